"""A fast GGUF reader: metadata as python values and tensor data memory-mapped with numpy.

gguf-py's reader builds a numpy view per array element, which takes seconds for a 50k-token
vocabulary; this one parses the header with `struct` in one pass. Layout (little endian):
magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv (key, type, value), then
n_tensors (name, u32 n_dims, u64 dims[n_dims] (ggml order), u32 type, u64 offset); tensor data
starts at the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from loraforge.errors import file_error

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    qtype: int
    shape: tuple[int, ...]  # torch order (reversed ggml dims), e.g. (out_features, in_features)
    offset: int  # absolute offset in the file
    n_bytes: int


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    mmap: np.memmap

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's data: float32/float16 (shape) or uint8 (rows, bytes_per_row) for other types."""
        raw = self.mmap[t.offset: t.offset + t.n_bytes]
        if t.qtype == 0:
            return raw.view(np.float32).reshape(t.shape)
        if t.qtype == 1:
            return raw.view(np.float16).reshape(t.shape)
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        return raw.reshape(rows, -1)


def release_pages(array: np.ndarray) -> None:
    """Let the OS drop the resident pages of a view into a GGUF file mapping.

    For a tensor already copied into another form (the loader's split of quantized blocks):
    the file-backed pages stop counting towards the process's memory. The mapping is
    copy-on-write and never written, so the view stays valid (pages are re-read if touched).
    Arrays that are not views of a mapping are left alone.
    """
    handle = getattr(array, "_mmap", None)  # numpy keeps the mmap object on memmap views
    if not isinstance(handle, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or handle.closed:
        return
    mapping_start = np.frombuffer(handle, dtype=np.uint8, count=1).__array_interface__["data"][0]
    start = array.__array_interface__["data"][0] - mapping_start
    end = start + array.nbytes
    if start < 0 or end > len(handle) or not array.flags.c_contiguous:
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        handle.madvise(mmap.MADV_DONTNEED, first, last - first)


class _Cursor:
    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise file_error(self.path, "truncated GGUF header")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise file_error(self.path, "truncated GGUF header")
        s = bytes(self.buf[self.pos: self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise file_error(self.path, "truncated GGUF header")
                arr = np.frombuffer(self.buf[self.pos:end], dtype=dt).tolist()
                self.pos = end
                return arr
            return [self.value(etype) for _ in range(count)]
        raise file_error(self.path, f"unknown GGUF metadata value type {vtype}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header; tensor data stays on disk (memory-mapped)."""
    import gguf

    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise file_error(path, "truncated GGUF file (shorter than its header)")
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file untouched
    cur = _Cursor(memoryview(mm), path)
    if bytes(mm[:4]) != b"GGUF":
        raise file_error(path, f"not a GGUF file (starts with {bytes(mm[:4])!r})")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise file_error(path, f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise file_error(path, "damaged GGUF header (absurd tensor or key count)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        qtype, offset = cur.take("<I"), cur.take("<Q")
        infos.append((name, dims, qtype, offset))
    alignment = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, dims, qtype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise file_error(path, f"tensor {name} has unknown type id {qtype}") from None
        n_elems = int(np.prod(dims)) if dims else 1
        n_bytes = n_elems * type_size // block
        start = data_start + offset
        if start + n_bytes > size:
            raise file_error(path, f"truncated: tensor {name} runs past the end of the file")
        tensors.append(TensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start, n_bytes))
    return GGUFFile(path, version, meta, tensors, mm)
