"""Open any adapter (GGUF LoRA, PEFT folder, old llama.cpp `ggla` .bin, finetune checkpoint) as an
`Adapter`, check it against a base model's shapes, and parse `--lora` / `--lora-scaled` arguments.

Shapes checked here are the HF ones of `lora.Adapter`: `<module>.lora_A` (r, in) and
`.lora_B` (out, r); for `model.embed_tokens` A is (r, vocab) and B (hidden, r).
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import Adapter

GGUF_MAGIC = b"GGUF"
GGLA_MAGIC = b"algg"  # uint32 0x67676c61 ('ggla') written little-endian

_LAYER_MODULES = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "self_attn.qkv_proj", "self_attn.W_pack", "mlp.gate_up_proj",  # stacked (Phi-3, Baichuan)
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def is_known_module(module: str) -> bool:
    """True for HF module names an adapter may target ("model.layers.3.mlp.up_proj", "lm_head", ...)."""
    if module in ("model.embed_tokens", "lm_head"):
        return True
    m = _LAYER_RE.match(module)
    return m is not None and m.group(2) in _LAYER_MODULES


def module_weight_shape(module: str, cfg: ModelConfig) -> tuple[int, int]:
    """(out, in) of a module's weight in HF layout; embeddings give (vocab, hidden)."""
    h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    if module in ("model.embed_tokens", "lm_head"):
        return cfg.vocab_size, h
    short = module.rsplit(".", 1)[-1]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
            "qkv_proj": (q + 2 * kv, h), "W_pack": (q + 2 * kv, h), "gate_up_proj": (2 * f, h)}[short]


