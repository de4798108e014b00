"""The speed levers keep training what it was: stacked q/k/v and gate/up projections, the compiled
decoder layer, flex attention for packed rows, the fused LM head + cross-entropy and oneDNN matmuls
give the losses and adapters of the plain eager model, to float32 tolerance."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from loraforge import compiled
from loraforge.kernels import cpu_linear
from loraforge.loader import load_model
from loraforge.lora import LoraConfig, adapter_tensors, inject
from loraforge.model import IGNORE_INDEX, attention_mask, chunked_cross_entropy, document_block_mask

STEPS = 5


@pytest.fixture(scope="module")
def tiny_q8_gguf(tiny_hf_factory, gguf_writer, tmp_path_factory) -> str:
    """The tiny llama as a Q8_0 GGUF: q/k/v and gate/up quantized (down_proj's 112-wide rows stay float)."""
    import gguf

    hf_model, folder = tiny_hf_factory("llama")
    config = json.loads(open(os.path.join(folder, "config.json"), encoding="utf-8").read())
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    return gguf_writer(tmp_path_factory.mktemp("q8") / "tiny-q8.gguf", config, tensors,
                       qtype=int(gguf.GGMLQuantizationType.Q8_0))


def packed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 packed rows of 24 tokens, three documents in each row: ids, labels, doc_ids."""
    g = torch.Generator().manual_seed(1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 11 + [2] * 6, [0] * 12 + [1] * 3 + [2] * 9])
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = torch.randint(0, vocab, (2, 24), generator=g)
    labels[:, ::5] = IGNORE_INDEX
    return ids, labels, doc_ids


def train(path: str, base_dtype: str, stack: bool, compile_layers: bool, steps: int = STEPS,
          backend: str | None = None, dropout: float = 0.0):
    """Losses and adapter tensors of `steps` SGD steps of a rank-4 all-linear LoRA learning one packed
    batch (SGD: the updates are the gradients, so the comparison is not blurred by Adam's normalisation
    of near-zero gradients). backend: force the CPU matmul backend ("aten": torch's own matmuls)."""
    cpu_linear.set_backend(backend)
    try:
        return _train(path, base_dtype, stack, compile_layers, steps, dropout)
    finally:
        cpu_linear.set_backend(None)


def _train(path: str, base_dtype: str, stack: bool, compile_layers: bool, steps: int, dropout: float):
    model = load_model(path, base_dtype).model
    torch.manual_seed(0)
    inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=dropout))
    with torch.no_grad():  # B != 0 from the start, so every adapter path carries signal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.stack_projections = stack
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    batch = packed_batch(model.config.vocab_size)
    if compile_layers:
        compiled.enable(model, on_failure=pytest.fail)
        seconds, active = compiled.probe(model, lambda: model.loss(*batch)[0].backward())
        assert active
    losses = []
    torch.manual_seed(1)  # the dropout masks of the steps
    for ids, labels, doc_ids in [batch] * steps:
        loss, _ = model.loss(ids, labels, doc_ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, adapter_tensors(model), model


def max_diffs(a, b) -> tuple[float, float]:
    loss = max(abs(x - y) for x, y in zip(a[0], b[0]))
    adapter = max((a[1][k] - b[1][k]).abs().max().item() for k in a[1])
    return loss, adapter


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["f32", "quantized"])
def test_stacked_and_compiled_training_match_eager(tiny_llama_folder, tiny_q8_gguf, base_dtype):
    """5 steps on packed rows: torch's own matmuls, separate projections, eager layers (the reference)
    against oneDNN matmuls with stacked projections, eagerly and in compiled layers; then the trained compiled model's logits without
    gradients, where packed rows go through flex attention (torch's CPU flex attention has no backward,
    so CPU training keeps the dense mask), against its eager logits."""
    path = tiny_llama_folder if base_dtype == "f32" else tiny_q8_gguf
    reference = train(path, base_dtype, stack=False, compile_layers=False, backend="aten")
    stacked = train(path, base_dtype, stack=True, compile_layers=False)
    fast = train(path, base_dtype, stack=True, compile_layers=True)
    attn = stacked[2].model.layers[0].self_attn
    assert attn.stacked_qkv is not None and reference[2].model.layers[0].self_attn.stacked_qkv is None
    assert set(stacked[1]) == set(reference[1])  # adapters stay per projection, under HF names
    assert any(k.endswith("self_attn.k_proj.lora_A") for k in stacked[1])
    for name, run in (("stacked", stacked), ("stacked+compiled", fast)):
        loss_diff, adapter_diff = max_diffs(reference, run)
        print(f"\n{base_dtype} {name} vs eager over {STEPS} steps: max |loss diff| {loss_diff:.2e}, "
              f"max |adapter diff| {adapter_diff:.2e} (loss {reference[0][0]:.4f} -> {reference[0][-1]:.4f})")
        assert loss_diff < 2e-5 and adapter_diff < 2e-5
    assert reference[0][-1] < reference[0][0] - 0.05  # it trained
    model = fast[2]
    model.eval()
    ids, _, doc_ids = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        flex = model(ids, doc_ids=doc_ids)
        layer_compiler, model.compiled_layer = model.compiled_layer, None
        eager = model(ids, doc_ids=doc_ids)
    assert layer_compiler.active
    print(f"{base_dtype} compiled flex attention vs eager, packed rows: max |logit diff| "
          f"{(flex - eager).abs().max().item():.2e}")
    torch.testing.assert_close(flex, eager, rtol=1e-4, atol=1e-4)



