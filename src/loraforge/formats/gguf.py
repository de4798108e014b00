"""Read llama-family models from GGUF files: metadata, and tensors memory-mapped in HF layout.

Tensors stay as the file's bytes (quantized blocks or floats); q/k rows of llama-arch files
are un-permuted to HF order (rows are whole quant blocks, so no requantization is needed), and
Gemma's norm weights, stored with 1 added, read back as HF's zero-centred values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraforge.config import ModelConfig
from loraforge.config_sources import config_from_gguf_metadata
from loraforge.errors import LoraforgeError, file_error
from loraforge.formats.names import (gguf_to_hf_name, is_aux_gguf_tensor, is_norm_plus_one, needs_qk_permutation,
                                     permute_qk_gguf_to_hf, qk_heads)

GGUF_MAGIC = b"GGUF"


@dataclass
class RawTensor:
    """One tensor as stored: `data` is float32/float16 (rows, cols) or uint8 blocks (rows, bytes_per_row).

    `stored` is the view into the file; q/k rows of llama-arch files are un-permuted on each
    access to `data` (`heads` set), so no un-permuted copy of every q/k matrix is kept around.
    `minus` is subtracted from float values on access (1 for Gemma's norms, stored as 1 + w).
    """

    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order, e.g. (out_features, in_features)
    stored: np.ndarray
    heads: int | None = None  # rows to un-permute by (llama-arch q/k), else None
    minus: float = 0.0

    @property
    def data(self) -> np.ndarray:
        if self.minus:
            return (self.stored.astype(np.float32) - np.float32(self.minus)).astype(self.stored.dtype)
        return self.stored if self.heads is None else permute_qk_gguf_to_hf(self.stored, self.heads)

    def release(self) -> None:
        """Drop the file pages under this tensor from memory (see gguf_file.release_pages)."""
        from loraforge.formats.gguf_file import release_pages

        release_pages(self.stored)

    @property
    def is_quantized(self) -> bool:
        import gguf

        return self.qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


@dataclass
class GGUFModel:
    config: ModelConfig
    metadata: dict[str, Any]
    tensors: dict[str, RawTensor]  # HF names
    path: str


def open_reader_checks(path: str) -> None:
    """One-line errors for a path that is missing, a folder, or not GGUF."""
    if not os.path.exists(path):
        raise file_error(path, "no such file")
    if os.path.isdir(path):
        raise file_error(path, "is a folder, expected a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        if magic in (b"algg", b"ggla"):  # the uint32 0x67676c61 of old finetune adapters
            raise file_error(path, "is an old llama.cpp 'ggla' LoRA file, not a GGUF model "
                                   "(convert it with `loraforge export`)")
        raise file_error(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")


class _Reader:  # replaced below by a gguf.GGUFReader subclass, built on first use (gguf imports lazily)
    pass


def _reader_class():
    """gguf.GGUFReader parsing plain ndarray views of its memory map.

    The stock reader slices a numpy.memmap once per token of the vocabulary (twice per string);
    memmap slices carry per-slice bookkeeping that makes a 49k-token file take seconds to open.
    Plain ndarray views of the same mapping give the same fields and tensors, several times faster.
    """
    global _Reader
    import gguf

    if issubclass(_Reader, gguf.GGUFReader):
        return _Reader

    class Reader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._array

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._mapping = value  # keeps the memmap (and its file) alive
            self._array = value.view(np.ndarray)

        def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
            dtype = np.dtype(dtype)
            count = int(count)
            arr = self._array[offset:offset + dtype.itemsize * count].view(dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    _Reader = Reader
    return Reader


def open_reader(path: str | os.PathLike):
    """A gguf.GGUFReader, or a one-line error naming the file and what is wrong with it."""
    from loraforge.formats.gguf_file import read_gguf

    path = os.fspath(path)
    open_reader_checks(path)
    read_gguf(path)  # validates the whole header first: gguf-py's reader trusts counts and sizes
    try:
        # copy-on-write mapping: tensors are writable numpy arrays (torch.from_numpy needs that),
        # pages stay shared with the file until written, and the file itself is never modified
        return _reader_class()(path, "c")
    except ValueError as e:
        msg = str(e)
        if "GGMLQuantizationType" in msg or "is not a valid" in msg:
            raise file_error(path, f"unknown tensor type ({msg})") from None
        if "version" in msg:
            raise file_error(path, f"unsupported GGUF version ({msg})") from None
        raise file_error(path, f"damaged or truncated GGUF file ({msg})") from None
    except (IndexError, OSError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise file_error(path, f"damaged or truncated GGUF file ({type(e).__name__}: {e})") from None


def read_model(path: str | os.PathLike) -> GGUFModel:
    """Config, metadata and HF-named raw tensors (memory-mapped) of a GGUF model file."""
    import gguf

    from loraforge.quant.ggml import SUPPORTED_TYPES

    from loraforge.formats.gguf_file import read_gguf

    path = os.fspath(path)
    open_reader_checks(path)
    gf = read_gguf(path)
    meta = gf.metadata
    if meta.get("general.type") == "adapter":
        raise file_error(path, "is a LoRA adapter, not a base model (pass it with --lora)")
    names = {t.name for t in gf.tensors}
    tok_embd = next((t for t in gf.tensors if t.name == "token_embd.weight"), None)
    n_vocab = int(tok_embd.shape[0]) if tok_embd is not None else None
    cfg = config_from_gguf_metadata(meta, path, n_vocab=n_vocab, has_output="output.weight" in names,
                                    tensor_names=names)
    if cfg.num_hidden_layers > len(names):  # before lists of names are made for that many layers
        raise file_error(path, f"the metadata says {cfg.num_hidden_layers} layers, but the file holds only "
                               f"{len(names)} tensors")
    arch = meta["general.architecture"]
    permute = needs_qk_permutation(arch)
    tensors: dict[str, RawTensor] = {}
    rope_factors: dict[str, list[float]] = {}
    for t in gf.tensors:
        qtype = int(t.qtype)
        if qtype not in SUPPORTED_TYPES:
            raise file_error(path, f"tensor {t.name} has type {gguf.GGMLQuantizationType(qtype).name}, "
                                   f"which is not supported")
        shape = t.shape
        if t.name == "rope_freqs.weight":
            cfg.extra["rope_freqs"] = np.array(gf.data(t), dtype=np.float32).reshape(-1)
            continue
        if t.name in ("rope_factors_long.weight", "rope_factors_short.weight"):
            rope_factors[t.name] = np.array(gf.data(t), dtype=np.float32).reshape(-1).tolist()
            continue
        if is_aux_gguf_tensor(t.name):
            continue
        try:
            hf_name = gguf_to_hf_name(t.name, arch)
        except LoraforgeError:
            raise file_error(path, f"unknown tensor {t.name!r} for architecture {arch!r}") from None
        heads = qk_heads(hf_name, cfg.num_attention_heads, cfg.num_key_value_heads)
        if permute and heads is not None and (shape[0] != heads * cfg.head_dim or cfg.head_dim % 2):
            raise file_error(path, f"tensor {t.name} has shape {shape}, which does not fit the metadata's "
                                   f"{heads} heads of {cfg.head_dim} rows")
        minus = 1.0 if is_norm_plus_one(hf_name, arch) else 0.0
        tensors[hf_name] = RawTensor(qtype, shape, gf.data(t), heads if permute else None, minus)
    if rope_factors:
        from loraforge.config_sources import add_gguf_rope_factors

        if len(rope_factors) != 2:
            raise file_error(path, "has only one of rope_factors_long / rope_factors_short")
        add_gguf_rope_factors(cfg, meta, rope_factors["rope_factors_long.weight"],
                              rope_factors["rope_factors_short.weight"])
    _check_complete(cfg, tensors, path)
    return GGUFModel(cfg, meta, tensors, path)


def _check_complete(cfg: ModelConfig, tensors: dict[str, RawTensor], path: str) -> None:
    from loraforge.model import build_on_meta

    expected = [n for n, _ in build_on_meta(cfg).named_parameters()]
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise file_error(path, f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
    unexpected = [n for n in tensors if n not in expected and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if unexpected:
        raise file_error(path, f"tensor {unexpected[0]!r} does not belong to a {cfg.arch} model of this shape")
    emb = tensors["model.embed_tokens.weight"].shape
    if emb != (cfg.vocab_size, cfg.hidden_size):
        raise file_error(path, f"token_embd has shape {emb}, expected {(cfg.vocab_size, cfg.hidden_size)}")


def tensor_type_counts(reader) -> dict[str, int]:
    """{'Q4_1': 210, 'F32': 61, ...} for `inspect`."""
    import gguf

    counts: dict[str, int] = {}
    for t in reader.tensors:
        name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        counts[name] = counts.get(name, 0) + 1
    return counts
