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
from loraforge.quant.mixes import OUTTYPES as MIX_OUTTYPES

GGUF_OUTTYPES = ("auto", "same") + MIX_OUTTYPES
HF_OUTTYPES = ("auto", "same", "f32", "f16", "bf16")
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

_KV_STRING, _KV_UINT32 = 8, 4


def kv_records(path: str) -> list[tuple[str, bytes]]:
    """The key/value records of a GGUF file as (key, raw bytes of key + type + value), in file order
    (spans found by the validating header parser)."""
    from loraforge.formats.gguf_file import read_gguf

    gf = read_gguf(path)
    return [(key, bytes(gf.mmap[start:end])) for key, start, end in gf.kv_spans]


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


def _nbytes(qtype: int, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return int(np.prod(shape)) // block * size


def _fits(qtype: int, shape: tuple[int, ...]) -> bool:
    import gguf

    return shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)][0] == 0


def _target_types(outtype: str, tensors: list[tuple[str, tuple[int, ...], int, bool]], cfg: ModelConfig,
                  arch: str, notes: list[str]) -> list[int]:
    """The output type of each (GGUF name, shape, base type, modified) tensor.

    A mix or single type (mixes.OUTTYPES) gives every matrix llama-quantize's type for it; 1-D
    tensors keep their type (F32 when an adapter changes one stored otherwise). `same` keeps the
    base's types; `auto` keeps them for untouched tensors and writes changed matrices at least
    as precisely as Q8_0 (F32/F16/BF16/Q8_0 bases keep their type), so re-quantization does not
    round a small adapter change away.
    """
    import gguf

    from loraforge.quant.mixes import ArchInfo, mix_tensor_types
    from loraforge.quant.quantize import QUANTIZABLE_TYPES

    T = gguf.GGMLQuantizationType
    keeps_adapter = (T.F32, T.F16, T.BF16, T.Q8_0)
    mixed: dict[str, Any] = {}
    if outtype not in ("same", "auto"):
        info = ArchInfo(arch, cfg.num_attention_heads, cfg.num_key_value_heads,
                        tied=not any(name == "output.weight" for name, *_ in tensors))
        mixed = mix_tensor_types([(name, shape) for name, shape, *_ in tensors], outtype, cfg.num_hidden_layers, info)
    out = []
    for name, shape, orig, modified in tensors:
        if len(shape) < 2 or (outtype not in ("same", "auto") and mixed[name] is None):
            out.append(orig if not modified or orig in (T.F32, T.F16) else T.F32)
            continue
        if outtype not in ("same", "auto"):
            out.append(int(mixed[name]))
            continue
        wanted = orig
        if modified and (orig not in QUANTIZABLE_TYPES or (outtype == "auto" and orig not in keeps_adapter)):
            wanted = T.Q8_0
            if orig not in QUANTIZABLE_TYPES:
                msg = f"note: {T(orig).name} cannot be written here; changed tensors of that type become Q8_0"
            else:
                msg = (f"note: changed {T(orig).name} tensors are written as Q8_0 so that the adapters' change "
                       f"survives (--outtype same keeps {T(orig).name}, q4_k_m etc. re-quantize everything)")
            if msg not in notes:
                notes.append(msg)
        out.append(int(wanted if not modified or _fits(wanted, shape) else T.F16))
    return out


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


