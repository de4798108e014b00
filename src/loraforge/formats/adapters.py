"""Open any adapter (GGUF LoRA, PEFT folder, old llama.cpp `ggla` .bin, finetune checkpoint) as an
`Adapter` checked against a base model's shapes (`formats.adapter_shapes`), and parse `--lora` /
`--lora-scaled` arguments.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.formats.adapter_shapes import check_adapter
from loraforge.lora import Adapter

GGUF_MAGIC = b"GGUF"
GGLA_MAGIC = b"algg"  # uint32 0x67676c61 ('ggla') written little-endian

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
