"""SmolLM2 with its base weights kept as ggml blocks (`base_dtype="quantized"`): the same logits as
the dequantized float32 model, and a fraction of its memory (each load measured in a fresh process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import loraforge
from loraforge.loader import load_model
from loraforge.quant.linear import QuantEmbedding, QuantLinear

PROMPTS = ["The quick brown fox jumps over the lazy dog.",
           "To be, or not to be, that is the question: whether 'tis nobler in the mind"]


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_path):
    return load_model(smollm2_path, base_dtype="quantized")


def test_quantized_modules_hold_the_file_blocks(smollm2_quantized):
    model = smollm2_quantized.model
    assert smollm2_quantized.base_dtype == "quantized"
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 30 * 7 + 1  # every projection, and the tied LM head over token_embd
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.lm_head.q.data_ptr() == model.model.embed_tokens.q.data_ptr()  # tied: one storage
    dense = [n for n, p in model.named_parameters() if p.ndim > 1]
    assert dense == []  # no float matrix anywhere
    # int8 values (1 byte per weight) and float16 group factors (Q4_1: scale and offset per 32 weights,
    # Q8_0: a scale)
    resident = sum(m.resident_bytes() for m in linears if m is not model.lm_head)
    resident += model.model.embed_tokens.resident_bytes()
    n_weights = sum(m.n_rows * m.n_cols for m in linears if m is not model.lm_head)
    n_weights += model.model.embed_tokens.n_rows * model.model.embed_tokens.n_cols
    assert 1.0 * n_weights < resident <= 1.125 * n_weights  # a float32 copy would take 4 bytes per weight


def test_quantized_logits_equal_dequantized(smollm2_quantized, smollm2_f32):
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2_f32.tokenizer.encode(prompt)])
        with torch.no_grad():
            dense = smollm2_f32.model(ids)
            quant = smollm2_quantized.model(ids)
        worst = max(worst, (dense - quant).abs().max().item())
    print(f"\nquantized vs dequantized f32 SmolLM2: max |logit diff| = {worst:.3g}")
    assert worst < 1e-4


def test_quantized_input_gradients_equal_dequantized(smollm2_quantized, smollm2_f32):
    """Backward through the frozen quantized base gives the dense model's input gradients."""
    ids = torch.tensor([smollm2_f32.tokenizer.encode(PROMPTS[0])])
    grads = []
    for loaded in (smollm2_f32, smollm2_quantized):
        emb = loaded.model.model.embed_tokens(ids).detach().requires_grad_(True)
        layer = loaded.model.model.layers[0]
        ropes = loaded.model.rope(torch.arange(ids.shape[1])[None], emb.dtype)  # {"global": (cos, sin)}
        out = layer(emb, ropes, {None: None}, None, 0)
        out.square().sum().backward()
        grads.append(emb.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


_MEASURE = r"""
import json, resource, sys
def peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import torch
import loraforge.formats.gguf, loraforge.quant.linear, loraforge.tokenizer
from loraforge.loader import load_model
before = peak()
loaded = load_model(sys.argv[1], base_dtype=sys.argv[2])
print(json.dumps({"before": before, "after": peak()}))
"""


def _peak_rss(path: str, base_dtype: str) -> dict[str, int]:
    src = os.path.dirname(os.path.dirname(loraforge.__file__))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _MEASURE, path, base_dtype], capture_output=True, text=True,
                         env=env, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantized_load_peak_memory_far_below_dense(smollm2_path):
    dense = _peak_rss(smollm2_path, "f32")
    quant = _peak_rss(smollm2_path, "quantized")
    mib = 1 << 20
    print(f"\npeak RSS loading SmolLM2: f32 {dense['after'] / mib:.0f} MiB "
          f"(+{(dense['after'] - dense['before']) / mib:.0f} over imports), quantized {quant['after'] / mib:.0f} MiB "
          f"(+{(quant['after'] - quant['before']) / mib:.0f})")
    # The quantized base is held as int8 values + f16 group factors (~1.06 bytes per weight, all of it
    # resident after loading) against 4 bytes per weight in float32; tokenizer and buffers are common.
    assert quant["after"] - quant["before"] < 0.45 * (dense["after"] - dense["before"])
    assert quant["after"] < 0.6 * dense["after"]


@pytest.mark.parametrize("arch, qtype_name, tied", [("llama", "Q4_0", False), ("qwen2", "Q8_0", False),
                                                     ("llama", "Q5_1", True)])
def test_tiny_quantized_gguf_same_logits(tiny_hf_factory, gguf_writer, tmp_path, arch, qtype_name, tied):
    """Untied quantized LM head, Qwen2 q/k/v biases on quantized projections, tied quantized table."""
    import gguf

    hf_model, folder = tiny_hf_factory(arch, tie_word_embeddings=tied)
    config = json.loads(open(os.path.join(folder, "config.json"), encoding="utf-8").read())
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    path = gguf_writer(tmp_path / "q.gguf", config, tensors, qtype=int(gguf.GGMLQuantizationType[qtype_name]))
    dense = load_model(path, base_dtype="f32").model
    quant = load_model(path, base_dtype="quantized").model
    assert isinstance(quant.lm_head, QuantLinear) and isinstance(quant.model.embed_tokens, QuantEmbedding)
    q_proj = quant.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and (q_proj.bias is not None) == (arch == "qwen2")
    assert not isinstance(quant.model.layers[0].mlp.down_proj, QuantLinear)  # 112-wide rows stay float
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, ref = dense(ids), quant(ids), hf_model(ids).logits
    assert (a - b).abs().max().item() < 1e-5
    assert 1e-4 < (a - ref).abs().max().item() < 0.5  # really quantized, and still the same model


def test_quantized_greedy_decode_equals_dequantized(smollm2_quantized, smollm2_f32, monkeypatch):
    """Generation from the resident quantized weights (one token at a time through the int8 C
    kernel) picks the same 32 greedy tokens as the float32 model, with logits within 1e-3."""
    from loraforge.generate import KVSession, Sampler, generate_tokens
    from loraforge.quant import linear as quant_linear

    monkeypatch.setattr(quant_linear.fused_matvec, "enabled", True)
    ids = smollm2_f32.tokenizer.encode(PROMPTS[1])
    tokens = [list(generate_tokens(m.model, ids, 32, Sampler(temp=0.0), ctx_size=96))
              for m in (smollm2_f32, smollm2_quantized)]
    assert quant_linear.matvec.available() and quant_linear.fused_matvec.enabled  # no fallback to decoding
    assert tokens[0] == tokens[1] and len(tokens[0]) == 32
    sessions = [KVSession(m.model, 96) for m in (smollm2_f32, smollm2_quantized)]
    worst = 0.0
    for token in [None] + tokens[0][:4]:
        logits = [s.feed(ids) if token is None else s.step(token) for s in sessions]
        worst = max(worst, (logits[0] - logits[1]).abs().max().item())
    print(f"\ngreedy decode, quantized vs f32 SmolLM2: same 32 tokens, max |logit diff| {worst:.2e}")
    assert worst < 1e-3
