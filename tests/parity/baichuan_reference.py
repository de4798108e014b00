"""A reference Baichuan 2 for the parity tests, written here from the equations of Baichuan 2's
published modeling_baichuan.py (transformers runs it only as remote code, so it is not in the
library): W_pack (q, k, v rows stacked), RMSNorm, RoPE with base 10000 for the 7B layout, ALiBi
biases (slope * key position, `_get_interleave` slopes) for the 13B layout, SwiGLU MLP, and the
NormHead output layer (rows L2-normalised before the product).

`make_tiny_baichuan` writes the HF folder our loader reads (config.json as Baichuan 2 ships it,
model.safetensors, the tiny tokenizer); `BaichuanReference` is the same model as an nn.Module whose
module names are Baichuan's, so peft can put adapters on it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

# The 7B layout (RoPE) is the 32-layer one, the 13B layout (ALiBi) the 40-layer one: llama.cpp and
# loraforge tell them apart by layer count.
ROPE_LAYERS, ALIBI_LAYERS = 32, 40


def baichuan_config(n_layers: int, n_heads: int = 4, hidden: int = 32, vocab: int = 260) -> dict[str, Any]:
    """A config.json in Baichuan 2's form (no head_dim, no kv heads, no rope keys)."""
    return {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": 2 * hidden + 8, "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "model_max_length": 512, "tie_word_embeddings": False, "bos_token_id": 257, "eos_token_id": 258,
            "torch_dtype": "float32"}


def _interleave(n: int) -> list[float]:
    """Baichuan 13B's ALiBi slopes (modeling_baichuan._get_interleave)."""
    def power_of_2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _interleave(2 * closest)[0::2][: n - closest]


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.epsilon))


class _Attention(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.hidden, self.heads = c["hidden_size"], c["num_attention_heads"]
        self.W_pack = nn.Linear(self.hidden, 3 * self.hidden, bias=False)
        self.o_proj = nn.Linear(self.hidden, self.hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.hidden // self.heads
        proj = self.W_pack(x).unflatten(-1, (3, self.hidden)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        q, k, v = (p.view(b, t, self.heads, d).transpose(1, 2) for p in proj)
        if rope is not None:
            cos, sin = rope

            def rotate_half(y: torch.Tensor) -> torch.Tensor:
                return torch.cat((-y[..., d // 2:], y[..., : d // 2]), dim=-1)

            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d) + bias
        weights = torch.max(weights, torch.tensor(torch.finfo(weights.dtype).min))
        out = torch.matmul(torch.softmax(weights, dim=-1), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.hidden))


class _MLP(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], c["hidden_size"], bias=False)
        self.up_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)
        self.input_layernorm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, rope, bias):
        x = x + self.self_attn(self.input_layernorm(x), rope, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class BaichuanReference(nn.Module):
    """Baichuan 2 (7B layout with RoPE unless the config has 40 layers: 13B layout with ALiBi)."""

    def __init__(self, c: dict[str, Any]) -> None:
        from transformers import PretrainedConfig

        super().__init__()
        self.hparams = c
        self.config = PretrainedConfig(**c)  # what peft's wrapper reads (model_type ...)
        self.model = _Body(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)  # NormHead's weight

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        """(peft's causal-LM wrapper asks for it; generation is not used here)"""
        return {"input_ids": input_ids}

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        c = self.hparams
        t = input_ids.shape[1]
        heads, d = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
        causal = torch.full((t, t), float("-inf")).triu(1)
        if c["num_hidden_layers"] == ALIBI_LAYERS:
            slopes = torch.tensor(_interleave(heads))
            bias = (causal[None] + slopes[:, None, None] * torch.arange(t)[None, None, :])[None]
            rope = None
        else:
            inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
            freqs = torch.outer(torch.arange(t).float(), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            rope, bias = (emb.cos()[None, None], emb.sin()[None, None]), causal[None, None]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, rope, bias)
        x = self.model.norm(x)
        return F.linear(x, F.normalize(self.lm_head.weight))


def make_tiny_baichuan(folder: str | os.PathLike, write_tokenizer: Callable[..., None], n_layers: int,
                       seed: int = 0, **config: Any) -> BaichuanReference:
    """A random BaichuanReference (float32, eval, visible norm weights) saved as an HF folder, with the
    tokenizer files `write_tokenizer(folder, vocab_size)` writes."""
    from safetensors.torch import save_file

    c = baichuan_config(n_layers, **config)
    torch.manual_seed(seed)
    model = BaichuanReference(c).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08 if p.ndim == 2 else 0.02)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0).add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(3.0)  # rows far from unit length: the NormHead shows
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(c), encoding="utf-8")
    write_tokenizer(folder, c["vocab_size"])
    return model
