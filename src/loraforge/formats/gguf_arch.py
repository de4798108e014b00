"""One table of the architectures loraforge writes as GGUF: llama.cpp's name for each Hugging Face
family, the metadata keys llama.cpp reads for it, and how its tensors are named and laid out.

Checked against llama.cpp's converter (convert_hf_to_gguf.py / conversion/llama.py, qwen.py) and
loader (src/llama-arch.cpp, src/llama-model.cpp):
- `LlamaForCausalLM` and `MistralForCausalLM` are both written as architecture "llama" (llama.cpp
  has no "mistral" text architecture), with q/k rows permuted into interleaved-rope order;
  `Qwen2ForCausalLM` is "qwen2" (NEOX rope, q/k as in HF, q/k/v biases).
- `{arch}.block_count`, `context_length`, `embedding_length`, `feed_forward_length`,
  `attention.head_count`, `attention.head_count_kv`, `rope.freq_base`,
  `attention.layer_norm_rms_epsilon`, `attention.key_length` / `value_length` (the head size);
  llama also writes `vocab_size` and `rope.dimension_count`.
- rope scaling: "linear" as `rope.scaling.type` + `rope.scaling.factor`; "llama3" as a
  `rope_freqs.weight` tensor of per-frequency divisors (head_dim/2,), F32.
- 1-D tensors (norms, biases) and `rope_freqs` stay F32; a tied model has no `output.weight`.

Adding a family is adding an `ArchSpec` entry below (and its tensor names to `names.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from loraforge.config import ModelConfig


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face family is written for llama.cpp."""

    gguf_arch: str  # llama.cpp's general.architecture
    permute_qk: bool  # q/k rows (and biases) into llama.cpp's interleaved-rope order
    writes_vocab_size: bool  # `{arch}.vocab_size` and `{arch}.rope.dimension_count`, as llama.cpp's converter does
    extra_keys: Callable[[ModelConfig], dict[str, Any]] | None = None  # family-specific keys (arch prefix added)


LLAMA = ArchSpec("llama", permute_qk=True, writes_vocab_size=True)
QWEN2 = ArchSpec("qwen2", permute_qk=False, writes_vocab_size=False)

# HF model_type (ModelConfig.arch) -> how llama.cpp stores it.
ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": QWEN2,
}


def arch_spec(hf_arch: str) -> ArchSpec:
    from loraforge.errors import LoraforgeError

    if hf_arch not in ARCH_SPECS:
        raise LoraforgeError(f"architecture {hf_arch!r} cannot be written as GGUF yet "
                             f"(supported: {', '.join(ARCH_SPECS)})")
    return ARCH_SPECS[hf_arch]


def llama_cpp_arch(name: str) -> str:
    """The `general.architecture` llama.cpp uses for a family name ("mistral" -> "llama")."""
    spec = ARCH_SPECS.get(name)
    return spec.gguf_arch if spec is not None else name


def same_arch(a: str, b: str) -> bool:
    """True when two architecture names load as the same llama.cpp architecture (mistral == llama)."""
    return llama_cpp_arch(a) == llama_cpp_arch(b)


def llama3_rope_divisors(cfg: ModelConfig) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` for llama3 rope scaling: the divisor of each inverse
    frequency, float32 (head_dim/2,); None for other rope types."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    dim = cfg.head_dim
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    divisors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


def arch_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """The `{arch}.*` keys llama.cpp reads for `cfg`, as {full key: python value}.

    Integers are written as UINT32 and floats as FLOAT32 (what llama.cpp's converter writes).
    """
    spec = arch_spec(cfg.arch)
    a = spec.gguf_arch
    keys: dict[str, Any] = {
        f"{a}.block_count": cfg.num_hidden_layers,
        f"{a}.context_length": cfg.max_position_embeddings,
        f"{a}.embedding_length": cfg.hidden_size,
        f"{a}.feed_forward_length": cfg.intermediate_size,
        f"{a}.attention.head_count": cfg.num_attention_heads,
        f"{a}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{a}.rope.freq_base": float(cfg.rope_theta),
        f"{a}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim,
    }
    if spec.writes_vocab_size:
        keys[f"{a}.vocab_size"] = cfg.vocab_size
        keys[f"{a}.rope.dimension_count"] = cfg.head_dim
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        keys[f"{a}.rope.scaling.type"] = "linear"
        keys[f"{a}.rope.scaling.factor"] = float(scaling["factor"])
    if spec.extra_keys is not None:
        keys.update({f"{a}.{k}": v for k, v in spec.extra_keys(cfg).items()})
    return keys
