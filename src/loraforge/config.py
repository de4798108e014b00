"""Architecture numbers of a llama-family model, from GGUF metadata or an HF config.json.

One `ModelConfig` drives `model.py`; field names follow Hugging Face's config.json so
HF folders map one to one and GGUF metadata maps through `from_gguf_metadata`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from loraforge.errors import LoraforgeError, file_error

# GGUF `general.architecture` / HF `model_type` values we run with the one decoder.
GGUF_ARCHES = ("llama", "mistral", "qwen2")
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


@dataclass
class ModelConfig:
    """Numbers of a llama-family decoder (HF config.json names)."""

    arch: str = "llama"  # "llama" | "mistral" | "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # output projection bias (Llama with attention_bias)
    sliding_window: int | None = None  # keys within the last `sliding_window` positions (Mistral v0.1)
    layer_types: list[str] | None = None  # per layer "full_attention"|"sliding_attention"; None = all
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, key) <= 0:
                raise LoraforgeError(f"model config: {key} must be positive, got {getattr(self, key)}")
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

    def n_matmul_params(self) -> int:
        """Parameters that take part in matmuls per token (decoder linears + LM head)."""
        h, f = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * f
        return self.num_hidden_layers * per_layer + h * self.vocab_size

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json for transformers (`LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM`)."""
        arch_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM"}[self.arch]
        d = {
            "architectures": [arch_class],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.arch == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        if self.arch == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.arch == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            if self.sliding_window is not None:
                types = self.layer_types or ["sliding_attention"] * self.num_hidden_layers
                d["layer_types"] = list(types)
                d["max_window_layers"] = next(
                    (i for i, t in enumerate(types) if t == "sliding_attention"), self.num_hidden_layers)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        return d

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type", "")
        if model_type not in HF_MODEL_TYPES:
            raise file_error(source, f"model_type {model_type!r} is not supported "
                                     f"(supported: {', '.join(HF_MODEL_TYPES)})")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise file_error(source, f"hidden_act {d.get('hidden_act')!r} is not supported (silu only)")
        if d.get("mlp_bias"):
            raise file_error(source, "mlp_bias is not supported")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope_theta, rope_scaling = _hf_rope(d, source)
            if model_type == "llama":
                attention_bias = o_proj_bias = bool(d.get("attention_bias", False))
            else:  # Qwen2 always has q/k/v biases, Mistral none
                attention_bias, o_proj_bias = model_type == "qwen2", False
            sliding_window, layer_types = _hf_sliding_window(d, model_type, int(d["num_hidden_layers"]))
            return cls(
                arch=HF_MODEL_TYPES[model_type],
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=attention_bias,
                o_proj_bias=o_proj_bias,
                sliding_window=sliding_window,
                layer_types=layer_types,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                name=str(d.get("_name_or_path", "")),
            )
        except KeyError as e:
            raise file_error(source, f"missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise file_error(source, f"bad value: {e}") from None

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> "ModelConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise file_error(folder, "no config.json in this folder (not a Hugging Face model folder)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise file_error(path, f"not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=path)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str, n_vocab: int | None = None,
                           has_output: bool = True) -> "ModelConfig":
        """Numbers from GGUF keys (`{arch}.embedding_length` ...). `has_output`: an output.weight exists.

        A value of the wrong type or out of range is a one-line error naming `source`."""
        try:
            return cls._from_gguf_metadata(meta, source, n_vocab, has_output)
        except LoraforgeError as e:
            if str(e).startswith(f"{source}: "):
                raise
            raise file_error(source, str(e)) from None
        except (TypeError, ValueError, OverflowError, ZeroDivisionError, IndexError) as e:
            raise file_error(source, f"GGUF metadata value of the wrong type or out of range ({e})") from None

    @classmethod
    def _from_gguf_metadata(cls, meta: Mapping[str, Any], source: str, n_vocab: int | None,
                            has_output: bool) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHES:
            raise file_error(source, f"architecture {arch!r} is not supported "
                                     f"(supported: {', '.join(GGUF_ARCHES)})")

        def key(name: str, default: Any = None) -> Any:
            v = meta.get(f"{arch}.{name}", default)
            if v is None:
                raise file_error(source, f"GGUF metadata lacks {arch}.{name}")
            return v

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            kv_heads = kv_heads[0]
        head_dim = int(meta.get(f"{arch}.attention.key_length", 0) or meta.get(f"{arch}.rope.dimension_count", 0)
                       or hidden // heads)
        vocab = meta.get(f"{arch}.vocab_size") or n_vocab or len(meta.get("tokenizer.ggml.tokens", []))
        ff = key("feed_forward_length")
        if isinstance(ff, list):
            ff = ff[0]
        rope_scaling = None
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if scaling_type == "linear" and factor and float(factor) != 1.0:
            rope_scaling = {"rope_type": "linear", "factor": float(factor)}
        elif scaling_type not in (None, "none", "linear"):
            raise file_error(source, f"rope scaling type {scaling_type!r} is not supported")
        # Llama 3.1+ files carry the precomputed llama3 factors as a rope_freqs tensor instead;
        # the loader reads that tensor and passes it as extra["rope_freqs"].
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            arch="qwen2" if arch == "qwen2" else arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(ff),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
            tie_word_embeddings=not has_output,
            attention_bias=arch == "qwen2",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=eos,
            name=str(meta.get("general.name", "")),
        )

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _hf_rope(d: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from transformers 4 (`rope_theta` + `rope_scaling`) or
    transformers 5 (`rope_parameters`, which holds both) config keys."""
    params = d.get("rope_parameters")
    params = dict(params) if isinstance(params, Mapping) else {}
    scaling = d.get("rope_scaling")
    scaling = dict(scaling) if isinstance(scaling, Mapping) else {}
    theta = d.get("rope_theta", params.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    merged.pop("rope_theta", None)
    merged["rope_type"] = rope_type
    if rope_type not in ("linear", "llama3"):
        raise file_error(source, f"rope scaling type {rope_type!r} is not supported (supported: linear, llama3)")
    return float(theta), merged


def _hf_sliding_window(d: Mapping[str, Any], model_type: str, n_layers: int
                       ) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) as transformers applies them."""
    window = d.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, None
    if model_type == "qwen2":
        if not d.get("use_sliding_window", False):
            return None, None
        types = d.get("layer_types")
        if types is None:
            first = int(d.get("max_window_layers", n_layers))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        return int(window), list(types)
    types = d.get("layer_types")
    return int(window), list(types) if types is not None else None


def rope_inv_freq(cfg: ModelConfig) -> "torch.Tensor":  # noqa: F821
    """Inverse frequencies (head_dim/2,) with the config's rope scaling applied (fp32)."""
    import torch

    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_freqs = cfg.extra.get("rope_freqs")
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
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
    elif rope_type not in (None, "default"):
        raise LoraforgeError(f"rope scaling type {rope_type!r} is not supported")
    return inv_freq.float()
