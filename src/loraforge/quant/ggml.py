"""Dequantize ggml block formats (as stored in GGUF files) with plain torch ops.

Every format is a sequence of fixed-size blocks; each block holds `block_size` weights in
`type_size` bytes (`gguf.GGML_QUANT_SIZES`). A row of a 2-D tensor is a whole number of
blocks, so rows can be gathered or permuted as raw bytes without requantizing.

The decoders below work on all blocks at once (reshape, shift, mask, broadcast), so the
same code runs on CPU and CUDA. They follow the arithmetic of the reference numpy code in
`gguf.quants` operation by operation (float32, same association order, no fused
multiply-add), so results are bit-identical to it; a requested `dtype` other than float32
is a final cast.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import LoraforgeError

QK_K = 256  # weights per k-quant super-block

_T = GGMLQuantizationType

# ---------------------------------------------------------------------------------------
# small helpers


def _view_bytes_as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 bytes (..., k) as `dtype` (..., k / itemsize), copying only when
    the bytes are not laid out (aligned, unit last stride) for a view."""
    try:
        return data.view(dtype)
    except RuntimeError:
        fresh = torch.empty(data.shape, dtype=data.dtype, device=data.device)
        return fresh.copy_(data).view(dtype)


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian f16 at byte `offset` of each block, as float32: (n_blocks, 1).

    blocks: (n_blocks, type_size) with an even type_size, so whole blocks reinterpret as
    f16 without a copy (a strided 2-byte slice copy is far slower).
    """
    halves = _view_bytes_as(blocks, torch.float16)
    return halves[:, offset // 2 : offset // 2 + 1].float()


def _unpack_bits(data: torch.Tensor, chunk: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Split bit fields out of packed bytes, ggml order.

    data: (n_blocks, n_bytes) uint8, seen as groups of `chunk` bytes (chunk % 4 == 0).
    Within each group the values for shift[0] of all `chunk` bytes come first, then those
    for shift[1], and so on. Returns (n_blocks, n_bytes * len(shifts)) uint8.

    The shifts and masks run on int32 words, four bytes at a time; `mask` repeated in each
    byte drops the bits that a word shift carries over from the next byte (any endianness).
    """
    n_blocks = data.shape[0]
    words = _view_bytes_as(data, torch.int32).reshape(n_blocks, -1, 1, chunk // 4)
    word_mask = mask * 0x01010101
    fields = [(words >> shift) & word_mask if shift else words & word_mask for shift in shifts]
    return torch.cat(fields, dim=2).view(torch.uint8).reshape(n_blocks, -1)


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Cut each block into consecutive byte fields of the given sizes (the last takes the rest)."""
    fields, start = [], 0
    for size in sizes:
        fields.append(blocks[:, start : start + size])
        start += size
    fields.append(blocks[:, start:])
    return fields


_LOW_HIGH_NIBBLE = (0, 4)
_TWO_BIT = (0, 2, 4, 6)
_ONE_BIT = tuple(range(8))


# ---------------------------------------------------------------------------------------
# legacy 32-weight block formats
#
# Each `_split_*` returns the block's integer values and the float32 factors that turn them
# into weights, w = q * scale (+ offset): q (n_blocks, groups, group_size) int8, scale and
# offset (n_blocks, groups, 1) float32 (offset None where the format has none). The factors
# are computed exactly as the reference computes them, and `_combine` multiplies, then adds,
# so decoding from the split form is bit-identical to decoding the blocks directly.

Groups = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _groups(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, n_groups: int) -> Groups:
    n = q.shape[0]
    q = q.to(torch.int8).reshape(n, n_groups, -1)
    offset = None if offset is None else offset.reshape(n, n_groups, 1)
    return q, scale.reshape(n, n_groups, 1), offset


def _split_q4_0(blocks: torch.Tensor) -> Groups:
    """Q4_0 (18 bytes): f16 d, 16 bytes of 4-bit q; w = d * (q - 8)."""
    d = _f16_field(blocks, 0)
    q = _unpack_bits(blocks[:, 2:], 16, _LOW_HIGH_NIBBLE, 0x0F)
    return _groups(q.to(torch.int8) - 8, d, None, 1)


def _split_q4_1(blocks: torch.Tensor) -> Groups:
    """Q4_1 (20 bytes): f16 d, f16 m, 16 bytes of 4-bit q; w = d * q + m."""
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)
    return _groups(_unpack_bits(blocks[:, 4:], 16, _LOW_HIGH_NIBBLE, 0x0F), d, m, 1)


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values 0..31 from a 32-bit high-bit mask (4 bytes, LE) and 16 nibble bytes."""
    high = _unpack_bits(qh, 4, _ONE_BIT, 0x01).reshape(-1, 8, 4).transpose(1, 2).reshape(-1, 32)
    low = _unpack_bits(qs, 16, _LOW_HIGH_NIBBLE, 0x0F)
    return low | (high << 4)


def _split_q5_0(blocks: torch.Tensor) -> Groups:
    """Q5_0 (22 bytes): f16 d, u32 high bits, 16 nibble bytes; w = d * (q - 16)."""
    d = _f16_field(blocks, 0)
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:])
    return _groups(q.to(torch.int8) - 16, d, None, 1)


