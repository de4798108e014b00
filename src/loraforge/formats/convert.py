"""Hugging Face folder (+ adapters) -> one GGUF model file that llama.cpp loads, streamed.

The GGUF header (metadata from config.json and the tokenizer files, one tensor-info record per
tensor with its final type and size) is written first; then each tensor is read from its
safetensors shard with plain reads (no memory map, so the input's pages never count towards
this process's memory), has the adapters' deltas added (`merge.weight_delta`, HF layout), is
permuted into llama.cpp's q/k order where the architecture needs it, encoded and written, and
dropped. Peak memory is a few copies of the largest single tensor, whatever the model size.

Per-architecture facts live in `gguf_arch`, tokenizer facts in `gguf_tokenizer`.
Output types f32/f16/bf16/q8_0 follow llama.cpp's converter: 1-D tensors (norms, biases) and
`rope_freqs` stay F32, matrices take the output type, and a matrix whose rows are not whole
blocks of it falls back to F16 (as llama.cpp's converter does on its QuantError). The other
types (q4_k_m, q6_k, q4_0 ...) are llama-quantize's per-tensor mixes over that output.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import Adapter

# f32/f16/bf16/q8_0 as llama.cpp's converter writes them; the other types as llama-quantize would
# quantize that converter output (its per-tensor mixes, quant/mixes.py)
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# -- encoding: the one place a float tensor becomes GGUF bytes -------------------------------------

def tensor_qtype(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    """GGML type name ("F32", "Q8_0" ...) a tensor is stored as for `outtype` (llama.cpp's converter rules)."""
    import gguf

    if len(shape) < 2 or gguf_name.endswith("_norm.weight") or gguf_name == "rope_freqs.weight":
        return "F32"
    wanted = outtype.upper()
    if wanted not in gguf.GGMLQuantizationType.__members__:
        raise LoraforgeError(f"--outtype {outtype!r}: not a GGML type")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]][0]
    return wanted if shape[-1] % block == 0 else "F16"


def encoded_nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return int(np.prod(shape)) // block * size


def encode_tensor(values: torch.Tensor, qtype: str) -> np.ndarray:
    """float32 `values` (rows, cols) or (n,) as the bytes of GGML type `qtype` (numpy, C order).

    F32/F16/BF16/Q8_0 go through the gguf package's reference code (bit-exact with llama.cpp's
    converter); other types through `loraforge.quant.quantize.quantize_tensor` when installed.
    """
    import gguf

    x = values.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == "F32":
        return x
    if qtype == "F16":
        return x.astype(np.float16)
    if qtype in ("BF16", "Q8_0"):
        return np.ascontiguousarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]))
    try:
        from loraforge.quant.quantize import quantize_tensor
    except ImportError:
        raise LoraforgeError(f"output type {qtype} needs loraforge's quantizer, which is not installed") from None
    return np.ascontiguousarray(np.asarray(quantize_tensor(values, gguf.GGMLQuantizationType[qtype])))


# -- reading safetensors one tensor at a time ------------------------------------------------------

@dataclass
class SourceTensor:
    """Where one HF tensor's bytes are: file, absolute byte range, dtype and shape."""

    name: str
    path: str
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        """The tensor as float32, read with plain file reads (no memory map)."""
        n = self.end - self.start
        buf = bytearray(n)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start)
            view, got = memoryview(buf), 0
            while got < n:
                k = f.readinto(view[got:])
                if not k:
                    raise file_error(self.path, f"truncated: tensor {self.name} runs past the end of the file")
                got += k
        if n == 0:
            return torch.zeros(self.shape, dtype=torch.float32)
        t = torch.frombuffer(buf, dtype=_SAFETENSORS_DTYPES[self.dtype]).reshape(self.shape)
        return t.float() if t.dtype != torch.float32 else t


def index_safetensors(folder: str) -> dict[str, SourceTensor]:
    """{HF name: SourceTensor} of every tensor in the folder's safetensors files (headers only)."""
    from loraforge.formats.hf import read_safetensors_header, safetensors_files

    out: dict[str, SourceTensor] = {}
    for path in safetensors_files(folder):
        header = read_safetensors_header(path)
        with open(path, "rb") as f:
            base = 8 + int.from_bytes(f.read(8), "little")
        size = os.path.getsize(path)
        for name, info in header.items():
            dtype = info.get("dtype")
            if dtype not in _SAFETENSORS_DTYPES:
                raise file_error(path, f"tensor {name} has dtype {dtype}; only F32/F16/BF16/F64 are converted")
            start, end = (base + int(o) for o in info["data_offsets"])
            if end > size:
                raise file_error(path, f"truncated: tensor {name} runs past the end of the file")
            out[name] = SourceTensor(name, path, start, end, dtype, tuple(int(d) for d in info["shape"]))
    return out


