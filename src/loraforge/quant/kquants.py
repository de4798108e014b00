"""K-quant encoders (Q2_K ... Q6_K): llama.cpp's reference quantizers, vectorised over blocks.

Each `quantize_qN_k(x)` takes x (n_superblocks, 256) float32 and returns the (n_superblocks,
type_size) uint8 blocks that `quantize_row_qN_K_ref` of ggml-quants.c writes (what
llama-quantize uses without an importance matrix). The per-sub-block searches of the
reference (make_qkx2_quants for Q2_K/Q4_K/Q5_K, make_q3_quants for Q3_K, make_qx_quants for
Q6_K) run here on "group-major" tensors: a sub-block's n weights along dim 0 and all G
sub-blocks of the chunk along dim 1, so that the reference's left-to-right sums are n
vector additions of length G. Python loops run over the fixed steps of a search (each step
over all G sub-blocks at once), never over blocks. See quantize.py for the float32 rules
followed throughout.
"""

from __future__ import annotations

import numpy as np
import torch

from .quantize import fp16_bytes, fp16_round, nearest_int, pack_nibbles, rdiv, seq_sum

QK_K = 256
GROUP_MAX_EPS = 1e-15


def _f32(v: float) -> float:
    """A Python float holding the float32 rounding of v (constants of the reference's float code)."""
    return float(np.float32(v))


def _step_constants(rmin: float, rdelta: float, nmax: int, nstep: int) -> list[float]:
    """(rmin + rdelta * is) + nmax in float32 for is = 0..nstep (make_qkx2_quants' numerators)."""
    out = []
    for step in range(nstep + 1):
        v = np.float32(rmin) + np.float32(rdelta) * np.float32(step)
        out.append(float(np.float32(v + np.float32(nmax))))
    return out


def _group_major(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n_superblocks, 256) -> (n, G): sub-blocks of n weights as columns, in block order."""
    return x.reshape(-1, n).t().contiguous()


def _block_major(t: torch.Tensor, n_sub: int) -> torch.Tensor:
    """(n, G) group-major -> (n_superblocks, n_sub, n)."""
    return t.t().reshape(-1, n_sub, t.shape[0])


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): the largest |x| of each column and the x it came from (first on ties; 0 if all 0)."""
    ax = x.abs()
    first = ax.argmax(dim=0, keepdim=True)
    amax = ax.gather(0, first)[0]
    value = x.gather(0, first)[0]
    return amax, torch.where(amax > 0, value, torch.zeros_like(value))


# ---------------------------------------------------------------------------------------
# the searches
#
# Written with preallocated buffers and in-place ops: each step touches a few (n, G) arrays
# that stay in the caches, and no step allocates (allocation and page faults cost more than
# the arithmetic at these sizes).

_NEAREST_INT_LIMIT = 4.0e6  # nearest_int's domain is |v| <= 4194303 (the reference asserts it)


def _round_levels(v: torch.Tensor, lo: int, hi: int, exact: bool) -> torch.Tensor:
    """In place: v <- clamp(nearest_int(v), lo, hi) as float32.

    Where every |v| is inside nearest_int's domain, nearest_int is rounding half to even
    (torch.round); `exact` (some |v| may be outside) takes the reference's bit trick instead.
    """
    if exact:
        return v.copy_(nearest_int(v).clamp_(lo, hi))
    return v.round_().clamp_(lo, hi)


def _needs_exact(iscale: torch.Tensor, reach: torch.Tensor) -> bool:
    """True when iscale * (x - offset) may leave nearest_int's domain for some (non-degenerate) column.

    reach: (G,) bound of |x - offset| per column (0 for columns whose result is discarded).
    """
    bound = iscale.abs() * reach
    return bool((~(bound < _NEAREST_INT_LIMIT)).any())


