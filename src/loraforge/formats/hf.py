"""Hugging Face model folders: config.json + single or sharded safetensors (with an index)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Iterator

import torch

from loraforge.config import ModelConfig
from loraforge.config_sources import config_from_hf_folder, config_to_hf_dict
from loraforge.errors import file_error

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def is_hf_folder(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def safetensors_files(folder: str | os.PathLike) -> list[str]:
    """The weight files of a folder, from the index when sharded."""
    folder = os.fspath(folder)
    index = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise file_error(index, f"not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                raise file_error(index, f"names shard {name!r}, which is not in the folder")
        return [os.path.join(folder, n) for n in files]
    single = os.path.join(folder, SINGLE_NAME)
    if os.path.isfile(single):
        return [single]
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not shards:
        raise file_error(folder, "no .safetensors weights in this folder (.bin pickles are not loaded)")
    return [os.path.join(folder, n) for n in shards]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """{name: {"dtype": "F32", "shape": [...], ...}} from a safetensors file's JSON header (no tensor data read)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise file_error(path, "not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise file_error(path, f"not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise file_error(path, "not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


def save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors' `save_file`, with an I/O failure raised as the OSError it is (safetensors reports
    "I/O error: ... (os error 28)" as a SafetensorError), so that atomic writes report it in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), path) from None


def verify_written_safetensors(path: str | os.PathLike) -> None:
    """Check a safetensors file just written: its header parses and the file ends where the last
    tensor's data ends (a short write makes it shorter)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    offsets = [entry.get("data_offsets") for entry in header.values() if isinstance(entry, dict)]
    ends = [pair[1] for pair in offsets if isinstance(pair, list) and len(pair) == 2]
    want = 8 + n + max(ends, default=0)
    if size != want:
        raise file_error(path, f"written file has {size} bytes, its header says {want} (a short write)")


def iter_tensors(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight, memory-mapped, one at a time."""
    from safetensors import SafetensorError, safe_open

    for path in safetensors_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise file_error(path, f"cannot read safetensors ({e})") from None


def read_config(folder: str | os.PathLike) -> ModelConfig:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise file_error(folder, "no such folder" if not os.path.exists(folder) else "not a folder")
    return config_from_hf_folder(folder)


def hf_layout(cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]]
              ) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(config, tensors) in the family's Hugging Face layout: a Baichuan read from GGUF (llama.cpp's
    split attn_q/k/v) gets its q, k, v rows stacked back into W_pack, layer by layer."""
    from loraforge.formats.names import arch_facts

    stacked = arch_facts(cfg.arch).hf_fused_qkv
    if stacked is None or cfg.fused_qkv == stacked:
        return cfg, tensors

    def restack() -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors:
            prefix, _, rest = name.partition("self_attn.")
            part = rest[:1] if rest in ("q_proj.weight", "k_proj.weight", "v_proj.weight") else None
            if part is None:
                yield name, t
                continue
            parts = pending.setdefault(prefix, {})
            parts[part] = t
            if len(parts) == 3:
                del pending[prefix]
                yield f"{prefix}self_attn.{stacked}.weight", torch.cat([parts["q"], parts["k"], parts["v"]])
        if pending:
            raise file_error(next(iter(pending)), "has only some of q_proj / k_proj / v_proj")

    return cfg.replace(fused_qkv=stacked), restack()


def write_folder(folder: str | os.PathLike, cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]],
                 max_shard_bytes: int = 2 << 30) -> None:
    """Write config.json and safetensors shards (+ index when more than one), streaming tensors,
    in the family's Hugging Face layout (`hf_layout`).

    Each shard is written atomically and checked; when a write fails, the shards this call
    wrote that are not yet under their final names are removed again.
    """
    from loraforge.atomic import atomic_path

    cfg, tensors = hf_layout(cfg, tensors)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    written: list[tuple[str, list[str]]] = []

    def flush() -> None:
        name = f"model-{len(written) + 1:05d}.safetensors"
        with atomic_path(os.path.join(folder, name), verify=verify_written_safetensors, size_hint=shard_bytes) as tmp:
            save_safetensors(shard, tmp)
        written.append((name, list(shard)))

    try:
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shard and shard_bytes + nbytes > max_shard_bytes:
                flush()
                shard, shard_bytes = {}, 0
            shard[name] = t.contiguous()
            shard_bytes += nbytes
        if shard or not written:
            flush()
    except BaseException:
        for name, _ in written:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
        raise
    total = len(written)
    if total == 1:
        only = written[0][0]
        os.replace(os.path.join(folder, only), os.path.join(folder, SINGLE_NAME))
    else:
        weight_map = {}
        for i, (name, keys) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(folder, name), os.path.join(folder, final))
            weight_map.update({k: final for k in keys})
        with atomic_path(os.path.join(folder, INDEX_NAME)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with atomic_path(os.path.join(folder, "config.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_to_hf_dict(cfg), f, indent=2)
