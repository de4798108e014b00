"""Hugging Face folder (+ adapters) -> one GGUF model file that llama.cpp loads, streamed.

The GGUF header (metadata from config.json and the tokenizer files, one tensor-info record per
tensor with its final type and size) is written first; then each tensor is read from its
safetensors shard with plain reads (no memory map, so the input's pages never count towards
this process's memory), has the adapters' deltas added (`merge.weight_delta`, HF layout), is put
into llama.cpp's layout of its family (`gguf_arch.tensor_layout`: Baichuan's W_pack split into
q/k/v, q/k rows permuted for llama-arch files, Gemma's norms + 1), encoded and written, and
dropped. Peak memory is a few copies of the largest single tensor, whatever the model size.

Per-architecture facts live in `gguf_arch` (built on `names.ARCHES`), tokenizer facts in
`gguf_tokenizer`. One deliberate difference from llama.cpp's converter: Baichuan 2's output rows
are L2-normalised (its NormHead, which the HF model applies when it runs and llama.cpp does not),
so the file gives the HF model's logits; Baichuan 1 (64,000 tokens, plain head) is written as is.
Output types f32/f16/bf16/q8_0 follow llama.cpp's converter: 1-D tensors (norms, biases,
rope factors) stay F32, matrices take the output type, and a matrix whose rows are not whole
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
    shape: tuple[int, ...]  # torch order, as written
    qtype: str
    values: Callable[[], torch.Tensor]  # float32, GGUF layout (rows split, permuted, + 1), adapters applied


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of every weight a `cfg` model's safetensors hold (lm_head only when
    untied), in HF's layout: stacked qkv_proj / W_pack / gate_up_proj, q/k norms, Gemma's four norms."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg.post_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + n + ".weight": (h,) for n in norms})
        projections = {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size}
        if cfg.fused_qkv:
            shapes[p + f"self_attn.{cfg.fused_qkv}.weight"] = (sum(projections.values()), h)
        else:
            shapes.update({p + f"self_attn.{n}.weight": (rows, h) for n, rows in projections.items()})
        if cfg.attention_bias:
            shapes.update({p + f"self_attn.{n}.bias": (rows,) for n, rows in projections.items()})
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.q_size)
        if cfg.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.qk_norm:
            shapes.update({p + f"self_attn.{n}.weight": (cfg.head_dim,) for n in ("q_norm", "k_norm")})
        if cfg.fused_gate_up:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * f, h)
        else:
            shapes.update({p + f"mlp.{n}.weight": (f, h) for n in ("gate_proj", "up_proj")})
        shapes[p + "mlp.down_proj.weight"] = (h, f)
    return shapes


def _order_key(gguf_name: str) -> tuple[int, int, str]:
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    if m:
        return 1, int(m.group(1)), gguf_name
    return (0 if gguf_name.startswith("rope_") or gguf_name == "token_embd.weight" else 2), 0, gguf_name


def plan_tensors(folder: str, cfg: ModelConfig, outtype: str,
                 adapters: Sequence[tuple[Adapter, float]] = ()) -> list[PlannedTensor]:
    """Every output tensor of the GGUF, in file order; raises a one-line error for a missing,
    unknown or misshapen tensor (or an adapter llama.cpp's file of the family cannot hold) before
    anything is written."""
    from loraforge.formats.gguf_arch import extra_tensors, llama_cpp_arch, tensor_layout
    from loraforge.formats.names import arch_facts
    from loraforge.merge import needs_untied_output, weight_delta

    sources = index_safetensors(folder)
    present = {n for n in sources if not _SKIPPED.search(n)}
    expected = expected_hf_shapes(cfg)
    missing = [n for n in expected if n not in present]
    if missing:
        raise file_error(folder, f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    unknown = sorted(present - set(expected))
    if unknown:
        raise file_error(folder, f"unexpected tensor {unknown[0]!r} for a {cfg.arch} model (not converted)")
    for name, shape in expected.items():
        if sources[name].shape != shape:
            raise file_error(sources[name].path, f"tensor {name} has shape {sources[name].shape}, config.json "
                                                 f"implies {shape}")
    untied_output = needs_untied_output(cfg, adapters)
    if untied_output and arch_facts(llama_cpp_arch(cfg.arch)).output_tied:
        raise LoraforgeError(f"an adapter on lm_head / embed_tokens of a tied {cfg.arch} model cannot be merged "
                             "for llama.cpp: its files of this architecture have no separate output layer")

    def loader(hf_name: str, src: SourceTensor) -> Callable[[], torch.Tensor]:
        def values() -> torch.Tensor:
            t = src.read()
            delta = weight_delta(adapters, hf_name)
            t = t if delta is None else t + delta.reshape(t.shape)
            if hf_name == "lm_head.weight" and cfg.norm_head:  # Baichuan 2's NormHead, as the HF model applies it
                t = torch.nn.functional.normalize(t, dim=-1)
            return t
        return values

    held: dict[str, list] = {}  # a stacked tensor split into several GGUF tensors: read once, kept for its parts

    def placed(hf_name: str, read: Callable[[], torch.Tensor], layout, n_parts: int) -> Callable[[], torch.Tensor]:
        def values() -> torch.Tensor:
            if n_parts == 1:
                return layout.apply(read())
            entry = held.setdefault(hf_name, [None, n_parts])
            if entry[0] is None:
                entry[0] = read()
            entry[1] -= 1
            part = layout.apply(entry[0])
            if entry[1] == 0:
                del held[hf_name]
            return part
        return values

    plan: list[PlannedTensor] = []
    for gguf_name, array in extra_tensors(cfg).items():
        plan.append(PlannedTensor(gguf_name, None, tuple(array.shape), "F32", lambda a=array: torch.from_numpy(a)))
    for hf_name in expected:
        read = loader(hf_name, sources[hf_name])
        layouts = tensor_layout(hf_name, cfg)
        for layout in layouts:
            rows = sources[hf_name].shape[0] if layout.rows is None else layout.rows[1] - layout.rows[0]
            shape = (rows, *sources[hf_name].shape[1:])
            plan.append(PlannedTensor(layout.gguf_name, hf_name, shape, tensor_qtype(layout.gguf_name, shape, outtype),
                                      placed(hf_name, read, layout, len(layouts))))
    if untied_output:  # the adapted model's output differs from its input embedding
        src = sources["model.embed_tokens.weight"]
        plan.append(PlannedTensor("output.weight", "lm_head.weight", src.shape,
                                  tensor_qtype("output.weight", src.shape, outtype), loader("lm_head.weight", src)))
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


def convertible_config(folder: str | os.PathLike) -> ModelConfig:
    """The folder's ModelConfig, refused (one line) when its family cannot be written for llama.cpp or
    llama.cpp would run it differently from its config.json (checked before any slow work)."""
    from loraforge.formats.gguf_arch import check_expressible
    from loraforge.formats.hf import read_config

    cfg = read_config(folder)
    check_expressible(cfg, os.path.join(os.fspath(folder), "config.json"))
    return cfg


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
    from loraforge.formats.gguf_arch import add_metadata, arch_metadata, arch_spec
    from loraforge.formats.gguf_tokenizer import tokenizer_kv
    from loraforge.merge import weight_delta_exists
    from loraforge.quant.mixes import FILE_TYPES, parse_outtype

    folder, out_path = os.fspath(folder), os.fspath(out_path)
    outtype = parse_outtype(outtype)
    cfg = convertible_config(folder)
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
    add_metadata(writer, arch_metadata(cfg))
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
        for p in plan:
            values = p.values()
            data = encode_tensor(values, p.qtype)
            del values
            writer.write_tensor_data(data)
            total += data.nbytes
            del data
        writer.close()
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings \
            and spec.gguf_arch not in ("gemma2", "gemma3"):
        log(f"note: llama.cpp runs {spec.gguf_arch} files without the {cfg.sliding_window}-token sliding window of "
            f"this {cfg.arch} model; its outputs differ from transformers' past {cfg.sliding_window} tokens")
    log(f"converted {len(plan)} tensors ({spec.gguf_arch}, {outtype}, tokenizer {tokenizer.model}"
        f"{'/' + tokenizer.pre if tokenizer.model == 'gpt2' else ''})")
    return {"tensors": len(plan), "changed": changed, "arch": spec.gguf_arch, "bytes": total, "outtype": outtype}
