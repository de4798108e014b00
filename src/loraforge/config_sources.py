"""`ModelConfig` from an HF config.json (transformers 4 and 5 layouts) or GGUF metadata, and back to
a config.json. Each family's switches are set here; the decoder only reads the switches.

The GGUF side follows llama.cpp's reading of its own files (src/models/<arch>.cpp): defaults
for keys a converter leaves out, layer patterns, and the few numbers llama.cpp derives from the
layer count (Gemma's 27B attention scale, Baichuan 13B's ALiBi).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Collection, Mapping

from loraforge.config import ACTIVATIONS, ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.formats.names import ARCHES, GGUF_ARCHES

HF_MODEL_TYPES: dict[str, str] = {t: arch for arch, facts in ARCHES.items() for t in facts.hf_model_types}
BAICHUAN1_VOCAB = 64000  # Baichuan 1 has a plain output layer; Baichuan 2 (125,696 tokens) a NormHead
# llama.cpp's fixed Gemma facts (src/models/gemma2.cpp, gemma3.cpp): the sliding-window period when a file
# lists no per-layer pattern, and the layer counts of the 27B models, whose attention scale is
# 1/sqrt(hidden / heads) instead of 1/sqrt(head_dim)
SWA_PERIODS = {"gemma2": 2, "gemma3": 6}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's Baichuan (src/models/baichuan.cpp) knows its layout by layer count only: RoPE for the
# 32-layer 7B model, ALiBi for the 40-layer 13B one, and no position encoding at all for any other count
BAICHUAN_ROPE_LAYERS, BAICHUAN_ALIBI_LAYERS = 32, 40


def supported_families() -> str:
    return ", ".join(GGUF_ARCHES)


# -- config.json -----------------------------------------------------------------------------------

def _rope_params(d: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(global rope parameters, sliding-layer rope parameters or None) from transformers 4
    (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) or 5 (`rope_parameters`, per layer type
    for Gemma 3) keys. Each dict holds rope_theta and, when scaled, rope_type and its numbers."""
    params = d.get("rope_parameters")
    params = dict(params) if isinstance(params, Mapping) else {}
    local = None
    if isinstance(params.get("full_attention"), Mapping):  # transformers 5, per layer type
        local = dict(params.get("sliding_attention") or {}) or None
        params = dict(params["full_attention"])
    scaling = d.get("rope_scaling")
    scaling = dict(scaling) if isinstance(scaling, Mapping) else {}
    merged = {**params, **scaling}
    merged["rope_theta"] = float(d.get("rope_theta", params.get("rope_theta", scaling.get("rope_theta", 10000.0))))
    if local is None and d.get("rope_local_base_freq") is not None:
        local = {"rope_theta": float(d["rope_local_base_freq"])}
    return merged, local


