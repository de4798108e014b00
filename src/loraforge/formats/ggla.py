"""Read the `.bin` LoRA files ("ggla") written by llama.cpp's removed `finetune` (`--lora-out`).

Layout (little-endian; from finetune.cpp `save_as_llama_lora` and export-lora.cpp `load_lora`):
  uint32 magic 0x67676c61 ('ggla', so the file starts with b"algg"), uint32 version (1),
  uint32 lora_r, uint32 lora_alpha, then until end of file, per tensor:
  uint32 n_dims, uint32 name_len, uint32 ggml type (0 f32, 1 f16), uint32 ne[n_dims],
  name bytes, zero padding to the next multiple of 32 from the file start, then the data.
Names are `<gguf tensor>.loraA` / `.loraB`. Both are stored with ne = (r, n): ne0 is the rank, so
as numpy A is (in, r) and B is (out, r), and the weight delta is mul_mat(A, B) = B @ A.T, in
the GGUF (q/k-permuted) layout. llama.cpp applied it scaled by user_scale * alpha / r with the
header's r for every tensor, whatever its own rank; finetune also trained rank-1 deltas on the
RMSNorm weights, which an `Adapter` cannot hold: they go to `metadata["norm_deltas"]` (HF names,
already scaled), are applied by `merge`, and are reported as dropped elsewhere.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np
import torch

from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import Adapter
from loraforge.formats.names import gguf_to_hf_name, needs_qk_permutation, permute_qk_gguf_to_hf, qk_heads

MAGIC = 0x67676C61
VERSION = 1
_DTYPES = {0: np.float32, 1: np.float16}


def read_ggla_tensors(path: str | os.PathLike) -> tuple[int, int, dict[str, np.ndarray]]:
    """(r, alpha, {name: numpy array in reversed-ne order}) of a ggla file, validating as it reads."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 16:
        raise file_error(path, "too short for a ggla LoRA header")
    magic, version, lora_r, lora_alpha = struct.unpack_from("<4I", data, 0)
    if magic != MAGIC:
        raise file_error(path, "not a llama.cpp ggla LoRA file (bad magic)")
    if version != VERSION:
        raise file_error(path, f"ggla version {version} is not supported (only 1)")
    if lora_r == 0:
        raise file_error(path, "ggla header has rank 0")
    pos = 16
    tensors: dict[str, np.ndarray] = {}
    while pos < len(data):
        if pos + 12 > len(data):
            raise file_error(path, f"truncated tensor header at byte {pos}")
        n_dims, name_len, ggml_type = struct.unpack_from("<3I", data, pos)
        pos += 12
        if n_dims > 4:
            raise file_error(path, f"tensor at byte {pos - 12} has {n_dims} dimensions (damaged file?)")
        ne = struct.unpack_from(f"<{n_dims}I", data, pos) if n_dims else ()
        pos += 4 * n_dims
        name = data[pos:pos + name_len].decode("utf-8", errors="replace")
        pos += name_len
        pos += (-pos) % 32
        if n_dims == 0 and name_len == 0:
            continue  # finetune wrote an empty record for a missing tensor
        if ggml_type not in _DTYPES:
            raise file_error(path, f"tensor {name} has ggml type {ggml_type}; only f32 and f16 are supported")
        count = int(np.prod(ne)) if ne else 1
        nbytes = count * np.dtype(_DTYPES[ggml_type]).itemsize
        if pos + nbytes > len(data):
            raise file_error(path, f"truncated: tensor {name} runs past the end of the file")
        arr = np.frombuffer(data, dtype=_DTYPES[ggml_type], count=count, offset=pos).astype(np.float32)
        tensors[name] = arr.reshape(tuple(reversed(ne)) if ne else ())
        pos += nbytes
    return int(lora_r), int(lora_alpha), tensors


def _as_2d(arr: np.ndarray) -> np.ndarray:
    """ne (r,) written by ggml_n_dims for (r, 1) tensors -> numpy (1, r)."""
    return arr.reshape(1, -1) if arr.ndim == 1 else arr


