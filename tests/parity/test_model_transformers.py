"""Our decoder and loaders against transformers on the same weights.

- SmolLM2 GGUF: transformers loads the file itself (`from_pretrained(folder, gguf_file=...)`,
  dequantizing with the gguf package and un-permuting q/k) and we load it with `load_model`.
- Tiny random llama / mistral / qwen2 models written by transformers (`save_pretrained`,
  safetensors, single and sharded): our `load_model(folder, base_dtype="f32")`.
- KV-cache decoding and packed (doc_ids) rows against plain full forwards.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from family_cases import packed_documents  # noqa: E402
from loraforge.loader import load_model  # noqa: E402

pytestmark = pytest.mark.transformers

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:",
]
# fp32 on both sides, same dequantized weights: differences are summation-order rounding only.
SMOLLM2_TOL = 1e-3
TINY_TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- SmolLM2 GGUF ----------------------------------------------------------------------------------

def test_smollm2_gguf_logits_match_transformers(smollm2_f32, smollm2_transformers):
    ours, theirs = smollm2_f32.model, smollm2_transformers
    assert smollm2_f32.config.tie_word_embeddings and theirs.config.tie_word_embeddings
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2_f32.tokenizer.encode(prompt)])
        with torch.no_grad():
            a = ours(ids)
            b = theirs(ids).logits
        assert a.shape == b.shape == (1, ids.shape[1], 49152)
        worst = max(worst, _max_diff(a, b))
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    print(f"\nSmolLM2 GGUF vs transformers: max |logit diff| over {len(PROMPTS)} prompts = {worst:.3g}")
    assert worst < SMOLLM2_TOL


def test_smollm2_weights_equal_transformers_dequantization(smollm2_f32, smollm2_transformers):
    """Same names and values for every tensor (q/k un-permuted the way transformers does it)."""
    ours = dict(smollm2_f32.model.named_parameters())
    theirs = smollm2_transformers.state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: one tensor
    for name, p in ours.items():
        assert torch.equal(p, theirs[name]), name


def test_smollm2_batched_matches_single(smollm2_f32):
    """Two rows in one batch give the logits of each row alone."""
    model, tok = smollm2_f32.model, smollm2_f32.tokenizer
    rows = [tok.encode(p)[:10] for p in PROMPTS[:2]]
    assert all(len(r) == 10 for r in rows)
    ids = torch.tensor(rows)
    with torch.no_grad():
        batched = model(ids)
        single = torch.cat([model(ids[i:i + 1]) for i in range(2)])
    assert _max_diff(batched, single) < 1e-4


# --- tiny random HF models ---------------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
TINY_CASES = {
    "llama-untied": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama-mha": dict(arch="llama", num_key_value_heads=4),
    "llama-mqa-headdim": dict(arch="llama", num_key_value_heads=1, head_dim=32),
    "llama-bias": dict(arch="llama", attention_bias=True),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "llama-linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-sharded": dict(arch="llama", max_shard_size="60KB"),
    "mistral": dict(arch="mistral"),
    "mistral-window": dict(arch="mistral", sliding_window=7),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True),
    "qwen2-untied": dict(arch="qwen2", tie_word_embeddings=False),
}


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_hf_model_logits_match(tiny_hf_factory, case):
    kwargs = dict(TINY_CASES[case])
    hf_model, folder = tiny_hf_factory(**kwargs)
    if case == "llama-sharded":
        index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
        assert len(set(index["weight_map"].values())) > 2
    loaded = load_model(folder, base_dtype="f32")
    assert loaded.kind == "hf" and loaded.base_dtype == "f32"
    cfg = loaded.config
    assert cfg.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert (loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight) == cfg.tie_word_embeddings
    if case == "mistral-window":
        assert cfg.sliding_window == 7
    if "rope" in case:
        assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] in ("llama3", "linear")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=generator)  # longer than the rope/window limits
    with torch.no_grad():
        ours = loaded.model(ids)
    diff = _max_diff(ours, _hf_logits(hf_model, ids))
    assert diff < TINY_TOL, f"{case}: max |logit diff| {diff:.3g}"


def test_qwen2_sliding_window_layers_match(tiny_hf_factory):
    """Qwen2's use_sliding_window applies the window from layer max_window_layers on."""
    hf_model, folder = tiny_hf_factory("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    loaded = load_model(folder, base_dtype="f32")
    assert [loaded.config.layer_window(i) for i in range(3)] == [None, 5, 5]
    ids = torch.randint(0, 260, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = loaded.model(ids)
    assert _max_diff(ours, _hf_logits(hf_model, ids)) < TINY_TOL


# --- KV cache and packing (tiny models, compared with full forwards) ------------------------------

@pytest.mark.parametrize("case", ["llama-untied", "llama3-rope", "mistral-window", "qwen2-tied"])
def test_kv_cache_decoding_equals_full_forward(tiny_hf_factory, case):
    from loraforge.model import KVCache

    hf_model, folder = tiny_hf_factory(**TINY_CASES[case])
    model = load_model(folder, base_dtype="f32").model
    ids = torch.randint(0, 260, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch=2, max_len=32, device="cpu", dtype=torch.float32)
        prefill = 11
        steps = [model(ids[:, :prefill], cache=cache, start_pos=0)]
        pos = prefill
        # a chunk of several tokens continuing the cache, then one token at a time
        steps.append(model(ids[:, pos:pos + 4], cache=cache, start_pos=pos))
        pos += 4
        for p in range(pos, ids.shape[1]):
            steps.append(model(ids[:, p:p + 1], cache=cache, start_pos=p))
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    assert _max_diff(cached, full) < TINY_TOL
    assert _max_diff(full, _hf_logits(hf_model, ids)) < TINY_TOL


def test_kv_cache_matches_transformers_generate(tiny_hf_factory):
    """Greedy decoding with our cache picks the tokens transformers' generate picks."""
    from loraforge.model import KVCache

    hf_model, folder = tiny_hf_factory("llama", seed=4)
    model = load_model(folder, base_dtype="f32").model
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, 8:].tolist()
        cache = KVCache(model.config, batch=1, max_len=20, device="cpu", dtype=torch.float32)
        logits = model(prompt, cache=cache)
        got, pos = [], 8
        for _ in range(12):
            nxt = int(logits[0, -1].argmax())
            got.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache=cache, start_pos=pos)
            pos += 1
    assert got == expected


