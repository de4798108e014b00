"""Quantize float tensors into GGUF block bytes with torch, as llama.cpp's reference quantizers do.

`quantize_tensor(x, qtype)` turns a float tensor (rows, cols) into the uint8 array
(rows, bytes_per_row) that a GGUF file stores for that type: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
(32-weight blocks), Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-weight super-blocks, `kquants.py`) and
F32/F16/BF16. The arithmetic follows llama.cpp's `quantize_row_*_ref` functions of
ggml/src/ggml-quants.c, which `ggml_quantize_chunk` (and so `llama-quantize`) uses when no
importance matrix is given, step by step in float32:

- every product, sum and quotient is one float32 operation in the reference's order (sums
  over a block run left to right, never as a tree), with no fused multiply-add;
- `nearest_int` (add 1.5 * 2**23, read the low mantissa bits) rounds half to even inside
  |v| < 2**22, where the reference asserts it stays; `torch.round` is used where the values
  provably stay there, the bit trick itself where they may not;
- C's float -> int8 casts are x86's (truncation, INT_MIN for NaN / out of range, low byte);
- float16 fields are rounded to nearest even (GGML_FP32_TO_FP16) and read back where the
  reference reads them back; sqrtf is taken in float64 (torch's float32 sqrt can be 1 ulp off);
- `scalar / tensor` is written as `torch.div(tensor_of_scalar, tensor)`: Python's
  `scalar / tensor` is `reciprocal(tensor) * scalar` in torch, which rounds twice.

So the output is byte-identical to llama.cpp's (tests/parity/test_quantize_llamacpp.py checks
each type against `llama_model_quantize` of llama-cpp-python). Everything is vectorised over
all blocks of a chunk; loops run only over the elements of one block (the ordered sums) or the
fixed steps of a search, so the same code runs on CPU and CUDA tensors.

Throughput, measured with bench/quantize_speed.py (4096 x 4096 float32, best of 2, torch 2.13
CPU, 2 threads, 2-core AMD EPYC shared with other jobs: load average ~13, so absolute figures
are low; llama.cpp's ggml_quantize_chunk on one thread measured in the same run), MB/s of
float32 input: Q8_0 166 (llama.cpp 558), Q4_0 215 (1048), Q4_1 161 (1472), Q5_0 164 (730),
Q5_1 163 (1237), Q2_K 24 (38), Q3_K 25 (161), Q4_K 19 (34), Q5_K 23 (39), Q6_K 35 (66).
A Llama-2-7B (27 GB of float32) entirely in Q4_K takes ~24 minutes at that rate; the K-quant
searches run at about 0.55x the C reference's speed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import LoraforgeError

_T = GGMLQuantizationType

# ---------------------------------------------------------------------------------------
# float32 helpers shared with kquants.py


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: float32 -> int32 by adding 1.5 * 2**23 and reading the mantissa.

    Rounds half to even for |v| < 2**22 and gives the reference's (wrapped) value otherwise.
    """
    bits = (v + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def rdiv(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """float32 `numerator / t`, one correctly rounded division (not reciprocal-then-multiply)."""
    return torch.div(torch.tensor(numerator, dtype=t.dtype, device=t.device), t)


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: nearest integer, halves away from zero (exact for every float32)."""
    whole = torch.trunc(v)
    return whole + torch.sign(v) * ((v - whole).abs() >= 0.5)


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) uint8 of the float16 (round to nearest even), little endian."""
    return v.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """float32 value of GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))."""
    return v.to(torch.float16).to(torch.float32)


def seq_sum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Left-to-right float32 sum along `dim`, as a C loop `float s = 0; s += t[i]` does.

    torch's sum adds in a different order, which changes the last bits of the result.
    """
    first = t.select(dim, 0)
    total = first + 0.0  # 0 + t[0]: turns -0.0 into +0.0 as the C loop does
    for i in range(1, t.shape[dim]):
        total = total + t.select(dim, i)
    return total


def pack_nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """uint8 bytes low | high << 4 from two integer tensors of 4-bit values."""
    return (low.to(torch.uint8) & 0x0F) | ((high.to(torch.uint8) & 0x0F) << 4)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8) tensor of 0/1 -> (...,) uint8 with element k in bit k."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=bits.device)
    return (bits.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _first_signed(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The element of each row of x (n, k) equal to value (n, 1) that comes first: keeps the sign of a
    zero minimum as the reference's `if (v < min) min = v` scan does."""
    first = (x == value).to(torch.uint8).argmax(dim=1, keepdim=True)
    return x.gather(1, first)


# ---------------------------------------------------------------------------------------
# 32-weight block formats: x (n_blocks, 32) float32 -> (n_blocks, type_size) uint8


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude of each block (first one on ties), +0.0 for an all-zero block."""
    first = x.abs().argmax(dim=1, keepdim=True)
    value = x.gather(1, first)
    return torch.where(value != 0, value, torch.zeros_like(value))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, rdiv(1.0, d), torch.zeros_like(d))


def c_int8(v: torch.Tensor) -> torch.Tensor:
    """C's `(int8_t)v` / `(uint8_t)v` for float32 v as compiled for x86 (truncate to a 32-bit int with
    cvttss2si, which gives INT_MIN for NaN and out-of-range values, then keep the low byte):
    int32 tensor of the signed byte, -128..127. In range this is plain truncation; the rest
    only happens for blocks whose scale underflows (the reference's 1/d is then infinite).
    """
    whole = torch.trunc(v)
    whole = torch.where(whole.abs() < 2147483648.0, whole, torch.zeros_like(whole))
    low = whole.to(torch.int64).to(torch.int32) & 0xFF
    return (low ^ 0x80) - 0x80


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 (34 bytes): f16 d = amax / 127, 32 int8 roundf(x / d)."""
    d = x.abs().amax(dim=1, keepdim=True) / 127.0
    q = c_int8(round_half_away(x * _inverse(d))).to(torch.int8)
    return torch.cat([fp16_bytes(d), q.view(torch.uint8)], dim=1)


def _pack_bytes_or(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """`q = low; q |= high << 4` on uint8 bytes (low is not masked, as in the reference)."""
    return ((low & 0xFF) | ((high << 4) & 0xFF)).to(torch.uint8)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    """Q4_0 (18 bytes): f16 d = max / -8, nibbles min(15, (int8_t)(x / d + 8.5))."""
    d = _signed_absmax(x) / -8.0
    q = c_int8(x * _inverse(d) + 8.5).clamp(max=15)
    return torch.cat([fp16_bytes(d), _pack_bytes_or(q[:, :16], q[:, 16:])], dim=1)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    """Q4_1 (20 bytes): f16 d = (max - min) / 15, f16 m = min, nibbles min(15, (int8_t)((x - min) / d + 0.5))."""
    lo = _first_signed(x, x.amin(dim=1, keepdim=True))
    d = (x.amax(dim=1, keepdim=True) - lo) / 15.0
    q = c_int8((x - lo) * _inverse(d) + 0.5).clamp(max=15)
    return torch.cat([fp16_bytes(d), fp16_bytes(lo), _pack_bytes_or(q[:, :16], q[:, 16:])], dim=1)


def _q5_high_bits(q: torch.Tensor) -> torch.Tensor:
    """The 32-bit mask of bit 4 of each of the 32 byte values, as 4 little-endian bytes (n, 4)."""
    high = (q >> 4) & 1
    return pack_bits(high.reshape(-1, 4, 8))


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    """Q5_0 (22 bytes): f16 d = max / -16, 5-bit min(31, (int8_t)(x / d + 16.5)) as high-bit mask + nibbles."""
    d = _signed_absmax(x) / -16.0
    q = c_int8(x * _inverse(d) + 16.5).clamp(max=31) & 0xFF
    return torch.cat([fp16_bytes(d), _q5_high_bits(q), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    """Q5_1 (24 bytes): f16 d = (max - min) / 31, f16 m = min, 5-bit (uint8_t)((x - min) / d + 0.5)."""
    lo = _first_signed(x, x.amin(dim=1, keepdim=True))
    d = (x.amax(dim=1, keepdim=True) - lo) / 31.0
    q = c_int8((x - lo) * _inverse(d) + 0.5) & 0xFF
    return torch.cat([fp16_bytes(d), fp16_bytes(lo), _q5_high_bits(q),
                      pack_nibbles(q[:, :16], q[:, 16:])], dim=1)


def _block_quantizers() -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    from . import kquants

    return {
        _T.Q8_0: _q8_0, _T.Q4_0: _q4_0, _T.Q4_1: _q4_1, _T.Q5_0: _q5_0, _T.Q5_1: _q5_1,
        _T.Q2_K: kquants.quantize_q2_k, _T.Q3_K: kquants.quantize_q3_k, _T.Q4_K: kquants.quantize_q4_k,
        _T.Q5_K: kquants.quantize_q5_k, _T.Q6_K: kquants.quantize_q6_k,
    }


FLOAT_TYPES = {_T.F32: torch.float32, _T.F16: torch.float16, _T.BF16: torch.bfloat16}
BLOCK_TYPES = frozenset({_T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K})
QUANTIZABLE_TYPES = frozenset(FLOAT_TYPES) | BLOCK_TYPES

# Weights per chunk of work: bounds the temporaries (the K-quant searches hold ~20 candidates per
# weight) and keeps them near the caches.
_CHUNK_WEIGHTS = {_T.Q2_K: 1 << 17, _T.Q3_K: 1 << 18, _T.Q4_K: 1 << 17, _T.Q5_K: 1 << 17, _T.Q6_K: 1 << 17}
_DEFAULT_CHUNK = 1 << 20

# ---------------------------------------------------------------------------------------
# public API


def check_quantizable(qtype: int, n_cols: int | None = None) -> GGMLQuantizationType:
    """`qtype` as a GGMLQuantizationType we can write; with n_cols, also that a row is whole blocks."""
    try:
        as_type = GGMLQuantizationType(int(qtype))
    except ValueError:
        as_type = None
    if as_type not in QUANTIZABLE_TYPES:
        names = ", ".join(sorted(t.name for t in QUANTIZABLE_TYPES))
        raise LoraforgeError(f"cannot quantize to ggml type {qtype}; supported: {names}")
    block = GGML_QUANT_SIZES[as_type][0]
    if n_cols is not None and n_cols % block:
        raise LoraforgeError(f"a {as_type.name} row must be a multiple of {block} weights, got {n_cols}")
    return as_type


def quantize_tensor_torch(x: torch.Tensor, qtype: int) -> torch.Tensor:
    """Encode x (..., cols) into ggml `qtype` blocks on x's device.

    Returns uint8 (rows, bytes_per_row) with rows = x.numel() // cols, in llama.cpp's block
    layout. x is read as float32 (F16/BF16 are plain casts, like llama.cpp's converter).
    """
    if x.dim() == 0:
        x = x.reshape(1)
    cols = int(x.shape[-1])
    qtype = check_quantizable(qtype, cols)
    rows = x.numel() // cols if cols else 0
    if qtype in FLOAT_TYPES:
        out = x.detach().to(torch.float32).to(FLOAT_TYPES[qtype]).contiguous()
        return out.reshape(rows, cols).view(torch.uint8)
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = x.detach().to(torch.float32).contiguous().reshape(-1, block)
    out = torch.empty((blocks.shape[0], type_size), dtype=torch.uint8, device=x.device)
    quantize = _block_quantizers()[qtype]
    step = max(1, _CHUNK_WEIGHTS.get(qtype, _DEFAULT_CHUNK) // block)
    starts = range(0, blocks.shape[0], step)

    def encode(start: int) -> None:
        out[start:start + step] = quantize(blocks[start:start + step])

    if x.device.type != "cpu":
        for start in starts:
            encode(start)
    else:
        _on_cpu_threads(encode, starts)
    return out.reshape(rows, cols // block * type_size)


def _on_cpu_threads(encode: Callable[[int], None], starts: range) -> None:
    """Run encode(start) for every chunk, one chunk per thread, torch's own threading off meanwhile.

    The chunks' tensors are small (about 1 MB), where torch's intra-op threads cost more in
    synchronisation than they give (and spin when the CPU is shared); whole chunks on parallel
    threads (torch ops release the GIL) use the cores better. Measured in bench/quantize_speed.py.
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    workers = min(threads, len(starts))
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            for start in starts:
                encode(start)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(encode, starts))
    finally:
        torch.set_num_threads(threads)


def quantize_tensor(x: torch.Tensor, qtype: int) -> np.ndarray:
    """Encode a float tensor x (rows, cols) (any leading shape; rows = all but the last dim) as
    GGUF bytes of `qtype`: a uint8 numpy array (rows, bytes_per_row), exactly what
    llama.cpp's quantizer (no importance matrix) writes for the same float32 values.

    qtype: a gguf.GGMLQuantizationType among QUANTIZABLE_TYPES; cols must be a whole number of
    its blocks (32 weights, 256 for the K-quants). CUDA tensors are quantized on the GPU.
    """
    return quantize_tensor_torch(x, qtype).cpu().numpy()