def read_ggla(path: str | os.PathLike, cfg: ModelConfig) -> Adapter:
    """Import a finetune `.bin` LoRA for a base with config `cfg` into an `Adapter` (HF layout).

    Per-module alphas reproduce llama.cpp's header scaling alpha / r_header on every tensor.
    """
    from loraforge.formats.adapter_shapes import check_adapter, check_pair_shapes

    path = os.fspath(path)
    lora_r, lora_alpha, raw = read_ggla_tensors(path)
    scale = lora_alpha / lora_r
    permute = needs_qk_permutation(cfg.arch)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in raw.items():
        if name.endswith(".loraA"):
            which = "A"
        elif name.endswith(".loraB"):
            which = "B"
        else:
            raise file_error(path, f"tensor {name!r} is neither .loraA nor .loraB")
        base = name[: -len(".loraA")]
        try:
            hf = gguf_to_hf_name(base)
        except LoraforgeError:
            raise file_error(path, f"tensor {name!r} targets {base!r}, unknown for a llama model") from None
        pairs.setdefault(hf, {})[which] = _as_2d(arr)

    tensors: dict[str, torch.Tensor] = {}
    alpha_pattern: dict[str, float] = {}
    norm_deltas: dict[str, torch.Tensor] = {}
    for hf, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise file_error(path, f"{hf} has only one of loraA / loraB")
        a, b = ab["A"], ab["B"]  # numpy (in, r), (out, r)
        if a.shape[1] != b.shape[1]:
            raise file_error(path, f"{hf}: loraA {a.shape[::-1]} and loraB {b.shape[::-1]} ranks differ")
        rank = int(a.shape[1])
        if hf.endswith("norm.weight"):
            delta = (b @ a.T).reshape(-1) * scale  # ne (n, 1): one row
            if delta.shape[0] != cfg.hidden_size:
                raise file_error(path, f"{hf}: norm delta of size {delta.shape[0]}, the model has "
                                       f"{cfg.hidden_size}")
            norm_deltas[hf] = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float32))
            continue
        module = hf[: -len(".weight")]
        # shapes in HF layout, checked before the q/k un-permute (which needs the right row count)
        if module == "model.embed_tokens":
            check_pair_shapes(module, b.T.shape, a.shape, cfg, path)
        else:
            check_pair_shapes(module, a.T.shape, b.shape, cfg, path)
        heads = qk_heads(hf, cfg.num_attention_heads, cfg.num_key_value_heads)
        if permute and heads is not None:
            b = permute_qk_gguf_to_hf(b, heads)
        if module == "model.embed_tokens":
            # delta (vocab, hidden) = B_np @ A_np.T with A_np (hidden, r), B_np (vocab, r);
            # ours: delta = (B' @ A').T with A' (r, vocab), B' (hidden, r)
            ours_a, ours_b = b.T, a
        else:
            ours_a, ours_b = a.T, b
        tensors[module + ".lora_A"] = torch.from_numpy(np.ascontiguousarray(ours_a, dtype=np.float32))
        tensors[module + ".lora_B"] = torch.from_numpy(np.ascontiguousarray(ours_b, dtype=np.float32))
        if rank != lora_r:
            alpha_pattern[module] = scale * rank
    metadata: dict[str, Any] = {"source": "ggla", "ggla_r": lora_r, "ggla_alpha": lora_alpha}
    if norm_deltas:
        metadata["norm_deltas"] = norm_deltas
    adapter = Adapter(tensors=tensors, alpha=float(lora_alpha), alpha_pattern=alpha_pattern, metadata=metadata)
    check_adapter(adapter, cfg, path)
    return adapter


def dropped_norm_note(adapter: Adapter) -> str | None:
    """A one-line note when an imported ggla adapter carries nonzero norm deltas that a format drops."""
    deltas = adapter.metadata.get("norm_deltas") or {}
    nonzero = [n for n, d in deltas.items() if bool(torch.any(d != 0))]
    if not nonzero:
        return None
    return (f"note: {len(nonzero)} RMSNorm delta(s) of the old finetune adapter (e.g. {nonzero[0]}) cannot be "
            "stored in this format and are dropped; `loraforge merge` applies them")
