"""Our decoder against llama.cpp (llama-cpp-python) on the same GGUF files.

1. Tiny float32 GGUF files written here from random transformers models (llama untied/tied,
   llama3 rope factors in rope_freqs.weight, qwen2 with biases and NEOX rope): with float
   weights llama.cpp runs its matmuls in f32, so logits must agree to float rounding. This pins
   the q/k row permutation, the rope layouts and the tied LM head against the real client.
2. SmolLM2-135M Q4_1 over a few hundred tokens of Shakespeare: next-token logits compared.
   Here llama.cpp does NOT compute what we compute: for a Q4_1 (and Q8_0) matmul it first
   quantizes the activations to 8 bits in blocks of 32 (Q8_1 / Q8_0) and runs an integer dot
   product, while we multiply float32 activations with the dequantized weights (as transformers
   does). So the bound is looser, and the test shows that this quantization explains the gap:
   the same rounding applied to our own activations moves our logits about as far.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from loraforge.loader import load_model  # noqa: E402

pytestmark = pytest.mark.llamacpp

N_SHAKESPEARE_TOKENS = 256
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
TINY_GGUF_CASES = {
    "llama-untied": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama3-rope-freqs": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=True),
}


def llama_cpp_logits(path: str, ids: list[int], n_ctx: int = 512) -> np.ndarray:
    """Logits (T, V) of llama.cpp for every position of `ids`, f32 KV cache, no flash attention."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=2, type_k=0, type_v=0, flash_attn=False, verbose=False)  # 0 = GGML_TYPE_F32
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("case", list(TINY_GGUF_CASES))
def test_tiny_f32_gguf_logits_match_llamacpp(tiny_hf_factory, gguf_writer, tmp_path, case):
    hf_model, folder = tiny_hf_factory(**TINY_GGUF_CASES[case])
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    rope_freqs = None
    if case == "llama3-rope-freqs":  # llama.cpp's form: per-frequency divisors of the plain inverse frequencies
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        scaled = hf_model.model.rotary_emb.inv_freq.float()
        rope_freqs = (plain / scaled).numpy()
        assert rope_freqs.max() > 7.9  # the low frequencies really are scaled by the factor 8
    path = gguf_writer(tmp_path / f"{case}.gguf", config, tensors, rope_freqs=rope_freqs)

    loaded = load_model(path, base_dtype="f32")
    assert loaded.kind == "gguf" and loaded.config.tie_word_embeddings == bool(config.get("tie_word_embeddings"))
    ids = torch.randint(0, 259, (48,), generator=torch.Generator().manual_seed(11))  # past the rope limit of 16
    with torch.no_grad():
        ours = loaded.model(ids[None])[0].numpy()
        theirs_hf = hf_model(ids[None]).logits[0].numpy()
    reference = llama_cpp_logits(path, ids.tolist(), n_ctx=64)
    diff = float(np.abs(ours - reference).max())
    assert diff < 1e-4, f"{case}: max |logit diff| vs llama.cpp {diff:.3g}"
    assert float(np.abs(ours - theirs_hf).max()) < 1e-5


@pytest.fixture(scope="module")
def shakespeare_ids(smollm2_f32, shakespeare_text) -> list[int]:
    ids = smollm2_f32.tokenizer.encode(shakespeare_text[:4000])[:N_SHAKESPEARE_TOKENS]
    assert len(ids) == N_SHAKESPEARE_TOKENS
    return ids


def _quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """What llama.cpp does to a matmul's float input for Q4_1/Q8_0 weights: blocks of 32 values,
    scale d = max|x| / 127 kept as float16, values rounded to integers in [-127, 127]."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
    return (q * d.half().float()).reshape(x.shape)


def test_smollm2_q4_1_next_token_logits_match_llamacpp(smollm2_path, smollm2_f32, shakespeare_ids):
    model = smollm2_f32.model
    ids = torch.tensor([shakespeare_ids])
    reference = llama_cpp_logits(smollm2_path, shakespeare_ids)
    with torch.no_grad():
        ours = model(ids)[0].numpy()
        hooks = [m.register_forward_pre_hook(lambda _m, args: (_quantize_activations_q8(args[0]),))
                 for m in model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            ours_q8 = model(ids)[0].numpy()
        finally:
            for h in hooks:
                h.remove()

    gap = np.abs(ours - reference)
    top1 = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    q8_shift = float(np.abs(ours_q8 - ours).mean())
    scale = float(np.abs(reference - reference.mean(-1, keepdims=True)).mean())
    print(f"\nSmolLM2 Q4_1 vs llama.cpp over {len(shakespeare_ids)} Shakespeare tokens: top-1 agreement "
          f"{top1:.3f}, mean |logit diff| {gap.mean():.3f} (max {gap.max():.2f}; mean |logit - row mean| "
          f"{scale:.2f}); 8-bit activation rounding alone moves our logits by {q8_shift:.3f} on average")
    assert top1 >= 0.9
    assert gap.mean() < 0.4
    # the gap is of the size that activation quantization explains, no more
    assert gap.mean() < 1.5 * q8_shift
    # and it is small next to the logits' own spread
    assert gap.mean() < 0.1 * scale