def _hf_rope(d: Mapping[str, Any], source: str, head_dim: int
             ) -> tuple[float, dict[str, Any] | None, float | None, int]:
    """(rope_theta, rope_scaling or None, local rope theta or None, rotary_dim)."""
    merged, local = _rope_params(d)
    theta = merged.pop("rope_theta")
    partial = float(merged.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
    rotary_dim = int(head_dim * partial)
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    local_theta = None if local is None else float(local.get("rope_theta", 10000.0))
    if local is not None and local.get("rope_type", "default") != "default":
        raise file_error(source, f"rope scaling of sliding layers ({local.get('rope_type')!r}) is not supported")
    if rope_type == "default":
        return theta, None, local_theta, rotary_dim
    merged.pop("type", None)
    merged["rope_type"] = rope_type
    if rope_type in ("su", "longrope"):
        merged["rope_type"] = "longrope"
        original = int(merged.get("original_max_position_embeddings")
                       or d.get("original_max_position_embeddings") or d["max_position_embeddings"])
        factor = merged.get("factor") or d["max_position_embeddings"] / original
        attention = merged.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        for key in ("short_factor", "long_factor"):
            if len(merged.get(key) or []) != rotary_dim // 2:
                raise file_error(source, f"rope_scaling.{key} must list {rotary_dim // 2} factors")
        merged.update(original_max_position_embeddings=original, attention_factor=float(attention))
    elif rope_type not in ("linear", "llama3"):
        raise file_error(source, f"rope scaling type {rope_type!r} is not supported "
                                 "(supported: linear, llama3, longrope)")
    return theta, merged, local_theta, rotary_dim


def pattern_layer_types(n_layers: int, pattern: int) -> list[str]:
    """Every `pattern`-th layer full, the others sliding (llama.cpp's set_swa_pattern)."""
    return ["sliding_attention" if pattern == 0 or i % pattern < pattern - 1 else "full_attention"
            for i in range(n_layers)]


def gemma_query_scalar(arch: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp applies to a Gemma GGUF (it has no key for it): head_dim,
    except the 27B models' hidden / heads."""
    return hidden // heads if n_layers == GEMMA_27B_LAYERS[arch] else head_dim


def _hf_sliding_window(d: Mapping[str, Any], arch: str, n_layers: int) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) as transformers applies them."""
    window = d.get("sliding_window")
    if arch in ("llama", "baichuan") or window is None:
        return None, None
    types = d.get("layer_types")
    if arch in ("qwen2", "qwen3"):
        if not d.get("use_sliding_window", False):
            return None, None
        if types is None:
            first = int(d.get("max_window_layers", n_layers))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    elif arch == "gemma2" and types is None:
        types = pattern_layer_types(n_layers, SWA_PERIODS[arch])
    elif arch == "gemma3" and types is None:
        types = pattern_layer_types(n_layers, int(d.get("sliding_window_pattern", SWA_PERIODS[arch])))
    return int(window), list(types) if types is not None else None


def _family_switches(arch: str, d: Mapping[str, Any]) -> dict[str, Any]:
    """The switches of one family from its config.json (everything else is shared)."""
    gemma = arch in ("gemma2", "gemma3")
    switches: dict[str, Any] = {
        "qk_norm": arch in ("qwen3", "gemma3"),
        "norm_offset": 1.0 if gemma else 0.0,
        "post_norms": gemma,
        "scale_embeddings": gemma,
        "fused_qkv": ARCHES[arch].hf_fused_qkv,
        "fused_gate_up": ARCHES[arch].fused_gate_up,
    }
    if arch == "qwen2":
        switches.update(attention_bias=True)
    elif arch in ("llama", "qwen3") or gemma:
        switches.update(attention_bias=bool(d.get("attention_bias", False)),
                        o_proj_bias=bool(d.get("attention_bias", False)))
    if gemma:
        switches.update(attn_logit_softcap=d.get("attn_logit_softcapping"),
                        final_logit_softcap=d.get("final_logit_softcapping"),
                        query_pre_attn_scalar=d.get("query_pre_attn_scalar"))
    if arch == "baichuan":
        switches.update(alibi=int(d["num_hidden_layers"]) == BAICHUAN_ALIBI_LAYERS,
                        norm_head=int(d["vocab_size"]) != BAICHUAN1_VOCAB)
    return switches


def config_from_hf_dict(d: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from config.json values; unsupported families and settings raise one-line errors."""
    model_type = d.get("model_type", "")
    if model_type == "gemma3" and isinstance(d.get("text_config"), Mapping):
        raise file_error(source, "Gemma 3 with a vision tower (Gemma3ForConditionalGeneration) is not supported; "
                                 "use a text-only Gemma 3 (model_type gemma3_text)")
    if model_type not in HF_MODEL_TYPES:
        raise file_error(source, f"model_type {model_type!r} is not supported "
                                 f"(supported: {', '.join(HF_MODEL_TYPES)})")
    arch = HF_MODEL_TYPES[model_type]
    gemma = arch in ("gemma2", "gemma3")
    act = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    act = {"swish": "silu", "gelu_tanh": "gelu_pytorch_tanh"}.get(act, act)
    if act not in ACTIVATIONS:
        raise file_error(source, f"hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    if d.get("mlp_bias"):
        raise file_error(source, "mlp_bias is not supported")
    try:
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        n_layers = int(d["num_hidden_layers"])
        head_dim = int(d.get("head_dim") or hidden // heads)
        rope_theta, rope_scaling, local_theta, rotary_dim = _hf_rope(d, source, head_dim)
        sliding_window, layer_types = _hf_sliding_window(d, arch, n_layers)
        max_pos = d.get("max_position_embeddings") or d.get("model_max_length") or 2048
        return ModelConfig(
            arch=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(max_pos),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            sliding_window=sliding_window,
            layer_types=layer_types,
            hidden_act=act,
            rope_local_theta=local_theta if arch == "gemma3" else None,
            rotary_dim=rotary_dim,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            name=str(d.get("_name_or_path", "")),
            **_family_switches(arch, d),
        )
    except KeyError as e:
        raise file_error(source, f"missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise file_error(source, f"bad value: {e}") from None


# -- GGUF metadata ----------------------------------------------------------------------------------

def _gguf_layer_types(meta: Mapping[str, Any], arch: str, n_layers: int, default_pattern: int) -> list[str]:
    """Sliding/full per layer: `{arch}.attention.sliding_window_pattern` (bools per layer, or a period)."""
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        return ["sliding_attention" if p else "full_attention" for p in pattern[:n_layers]]
    return pattern_layer_types(n_layers, int(pattern))


def _config_from_gguf(meta: Mapping[str, Any], source: str, n_vocab: int | None = None, has_output: bool = True,
                     tensor_names: Collection[str] | None = None) -> ModelConfig:
    """A `ModelConfig` from GGUF key/values, read as llama.cpp reads them."""
    arch = meta.get("general.architecture")
    if arch not in ARCHES:
        raise file_error(source, f"architecture {arch!r} is not supported (supported: {supported_families()})")

    def key(name: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{name}", default)
        if v is None:
            raise file_error(source, f"GGUF metadata lacks {arch}.{name}")
        return v

    def first(v: Any) -> Any:
        return v[0] if isinstance(v, list) else v

    names = set(tensor_names) if tensor_names is not None else None

    def has(tensor: str, default: bool) -> bool:
        return default if names is None else tensor in names

    hidden = int(key("embedding_length"))
    heads = int(first(key("attention.head_count")))
    kv_heads = int(first(meta.get(f"{arch}.attention.head_count_kv", heads)))
    n_layers = int(key("block_count"))
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    head_dim = int(meta.get(f"{arch}.attention.key_length", 0) or 0)
    if not head_dim:  # llama.cpp: n_rot == head_dim for llama-arch files, so it may stand for it
        head_dim = int(rope_dims) if rope_dims and arch in ("llama", "mistral") else hidden // heads
    rotary_dim = int(rope_dims or head_dim)
    vocab = meta.get(f"{arch}.vocab_size") or n_vocab or len(meta.get("tokenizer.ggml.tokens", []))
    rope_scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if scaling_type in (None, "linear") and factor and float(factor) != 1.0:
        rope_scaling = {"rope_type": "linear", "factor": float(factor)}
    elif scaling_type not in (None, "none", "linear"):
        raise file_error(source, f"rope scaling type {scaling_type!r} is not supported")
    # Llama 3.1+ files carry the precomputed llama3 factors as a rope_freqs tensor, Phi-3 128k files
    # LongRoPE's factors as rope_factors_long/short: the reader adds those (`add_gguf_rope_factors`).
    gemma = arch in ("gemma2", "gemma3")
    # windows as the HF models apply them (llama.cpp switches Phi-3's off; it only shows past 2k tokens)
    window = meta.get(f"{arch}.attention.sliding_window") if gemma or arch == "phi3" else None
    switches: dict[str, Any] = {}
    if arch == "gemma2":  # llama.cpp: window 4096 and caps 50 / 30 unless the file says otherwise
        window = int(window or 4096)
        switches.update(attn_logit_softcap=float(meta.get(f"{arch}.attn_logit_softcapping", 50.0)),
                        final_logit_softcap=float(meta.get(f"{arch}.final_logit_softcapping", 30.0)),
                        layer_types=_gguf_layer_types(meta, arch, n_layers, SWA_PERIODS[arch]))
    elif arch == "gemma3":
        cap = meta.get(f"{arch}.final_logit_softcapping")
        switches.update(final_logit_softcap=float(cap) if cap else None)
        if window:
            switches.update(layer_types=_gguf_layer_types(meta, arch, n_layers, SWA_PERIODS[arch]),
                            rope_local_theta=float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0)))
    if gemma:  # llama.cpp: 1/sqrt(head_dim), except the 27B models' 1/sqrt(hidden/heads)
        switches.update(query_pre_attn_scalar=gemma_query_scalar(arch, n_layers, hidden, heads, head_dim),
                        norm_offset=1.0, post_norms=True, scale_embeddings=True, hidden_act="gelu_pytorch_tanh")
    if arch == "baichuan":  # llama.cpp: the 40-layer (13B) model uses ALiBi (max bias 8) and no RoPE
        switches.update(alibi=n_layers == BAICHUAN_ALIBI_LAYERS)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(first(key("feed_forward_length"))),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        tie_word_embeddings=ARCHES[arch].output_tied or not has_output,
        attention_bias=has("blk.0.attn_q.bias", arch == "qwen2"),
        o_proj_bias=has("blk.0.attn_output.bias", False),
        sliding_window=int(window) if window else None,
        qk_norm=has("blk.0.attn_q_norm.weight", arch in ("qwen3", "gemma3")),
        rotary_dim=rotary_dim,
        fused_qkv="qkv_proj" if has("blk.0.attn_qkv.weight", arch == "phi3") else None,
        fused_gate_up=ARCHES[arch].fused_gate_up,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        name=str(meta.get("general.name", "")),
        **switches,
    )


def add_gguf_rope_factors(cfg: ModelConfig, meta: Mapping[str, Any], long: list[float], short: list[float]) -> None:
    """LongRoPE (Phi-3 128k) from a GGUF file: its rope_factors_long/short tensors and keys."""
    arch = cfg.arch
    cfg.rope_scaling = {
        "rope_type": "longrope", "long_factor": list(long), "short_factor": list(short),
        "original_max_position_embeddings": int(meta.get(f"{arch}.rope.scaling.original_context_length",
                                                         cfg.max_position_embeddings)),
        "attention_factor": float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0)),
    }