@pytest.mark.parametrize("case", ["llama-untied", "llama3-rope", "qwen2-tied", "mistral-window"])
def test_packed_doc_ids_equal_separate_forwards(tiny_hf_factory, case):
    hf_model, folder = tiny_hf_factory(**TINY_CASES[case])
    model = load_model(folder, base_dtype="f32").model
    docs, ids, doc_ids = packed_documents(260)
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        for b, row in enumerate(docs):
            start = 0
            for d in row:
                alone = model(d[None])
                theirs = _hf_logits(hf_model, d[None])
                assert _max_diff(packed[b:b + 1, start:start + len(d)], alone) < TINY_TOL
                assert _max_diff(alone, theirs) < TINY_TOL
                start += len(d)


def test_packed_loss_equals_mean_of_separate_losses(tiny_hf_factory):
    """CausalLM.loss over a packed row equals transformers' token-weighted loss of the documents."""
    import torch.nn.functional as F

    hf_model, folder = tiny_hf_factory("llama")
    model = load_model(folder, base_dtype="f32").model
    gen = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, 260, (n,), generator=gen) for n in (6, 11, 7)]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), j) for j, d in enumerate(docs)])[None]
    labels = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs])[None]
    with torch.no_grad():
        loss, n = model.loss(ids, labels, doc_ids=doc_ids, chunk_tokens=5)
        total, count = 0.0, 0
        for d in docs:
            logits = _hf_logits(hf_model, d[None])[0, :-1]
            total += F.cross_entropy(logits, d[1:], reduction="sum").item()
            count += len(d) - 1
    assert n == count
    assert abs(loss.item() - total / count) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(tiny_hf_factory):
    """Recomputing layers in backward (masks, rope and a sliding window passed through) changes nothing."""
    _, folder = tiny_hf_factory(**TINY_CASES["mistral-window"])
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 260, (2, 20), generator=gen)
    doc_ids = torch.tensor([[0] * 12 + [1] * 8, [0] * 20])
    grads = []
    for checkpointing in (False, True):
        model = load_model(folder, base_dtype="f32").model
        model.requires_grad_(True).train()
        model.gradient_checkpointing = checkpointing
        loss, _ = model.loss(ids, ids.roll(-1, dims=1), doc_ids=doc_ids)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