def _split_q5_1(blocks: torch.Tensor) -> Groups:
    """Q5_1 (24 bytes): f16 d, f16 m, u32 high bits, 16 nibble bytes; w = d * q + m."""
    d, m = _f16_field(blocks, 0), _f16_field(blocks, 2)
    return _groups(_q5_values(blocks[:, 4:8], blocks[:, 8:]), d, m, 1)


def _split_q8_0(blocks: torch.Tensor) -> Groups:
    """Q8_0 (34 bytes): f16 d, 32 int8 q; w = q * d."""
    return _groups(blocks[:, 2:].view(torch.int8), _f16_field(blocks, 0), None, 1)


# ---------------------------------------------------------------------------------------
# k-quants: 256-weight super-blocks


def _split_q2_k(blocks: torch.Tensor) -> Groups:
    """Q2_K (84 bytes): 16 scale/min nibble pairs, 64 bytes of 2-bit q, f16 d, f16 dmin."""
    scales, qs, _ = _split(blocks, QK_K // 16, QK_K // 4)
    d, dmin = _f16_field(blocks, 80), _f16_field(blocks, 82)
    dl = d * (scales & 0x0F).float()
    ml = dmin * (scales >> 4).float()
    q = _unpack_bits(qs, 32, _TWO_BIT, 0x03)
    return _groups(q, dl, -ml, 16)  # dl * q + (-ml) is exactly dl * q - ml


def _split_q3_k(blocks: torch.Tensor) -> Groups:
    """Q3_K (110 bytes): 32 bytes high-bit mask, 64 bytes 2-bit q, 12 bytes 6-bit scales, f16 d."""
    n = blocks.shape[0]
    hmask, qs, scale_bytes, _ = _split(blocks, QK_K // 8, QK_K // 4, 12)
    d = _f16_field(blocks, 108)
    low = _unpack_bits(scale_bytes[:, :8], 8, _LOW_HIGH_NIBBLE, 0x0F)
    high = _unpack_bits(scale_bytes[:, 8:], 4, _TWO_BIT, 0x03)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    q_low = _unpack_bits(qs, 32, _TWO_BIT, 0x03).reshape(n, 16, 16)
    # a set mask bit means "no offset"; a clear one subtracts 4
    q_off = (_unpack_bits(hmask, 32, _ONE_BIT, 0x01).reshape(n, 16, 16) ^ 1) << 2
    return _groups(q_low.to(torch.int8) - q_off.to(torch.int8), d * scales, None, 16)


def _k_scale_min(scale_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte field of Q4_K/Q5_K into 8 six-bit scales and 8 six-bit mins."""
    n = scale_bytes.shape[0]
    packed = scale_bytes.reshape(n, 3, 4)
    d, m, m_d = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _split_q4_k(blocks: torch.Tensor) -> Groups:
    """Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes scales/mins, 128 bytes of 4-bit q."""
    d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    q = _unpack_bits(blocks[:, 16:], 32, _LOW_HIGH_NIBBLE, 0x0F)
    return _groups(q, d * sc.float(), -(dmin * mn.float()), 8)


def _split_q5_k(blocks: torch.Tensor) -> Groups:
    """Q5_K (176 bytes): f16 d, f16 dmin, 12 bytes scales/mins, 32 bytes high bits, 128 nibble bytes."""
    d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    q_high = _unpack_bits(blocks[:, 16:48], 32, _ONE_BIT, 0x01)
    q_low = _unpack_bits(blocks[:, 48:], 32, _LOW_HIGH_NIBBLE, 0x0F)
    return _groups(q_low | (q_high << 4), d * sc.float(), -(dmin * mn.float()), 8)


def _split_q6_k(blocks: torch.Tensor) -> Groups:
    """Q6_K (210 bytes): 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, f16 d."""
    ql, qh, scales, _ = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16)
    d = _f16_field(blocks, 208)
    q_low = _unpack_bits(ql, 64, _LOW_HIGH_NIBBLE, 0x0F)
    q_high = _unpack_bits(qh, 32, _TWO_BIT, 0x03)
    q = (q_low | (q_high << 4)).to(torch.int8) - 32
    return _groups(q, d * scales.view(torch.int8).float(), None, 16)


def _combine(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """float32 weights (n, groups, group_size) = q * scale (+ offset), multiply then add."""
    w = q.float().mul_(scale)
    return w if offset is None else w.add_(offset)


# ---------------------------------------------------------------------------------------
# plain float formats: one "block" is one element


def _dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return _view_bytes_as(blocks, torch.float32)


def _dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _view_bytes_as(blocks, torch.float16).float()


def _dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return _view_bytes_as(blocks, torch.bfloat16).float()


_SPLITTERS: dict[int, Callable[[torch.Tensor], Groups]] = {
    _T.Q8_0: _split_q8_0,
    _T.Q4_0: _split_q4_0,
    _T.Q4_1: _split_q4_1,
    _T.Q5_0: _split_q5_0,
    _T.Q5_1: _split_q5_1,
    _T.Q2_K: _split_q2_k,
    _T.Q3_K: _split_q3_k,
    _T.Q4_K: _split_q4_k,
    _T.Q5_K: _split_q5_k,
    _T.Q6_K: _split_q6_k,
}

_DECODERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    _T.F32: _dequant_f32,
    _T.F16: _dequant_f16,
    _T.BF16: _dequant_bf16,
    **{t: (lambda blocks, split=split: _combine(*split(blocks)).reshape(blocks.shape[0], -1))
       for t, split in _SPLITTERS.items()},
}

# The plain float types need no decoding when the wanted dtype is their own.
_NATIVE_DTYPES: dict[int, torch.dtype] = {
    _T.F32: torch.float32,
    _T.F16: torch.float16,
    _T.BF16: torch.bfloat16,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(GGMLQuantizationType(t) for t in _DECODERS)

# ---------------------------------------------------------------------------------------
# public API


def type_name(qtype: int) -> str:
    """The ggml name of a type id ("Q4_K"), or "type <id>" for ids gguf does not know."""
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


def check_supported(qtype: int) -> GGMLQuantizationType:
    """Return `qtype` as a GGMLQuantizationType, or raise LoraforgeError naming the type."""
    try:
        as_type = GGMLQuantizationType(int(qtype))
    except ValueError:
        as_type = None
    if as_type is None or as_type not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise LoraforgeError(
            f"ggml tensor type {type_name(qtype)} (id {int(qtype)}) is not supported; "
            f"supported types: {names}"
        )
    return as_type


def block_shape(qtype: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a supported type."""
    return GGML_QUANT_SIZES[check_supported(qtype)]


def bytes_per_row(qtype: int, n_cols: int) -> int:
    """Bytes one row of `n_cols` weights takes; n_cols must be a whole number of blocks."""
    block_size, type_size = block_shape(qtype)
    if n_cols % block_size != 0:
        raise LoraforgeError(
            f"a {type_name(qtype)} row of {n_cols} weights is not a whole number of "
            f"{block_size}-weight blocks"
        )
    return n_cols // block_size * type_size


def _as_bytes(raw: torch.Tensor) -> torch.Tensor:
    """Any tensor as its flat uint8 bytes (a view where possible): (n_bytes,)."""
    raw = raw.contiguous()
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8) if raw.dim() > 0 else raw.reshape(1).view(torch.uint8)
    return raw.reshape(-1)


def dequantize(
    raw: torch.Tensor,
    qtype: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode a ggml tensor's bytes into a float tensor on raw's device.

    raw: uint8 tensor of the bytes as stored in the GGUF file, any shape (e.g. the
    (rows, bytes_per_row) array gguf.GGUFReader gives). qtype: a GGMLQuantizationType.
    shape: the torch-order shape of the result, e.g. (out_features, in_features); its
    last dimension runs along the blocks. Returns a tensor of `shape` and `dtype`.
    """
    qtype = check_supported(qtype)
    shape = tuple(int(s) for s in shape)
    n_elements = 1
    for size in shape:
        n_elements *= size
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    flat = _as_bytes(raw)
    if n_elements % block_size != 0 or flat.numel() != n_elements // block_size * type_size:
        raise LoraforgeError(
            f"{type_name(qtype)} tensor of shape {list(shape)} needs "
            f"{n_elements // block_size * type_size} bytes, got {flat.numel()}"
        )
    if shape and shape[-1] % block_size != 0:
        raise LoraforgeError(
            f"{type_name(qtype)} tensor of shape {list(shape)}: rows of {shape[-1]} weights "
            f"are not a whole number of {block_size}-weight blocks"
        )
    if n_elements == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    blocks = flat.view(n_elements // block_size, type_size)
    if _NATIVE_DTYPES.get(qtype) == dtype:
        values = _view_bytes_as(blocks, dtype)
    else:
        values = _DECODERS[qtype](blocks)
    return values.reshape(shape).to(dtype)


def split_groups(raw: torch.Tensor, qtype: int, n_rows: int, n_cols: int) -> Groups:
    """The integer values and float32 factors of a 2-D block-quantized tensor.

    Returns q (n_rows, n_groups, group_size) int8, scale and offset (n_rows, n_groups, 1)
    (offset None for formats without one), with weights = q * scale (+ offset) in float32
    bit-identical to `dequantize`. group_size is 32 or 16 depending on the format. The
    factors are float16 where that holds them exactly (Q4_0 ... Q8_0 store f16 fields),
    float32 otherwise (k-quants multiply a super-block scale by a sub-block one).
    """
    qtype = check_supported(qtype)
    if qtype not in _SPLITTERS:
        raise LoraforgeError(f"{type_name(qtype)} is a float type, not a block-quantized one")
    row_bytes = bytes_per_row(qtype, n_cols)
    flat = _as_bytes(raw)
    if flat.numel() != n_rows * row_bytes:
        raise LoraforgeError(
            f"{type_name(qtype)} tensor of {n_rows}x{n_cols} needs {n_rows * row_bytes} bytes, "
            f"got {flat.numel()}"
        )
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    q, scale, offset = _SPLITTERS[qtype](flat.view(-1, type_size))
    groups = n_cols // q.shape[-1] if q.numel() else 0
    q = q.reshape(n_rows, groups, -1).contiguous()
    scale = _compact(scale.reshape(n_rows, groups, 1))
    offset = None if offset is None else _compact(offset.reshape(n_rows, groups, 1))
    return q, scale, offset


def _compact(factors: torch.Tensor) -> torch.Tensor:
    """float32 factors as float16 when that is lossless (the legacy formats' f16 fields)."""
    half = factors.half()
    return half if torch.equal(half.float(), factors) else factors.contiguous()


def is_block_quantized(qtype: int) -> bool:
    """True for the block formats (Q8_0, Q4_K, ...), False for F32/F16/BF16."""
    return int(qtype) in _SPLITTERS


def dequantize_rows(
    raw2d: torch.Tensor,
    qtype: int,
    row_ids: torch.Tensor,
    n_cols: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode only the rows `row_ids` of a 2-D ggml tensor (e.g. an embedding lookup).

    raw2d: (n_rows, bytes_per_row) uint8 (a flat byte tensor is split into rows first).
    row_ids: integer tensor of any shape. Returns (*row_ids.shape, n_cols) in `dtype`.
    """
    row_bytes = bytes_per_row(qtype, n_cols)
    if raw2d.dim() != 2 or raw2d.shape[1] != row_bytes:
        raw2d = _as_bytes(raw2d).view(-1, row_bytes)
    ids = row_ids.reshape(-1).to(device=raw2d.device, dtype=torch.long)
    picked = raw2d.index_select(0, ids)
    values = dequantize(picked, qtype, (ids.numel(), n_cols), dtype)
    return values.reshape(*row_ids.shape, n_cols)
