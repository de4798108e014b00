"""Merge adapters into a base model, streaming one tensor at a time.

For each base tensor: decode only that tensor to float32, add sum_i scale_i * delta_i (each
adapter's own alpha / r folded in), encode to the output type and write it; untouched tensors
whose type does not change are copied byte for byte. Peak memory is about one dense matrix
(plus one safetensors shard for HF output), so a 7B base never has to be dense in memory.

A tied model (no output.weight) with an lm_head or embed_tokens adapter gets a separate output
matrix, as the adapted model has one: `output.weight` in GGUF, `lm_head.weight` with
`tie_word_embeddings: false` in an HF folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from loraforge.atomic import atomic_path
from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import Adapter

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "same")
HF_OUTTYPES = ("f32", "f16", "bf16", "same")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "generation_config.json", "chat_template.jinja", "chat_template.json", "added_tokens.json",
                      "vocab.json", "merges.txt")
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# -- adapter deltas --------------------------------------------------------------------------------

def weight_delta(adapters: Sequence[tuple[Adapter, float]], hf_name: str) -> torch.Tensor | None:
    """sum_i scale_i * delta_i for the HF tensor `hf_name` (weights (out, in), embeddings (vocab, hidden),
    RMSNorm weights from imported ggla norm deltas), float32; None when no adapter touches it."""
    total: torch.Tensor | None = None
    module = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else None
    for adapter, scale in adapters:
        if scale == 0.0:
            continue
        delta = None
        if module is not None and module + ".lora_A" in adapter.tensors:
            delta = adapter.delta(module)
        elif hf_name in (adapter.metadata.get("norm_deltas") or {}):
            delta = adapter.metadata["norm_deltas"][hf_name].float()
        if delta is not None:
            total = delta * scale if total is None else total + delta * scale
    return total


def _touches(adapters: Sequence[tuple[Adapter, float]], module: str) -> bool:
    return any(module + ".lora_A" in a.tensors and s != 0.0 for a, s in adapters)


def needs_untied_output(cfg: ModelConfig, adapters: Sequence[tuple[Adapter, float]]) -> bool:
    """A tied base whose input embedding or output layer an adapter changes needs its own output matrix."""
    return cfg.tie_word_embeddings and (_touches(adapters, "lm_head") or _touches(adapters, "model.embed_tokens"))


# -- GGUF output -----------------------------------------------------------------------------------
#
# The merged file is written here rather than with gguf.GGUFWriter: the base's key/value section
# is copied byte for byte (every type kept exactly, a 50k-token vocabulary in milliseconds), and
# tensors are encoded and written one at a time in the order of their info records.

_KV_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_KV_STRING, _KV_ARRAY, _KV_UINT32 = 8, 9, 4


def _skip_value(buf: memoryview, pos: int, vtype: int) -> int:
    """Position after a GGUF value of type `vtype` starting at `pos`."""
    if vtype in _KV_SCALAR_SIZES:
        return pos + _KV_SCALAR_SIZES[vtype]
    if vtype == _KV_STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == _KV_ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _KV_SCALAR_SIZES:
            return pos + count * _KV_SCALAR_SIZES[etype]
        for _ in range(count):
            pos = _skip_value(buf, pos, etype)
        return pos
    raise LoraforgeError(f"unknown GGUF metadata value type {vtype}")


def kv_records(path: str) -> list[tuple[str, bytes]]:
    """The key/value records of a GGUF file as (key, raw bytes of key + type + value), in file order."""
    with open(path, "rb") as f:
        head = f.read(24)
        magic, _version, _n_tensors, n_kv = struct.unpack("<4sIQQ", head)
        if magic != b"GGUF":
            raise file_error(path, "not a GGUF file")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(mm)
    pos, records = 24, []
    for _ in range(n_kv):
        start = pos
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace")
        pos += 8 + n
        vtype = struct.unpack_from("<I", buf, pos)[0]
        pos = _skip_value(buf, pos + 4, vtype)
        records.append((key, bytes(buf[start:pos])))
    return records


def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv_uint32(key: str, value: int) -> bytes:
    return _pack_string(key) + struct.pack("<II", _KV_UINT32, value)


def _kv_string(key: str, value: str) -> bytes:
    return _pack_string(key) + struct.pack("<I", _KV_STRING) + _pack_string(value)


@dataclass
class _Planned:
    """One output tensor: where its values come from and how it is stored."""

    name: str  # GGUF name
    source: Any  # gguf_file.TensorInfo of the base
    hf_name: str | None  # HF name whose deltas apply (None: copied as is)
    qtype: int  # output GGMLQuantizationType
    copy_raw: bool  # bytes copied unchanged
    shape: tuple[int, ...]  # torch order (rows, cols)
    nbytes: int


def _quantizable(qtype: int) -> bool:
    import gguf

    T = gguf.GGMLQuantizationType
    return qtype in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def _nbytes(qtype: int, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return int(np.prod(shape)) // block * size


def _target_type(outtype: str, orig: int, shape: tuple[int, ...], modified: bool, notes: list[str]) -> int:
    """The output type of one tensor: 1-D tensors stay float, `same` keeps the base's type where
    the gguf package can encode it (else Q8_0), rows that are not whole blocks stay F32."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return orig if not modified or orig in (T.F32, T.F16) else T.F32
    if outtype == "same":
        if not modified or _quantizable(orig):
            return orig
        msg = f"note: the gguf package cannot quantize {T(orig).name}; changed tensors are written as Q8_0"
        if msg not in notes:
            notes.append(msg)
        wanted = T.Q8_0
    else:
        wanted = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else T.F32


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def _decode(gf, t) -> torch.Tensor:
    """A base tensor (GGUF layout) as float32, torch order shape."""
    import gguf

    from loraforge.quant.ggml import SUPPORTED_TYPES, dequantize

    data = gf.data(t)
    if t.qtype in SUPPORTED_TYPES:
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
        return dequantize(raw, t.qtype, t.shape, torch.float32)
    values = gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(t.qtype))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(t.shape))