def native_outtype(folder: str) -> str:
    """The output type matching the folder's own float type ("f32", "f16" or "bf16"), from its embedding."""
    src = index_safetensors(folder).get("model.embed_tokens.weight")
    return {"F16": "f16", "BF16": "bf16"}.get(src.dtype if src else "", "f32")


# -- the plan ---------------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    gguf_name: str
    hf_name: str | None  # source tensor (None: generated, e.g. rope_freqs)
    shape: tuple[int, ...]  # torch order
    qtype: str
    heads: int | None  # q/k rows to permute by, else None
    values: Callable[[], torch.Tensor]  # float32, HF layout, adapters applied


def _expected_hf_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        if cfg.attention_bias:
            names += [p + f"self_attn.{n}.bias" for n in ("q_proj", "k_proj", "v_proj")]
        if cfg.o_proj_bias:
            names.append(p + "self_attn.o_proj.bias")
    return names


def _order_key(gguf_name: str) -> tuple[int, int, str]:
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    if m:
        return 1, int(m.group(1)), gguf_name
    return (0 if gguf_name in ("rope_freqs.weight", "token_embd.weight") else 2), 0, gguf_name


def plan_tensors(folder: str, cfg: ModelConfig, outtype: str,
                 adapters: Sequence[tuple[Adapter, float]] = ()) -> list[PlannedTensor]:
    """Every output tensor of the GGUF, in file order; raises a one-line error for a missing,
    unknown or misshapen tensor before anything is written."""
    from loraforge.formats.gguf_arch import arch_spec, llama3_rope_divisors
    from loraforge.formats.names import hf_to_gguf_name, qk_heads
    from loraforge.merge import needs_untied_output, weight_delta

    spec = arch_spec(cfg.arch)
    sources = index_safetensors(folder)
    present = {n for n in sources if not _SKIPPED.search(n)}
    expected = _expected_hf_names(cfg)
    missing = [n for n in expected if n not in present]
    if missing:
        raise file_error(folder, f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    unknown = sorted(present - set(expected))
    if unknown:
        raise file_error(folder, f"unexpected tensor {unknown[0]!r} for a {cfg.arch} model (not converted)")
    emb = sources["model.embed_tokens.weight"].shape
    if emb != (cfg.vocab_size, cfg.hidden_size):
        raise file_error(folder, f"model.embed_tokens.weight has shape {emb}, config.json says "
                                 f"{(cfg.vocab_size, cfg.hidden_size)}")

    def loader(hf_name: str, src: SourceTensor) -> Callable[[], torch.Tensor]:
        def values() -> torch.Tensor:
            t = src.read()
            delta = weight_delta(adapters, hf_name)
            return t if delta is None else t + delta.reshape(t.shape)
        return values

    plan: list[PlannedTensor] = []
    divisors = llama3_rope_divisors(cfg)
    if divisors is not None:
        plan.append(PlannedTensor("rope_freqs.weight", None, tuple(divisors.shape), "F32", None,
                                  lambda d=divisors: torch.from_numpy(d)))
    for hf_name in expected:
        src = sources[hf_name]
        gguf_name = hf_to_gguf_name(hf_name)
        heads = qk_heads(hf_name, cfg.num_attention_heads, cfg.num_key_value_heads) if spec.permute_qk else None
        plan.append(PlannedTensor(gguf_name, hf_name, src.shape, tensor_qtype(gguf_name, src.shape, outtype),
                                  heads, loader(hf_name, src)))
    if needs_untied_output(cfg, adapters):  # the adapted model's output differs from its input embedding
        src = sources["model.embed_tokens.weight"]

        def output_values() -> torch.Tensor:
            t = src.read()
            delta = weight_delta(adapters, "lm_head.weight")
            return t if delta is None else t + delta.reshape(t.shape)

        plan.append(PlannedTensor("output.weight", "lm_head.weight", src.shape,
                                  tensor_qtype("output.weight", src.shape, outtype), None, output_values))
    plan.sort(key=lambda p: _order_key(p.gguf_name))
    return plan


def _apply_mix(plan: list["PlannedTensor"], outtype: str, cfg: ModelConfig, gguf_arch: str) -> None:
    """Per-tensor types of a llama-quantize mix (Q4_K_M ...), as llama-quantize picks them for the
    converter's output; tensors it leaves alone stay F32 (1-D) or F16 (matrices)."""
    from loraforge.quant.mixes import ArchInfo, mix_tensor_types

    info = ArchInfo(gguf_arch, cfg.num_attention_heads, cfg.num_key_value_heads,
                    tied=not any(p.gguf_name == "output.weight" for p in plan))
    mixed = mix_tensor_types([(p.gguf_name, p.shape) for p in plan], outtype, cfg.num_hidden_layers, info)
    for p in plan:
        chosen = mixed.get(p.gguf_name)
        p.qtype = chosen.name if chosen is not None else ("F32" if len(p.shape) < 2 or p.qtype == "F32" else "F16")


# -- writing ----------------------------------------------------------------------------------------

def _model_name(folder: str, cfg: ModelConfig) -> str:
    name = cfg.name.strip().rstrip("/") if cfg.name else ""
    return os.path.basename(name) if name else os.path.basename(os.path.abspath(folder))


def convert_hf_to_gguf(folder: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16",
                       adapters: Sequence[tuple[Adapter, float]] = (), labels: Sequence[str] = (),
                       tokenizer_pre: str | None = None,
                       log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Write the HF model in `folder` (plus `adapters` at their scales, merged) as one GGUF file.

    Returns {"tensors", "changed", "arch", "bytes", "outtype"}. The file appears atomically; on any
    error nothing is left at `out_path`.
    """
    import gguf

    from loraforge.atomic import atomic_path
    from loraforge.formats.gguf_arch import arch_metadata, arch_spec
    from loraforge.formats.gguf_tokenizer import tokenizer_kv
    from loraforge.formats.hf import read_config
    from loraforge.formats.names import permute_qk_hf_to_gguf
    from loraforge.merge import weight_delta_exists

    from loraforge.quant.mixes import FILE_TYPES, parse_outtype

    folder, out_path = os.fspath(folder), os.fspath(out_path)
    outtype = parse_outtype(outtype)
    cfg = read_config(folder)
    spec = arch_spec(cfg.arch)
    tokenizer = tokenizer_kv(folder, cfg.vocab_size, pre=tokenizer_pre)
    if len(tokenizer.tokens) != cfg.vocab_size:
        raise file_error(folder, f"the tokenizer has {len(tokenizer.tokens)} tokens but the model's embedding "
                                 f"has {cfg.vocab_size} rows")
    plan = plan_tensors(folder, cfg, outtype if outtype in CONVERTER_OUTTYPES else "f16", adapters)
    if outtype not in CONVERTER_OUTTYPES:
        _apply_mix(plan, outtype, cfg, spec.gguf_arch)
    changed = sum(1 for p in plan if p.hf_name and weight_delta_exists(adapters, p.hf_name))

    writer = gguf.GGUFWriter(path=None, arch=spec.gguf_arch)
    writer.add_type("model")
    writer.add_name(_model_name(folder, cfg))
    for key, value in arch_metadata(cfg).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_file_type(int(FILE_TYPES[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer.write(writer)
    if adapters:
        writer.add_string("loraforge.merged_adapters", json.dumps(
            [{"adapter": labels[i] if i < len(labels) else f"#{i + 1}", "scale": s}
             for i, (_, s) in enumerate(adapters)]))
    for p in plan:
        qtype = gguf.GGMLQuantizationType[p.qtype]
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), encoded_nbytes(p.qtype, p.shape),
                               raw_dtype=qtype)

    total = 0
    with atomic_path(out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, p in enumerate(plan):
            values = p.values()
            if p.heads is not None:
                values = permute_qk_hf_to_gguf(values, p.heads)
            data = encode_tensor(values, p.qtype)
            del values
            writer.write_tensor_data(data)
            total += data.nbytes
            del data
        writer.close()
    log(f"converted {len(plan)} tensors ({spec.gguf_arch}, {outtype}, tokenizer {tokenizer.model}"
        f"{'/' + tokenizer.pre if tokenizer.model == 'gpt2' else ''})")
    return {"tensors": len(plan), "changed": changed, "arch": spec.gguf_arch, "bytes": total, "outtype": outtype}
