"""How each Hugging Face family is written as a GGUF model for llama.cpp: its `general.architecture`,
the `{arch}.*` metadata llama.cpp reads for it, the extra tensors it wants, and how every HF tensor
lands in the file (name, stacked rows split, q/k rows permuted, norms + 1).

The per-family facts come from `names.py` (tensor names, `ArchFacts`: permuted q/k, norms + 1,
W_pack split, metadata key names) and `config_sources.py` (llama.cpp's fixed Gemma facts); this
module puts them together for the writer. Checked against llama.cpp's converter
(convert_hf_to_gguf.py and conversion/base.py, llama.py, qwen.py, gemma.py, phi.py, baichuan.py) and
loader (src/models/<arch>.cpp):

- llama, mistral -> "llama" (llama.cpp has no "mistral" text architecture): q/k rows permuted into
  interleaved-rope order, `vocab_size`, `rope.dimension_count` = head_dim (Mistral-Nemo's explicit
  one too, with `attention.key_length`); llama3 rope as a `rope_freqs.weight` tensor of divisors.
- qwen2, qwen3 -> "qwen2", "qwen3": NEOX rope, nothing permuted; Qwen3's q/k norms as attn_q_norm /
  attn_k_norm.
- gemma2 -> "gemma2": every norm holds 1 + w; `attn_logit_softcapping`, `final_logit_softcapping`,
  `attention.sliding_window`; no output.weight (llama.cpp always uses the token embeddings).
- gemma3 -> "gemma3": norms (q/k norms too) + 1; `final_logit_softcapping` when set,
  `attention.sliding_window`, `rope.freq_base_swa` (the sliding layers' base), linear scaling of the
  global layers' rope.
- phi3 -> "phi3": attn_qkv and ffn_up (gate rows, then up rows) stacked as in HF;
  `rope.dimension_count` (partial rotary), `rope.scaling.original_context_length`,
  `attention.sliding_window` (0: none; llama.cpp switches Phi-3's window off when reading);
  LongRoPE as `rope.scaling.attn_factor` and the `rope_factors_long/short.weight` tensors.
- baichuan -> "baichuan": W_pack split into attn_q/k/v, q/k permuted; `rope.dimension_count`,
  `tensor_data_layout`; llama.cpp picks RoPE (32 layers, 7B) or ALiBi (40 layers, 13B) by the
  layer count itself, and no position encoding for other counts (refused).
- every family: `block_count`, `context_length`, `embedding_length`, `feed_forward_length`,
  `attention.head_count(_kv)`, `rope.freq_base`, `attention.layer_norm_rms_epsilon`,
  `attention.key_length` / `value_length` (not for Phi-3 and Baichuan, whose converters leave them
  to llama.cpp's hidden / heads), linear rope scaling as `rope.scaling.type` + `rope.scaling.factor`.

Compared with llama.cpp's own converter on tiny models of every family here (same tensors, bytes
equal in f32): a few keys it leaves to llama.cpp's defaults are written with those same values
(`rope.freq_base` of Gemma 2 and Baichuan, Baichuan's `head_count_kv`); Phi-3 without LongRoPE gets
`original_context_length` = its context length, where llama.cpp's converter copies config.json's
original_max_position_embeddings (read only with LongRoPE's factors); no `general.size_label`.

Beyond llama.cpp's converter: a Gemma layer pattern other than llama.cpp's fixed period is written
as `attention.sliding_window_pattern` (one bool per layer, which llama.cpp reads); Baichuan 2's
NormHead is applied to the output rows (see convert.py). What llama.cpp cannot express is refused
before anything is written (`check_expressible`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from loraforge.config import ModelConfig
from loraforge.errors import file_error


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face family is written for llama.cpp (the other facts: `names.ArchFacts`)."""

    gguf_arch: str  # llama.cpp's general.architecture
    writes_vocab_size: bool = False  # `{arch}.vocab_size` (llama.cpp's LlamaModel converter)
    writes_rope_dims: bool = False  # `{arch}.rope.dimension_count` = the rotary dimensions
    writes_head_dim: bool = True  # `attention.key_length` / `value_length` (Phi-3's, Baichuan's converters: never)
    family_keys: Callable[[ModelConfig], dict[str, Any]] | None = None  # keys after "{arch}."


def _key(cfg: ModelConfig, hf_field: str) -> str:
    """The GGUF key (after "{arch}.") of an HF config.json field, from `names.ARCHES[...].gguf_keys`."""
    from loraforge.formats.names import ARCHES

    return ARCHES[cfg.arch].gguf_keys[hf_field]


