"""Architecture numbers of a llama-family model, from GGUF metadata or an HF config.json.

One `ModelConfig` drives `model.py`; field names follow Hugging Face's config.json so
HF folders and GGUF metadata map through `config_sources` (which imports this module, not the reverse).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from loraforge.errors import LoraforgeError

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass
class ModelConfig:
    """Numbers of a llama-family decoder (HF config.json names) and the switches of each family.

    The switches say what the decoder does, not which family it is: `model.py` branches on them
    only. `config_sources.py` sets them from config.json or GGUF metadata.
    """

    arch: str = "llama"  # GGUF architecture name: llama mistral qwen2 qwen3 gemma2 gemma3 phi3 baichuan
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear"|"longrope", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # output projection bias (Llama with attention_bias)
    sliding_window: int | None = None  # keys within the last `sliding_window` positions (Mistral v0.1)
    layer_types: list[str] | None = None  # per layer "full_attention"|"sliding_attention"; None = all
    hidden_act: str = "silu"  # MLP gate activation: "silu" | "gelu_pytorch_tanh" (Gemma)
    qk_norm: bool = False  # RMSNorm of each q and k head before RoPE (self_attn.q_norm / k_norm)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1.0 for Gemma
    post_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2/3 "sandwich")
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size), rounded to their dtype (Gemma)
    attn_logit_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar ** -0.5; None: head_dim
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers, unscaled (Gemma 3)
    rotary_dim: int = 0  # leading dims of each head that RoPE turns; 0 = head_dim (partial rotary)
    fused_qkv: str | None = None  # one module with q, k, v rows stacked: "qkv_proj" (Phi-3) | "W_pack"
    fused_gate_up: bool = False  # one mlp.gate_up_proj with gate rows, then up rows (Phi-3)
    alibi: bool = False  # ALiBi attention biases instead of RoPE (Baichuan 2 13B)
    norm_head: bool = False  # lm_head rows L2-normalised when loaded from an HF folder (Baichuan 2)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rotary_dim == 0:
            self.rotary_dim = self.head_dim
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, key) <= 0:
                raise LoraforgeError(f"model config: {key} must be positive, got {getattr(self, key)}")
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise LoraforgeError(f"model config: rotary dimension {self.rotary_dim} must be even and at most "
                                 f"head_dim {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise LoraforgeError(f"model config: sliding_window must be positive, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {
                    "full_attention", "sliding_attention"}:
                raise LoraforgeError(f"model config: layer_types must give full_attention/sliding_attention "
                                     f"for each of the {self.num_hidden_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LoraforgeError(
                f"model config: {self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads")
        if self.hidden_act not in ACTIVATIONS:
            raise LoraforgeError(f"model config: activation {self.hidden_act!r} is not supported "
                                 f"({', '.join(ACTIVATIONS)})")
        if self.fused_qkv not in (None, "qkv_proj", "W_pack"):
            raise LoraforgeError(f"model config: unknown fused q/k/v module {self.fused_qkv!r}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding attention window of a layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> str:
        """Which RoPE table a layer uses: "local" (sliding layers with their own base) or "global"."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return "local"
        return "global"

    def attention_scale(self) -> float:
        """The factor on q.k scores (1/sqrt(head_dim) unless query_pre_attn_scalar says otherwise)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def n_matmul_params(self) -> int:
        """Parameters that take part in matmuls per token (decoder linears + LM head)."""
        h, f = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * f
        return self.num_hidden_layers * per_layer + h * self.vocab_size

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def rope_inv_freq(cfg: ModelConfig, kind: str = "global") -> "torch.Tensor":  # noqa: F821
    """Inverse frequencies (rotary_dim/2,) float32 of one RoPE table.

    kind "global": rope_theta with the config's scaling (llama3, linear, or LongRoPE's short
    factors); "local": rope_local_theta, unscaled (Gemma 3's sliding layers); "long": LongRoPE's
    long factors, used when a sequence runs past original_max_position_embeddings.
    """
    import torch

    dim = cfg.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "local":
        return (1.0 / (cfg.rope_local_theta ** exponents)).float()
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    rope_freqs = cfg.extra.get("rope_freqs")
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if kind == "long" and rope_type != "longrope":
        raise LoraforgeError("internal: a long RoPE table exists for LongRoPE only")
    if rope_freqs is not None:  # GGUF: per-frequency divisors already computed (llama3)
        inv_freq = inv_freq / torch.as_tensor(rope_freqs, dtype=torch.float32)
    elif rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif rope_type == "longrope":  # 1 / (factor_i * theta^(2i/d)), as transformers and llama.cpp
        factors = scaling["long_factor" if kind == "long" else "short_factor"]
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * cfg.rope_theta ** exponents)
    elif rope_type not in (None, "default"):
        raise LoraforgeError(f"rope scaling type {rope_type!r} is not supported")
    return inv_freq.float()


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor on RoPE's cos/sin (LongRoPE's attention factor; 1 otherwise)."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "longrope":
        return float(scaling["attention_factor"])
    return 1.0


def longrope_threshold(cfg: ModelConfig) -> int | None:
    """Sequences longer than this use LongRoPE's long factors; None without LongRoPE."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "longrope":
        return int(scaling["original_max_position_embeddings"])
    return None