# -- back to config.json ----------------------------------------------------------------------------

def config_to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json for transformers' class of the family (transformers 4 key names, which 5 reads too)."""
    facts = ARCHES.get(cfg.arch)
    if facts is None:
        raise file_error("config.json", f"architecture {cfg.arch!r} has no Hugging Face form")
    d: dict[str, Any] = {
        "architectures": [facts.hf_class],
        "model_type": facts.hf_model_types[0],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": copy.deepcopy(cfg.rope_scaling),  # (transformers writes into the dict it is given)
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": cfg.hidden_act,
        "pad_token_id": None,  # (no class default such as Phi-3's 32000 beyond a small vocabulary)
        "torch_dtype": "float32",
    }
    if cfg.arch in ("llama", "qwen3", "gemma2", "gemma3"):
        d["attention_bias"] = cfg.attention_bias
    if cfg.arch == "llama":
        d["mlp_bias"] = False
    if cfg.arch in ("mistral", "phi3", "gemma2", "gemma3"):
        d["sliding_window"] = cfg.sliding_window
    if cfg.arch in ("qwen2", "qwen3"):
        d["use_sliding_window"] = cfg.sliding_window is not None
        d["sliding_window"] = cfg.sliding_window
        if cfg.sliding_window is not None:
            types = cfg.layer_types or ["sliding_attention"] * cfg.num_hidden_layers
            d["max_window_layers"] = next(
                (i for i, t in enumerate(types) if t == "sliding_attention"), cfg.num_hidden_layers)
    if cfg.layer_types is not None:
        d["layer_types"] = list(cfg.layer_types)
    if cfg.arch in ("gemma2", "gemma3"):
        scalar = cfg.query_pre_attn_scalar
        d.update(hidden_activation=cfg.hidden_act, final_logit_softcapping=cfg.final_logit_softcap,
                 query_pre_attn_scalar=int(scalar) if scalar is not None and float(scalar).is_integer() else scalar)
        if cfg.arch == "gemma2":
            d["attn_logit_softcapping"] = cfg.attn_logit_softcap
        elif cfg.rope_local_theta is not None:
            d["rope_local_base_freq"] = cfg.rope_local_theta
    if cfg.rotary_dim != cfg.head_dim:
        d["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "longrope":
        d["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
        d["eos_token_id"] = cfg.eos_token_id
    return d


def config_from_gguf_metadata(meta: Mapping[str, Any], source: str, n_vocab: int | None = None,
                              has_output: bool = True, tensor_names: Collection[str] | None = None
                              ) -> ModelConfig:
    """Numbers from GGUF keys (`{arch}.embedding_length` ...). `has_output`: an output.weight exists;
    `tensor_names`: the file's tensors, which tell biases, q/k norms and fused projections apart.

    A value of the wrong type or out of range is a one-line error naming `source`."""
    try:
        return _config_from_gguf(meta, source, n_vocab, has_output, tensor_names)
    except LoraforgeError as e:
        if str(e).startswith(f"{source}: "):
            raise
        raise file_error(source, str(e)) from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, IndexError) as e:
        raise file_error(source, f"GGUF metadata value of the wrong type or out of range ({e})") from None


def config_from_hf_folder(folder: str | os.PathLike) -> ModelConfig:
    """The config.json of a Hugging Face model folder; one-line errors for a missing or broken file."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise file_error(folder, "no config.json in this folder (not a Hugging Face model folder)")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise file_error(path, f"not valid JSON ({e})") from None
    return config_from_hf_dict(d, source=path)