def _encode(x: torch.Tensor, qtype: int) -> np.ndarray:
    import gguf

    arr = x.detach().float().cpu().contiguous().numpy()
    return np.ascontiguousarray(gguf.quants.quantize(arr, gguf.GGMLQuantizationType(qtype)))


def _write_gguf(path: str, version: int, kv: list[bytes], plan: list[_Planned], alignment: int,
                tensor_bytes: Callable[[_Planned], np.ndarray]) -> None:
    """Header, key/values, tensor infos, then each tensor's bytes (from `tensor_bytes`) padded."""
    def pad(n: int) -> int:
        return (alignment - n % alignment) % alignment

    with open(path, "wb") as f:
        f.write(struct.pack("<4sIQQ", b"GGUF", version, len(plan), len(kv)))
        for record in kv:
            f.write(record)
        offset = 0
        for p in plan:
            dims = tuple(reversed(p.shape))
            f.write(_pack_string(p.name) + struct.pack("<I", len(dims)))
            f.write(struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", p.qtype, offset))
            offset += p.nbytes + pad(p.nbytes)
        f.write(b"\0" * pad(f.tell()))
        for p in plan:
            data = np.ascontiguousarray(tensor_bytes(p))
            if data.nbytes != p.nbytes:
                raise LoraforgeError(f"internal: tensor {p.name} encodes to {data.nbytes} bytes, "
                                     f"planned {p.nbytes}")
            f.write(memoryview(data.reshape(-1).view(np.uint8)))
            f.write(b"\0" * pad(p.nbytes))


def merge_to_gguf(base_path: str, adapters: Sequence[tuple[Adapter, float]], out_path: str,
                  outtype: str = "same", labels: Sequence[str] = (),
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Write base + adapters as one GGUF model at `out_path` (atomic). Returns a summary dict."""
    from loraforge.formats.gguf import read_model
    from loraforge.formats.gguf_file import read_gguf
    from loraforge.formats.names import (gguf_to_hf_name, is_aux_gguf_tensor, needs_qk_permutation,
                                         permute_qk_hf_to_gguf, qk_heads)

    if outtype not in GGUF_OUTTYPES:
        raise LoraforgeError(f"--outtype {outtype!r}: choose one of {', '.join(GGUF_OUTTYPES)}")
    if os.path.isdir(base_path):
        raise file_error(base_path, "merging into a GGUF file needs a GGUF base (an HF base merges with --to hf)")
    cfg = read_model(base_path).config  # validates the base
    gf = read_gguf(base_path)
    arch = gf.metadata["general.architecture"]
    permute = needs_qk_permutation(arch)

    notes: list[str] = []
    plan: list[_Planned] = []
    embd = None
    for t in gf.tensors:
        hf = None if is_aux_gguf_tensor(t.name) or t.name == "rope_freqs.weight" else gguf_to_hf_name(t.name, arch)
        modified = hf is not None and weight_delta_exists(adapters, hf)
        qtype = _target_type(outtype, t.qtype, t.shape, modified, notes) if hf else t.qtype
        plan.append(_Planned(t.name, t, hf, qtype, not modified and qtype == t.qtype, t.shape,
                             _nbytes(qtype, t.shape)))
        if t.name == "token_embd.weight":
            embd = t
    if needs_untied_output(cfg, adapters) and embd is not None:
        modified = _touches(adapters, "lm_head")
        qtype = _target_type(outtype, embd.qtype, embd.shape, modified, notes)
        plan.append(_Planned("output.weight", embd, "lm_head.weight", qtype, not modified and qtype == embd.qtype,
                             embd.shape, _nbytes(qtype, embd.shape)))
    for note in notes:
        log(note)

    kv = []
    for key, record in kv_records(base_path):
        if key == "general.file_type" and outtype in _FILE_TYPES:
            record = _kv_uint32(key, _FILE_TYPES[outtype])
        if key != "loraforge.merged_adapters":
            kv.append(record)
    if outtype in _FILE_TYPES and "general.file_type" not in gf.metadata:
        kv.append(_kv_uint32("general.file_type", _FILE_TYPES[outtype]))
    if adapters:
        kv.append(_kv_string("loraforge.merged_adapters", json.dumps(
            [{"adapter": (labels[i] if i < len(labels) else f"#{i + 1}"), "scale": s}
             for i, (_, s) in enumerate(adapters)])))
    changed = [0]

    def tensor_bytes(p: _Planned) -> np.ndarray:
        if p.copy_raw:
            return gf.data(p.source)
        values = _decode(gf, p.source)
        delta = weight_delta(adapters, p.hf_name) if p.hf_name else None
        if delta is not None:
            heads = qk_heads(p.hf_name, cfg.num_attention_heads, cfg.num_key_value_heads)
            if permute and heads is not None:
                delta = permute_qk_hf_to_gguf(delta, heads)
            values = values + delta.reshape(values.shape)
            changed[0] += 1
        return _encode(values, p.qtype)

    with atomic_path(out_path) as tmp:
        _write_gguf(tmp, gf.version, kv, plan, int(gf.metadata.get("general.alignment", 32)), tensor_bytes)
    return {"tensors": len(plan), "changed": changed[0], "arch": arch, "notes": notes}


def weight_delta_exists(adapters: Sequence[tuple[Adapter, float]], hf_name: str) -> bool:
    """True when some adapter (at a nonzero scale) changes the HF tensor `hf_name`."""
    module = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else ""
    for adapter, scale in adapters:
        if scale == 0.0:
            continue
        if module and module + ".lora_A" in adapter.tensors:
            return True
        if hf_name in (adapter.metadata.get("norm_deltas") or {}):
            return True
    return False


# -- HF output -------------------------------------------------------------------------------------

def _hf_tokenizer_files(tokenizer, cfg: ModelConfig, folder: str) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json from our Tokenizer."""
    with atomic_path(os.path.join(folder, "tokenizer.json")) as tmp:
        tokenizer.backend.save(tmp)

    def piece(i: int | None) -> str | None:
        return None if i is None else tokenizer.backend.id_to_token(i)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.unk_id),
        "pad_token": piece(tokenizer.pad_id),
        "add_bos_token": bool(tokenizer.add_bos),
        "add_eos_token": bool(tokenizer.add_eos),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    with atomic_path(os.path.join(folder, "tokenizer_config.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2, ensure_ascii=False)
    generation = {k: v for k, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id))
                  if v is not None}
    with atomic_path(os.path.join(folder, "generation_config.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)


def _gguf_base_tensors(base_path: str):
    """(config, tokenizer, iterator factory of (HF name, float32 tensor), getter by HF name) of a GGUF base."""
    from loraforge.formats.gguf import read_model
    from loraforge.quant.ggml import dequantize
    from loraforge.tokenizer import Tokenizer

    gm = read_model(base_path)

    def get(name: str) -> torch.Tensor:
        t = gm.tensors[name]
        raw = np.ascontiguousarray(t.data)
        return dequantize(torch.from_numpy(raw.view(np.uint8)), t.qtype, t.shape, torch.float32)

    def iterate() -> Iterator[tuple[str, torch.Tensor]]:
        for name in gm.tensors:
            yield name, get(name)

    tokenizer = Tokenizer.from_gguf_metadata(gm.metadata, source=base_path)
    float_types = {int(t.qtype) for t in gm.tensors.values() if len(t.shape) == 2}
    return gm.config, tokenizer, iterate, get, float_types


def merge_to_hf(base_path: str, adapters: Sequence[tuple[Adapter, float]], out_folder: str,
                outtype: str = "same", max_shard_bytes: int = 2 << 30) -> dict[str, Any]:
    """Write base + adapters as an HF folder (config.json, safetensors shards, tokenizer files)."""
    from loraforge.formats.hf import iter_tensors, read_config, write_folder

    if outtype not in HF_OUTTYPES:
        raise LoraforgeError(f"--outtype {outtype!r} is not available for HF folders "
                             f"(choose {', '.join(HF_OUTTYPES)})")
    if os.path.exists(out_folder) and not os.path.isdir(out_folder):
        raise file_error(out_folder, "exists and is not a folder")
    if os.path.abspath(out_folder) == os.path.abspath(base_path):
        raise file_error(out_folder, "is the base model folder; choose another output folder")
    if os.path.isdir(base_path):
        cfg = read_config(base_path)
        tokenizer = None

        def iterate() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in iter_tensors(base_path):
                if not name.endswith("rotary_emb.inv_freq"):
                    yield name, t

        def get(name: str) -> torch.Tensor:
            from safetensors import safe_open

            from loraforge.formats.hf import safetensors_files

            for shard in safetensors_files(base_path):
                with safe_open(shard, framework="pt") as f:
                    if name in f.keys():
                        return f.get_tensor(name)
            raise file_error(base_path, f"missing tensor {name}")

        dtype = HF_DTYPES.get(outtype)
    else:
        import gguf

        cfg, tokenizer, iterate, get, types = _gguf_base_tensors(base_path)
        T = gguf.GGMLQuantizationType
        same = {frozenset({T.F16}): torch.float16, frozenset({T.BF16}): torch.bfloat16}.get(frozenset(types),
                                                                                            torch.float32)
        dtype = HF_DTYPES.get(outtype, same)

    untie = needs_untied_output(cfg, adapters)
    out_cfg = cfg.replace(tie_word_embeddings=False) if untie else cfg
    changed = [0]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in iterate():
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue  # the tied output is rebuilt below when it has to differ
            delta = weight_delta(adapters, name)
            out_dtype = dtype or t.dtype
            if delta is not None:
                t = t.float() + delta.reshape(t.shape)
                changed[0] += 1
            yield name, t.to(out_dtype)
        if untie:
            embed = get("model.embed_tokens.weight")
            delta = weight_delta(adapters, "lm_head.weight")
            if delta is not None:
                embed = embed.float() + delta
                changed[0] += 1
            yield "lm_head.weight", embed.to(dtype or embed.dtype)

    created = not os.path.isdir(out_folder)
    try:
        write_folder(out_folder, out_cfg, tensors(), max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            _hf_tokenizer_files(tokenizer, out_cfg, out_folder)
        else:
            for name in HF_TOKENIZER_FILES:
                src = os.path.join(base_path, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(out_folder, name))
    except BaseException:
        if created:
            shutil.rmtree(out_folder, ignore_errors=True)
        raise
    return {"changed": changed[0], "untied": untie}


def base_config(path: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, GGUF architecture name) of a base model file or folder, without loading weights."""
    if os.path.isdir(path):
        from loraforge.formats.hf import read_config

        cfg = read_config(path)
        return cfg, cfg.arch
    from loraforge.formats.gguf import read_model

    gm = read_model(path)
    return gm.config, gm.metadata["general.architecture"]