class DeltaReport:
    """How much of the adapters' change survives in the written tensors.

    For each changed tensor: applied = written - base (both as float32), kept = <applied, delta> /
    <delta, delta> (1.0: all of the change is there; re-encoding a base that is already on the
    type's grid snaps a small change back to the base, kept near 0), error = |applied - delta| /
    |delta| (the type's rounding noise, relative to the size of the change).
    """

    def __init__(self) -> None:
        self.kept: list[float] = []
        self.error: list[float] = []
        self.names: list[str] = []

    def add(self, name: str, base: torch.Tensor, delta: torch.Tensor, written: torch.Tensor) -> None:
        """base, delta, written: float32 tensors of one shape (left unchanged)."""
        norm2 = float((delta * delta).sum(dtype=torch.float64))
        if norm2 == 0.0:
            return  # an adapter that changes nothing (B = 0) has nothing to keep
        applied = written - base
        self.kept.append(float((applied * delta).sum(dtype=torch.float64)) / norm2)
        self.error.append(float(applied.sub_(delta).square_().sum(dtype=torch.float64)) ** 0.5 / norm2 ** 0.5)
        self.names.append(name)

    def summary(self) -> dict[str, Any]:
        if not self.kept:
            return {"tensors": 0}
        worst = int(np.argmin(self.kept))
        return {"tensors": len(self.kept), "kept_mean": float(np.mean(self.kept)), "kept_min": self.kept[worst],
                "kept_min_tensor": self.names[worst], "error_mean": float(np.mean(self.error)),
                "error_max": float(np.max(self.error))}

    def lines(self, what: str) -> list[str]:
        s = self.summary()
        if not s["tensors"]:
            return []
        out = [f"adapter change kept in the {what} ({s['tensors']} changed tensors): mean {100 * s['kept_mean']:.1f}%, "
               f"min {100 * s['kept_min']:.1f}% ({s['kept_min_tensor']}); error of the applied change: "
               f"mean {100 * s['error_mean']:.1f}%, max {100 * s['error_max']:.1f}% of the change"]
        if s["kept_mean"] < 0.5:  # (a large error alone is rounding noise on top of a kept change)
            out.append("warning: the output type rounds most of the adapters' change away; merge with "
                       "--outtype auto (the default), q8_0 or f16 to keep it")
        return out


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


def _file_type(outtype: str, plan: list[_Planned], base_meta: dict[str, Any]) -> int | None:
    """general.file_type of the merged file: the mix's; for same/auto the base's when no matrix
    changed type and the base's value names its most common matrix type (None: leave the key as
    it is), else the file type of the most common matrix type written."""
    from loraforge.quant.mixes import FILE_TYPES, file_type_default, guess_file_type

    if outtype in FILE_TYPES:
        return int(FILE_TYPES[outtype])
    matrices = [p for p in plan if len(p.shape) >= 2]
    guessed = guess_file_type(p.qtype for p in matrices)
    if "general.file_type" in base_meta and all(p.qtype == p.source.qtype for p in matrices):
        if file_type_default(base_meta["general.file_type"]) == file_type_default(guessed):
            return None
    return guessed


