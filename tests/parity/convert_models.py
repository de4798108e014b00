"""Helpers for the convert / HF-adapter parity tests: llama.cpp logits of a GGUF, token sequences, a
brief training run that gives a tiny random model clear next-token margins, and ggml's GELU."""

from __future__ import annotations

import math

import numpy as np
import torch

GGML_TYPE_F32 = 0
N_POS = 256


def llama_logits(path: str, tokens: list[int]) -> np.ndarray:
    """llama.cpp's (len(tokens), vocab) logits of a GGUF model (f32 KV cache, one batch)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_POS, n_batch=N_POS, n_ubatch=N_POS, logits_all=True,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=2, flash_attn=False, verbose=False)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


def tokens_for(vocab: int, n: int = N_POS, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cycle_tokens(vocab: int, n: int, start: int = 0) -> list[int]:
    """A fixed random cycle through the vocabulary: token t is followed by NEXT[t]."""
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(7)).tolist()
    nxt = {a: b for a, b in zip(order, order[1:] + order[:1])}
    out = [order[start % vocab]]
    while len(out) < n:
        out.append(nxt[out[-1]])
    return out


def train_on_cycle(model, steps: int = 25) -> None:
    """A few Adam steps on `cycle_tokens`, so the model's next-token choices have clear margins (a random
    model's logits are near-uniform and their top-1 flips under any rounding, q8_0 in transformers too)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    vocab = model.config.vocab_size
    batch = torch.tensor([cycle_tokens(vocab, 64, start=s) for s in range(0, vocab, vocab // 8)][:8])
    model.train()
    for _ in range(steps):
        out = model(batch)  # transformers' output, or the logits of an in-test reference model
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU as ggml's CPU backend computes it in float32: the tanh form evaluated at the float16-rounded
    input, the result rounded to float16 (its lookup table, GGML_GELU_FP16 in ggml-cpu/vec.h); identity /
    zero beyond +-10."""
    h = x.half().float()
    y = (0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * h * (1.0 + 0.044715 * h * h)))).half().float()
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


