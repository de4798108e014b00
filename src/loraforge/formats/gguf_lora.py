"""GGUF LoRA adapters as llama.cpp loads them (`--lora`, `--lora-scaled`, `llama_adapter_lora_init`).

Layout (checked against llama.cpp's src/llama-adapter.cpp and llama-graph.cpp):
- metadata `general.type = "adapter"`, `general.architecture` = the base's, `adapter.type = "lora"`,
  `adapter.lora.alpha` (FLOAT32). llama.cpp scales each pair by user_scale * alpha / r with r read
  from lora_b's shape (alpha 0 or absent: user_scale alone).
- tensors `<base tensor>.lora_a` (numpy (r, in)) and `.lora_b` ((out, r)); the base tensor must
  exist in the model. `token_embd.weight.lora_a` is stored transposed, numpy (vocab, r), because
  llama.cpp gathers its rows by token id; lora_b stays (hidden, r).
- llama-arch q/k rows are in llama.cpp's interleaved-rope order: only lora_b is permuted.
- a tied model's output layer *is* `token_embd.weight` in llama.cpp, so a token_embd pair would
  also be applied (with the wrong orientation) to the output: such adapters are refused, as is
  an lm_head adapter for a model without `output.weight`.

GGUF has one alpha. Per-module scales that differ from alpha / r (alpha_pattern, rsLoRA with
mixed ranks) are folded into lora_b; the `loraforge.*` keys record enough to undo that on read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np
import torch

from loraforge.atomic import atomic_path
from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import Adapter
from loraforge.formats.names import (gguf_to_hf_name, hf_to_gguf_name, needs_qk_permutation,
                                     permute_qk_gguf_to_hf, permute_qk_hf_to_gguf, qk_heads)

ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
FORMAT_VERSION = 1


def encode_array(x: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw_dtype for GGUFWriter.add_tensor) of float32 `x` in `outtype`.

    q8_0 needs rows that are whole 32-value blocks; other rows (e.g. a rank-8 lora_b) stay f32.
    """
    import gguf

    x = np.ascontiguousarray(x, dtype=np.float32)
    if outtype == "f32":
        return x, None
    if outtype == "f16":
        return x.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if x.shape[-1] % block:
        return x, None
    return gguf.quants.quantize(x, qtype), qtype


def _module_scaling(adapter: Adapter, module: str) -> float:
    return adapter.scaling(module)


def _common_alpha(adapter: Adapter) -> float:
    """The GGUF alpha that makes alpha / r equal the most modules' own scaling (the rest get folded)."""
    values = [_module_scaling(adapter, m) * adapter.rank(m) for m in adapter.modules()]
    rounded = Counter(float(np.float32(v)) for v in values)
    return rounded.most_common(1)[0][0] if rounded else float(adapter.alpha)


def _check_for_llamacpp(adapter: Adapter, cfg: ModelConfig, path: str) -> None:
    modules = set(adapter.modules())
    if cfg.tie_word_embeddings and "lm_head" in modules:
        raise file_error(path, "the base model ties its output layer to the token embeddings (no output.weight), "
                               "so llama.cpp cannot load an lm_head adapter for it; merge it instead "
                               "(`loraforge merge` writes a separate output.weight)")
    if cfg.tie_word_embeddings and "model.embed_tokens" in modules:
        raise file_error(path, "the base model ties its output layer to the token embeddings; llama.cpp would "
                               "apply a token_embd adapter to the output layer too (and fail); merge it instead")


def _gguf_layout(adapter: Adapter, cfg: ModelConfig, gguf_arch: str) -> Adapter:
    """The adapter with q/k/v modules as the architecture's GGUF files hold them: llama.cpp's
    converter splits Baichuan's W_pack into attn_q/k/v; Phi-3 keeps attn_qkv."""
    from loraforge.formats.fused_adapters import match_layout
    from loraforge.formats.names import arch_facts

    if not arch_facts(gguf_arch).gguf_splits_qkv:
        return adapter
    return match_layout(adapter, cfg, fused_qkv=None)