def expected_ab_shapes(module: str, rank: int, cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (lora_A, lora_B) for `module` at `rank`."""
    out_f, in_f = module_weight_shape(module, cfg)
    if module == "model.embed_tokens":
        return (rank, out_f), (in_f, rank)  # A (r, vocab), B (hidden, r)
    return (rank, in_f), (out_f, rank)


def check_adapter(adapter: Adapter, cfg: ModelConfig | None, source: str) -> None:
    """Raise a one-line error naming `source` if a module is unknown, a pair is incomplete, or a
    shape does not fit the base model `cfg` (when given)."""
    names = {k.rpartition(".")[0] for k in adapter.tensors}
    for key in adapter.tensors:
        if not key.endswith((".lora_A", ".lora_B")):
            raise file_error(source, f"unexpected adapter tensor {key!r}")
    if not names:
        raise file_error(source, "holds no LoRA tensors")
    for module in sorted(names):
        if not is_known_module(module):
            raise file_error(source, f"unknown target module {module!r} (a llama-family adapter targets "
                                     "q/k/v/o_proj, gate/up/down_proj, embed_tokens or lm_head)")
        a = adapter.tensors.get(module + ".lora_A")
        b = adapter.tensors.get(module + ".lora_B")
        if a is None or b is None:
            raise file_error(source, f"module {module} has only one of lora_A / lora_B")
        if a.ndim != 2 or b.ndim != 2:
            raise file_error(source, f"module {module}: LoRA tensors must be 2-D")
        rank = int(a.shape[0])
        if cfg is None:
            if int(b.shape[1]) != rank:
                raise file_error(source, f"module {module}: lora_A has rank {rank}, lora_B {int(b.shape[1])}")
            continue
        check_pair_shapes(module, tuple(a.shape), tuple(b.shape), cfg, source)


def check_pair_shapes(module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], cfg: ModelConfig,
                      source: str) -> None:
    """One line naming `source` when lora_A (r, in) / lora_B (out, r) (HF layout) of a known `module`
    do not fit the base model `cfg`. Readers call it before any q/k row permutation."""
    if not is_known_module(module):
        raise file_error(source, f"unknown target module {module!r} (a llama-family adapter targets "
                                 "q/k/v/o_proj, gate/up/down_proj, embed_tokens or lm_head)")
    m = _LAYER_RE.match(module)
    if m is not None and int(m.group(1)) >= cfg.num_hidden_layers:
        raise file_error(source, f"module {module} is beyond the base model's {cfg.num_hidden_layers} "
                                 "layers (an adapter for another model?)")
    rank = int(a_shape[0]) if a_shape else 0
    want_a, want_b = expected_ab_shapes(module, rank, cfg)
    if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
        raise file_error(source, f"module {module}: lora_A {tuple(a_shape)} / lora_B {tuple(b_shape)} do not "
                                 f"fit the base model (expected {want_a} / {want_b}; an adapter for "
                                 "another model?)")


def detect_format(path: str | os.PathLike) -> str:
    """"peft", "gguf" (adapter), "checkpoint", "ggla" or a one-line error saying what the path is."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise file_error(path, "no such file or folder")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return "peft"
        if any(n.startswith("adapter_model.") for n in os.listdir(path)):
            raise file_error(path, "PEFT folder without adapter_config.json (it is needed for alpha and ranks)")
        raise file_error(path, "is a folder but not a PEFT adapter (no adapter_config.json)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGLA_MAGIC:
        return "ggla"
    if magic == GGUF_MAGIC:
        from loraforge.formats.gguf_file import read_gguf

        meta = read_gguf(path).metadata  # header only: fast even for a base model passed by mistake
        kind = meta.get("general.type", "")
        if kind == "adapter":
            return "gguf"
        if kind == "loraforge-checkpoint" or "loraforge.checkpoint" in meta:
            return "checkpoint"
        raise file_error(path, f"is a GGUF {kind or 'model'} file, not a LoRA adapter")
    if path.endswith(".safetensors"):
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            return "peft"
        raise file_error(path, "safetensors file without an adapter_config.json beside it (pass the PEFT folder)")
    raise file_error(path, f"not an adapter: expected a GGUF LoRA, a PEFT folder, a llama.cpp ggla .bin or a "
                           f"loraforge checkpoint (file starts with {magic!r})")


def load_adapter(path: str | os.PathLike, cfg: ModelConfig) -> Adapter:
    """Any supported adapter file or folder, checked against the base model `cfg`, with its q/k/v and
    gate/up modules stacked or separate as the model has them."""
    from loraforge.formats.fused_adapters import match_layout

    return match_layout(_read_adapter(path, cfg), cfg)


def _read_adapter(path: str | os.PathLike, cfg: ModelConfig) -> Adapter:
    path = os.fspath(path)
    kind = detect_format(path)
    if kind == "peft":
        from loraforge.formats.peft import read_peft

        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        return read_peft(folder, cfg)
    if kind == "gguf":
        from loraforge.formats.gguf_lora import read_gguf_adapter

        return read_gguf_adapter(path, cfg)
    if kind == "ggla":
        from loraforge.formats.ggla import read_ggla

        return read_ggla(path, cfg)
    try:
        from loraforge.train.checkpoint import read_checkpoint_adapter
    except ImportError:
        raise file_error(path, "is a training checkpoint, but this install cannot read checkpoints") from None
    adapter = read_checkpoint_adapter(path)
    arch = adapter.metadata.get("arch")
    from loraforge.formats.gguf_arch import same_arch

    if arch and not same_arch(arch, cfg.arch):
        raise file_error(path, f"checkpoint is for architecture {arch!r}, the base model is {cfg.arch!r}")
    check_adapter(adapter, cfg, path)
    return adapter


def parse_scale(value: str, what: str) -> float:
    """A finite float, or a one-line error naming `what` and the bad value."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise LoraforgeError(f"{what}: scale {value!r} is not a number") from None
    if not math.isfinite(scale):
        raise LoraforgeError(f"{what}: scale {value!r} is not a finite number")
    return scale


def parse_lora_args(lora: Sequence[str] | None, lora_scaled: Sequence[Sequence[str]] | None
                    ) -> list[tuple[str, float]]:
    """`--lora FILE` (scale 1) and `--lora-scaled FILE SCALE` into [(path, scale)], in that order."""
    out: list[tuple[str, float]] = [(p, 1.0) for p in (lora or [])]
    for item in lora_scaled or []:
        if len(item) != 2:
            raise LoraforgeError(f"--lora-scaled takes FILE SCALE, got {' '.join(map(str, item))!r}")
        path, value = item
        out.append((path, parse_scale(value, f"--lora-scaled {path}")))
    for path, _ in out:
        if not os.path.exists(path):
            raise file_error(path, "no such adapter file or folder")
    return out


def load_adapters(specs: Sequence[tuple[str, float]], cfg: ModelConfig) -> list[tuple[Adapter, float]]:
    """Load every (path, scale) of `parse_lora_args`."""
    return [(load_adapter(path, cfg), scale) for path, scale in specs]