def _sliding_pattern(cfg: ModelConfig) -> dict[str, Any]:
    """`attention.sliding_window_pattern` (one bool per layer) when the layers differ from llama.cpp's
    fixed period for the architecture; nothing otherwise (the file then reads as llama.cpp's default)."""
    from loraforge.config_sources import SWA_PERIODS, pattern_layer_types

    types = cfg.layer_types or ["sliding_attention"] * cfg.num_hidden_layers
    if types == pattern_layer_types(cfg.num_hidden_layers, SWA_PERIODS[cfg.arch]):
        return {}
    return {"attention.sliding_window_pattern": [t == "sliding_attention" for t in types]}


def _gemma2_keys(cfg: ModelConfig) -> dict[str, Any]:
    keys = {_key(cfg, "attn_logit_softcapping"): float(cfg.attn_logit_softcap),
            _key(cfg, "final_logit_softcapping"): float(cfg.final_logit_softcap),
            _key(cfg, "sliding_window"): int(cfg.sliding_window or 4096)}
    return {**keys, **_sliding_pattern(cfg)}


def _gemma3_keys(cfg: ModelConfig) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    if cfg.final_logit_softcap:
        keys[_key(cfg, "final_logit_softcapping")] = float(cfg.final_logit_softcap)
    if cfg.sliding_window is not None:
        keys[_key(cfg, "sliding_window")] = int(cfg.sliding_window)
        keys[_key(cfg, "rope_local_base_freq")] = float(cfg.rope_local_theta or 10000.0)
        keys.update(_sliding_pattern(cfg))
    return keys


def _phi3_keys(cfg: ModelConfig) -> dict[str, Any]:
    scaling = cfg.rope_scaling or {}
    keys: dict[str, Any] = {
        _key(cfg, "original_max_position_embeddings"): int(
            scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)),
        _key(cfg, "sliding_window"): int(cfg.sliding_window or 0),
    }
    if scaling.get("rope_type") == "longrope":  # (no rope.scaling.type: the factor tensors say it)
        keys[_key(cfg, "attention_factor")] = float(scaling["attention_factor"])
    return keys


def _baichuan_keys(cfg: ModelConfig) -> dict[str, Any]:
    return {"tensor_data_layout": "Meta AI original pth"}


LLAMA = ArchSpec("llama", writes_vocab_size=True, writes_rope_dims=True)

# HF model_type (ModelConfig.arch) -> how llama.cpp stores it.
ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3"),
    "gemma2": ArchSpec("gemma2", family_keys=_gemma2_keys),
    "gemma3": ArchSpec("gemma3", family_keys=_gemma3_keys),
    "phi3": ArchSpec("phi3", writes_rope_dims=True, writes_head_dim=False, family_keys=_phi3_keys),
    "baichuan": ArchSpec("baichuan", writes_rope_dims=True, writes_head_dim=False, family_keys=_baichuan_keys),
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


def check_expressible(cfg: ModelConfig, source: str) -> None:
    """Refuse (one line naming `source`) a model that llama.cpp would run differently from its HF
    config, because the GGUF format of its architecture has no way to say so."""
    arch_spec(cfg.arch)
    if cfg.arch in ("gemma2", "gemma3"):
        from loraforge.config_sources import gemma_query_scalar

        theirs = gemma_query_scalar(cfg.arch, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                    cfg.head_dim)
        if cfg.query_pre_attn_scalar is not None and float(cfg.query_pre_attn_scalar) != float(theirs):
            raise file_error(source, f"query_pre_attn_scalar {cfg.query_pre_attn_scalar:g}: llama.cpp scales "
                                     f"attention by 1/sqrt({theirs}) for a {cfg.num_hidden_layers}-layer "
                                     f"{cfg.arch} model and GGUF has no key to change it")
    from loraforge.formats.names import arch_facts

    if arch_facts(llama_cpp_arch(cfg.arch)).output_tied and not cfg.tie_word_embeddings:
        raise file_error(source, f"an untied {cfg.arch} model: llama.cpp's {cfg.arch} always uses the token "
                                 "embeddings as its output layer")
    if cfg.arch == "gemma2" and (cfg.attn_logit_softcap is None or cfg.final_logit_softcap is None):
        raise file_error(source, "gemma2 without attn_logit_softcapping / final_logit_softcapping: llama.cpp "
                                 "always soft-caps Gemma 2 (50 / 30 when the file says nothing)")
    if cfg.arch == "baichuan":
        from loraforge.config_sources import BAICHUAN_ALIBI_LAYERS, BAICHUAN_ROPE_LAYERS

        if cfg.num_hidden_layers not in (BAICHUAN_ROPE_LAYERS, BAICHUAN_ALIBI_LAYERS):
            raise file_error(source, f"a {cfg.num_hidden_layers}-layer Baichuan: llama.cpp applies RoPE to the "
                                     f"{BAICHUAN_ROPE_LAYERS}-layer model and ALiBi to the "
                                     f"{BAICHUAN_ALIBI_LAYERS}-layer one only, and no position encoding to any other")
    if cfg.arch == "gemma3" and cfg.attn_logit_softcap is not None:
        raise file_error(source, "gemma3 with attn_logit_softcapping: llama.cpp's Gemma 3 has no attention "
                                 "soft-capping")


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