def write_gguf_adapter(path: str | os.PathLike, adapter: Adapter, cfg: ModelConfig, gguf_arch: str,
                       outtype: str = "f32") -> None:
    """Write `adapter` (HF layout) as a llama.cpp GGUF LoRA for a base with config `cfg`, atomically."""
    import gguf

    from loraforge.formats.adapter_shapes import check_adapter

    from loraforge.formats.gguf_arch import llama_cpp_arch

    path = os.fspath(path)
    gguf_arch = llama_cpp_arch(gguf_arch)  # llama.cpp loads Mistral as "llama" and refuses any other name
    if outtype not in ADAPTER_OUTTYPES:
        raise LoraforgeError(f"--outtype {outtype!r} is not available for GGUF adapters "
                             f"(choose {', '.join(ADAPTER_OUTTYPES)})")
    check_adapter(adapter, cfg, path)
    _check_for_llamacpp(adapter, cfg, path)
    adapter = _gguf_layout(adapter, cfg, gguf_arch)
    permute = needs_qk_permutation(gguf_arch)
    alpha = _common_alpha(adapter)
    folded: dict[str, float] = {}
    arrays: list[tuple[str, np.ndarray]] = []
    for module in adapter.modules():
        rank = adapter.rank(module)
        a = adapter.tensors[module + ".lora_A"].detach().float().cpu()
        b = adapter.tensors[module + ".lora_B"].detach().float().cpu()
        factor = _module_scaling(adapter, module) / (float(np.float32(alpha)) / rank)
        if abs(factor - 1.0) > 1e-6:
            folded[module] = factor
            b = b * factor
        heads = qk_heads(module + ".", cfg.num_attention_heads, cfg.num_key_value_heads)
        if permute and heads is not None:
            b = permute_qk_hf_to_gguf(b, heads)
        base_name = hf_to_gguf_name(module + ".weight", gguf_arch)
        if module == "model.embed_tokens":
            a = a.t()  # llama.cpp gathers rows of lora_a by token id: numpy (vocab, r)
        arrays.append((base_name + ".lora_a", a.contiguous().numpy()))
        arrays.append((base_name + ".lora_b", b.contiguous().numpy()))

    from loraforge.formats.gguf_file import verify_written_gguf

    value_bytes = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1}[outtype]
    with atomic_path(path, verify=verify_written_gguf,
                     size_hint=sum(arr.size for _, arr in arrays) * value_bytes) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=gguf_arch)
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        if cfg.name:
            writer.add_string("general.name", f"{cfg.name} LoRA")
        writer.add_string("loraforge.version", str(FORMAT_VERSION))
        writer.add_float32("loraforge.alpha", float(adapter.alpha))
        writer.add_bool("loraforge.use_rslora", bool(adapter.use_rslora))
        if adapter.alpha_pattern:
            writer.add_string("loraforge.alpha_pattern", json.dumps(adapter.alpha_pattern, sort_keys=True))
        if folded:
            writer.add_string("loraforge.folded_scale", json.dumps(folded, sort_keys=True))
        for name, arr in arrays:
            data, raw_dtype = encode_array(arr, outtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _as_float32(t, path: str) -> np.ndarray:
    """A reader tensor as float32 numpy in its numpy (reversed-ne) shape."""
    import gguf

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        values = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(int(t.tensor_type)))
    except NotImplementedError:
        raise file_error(path, f"tensor {t.name} has type {t.tensor_type.name}, which cannot be read") from None
    return np.array(values, dtype=np.float32).reshape(shape)


def _scalar(reader, key: str, default: Any = None) -> Any:
    from loraforge.formats.gguf_meta import field_value

    field = reader.fields.get(key)
    return default if field is None else field_value(reader, field)