def merge_to_gguf(base_path: str, adapters: Sequence[tuple[Adapter, float]], out_path: str,
                  outtype: str = "auto", labels: Sequence[str] = (),
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Write base + adapters as one GGUF model at `out_path` (atomic). Returns a summary dict.

    outtype: `auto` (untouched tensors copied, changed matrices at least Q8_0-precise), `same`
    (the base's types), or a llama-quantize type/mix name (f16, q8_0, q4_k_m, ...: see
    quant.mixes). Logs (on stderr) how much of the adapters' change the written tensors keep.
    """
    from loraforge.formats.gguf import read_model
    from loraforge.formats.gguf_file import read_gguf
    from loraforge.formats.names import (gguf_to_hf_name, is_aux_gguf_tensor, needs_qk_permutation,
                                         permute_qk_hf_to_gguf, qk_heads)
    from loraforge.quant.ggml import dequantize
    from loraforge.quant.quantize import quantize_tensor

    outtype = outtype.lower()
    if outtype not in GGUF_OUTTYPES:
        raise LoraforgeError(f"--outtype {outtype!r}: choose one of {', '.join(GGUF_OUTTYPES)}")
    if os.path.isdir(base_path):
        raise file_error(base_path, "merging into a GGUF file needs a GGUF base (an HF base merges with --to hf)")
    cfg = read_model(base_path).config  # validates the base
    gf = read_gguf(base_path)
    arch = gf.metadata["general.architecture"]
    permute = needs_qk_permutation(arch)

    sources: list[tuple[str, Any, str | None, bool]] = []  # (name, base tensor, HF name, modified)
    embd = None
    for t in gf.tensors:
        hf = None if is_aux_gguf_tensor(t.name) or t.name == "rope_freqs.weight" else gguf_to_hf_name(t.name, arch)
        sources.append((t.name, t, hf, hf is not None and weight_delta_exists(adapters, hf)))
        if t.name == "token_embd.weight":
            embd = t
    if needs_untied_output(cfg, adapters) and embd is not None:
        sources.append(("output.weight", embd, "lm_head.weight", _touches(adapters, "lm_head")))
    notes: list[str] = []
    types = _target_types(outtype, [(n, t.shape, t.qtype, m) for n, t, _, m in sources], cfg, arch, notes)
    plan = [_Planned(name, t, hf, qtype, not modified and qtype == t.qtype, t.shape, _nbytes(qtype, t.shape))
            for (name, t, hf, modified), qtype in zip(sources, types)]
    for note in notes:
        log(note)

    file_type = _file_type(outtype, plan, gf.metadata)
    kv = []
    for key, record in kv_records(base_path):
        if key == "general.file_type" and file_type is not None:
            record = _kv_uint32(key, file_type)
        if key != "loraforge.merged_adapters":
            kv.append(record)
    if file_type is not None and "general.file_type" not in gf.metadata:
        kv.append(_kv_uint32("general.file_type", file_type))
    if adapters:
        kv.append(_kv_string("loraforge.merged_adapters", json.dumps(
            [{"adapter": (labels[i] if i < len(labels) else f"#{i + 1}"), "scale": s}
             for i, (_, s) in enumerate(adapters)])))
    changed = [0]
    report = DeltaReport()

    def tensor_bytes(p: _Planned) -> np.ndarray:
        if p.copy_raw:
            return gf.data(p.source)
        base = _decode(gf, p.source)
        delta = weight_delta(adapters, p.hf_name) if p.hf_name else None
        values = base
        if delta is not None:
            heads = qk_heads(p.hf_name, cfg.num_attention_heads, cfg.num_key_value_heads)
            if permute and heads is not None:
                delta = permute_qk_hf_to_gguf(delta, heads)
            delta = delta.reshape(base.shape)
            values = base + delta
            changed[0] += 1
        if values.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(values))).all()):  # NaN spreads
            whose = "the adapters or their scales" if delta is not None else f"the base {base_path}"
            raise LoraforgeError(f"merged tensor {p.name} has non-finite values (check {whose}); "
                                 f"nothing was written to {out_path}")
        data = quantize_tensor(values, p.qtype)
        if delta is not None:
            written = dequantize(torch.from_numpy(data), p.qtype, p.shape, torch.float32)
            report.add(p.name, base, delta, written)
        return data

    from loraforge.formats.gguf_file import verify_written_gguf

    with atomic_path(out_path, verify=verify_written_gguf, size_hint=sum(p.nbytes for p in plan)) as tmp:
        _write_gguf(tmp, gf.version, kv, plan, gf.alignment, tensor_bytes)
    for line in report.lines("merged file"):
        log(line)
    return {"tensors": len(plan), "changed": changed[0], "arch": arch, "notes": notes,
            "file_type": file_type if file_type is not None else gf.metadata.get("general.file_type"),
            "types": {p.name: p.qtype for p in plan}, "delta": report.summary()}


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
                outtype: str = "auto", max_shard_bytes: int = 2 << 30,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Write base + adapters as an HF folder (config.json, safetensors shards, tokenizer files).

    outtype: f32, f16, bf16, or auto/same (the base's dtype; float32 for a quantized GGUF base).
    Logs (on stderr) how much of the adapters' change the written dtype keeps.
    """
    from loraforge.formats.hf import iter_tensors, read_config, write_folder

    outtype = outtype.lower()
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
    report = DeltaReport()

    def merged(name: str, t: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        out_dtype = dtype or t.dtype
        if delta is None:
            return t.to(out_dtype)
        base = t.float()
        delta = delta.reshape(base.shape)
        out = (base + delta).to(out_dtype)
        report.add(name, base, delta, out.float())
        changed[0] += 1
        return out

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in iterate():
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue  # the tied output is rebuilt below when it has to differ
            yield name, merged(name, t, weight_delta(adapters, name))
        if untie:
            yield "lm_head.weight", merged("lm_head.weight", get("model.embed_tokens.weight"),
                                           weight_delta(adapters, "lm_head.weight"))

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
    for line in report.lines("merged folder"):
        log(line)
    return {"changed": changed[0], "untied": untie, "delta": report.summary()}


def base_config(path: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, GGUF architecture name) of a base model file or folder, without loading weights."""
    if os.path.isdir(path):
        from loraforge.formats.hf import read_config

        cfg = read_config(path)
        return cfg, cfg.arch
    from loraforge.formats.gguf import read_model

    gm = read_model(path)
    return gm.config, gm.metadata["general.architecture"]