def extra_tensors(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Tensors llama.cpp wants that no HF tensor holds, float32 1-D: llama3's `rope_freqs.weight`
    (head_dim/2,), LongRoPE's `rope_factors_long/short.weight` (rotary_dim/2,)."""
    out: dict[str, np.ndarray] = {}
    divisors = llama3_rope_divisors(cfg)
    if divisors is not None:
        out["rope_freqs.weight"] = divisors
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "longrope":
        out["rope_factors_long.weight"] = np.asarray(scaling["long_factor"], dtype=np.float32)
        out["rope_factors_short.weight"] = np.asarray(scaling["short_factor"], dtype=np.float32)
    return out


def arch_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """The `{arch}.*` keys llama.cpp reads for `cfg`, as {full key: python value}.

    Integers are written as UINT32, floats as FLOAT32, lists as arrays (what llama.cpp's converter
    writes).
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
    }
    if spec.writes_head_dim or cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        keys[f"{a}.attention.key_length"] = keys[f"{a}.attention.value_length"] = cfg.head_dim
    if spec.writes_vocab_size:
        keys[f"{a}.vocab_size"] = cfg.vocab_size
    if spec.writes_rope_dims:
        keys[f"{a}.rope.dimension_count"] = cfg.rotary_dim
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        keys[f"{a}.rope.scaling.type"] = "linear"
        keys[f"{a}.rope.scaling.factor"] = float(scaling["factor"])
    if spec.family_keys is not None:
        keys.update({f"{a}.{k}": v for k, v in spec.family_keys(cfg).items()})
    return keys


def add_metadata(writer: Any, keys: dict[str, Any]) -> None:
    """Add `arch_metadata`-style {key: value} to a gguf.GGUFWriter: lists as arrays, bools as BOOL, ints as
    UINT32, floats as FLOAT32, the rest as strings (the types llama.cpp's converter writes)."""
    for key, value in keys.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))


# -- tensors -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorLayout:
    """Where (part of) one HF tensor goes in llama.cpp's file of its architecture."""

    gguf_name: str
    rows: tuple[int, int] | None = None  # [start, stop) rows of the HF tensor (a part of a stacked W_pack)
    qk_heads: int | None = None  # permute the rows into interleaved-rope order by this many heads
    add_one: bool = False  # the file holds 1 + w (Gemma's x * (1 + w) norms)

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """The HF tensor's `values` (rows, ...) as this GGUF tensor holds them."""
        from loraforge.formats.names import permute_qk_hf_to_gguf

        if self.rows is not None:
            values = values[self.rows[0]:self.rows[1]]
        if self.add_one:
            values = values + 1.0
        if self.qk_heads is not None:
            values = permute_qk_hf_to_gguf(values, self.qk_heads)
        return values


def tensor_layout(hf_name: str, cfg: ModelConfig) -> list[TensorLayout]:
    """The GGUF tensors one HF tensor of a `cfg` model becomes, as llama.cpp's converter writes them:
    one, or three for a W_pack that the architecture splits into attn_q/k/v. Unknown names raise."""
    from loraforge.formats.names import arch_facts, hf_to_gguf_name, is_norm_plus_one, qk_heads

    gguf_arch = llama_cpp_arch(cfg.arch)
    facts = arch_facts(gguf_arch)
    stacked = facts.hf_fused_qkv
    if stacked is not None and facts.gguf_splits_qkv and hf_name.endswith(f".self_attn.{stacked}.weight"):
        prefix = hf_name[: -len(f"{stacked}.weight")]
        bounds = np.cumsum([0, cfg.q_size, cfg.kv_size, cfg.kv_size]).tolist()
        return [layout
                for i, part in enumerate(("q_proj", "k_proj", "v_proj"))
                for layout in (replace(x, rows=(bounds[i], bounds[i + 1]))
                               for x in tensor_layout(prefix + part + ".weight", cfg))]
    heads = qk_heads(hf_name, cfg.num_attention_heads, cfg.num_key_value_heads) if facts.permuted_qk else None
    return [TensorLayout(hf_to_gguf_name(hf_name, gguf_arch), None, heads, is_norm_plus_one(hf_name, gguf_arch))]