def _seq_sum_into(out: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    """out <- left-to-right float32 sum of t along dim (see quantize.seq_sum), in place."""
    parts = t.unbind(dim)
    torch.add(parts[0], 0.0, out=out)
    for part in parts[1:]:
        out.add_(part)
    return out


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale and min of asymmetric sub-blocks: x ~ scale * L - the_min with L in 0..nmax.

    x, w: (n, G) values and weights. Returns scale (G,), the_min (G,), L (n, G) int32. Starts from
    the min/max fit, then for is = 0..nstep quantizes with iscale = (rmin + rdelta*is + nmax) /
    (max - min), fits scale and min by weighted least squares and takes the fit when its weighted
    error (squared, or absolute with use_mad) is below the best so far. A taken fit moves `min`,
    which the later steps use, so the steps run one after another (each over all G columns).
    """
    n, G = x.shape
    lo = x.amin(dim=0)
    hi = x.amax(dim=0)
    sum_w = w[0].clone()
    sum_x = sum_w * x[0]
    for i in range(1, n):
        sum_w.add_(w[i])
        sum_x.add_(w[i] * x[i])
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo
    live = ~flat

    shifted = torch.empty_like(x)
    cand = torch.empty_like(x)
    diff = torch.empty_like(x)
    prods = torch.empty((3, n, G), dtype=x.dtype, device=x.device)
    sums = torch.empty((3, G), dtype=x.dtype, device=x.device)
    cur = torch.empty((G,), dtype=x.dtype, device=x.device)

    def quantize_levels(iscale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        torch.sub(x, offset, out=shifted)
        iscale = torch.where(live, iscale, torch.zeros_like(iscale))  # flat columns: discarded at the end
        reach = torch.where(live, torch.maximum(hi - offset, offset - lo), torch.zeros_like(lo))
        torch.mul(shifted, iscale, out=cand)
        return _round_levels(cand, 0, nmax, _needs_exact(iscale, reach))

    def error(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        torch.mul(cand, scale, out=diff)  # C: scale * L + min - x, then squared or absolute, times w
        diff.add_(offset).sub_(x)
        diff.abs_() if use_mad else diff.mul_(diff)
        diff.mul_(w)
        return _seq_sum_into(cur, diff, 0)

    iscale = rdiv(float(nmax), hi - lo)
    scale = rdiv(1.0, iscale)
    quantize_levels(iscale, lo)
    best = error(scale, lo).clone()
    offset = lo
    taken_iscale, taken_offset = iscale, lo  # the levels are recomputed from these at the end
    for numerator in _step_constants(rmin, rdelta, nmax, nstep):
        iscale = torch.div(torch.tensor(numerator, dtype=x.dtype, device=x.device), hi - offset)
        quantize_levels(iscale, offset)
        torch.mul(w, cand, out=prods[0])
        torch.mul(prods[0], cand, out=prods[1])
        torch.mul(prods[0], x, out=prods[2])
        sum_l, sum_l2, sum_xl = _seq_sum_into(sums, prods, 1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clipped = this_min > 0
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        err = error(this_scale, this_min)
        better = (D > 0) & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        taken_iscale = torch.where(better, iscale, taken_iscale)
        taken_offset = torch.where(better, offset, taken_offset)
        offset = torch.where(better, this_min, offset)
    levels = quantize_levels(taken_iscale, taken_offset).to(torch.int32)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -offset, levels


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric sub-blocks with x**2 weights (make_qx_quants, rmse_type 1, no importance).

    x: (n, G). Returns scale (G,) and L (n, G) int32 in 0..2*nmax-1 (value + nmax), all 0 for a zero
    sub-block. Fits iscale = -nmax / max, then tries iscale = -(nmax + 0.1*is) / max for
    is = -9..9 and takes a fit whose sumlx**2 / suml2 beats the best so far. Every |iscale * x|
    is below nmax + 1, inside nearest_int's domain.
    """
    n, G = x.shape
    amax, vmax = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)  # discarded below; avoids inf * 0
    w = x * x
    wx = w * x
    cand = torch.empty_like(x)
    prods = torch.empty((2, n, G), dtype=x.dtype, device=x.device)
    sums = torch.empty((2, G), dtype=x.dtype, device=x.device)

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.mul(x, iscale, out=cand)
        _round_levels(cand, -nmax, nmax - 1, False)
        torch.mul(wx, cand, out=prods[0])
        torch.mul(w, cand, out=prods[1]).mul_(cand)
        sumlx, suml2 = _seq_sum_into(sums, prods, 1)
        return sumlx, suml2

    iscale = rdiv(float(-nmax), vmax)
    sumlx, suml2 = fit(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    taken = iscale
    for step in (s for s in range(-9, 10) if s != 0):
        numerator = -_f32(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        iscale = torch.div(torch.tensor(numerator, dtype=x.dtype, device=x.device), vmax)
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
        taken = torch.where(better, iscale, taken)
    torch.mul(x, taken, out=cand)
    levels = _round_levels(cand, -nmax, nmax - 1, False).to(torch.int32) + nmax
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, levels


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric sub-blocks refined one weight at a time (make_q3_quants with do_rmse).

    x: (n, G). Returns scale (G,) and L (n, G) int32 (value + nmax; all 0 for a zero sub-block).
    Up to 5 passes over the weights; a pass that changes nothing leaves every later pass idle,
    so running the remaining passes for all sub-blocks equals the reference's early exit.
    Here the new level x * sl2 / slx can leave nearest_int's domain (a tiny slx), so the
    reference's bit trick is kept.
    """
    n = x.shape[0]
    amax, vmax = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = rdiv(float(-nmax), vmax)
    levels = nearest_int(iscale * x).clamp(-nmax, nmax - 1).float()
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * levels, dim=0)
    suml2 = seq_sum(w * levels * levels, dim=0)
    rows = list(levels.unbind(0))
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(n):
            li = rows[i]
            without = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = nearest_int(x[i] * sl2 / without).clamp_(-nmax, nmax - 1).float()
            slx = without + wx[i] * new_l
            sl2.add_(w[i] * new_l * new_l)
            take = (without > 0) & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            rows[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    levels = torch.stack(rows).to(torch.int32) + nmax
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, levels


# ---------------------------------------------------------------------------------------
# shared pieces of the super-block formats


def _requantize(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, levels: torch.Tensor,
                lo: int, hi: int) -> torch.Tensor:
    """Final levels from the stored (f16-rounded) sub-block factors: nearest_int((x + dm) / d) clamped,
    or nearest_int(x / d) - lo when dm is None; sub-blocks with d == 0 keep the search's levels.

    x, levels: (nb, n_sub, n); d, dm: (nb, n_sub, 1).
    """
    if dm is None:
        q = nearest_int(x / d).clamp(lo, hi) - lo
    else:
        q = nearest_int((x + dm) / d).clamp(lo, hi)
    return torch.where(d != 0, q, levels)


def _pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """(nb, 256) values 0..3 -> (nb, 64) bytes: for each half of 128, byte l holds l, l+32, l+64, l+96."""
    q = levels.to(torch.uint8).reshape(-1, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (nb, 8) -> the 12-byte field of Q4_K/Q5_K."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([first, second, third], dim=1)


def _six_bit(v: torch.Tensor) -> torch.Tensor:
    """`uint8_t l = nearest_int(v); l = MIN(63, l)`."""
    return (nearest_int(v) & 0xFF).clamp(max=63)


def _asymmetric_superblock(x: torch.Tensor, n: int, nmax: int, rmin: float, rdelta: float, nstep: int,
                           use_mad: bool, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Search every sub-block; return x, scales, mins, levels block-major ((nb, n_sub, n), (nb, n_sub))."""
    n_sub = QK_K // n
    xg = _group_major(x, n)
    scale, the_min, levels = make_qkx2_quants(xg, weights, nmax, rmin, rdelta, nstep, use_mad)
    return (x.reshape(-1, n_sub, n), scale.reshape(-1, n_sub), the_min.reshape(-1, n_sub),
            _block_major(levels, n_sub))


def _max_positive(v: torch.Tensor) -> torch.Tensor:
    """`float m = 0; if (v > m) m = v;` over dim 1 -> (nb, 1) (+0.0 when nothing is positive)."""
    top = v.amax(dim=1, keepdim=True)
    return torch.where(top > 0, top, torch.zeros_like(top))


def _qkx_k(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """The common part of Q4_K and Q5_K: 8 sub-blocks of 32 with av_x + |x| weights.

    Returns d16, dmin16 (nb, 1) float16-rounded factors, ls, lm (nb, 8) six-bit values and the
    final levels (nb, 8, 32).
    """
    xg = _group_major(x, 32)
    # sqrtf is correctly rounded; torch's vectorised float32 sqrt can be 1 ulp off, float64's is not
    av_x = torch.sqrt((seq_sum(xg * xg, dim=0) / 32.0).double()).float()
    weights = av_x + xg.abs()
    xb, scales, mins, levels = _asymmetric_superblock(x, 32, nmax, rmin, rdelta, nstep, False, weights)
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    inv_scale = torch.where(max_scale > 0, rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, rdiv(63.0, max_min), torch.zeros_like(max_min))
    ls, lm = _six_bit(inv_scale * scales), _six_bit(inv_min * mins)
    d_raw, dmin_raw = max_scale / 63.0, max_min / 63.0
    d = fp16_round(d_raw) * ls.float()
    dm = fp16_round(dmin_raw) * lm.float()
    levels = _requantize(xb, d[..., None], dm[..., None], levels, 0, nmax)
    return d_raw, dmin_raw, ls, lm, levels


# ---------------------------------------------------------------------------------------
# the formats


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """Q4_K (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit levels."""
    d, dmin, ls, lm, levels = _qkx_k(x, 15, -1.0, 0.1, 20)
    q = levels.reshape(-1, 4, 2, 32)
    qs = pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_scale_min_k4(ls, lm), qs], dim=1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """Q5_K (176 bytes): f16 d, f16 dmin, 12 bytes scales/mins, 32 bytes of high bits, 128 nibble bytes."""
    d, dmin, ls, lm, levels = _qkx_k(x, 31, -0.5, 0.1, 15)
    q = levels.reshape(-1, 8, 32).to(torch.int32)  # sub-block b, weight j
    bit_weights = (1 << torch.arange(8, dtype=torch.int32, device=x.device))[None, :, None]
    qh = (((q >> 4) & 1) * bit_weights).sum(dim=1).to(torch.uint8)  # byte j, bit b = high bit of (b, j)
    low = q.reshape(-1, 4, 2, 32) & 0x0F
    ql = pack_nibbles(low[:, :, 0], low[:, :, 1]).reshape(-1, 128)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_scale_min_k4(ls, lm), qh, ql], dim=1)


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    """Q2_K (84 bytes): 16 bytes of 4-bit scale | 4-bit min, 64 bytes of 2-bit levels, f16 d, f16 dmin."""
    xg = _group_major(x, 16)
    xb, scales, mins, levels = _asymmetric_superblock(x, 16, 3, -0.5, 0.1, 15, True, xg.abs())
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    has_scale, has_min = max_scale > 0, max_min > 0
    ls = nearest_int(rdiv(15.0, max_scale) * scales)
    ls = torch.where(has_scale, ls, torch.zeros_like(ls))
    lm = nearest_int(rdiv(15.0, max_min) * mins)
    packed = torch.where(has_min, (ls | (lm << 4)) & 0xFF, ls & 0xFF)
    d_raw = torch.where(has_scale, max_scale / 15.0, torch.zeros_like(max_scale))
    dmin_raw = torch.where(has_min, max_min / 15.0, torch.zeros_like(max_min))
    d = fp16_round(d_raw) * (packed & 0x0F).float()
    dm = fp16_round(dmin_raw) * (packed >> 4).float()
    levels = _requantize(xb, d[..., None], dm[..., None], levels, 0, 3)
    return torch.cat([packed.to(torch.uint8), _pack_2bit(levels.reshape(-1, QK_K)),
                      fp16_bytes(d_raw), fp16_bytes(dmin_raw)], dim=1)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    """Q3_K (110 bytes): 32 bytes high-bit mask, 64 bytes 2-bit levels, 12 bytes 6-bit scales, f16 d."""
    xg = _group_major(x, 16)
    scale, levels = make_q3_quants(xg, 4)
    scales = scale.reshape(-1, 16)
    levels = _block_major(levels, 16)
    max_scale = _signed_absmax(scales.t())[1][:, None]  # (n, 1), 0 for an all-zero block
    has_scale = max_scale != 0
    iscale = rdiv(-32.0, max_scale)
    l6 = ((nearest_int(iscale * scales) & 0xFF) ^ 0x80) - 0x80  # int8_t conversion
    l6 = torch.where(has_scale, l6.clamp(-32, 31) + 32, torch.zeros_like(l6))
    d_raw = torch.where(has_scale, rdiv(1.0, iscale), torch.zeros_like(max_scale))
    d = fp16_round(d_raw) * (l6 - 32).float()
    d = torch.where(has_scale, d, torch.zeros_like(d))
    levels = _requantize(x.reshape(-1, 16, 16), d[..., None], None, levels, -4, 3).reshape(-1, QK_K)
    high = levels > 3
    levels = torch.where(high, levels - 4, levels)
    hmask = (high.to(torch.int32).reshape(-1, 8, 32) << torch.arange(8, device=x.device)[None, :, None]).sum(1)
    l6 = l6.to(torch.uint8)
    low_nibbles = pack_nibbles(l6[:, :8], l6[:, 8:])
    top = (l6 >> 4).reshape(-1, 4, 4)  # j = 4 * k + m -> byte 8 + m, bits 2k
    top_bytes = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return torch.cat([hmask.to(torch.uint8), _pack_2bit(levels), low_nibbles, top_bytes, fp16_bytes(d_raw)], dim=1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """Q6_K (210 bytes): 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, f16 d."""
    xg = _group_major(x, 16)
    scale, levels = make_qx_quants_rmse1(xg, 32)
    scales = scale.reshape(-1, 16)
    levels = _block_major(levels, 16)
    amax = scales.abs()
    first = amax.argmax(dim=1, keepdim=True)
    max_abs = amax.gather(1, first)
    max_scale = scales.gather(1, first)
    empty = max_abs < GROUP_MAX_EPS
    iscale = rdiv(-128.0, max_scale)
    d_raw = rdiv(1.0, iscale)
    sc = nearest_int(iscale * scales).clamp(max=127)
    sc = ((sc & 0xFF) ^ 0x80) - 0x80
    d = fp16_round(d_raw) * sc.float()
    levels = _requantize(x.reshape(-1, 16, 16), d[..., None], None, levels, -32, 31).reshape(-1, 2, 4, 32)
    low = levels & 0x0F
    ql = torch.stack([pack_nibbles(low[:, :, 0], low[:, :, 2]), pack_nibbles(low[:, :, 1], low[:, :, 3])], dim=2)
    hi = (levels >> 4).to(torch.uint8)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.to(torch.int8).view(torch.uint8),
                     fp16_bytes(d_raw)], dim=1)
    return torch.where(empty, torch.zeros_like(out), out)