@pytest.mark.slow
def test_compiled_dropout_draws_the_eager_masks(tiny_llama_folder):
    """With LoRA dropout, compiled layers draw the same masks from torch's generator as eager ones (a
    seed means the same run in both modes): losses and adapters agree to float tolerance."""
    eager = train(tiny_llama_folder, "f32", stack=True, compile_layers=False, dropout=0.3)
    fast = train(tiny_llama_folder, "f32", stack=True, compile_layers=True, dropout=0.3)
    loss_diff, adapter_diff = max_diffs(fast, eager)
    print(f"\nf32 compiled vs eager with LoRA dropout 0.3: max |loss diff| {loss_diff:.2e}, "
          f"max |adapter diff| {adapter_diff:.2e}")
    assert loss_diff < 2e-5 and adapter_diff < 2e-5


def test_stacked_weights_are_views_of_one_tensor(tiny_llama_folder):
    model = load_model(tiny_llama_folder, "f32").model
    names = list(model.state_dict())
    inject(model, LoraConfig(r=4, alpha=4))
    ids = torch.randint(0, 260, (1, 8))
    with torch.no_grad():
        before = model(ids)
    attn = model.model.layers[1].self_attn
    stack = attn.stacked_qkv
    assert stack is not None and model.model.layers[1].mlp.stacked_gate_up is not None
    q, k, v = (m.base.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert q.data_ptr() == stack.weight.data_ptr()
    assert k.data_ptr() == stack.weight.data_ptr() + q.numel() * 4 and v.data_ptr() == k.data_ptr() + k.numel() * 4
    assert [n.replace(".base.", ".") for n in model.state_dict() if "lora_" not in n] == names
    # a weight replaced from outside (load_state_dict(assign=True)) is seen at the next forward
    new_q = torch.randn_like(q)
    model.load_state_dict({"model.layers.1.self_attn.q_proj.base.weight": new_q}, strict=False, assign=True)
    with torch.no_grad():
        after = model(ids)
        model.stack_projections = False
        separate = model(ids)
    assert attn.stacked_qkv is None and not torch.equal(before, after)
    torch.testing.assert_close(after, separate, rtol=1e-5, atol=1e-5)


def test_layer_compiles_without_graph_breaks(tiny_llama_folder, tiny_q8_gguf):
    """The decoder layer is one graph for dynamo: dense and quantized bases, stacked projections,
    LoRA, and flex attention over a packed-rows block mask."""
    for path, base_dtype in ((tiny_llama_folder, "f32"), (tiny_q8_gguf, "quantized")):
        model = load_model(path, base_dtype).model
        inject(model, LoraConfig(r=4, alpha=4))
        model.train()
        model.refresh_stacks()
        assert model.model.layers[1].self_attn.stacked_qkv is not None
        _, labels, doc_ids = packed_batch(260)
        x = torch.randn(2, 24, 64, requires_grad=True)
        ropes = model.rope(torch.arange(24).expand(2, 24), x.dtype)
        dense, blocks = attention_mask(24, 0, doc_ids, None, x.device), document_block_mask(doc_ids, None)
        for masks, grad in (({None: None}, True), ({None: dense}, True), ({None: blocks}, False)):
            with torch.set_grad_enabled(grad):  # (CPU flex attention: forward only)
                explained = torch._dynamo.explain(compiled._layer_forward)(model.model.layers[1], x, ropes, masks)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert explained.graph_count == 1


@pytest.mark.parametrize("window", [None, 5])
def test_flex_block_mask_attends_like_the_dense_mask(window):
    """Packed rows: flex attention over the block mask == SDPA over the dense per-document mask."""
    from torch.nn.attention.flex_attention import flex_attention

    doc_ids = torch.tensor([[0] * 9 + [1] * 20 + [2] * 3, [5] * 32])
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 32, 8), torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8)
    dense = attention_mask(32, 0, doc_ids, window, torch.device("cpu"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention outside torch.compile: the unfused reference path
        got = flex_attention(q, k, v, block_mask=document_block_mask(doc_ids, window), enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_head_cross_entropy_matches_torch():
    """Loss and gradients (hidden states and a trainable head parameter) of the fused LM head +
    cross-entropy equal F.cross_entropy over the full logits; chunked or not; soft-capped head."""
    torch.manual_seed(0)
    n, c, vocab = 37, 16, 50
    weight, extra = torch.randn(vocab, c), torch.randn(3, c)
    labels = torch.randint(0, vocab, (n,))
    labels[[3, 9]] = IGNORE_INDEX
    for capped in (False, True):
        def head(x, a):
            out = x @ weight.t() + (x @ a.t()) @ torch.ones(3, vocab) * 0.1
            return torch.tanh(out / 30.0) * 30.0 if capped else out

        for chunk in (5, None):
            h = torch.randn(n, c, requires_grad=True)
            a = extra.clone().requires_grad_()
            loss, count = chunked_cross_entropy(h, labels, lambda x: head(x, a), chunk, (a,), vocab)
            (2 * loss).backward()
            h_ref, a_ref = h.detach().clone().requires_grad_(), extra.clone().requires_grad_()
            ref = F.cross_entropy(head(h_ref, a_ref), labels, ignore_index=IGNORE_INDEX)
            (2 * ref).backward()
            assert count == n - 2
            torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                    reason="torch built without oneDNN")
def test_onednn_linear_equals_torch_linear(monkeypatch):
    """The oneDNN path of frozen float32 linears: the same values and input gradients as F.linear."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    results = []
    for backend in ("onednn", "aten"):
        monkeypatch.setattr(cpu_linear, "_override", [backend])
        x = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = cpu_linear.frozen_linear(x, w, b)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


def test_compile_failure_falls_back_with_one_warning(tiny_llama_folder):
    model = load_model(tiny_llama_folder, "f32").model
    ids = torch.randint(0, 260, (1, 8))
    with torch.no_grad():
        expected = model(ids)
    messages = []
    layer_compiler = compiled.enable(model, on_failure=messages.append)

    def broken(*args):
        raise RuntimeError("no C++ compiler\nsecond line")

    layer_compiler.fn = broken
    with torch.no_grad():
        got = model(ids)
        again = model(ids)
    assert messages == ["torch.compile failed (RuntimeError: no C++ compiler); the decoder layers run eagerly"]
    assert not layer_compiler.active
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_compile_modes():
    assert compiled.wanted("on", "cpu", 1) and not compiled.wanted("off", "cuda", 10**6)
    assert compiled.wanted("auto", "cuda", 1) and not compiled.wanted("auto", "cuda", 1, distributed=True)
    assert not compiled.wanted("auto", "cpu", compiled.AUTO_MIN_CPU_STEPS - 1)
    assert compiled.wanted("auto", "cpu", compiled.AUTO_MIN_CPU_STEPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_training_matches_eager_on_cuda(tiny_llama_folder):
    """On CUDA (Triton kernels, flex attention): stacked + compiled == eager, float32."""
    def run(fast: bool):
        model = load_model(tiny_llama_folder, "f32", device="cuda").model
        torch.manual_seed(0)
        inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        model.stack_projections = fast
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        if fast:
            compiled.enable(model, on_failure=pytest.fail)
        losses = []
        for ids, labels, doc_ids in [packed_batch(260)] * STEPS:
            loss, _ = model.loss(ids.cuda(), labels.cuda(), doc_ids.cuda())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, {k: v.cpu() for k, v in adapter_tensors(model).items()}, model

    loss_diff, adapter_diff = max_diffs(run(False), run(True))
    assert loss_diff < 1e-4 and adapter_diff < 1e-4