def read_gguf_adapter(path: str | os.PathLike, cfg: ModelConfig | None = None) -> Adapter:
    """A GGUF LoRA (ours or any llama.cpp one) as an `Adapter` in HF layout, checked against `cfg`."""
    from loraforge.formats.adapter_shapes import check_adapter, check_pair_shapes
    from loraforge.formats.gguf import open_reader

    path = os.fspath(path)
    reader = open_reader(path)
    kind = _scalar(reader, "general.type", "")
    if kind != "adapter":
        raise file_error(path, f"general.type is {kind!r}, not 'adapter' (not a LoRA adapter)")
    if _scalar(reader, "adapter.type", "") != "lora":
        raise file_error(path, f"adapter.type is {_scalar(reader, 'adapter.type')!r}, not 'lora'")
    arch = _scalar(reader, "general.architecture", "")
    from loraforge.formats.gguf_arch import same_arch

    if cfg is not None and not same_arch(arch, cfg.arch):
        raise file_error(path, f"adapter is for architecture {arch!r}, the base model is {cfg.arch!r}")
    permute = needs_qk_permutation(arch)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        name = t.name
        if name.endswith("_norm.weight"):
            continue  # llama.cpp ignores norm tensors in adapters too
        if name.endswith(".lora_a"):
            which = "a"
        elif name.endswith(".lora_b"):
            which = "b"
        else:
            raise file_error(path, f"tensor {name!r} is neither .lora_a nor .lora_b")
        base = name[: -len(".lora_a")]
        try:
            hf = gguf_to_hf_name(base, arch)
        except LoraforgeError:
            raise file_error(path, f"tensor {name!r} targets {base!r}, unknown for architecture {arch!r}") from None
        if not hf.endswith(".weight") or hf.endswith("norm.weight"):
            raise file_error(path, f"tensor {name!r} targets {base!r}, which cannot take a LoRA")
        pairs.setdefault(hf[: -len(".weight")], {})[which] = _as_float32(t, path)

    n_head = cfg.num_attention_heads if cfg else None
    n_kv = cfg.num_key_value_heads if cfg else None
    tensors: dict[str, torch.Tensor] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise file_error(path, f"{hf_to_gguf_name(module + '.weight', arch)} has only one of lora_a / lora_b")
        a, b = ab["a"], ab["b"]
        if module == "model.embed_tokens":
            a = a.T  # stored (vocab, r)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise file_error(path, f"{module}: lora_a {a.shape} and lora_b {b.shape} do not pair up "
                                   "(an old finetune adapter? convert it with `loraforge export`)")
        if cfg is not None:  # before the q/k un-permute, which needs the right row count
            check_pair_shapes(module, a.shape, b.shape, cfg, path)
        heads = qk_heads(module + ".", n_head or 0, n_kv or 0)
        if permute and heads is not None:
            if cfg is None:
                raise LoraforgeError(f"{path}: reading q/k adapters of a llama-arch GGUF needs the base model")
            b = permute_qk_gguf_to_hf(b, heads)
        tensors[module + ".lora_A"] = torch.from_numpy(np.ascontiguousarray(a))
        tensors[module + ".lora_B"] = torch.from_numpy(np.ascontiguousarray(b))

    alpha = float(_scalar(reader, "adapter.lora.alpha", 0.0) or 0.0)
    metadata: dict[str, Any] = {"source": "gguf", "arch": arch}
    if "loraforge.version" in reader.fields:
        folded = json.loads(_scalar(reader, "loraforge.folded_scale", "{}"))
        for module, factor in folded.items():
            key = module + ".lora_B"
            if key in tensors:
                tensors[key] = tensors[key] / factor
        adapter = Adapter(tensors=tensors, alpha=float(_scalar(reader, "loraforge.alpha", alpha)),
                          use_rslora=bool(_scalar(reader, "loraforge.use_rslora", False)),
                          alpha_pattern={k: float(v) for k, v in
                                         json.loads(_scalar(reader, "loraforge.alpha_pattern", "{}")).items()},
                          metadata=metadata)
    else:
        adapter = Adapter(tensors=tensors, alpha=alpha, metadata=metadata)
        if alpha == 0.0:  # llama.cpp: no alpha means scale 1 whatever the rank
            adapter.alpha_pattern = {m: float(adapter.rank(m)) for m in adapter.modules()}
    check_adapter(adapter, cfg, path)
    return adapter
