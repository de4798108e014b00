"""A fast GGUF reader: metadata as python values and tensor data memory-mapped with numpy.

gguf-py's reader builds a numpy view per array element, which takes seconds for a 50k-token
vocabulary; this one parses the header with `struct` in one pass. Layout (little endian):
magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv (key, type, value), then
n_tensors (name, u32 n_dims, u64 dims[n_dims] (ggml order), u32 type, u64 offset); tensor data
starts at the next multiple of `general.alignment` (default 32).

Every GGUF read in loraforge goes through `read_gguf` first (gguf-py's reader, used for adapters
and checkpoints, only after it), so no count, length or size from a file is trusted before it is
checked against the file's size.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loraforge.errors import file_error

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY, _UINT32 = 8, 9, 4
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32


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
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0  # absolute offset of the tensor data section
    kv_spans: list[tuple[str, int, int]] = field(default_factory=list)  # (key, start, end) of each record

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
    """Reads little-endian values from the mapped file; every read is checked against the file's end."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if size > self.left:
            raise file_error(self.path, "truncated GGUF header")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str = "string") -> str:
        n = self.take("<Q")
        if n > self.left:
            raise file_error(self.path, f"truncated GGUF header ({what} of {n} bytes at byte {self.pos - 8} "
                                        f"runs past the end of the file)")
        s = bytes(self.buf[self.pos: self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string(f"value of {key}")
        if vtype != ARRAY:
            raise file_error(self.path, f"key {key!r} has unknown GGUF value type {vtype}")
        etype, count = self.take("<I"), self.take("<Q")
        # the smallest an element can take: its scalar size, or a string's 8-byte length
        item_bytes = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 8 if etype == STRING else 0
        if item_bytes == 0:  # nested arrays and unknown types: llama.cpp refuses them too
            raise file_error(self.path, f"key {key!r} is an array of unsupported GGUF value type {etype}")
        if count * item_bytes > self.left:
            raise file_error(self.path, f"truncated GGUF header (key {key!r}: an array of {count} items "
                                        f"cannot fit in the {self.left} bytes left)")
        if etype == STRING:
            what = f"an item of {key}"
            return [self.string(what) for _ in range(count)]
        end = self.pos + count * item_bytes
        values = np.frombuffer(self.buf[self.pos:end], dtype=_NUMPY[etype]).tolist()
        self.pos = end
        return values


# Smallest possible records: a key/value (key length, a 1-byte key, type, a 1-byte value) and a
# tensor info (name length, n_dims, type, offset); a count that cannot fit in the file is refused
# before anything is allocated for it.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_INT64_MAX = 2**63 - 1


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file's header; tensor data stays on disk (memory-mapped).

    The checks follow llama.cpp's loader (ggml/src/gguf.cpp): version 2 or 3, counts and lengths
    within the file, no empty or duplicate keys, no nested arrays, `general.alignment` a uint32
    power of two, no duplicate tensor names, 1..4 dimensions, each > 0 with an element count
    below 2^63, rows of whole quantization blocks, a known type, offsets aligned, tensors inside
    the file and not overlapping. Anything else is a one-line error naming the file.
    """
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
        if version & 0xFFFF == 0:
            raise file_error(path, f"GGUF version {version:#x}: a big-endian file, which is not supported")
        raise file_error(path, f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise file_error(path, f"truncated GGUF header ({n_kv} keys and {n_tensors} tensors cannot fit in "
                               f"the {cur.left} bytes left; a damaged count?)")
    meta: dict[str, Any] = {}
    kv_spans: list[tuple[str, int, int]] = []
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string("key")
        if not key:
            raise file_error(path, f"damaged GGUF header: empty key at byte {start}")
        if key in meta:
            raise file_error(path, f"damaged GGUF header: key {key!r} appears twice")
        vtype = cur.take("<I")
        meta[key] = cur.value(vtype, key)
        kv_spans.append((key, start, cur.pos))
        if key == "general.alignment":
            if vtype != _UINT32:
                raise file_error(path, f"general.alignment must be a uint32, it has GGUF value type {vtype}")
            alignment = meta[key]
            if alignment == 0 or alignment & (alignment - 1):
                raise file_error(path, f"general.alignment is {alignment}, not a power of 2")
    infos = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        if name in names:
            raise file_error(path, f"damaged GGUF header: tensor name {name!r} appears twice")
        names.add(name)
        n_dims = cur.take("<I")
        if n_dims > MAX_DIMS:
            raise file_error(path, f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most {MAX_DIMS})")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        n_elems = math.prod(dims)
        if 0 in dims or n_elems > _INT64_MAX:
            raise file_error(path, f"tensor {name!r} has impossible dimensions {dims}")
        qtype, offset = cur.take("<I"), cur.take("<Q")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise file_error(path, f"tensor {name!r} has unknown type id {qtype}") from None
        row = dims[0] if dims else 1
        if row % block:
            raise file_error(path, f"tensor {name!r}: rows of {row} values are not whole blocks of {block} "
                                   f"for type {gguf.GGMLQuantizationType(qtype).name}")
        if offset % alignment:
            raise file_error(path, f"tensor {name!r} has offset {offset}, not a multiple of the alignment "
                                   f"{alignment} (llama.cpp refuses such files)")
        infos.append((name, dims, qtype, offset, n_elems // block * type_size))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, dims, qtype, offset, n_bytes in infos:
        start = data_start + offset
        if start + n_bytes > size:
            raise file_error(path, f"truncated: tensor {name} runs past the end of the file "
                                   f"(it ends at byte {start + n_bytes}, the file has {size})")
        tensors.append(TensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start, n_bytes))
    previous = None
    for t in sorted(tensors, key=lambda t: t.offset):
        if previous is not None and t.offset < previous.offset + previous.n_bytes:
            raise file_error(path, f"damaged GGUF header: tensors {previous.name} and {t.name} overlap")
        previous = t
    return GGUFFile(path, version, meta, tensors, mm, alignment, data_start, kv_spans)


def data_end(gf: GGUFFile) -> int:
    """Where the file should end: after the last tensor's data, padded to the alignment (as written by
    gguf-py's GGUFWriter and by `merge`), or after the header when there are no tensors."""
    if not gf.tensors:
        return 0
    end = max(t.offset + t.n_bytes for t in gf.tensors)
    return (end + gf.alignment - 1) // gf.alignment * gf.alignment


def verify_written_gguf(path: str) -> None:
    """Check a GGUF file just written: the header parses and the file is exactly as long as its
    tensors say. Catches a short write that the writer did not report (numpy's `tofile` drops
    write errors of small arrays)."""
    gf = read_gguf(path)
    size = os.path.getsize(path)
    want = data_end(gf)
    if want and size != want:
        raise file_error(path, f"written file has {size} bytes, its header says {want} (a short write)")
