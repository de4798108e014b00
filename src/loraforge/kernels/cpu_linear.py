"""Matmuls with frozen float32 weights on the CPU through oneDNN (`torch.ops.mkldnn._linear_pointwise`).

torch's float32 `F.linear` on the CPU calls MKL's sgemm, and MKL takes its AVX-512 kernels only on
Intel CPUs: on an AMD CPU with AVX-512 (Zen 4 / Zen 5) it runs its AVX2 code, about half the
machine's float32 rate. oneDNN, also inside torch (Inductor calls the same operator for frozen
linears), uses AVX-512 there. Measured on a 2-core AMD EPYC (Zen 5), 2 threads, float32
(x (256, in) @ W^T): 576 -> 1536 MKL ~190 GFLOP/s, oneDNN ~400; 4096 -> 11008 MKL ~180, oneDNN ~400;
the 49152-row LM head ~60 against ~120. The arithmetic is the same float32 products and sums in
another order (results differ in the last bits, as between any two BLAS libraries).

`frozen_linear(x, w, b)` is `F.linear` for a weight without gradient (a LoRA base, an LM head):
forward y = x W^T + b and the input gradient g W, both through oneDNN where `backend()` says so,
and F.linear otherwise. The backend is chosen once per process: LORAFORGE_CPU_LINEAR=onednn|aten,
or by default oneDNN on CPUs that report AVX-512 and are not Intel's (where MKL is at its best).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("onednn", "aten")


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _choose_backend() -> str:
    """"onednn" or "aten" for this process (LORAFORGE_CPU_LINEAR, else by CPU)."""
    forced = os.environ.get("LORAFORGE_CPU_LINEAR", "").strip().lower()
    usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if forced in BACKENDS:
        return forced if usable or forced == "aten" else "aten"
    if not usable:
        return "aten"
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return "onednn" if avx512 and _cpu_vendor() not in ("", "GenuineIntel") else "aten"


_DEFAULT = _choose_backend()  # decided once, at import (torch.compile then reads a constant)


def default_backend() -> str:
    return _DEFAULT


_override: list[str | None] = [None]


def set_backend(name: str | None) -> None:
    """Force "onednn" or "aten" (None: back to `default_backend()`), e.g. to compare the two."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"CPU linear backend must be one of {BACKENDS}, got {name!r}")
    _override[0] = name


def backend() -> str:
    return _override[0] or default_backend()


# A custom operator around oneDNN's: torch.compile keeps it as an opaque call (Inductor's own lowering
# of mkldnn._linear_pointwise expects weights it has packed itself).
@torch.library.custom_op("loraforge::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T + bias by oneDNN, float32 -> (..., out); weight may be a strided view."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_shape(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _onednn_linear_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _onednn_linear_backward(ctx, grad_out):
    """x's gradient only (g W, W^T read as a strided view): the weight is frozen."""
    (weight,) = ctx.saved_tensors
    grad_x = onednn_linear(grad_out, weight.t(), None) if ctx.needs_input_grad[0] else None
    return grad_x, None, None


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if backend() != "onednn" or x.device.type != "cpu" or weight.requires_grad:
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 2 or x.dim() < 2:
        return False
    if bias is not None and (bias.requires_grad or bias.dtype != torch.float32):
        return False
    return not torch.is_autocast_enabled("cpu") and x.numel() > 0


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., in), weight (out, in) that gets no gradient -> (..., out)."""
    if not _applies(x, weight, bias):
        return F.linear(x, weight, bias)
    return onednn_linear(x, weight, bias)


def linear_no_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear without recording gradients (inside a custom operator or autograd Function)."""
    if _applies(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def matmul_no_grad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight for x (..., out), weight (out, in) without recording gradients (a frozen linear's
    input gradient): oneDNN over the transposed view where it applies, else torch.matmul."""
    if _applies(x, weight, None):
        return onednn_linear(x, weight.t(), None)
    return x @ weight


def _lora_forward(y, x, a, sizes, ranks, scales, bs) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(the parts' outputs, x A^T (N, R)); see _LoRAOutputs."""
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.reshape(-1, y.shape[-1])
    xa = onednn_linear(x2, a, None)  # (N, R)
    outs, col, row = [], 0, 0
    for size, rank, scale, b in zip(sizes, ranks, scales, bs):
        part = y2[:, col:col + size]
        if rank:
            outs.append(torch.add(part, onednn_linear(xa[:, row:row + rank], b, None), alpha=scale))
        else:
            outs.append(part.clone())
        col, row = col + size, row + rank
    return tuple(o.view(*y.shape[:-1], o.shape[-1]) for o in outs), xa


class _LoRAOutputs(torch.autograd.Function):
    """The outputs y_i + s_i (x A_i^T) B_i^T of several projections read from one input, their base
    outputs y_i side by side in y (..., sum out_i), every product by oneDNN.

    x A^T for all parts is one product (A: the parts' A matrices stacked, (R, in)), and so are the
    gradients of A and x; per part: xa_i B_i^T forward, g_i B_i and (xa_i^T g_i)^T backward. These
    rank-r products are skinny (one side 4-16 wide), where MKL's AVX2 code on an AVX-512 AMD CPU is
    slow: measured on one core, 256 x 1536 grad times a 1536 x 4 B 318 us (MKL) against 77 (oneDNN),
    the 256 x 4 by 4 x 1536 forward product 136 against 38.
    """

    @staticmethod
    def forward(ctx, y, x, a, sizes, ranks, scales, *bs):
        outs, xa = _lora_forward(y, x, a, sizes, ranks, scales, bs)
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]), a, xa, *bs)
        ctx.parts = (sizes, ranks, scales)
        ctx.shapes = (tuple(x.shape), tuple(y.shape))
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x2, a, xa, *bs = ctx.saved_tensors
        sizes, ranks, scales = ctx.parts
        x_shape, y_shape = ctx.shapes
        n = x2.shape[0]
        g_parts, g_xa, g_bs, row = [], [], [], 0
        for g, size, rank, scale, b in zip(grads, sizes, ranks, scales, bs):
            g = torch.zeros(n, size, dtype=x2.dtype) if g is None else g.reshape(n, size).contiguous()
            g_parts.append(g)
            if rank:
                xa_i = xa[:, row:row + rank].t().contiguous()  # (rank, N)
                g_xa.append(onednn_linear(g, b.t(), None) * scale)  # g B: (N, rank)
                g_bs.append(onednn_linear(xa_i, g.t(), None).t() * scale)  # (xa^T g)^T: (out, rank)
            else:
                g_bs.append(None)
            row += rank
        g_y = torch.cat(g_parts, dim=1).view(y_shape) if ctx.needs_input_grad[0] else None
        g_x = g_a = None
        if g_xa:
            g_xa_all = torch.cat(g_xa, dim=1)  # (N, R)
            if ctx.needs_input_grad[1]:
                g_x = onednn_linear(g_xa_all, a.t(), None).view(x_shape)
            if ctx.needs_input_grad[2]:
                g_a = onednn_linear(g_xa_all.t().contiguous(), x2.t(), None)  # (R, in)
        return (g_y, g_x, g_a, None, None, None, *g_bs)


def lora_applies(y: torch.Tensor, x: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """Whether `lora_outputs` runs here: the oneDNN backend, float32 tensors on the CPU, no autocast."""
    if backend() != "onednn" or torch.is_autocast_enabled("cpu") or y.device.type != "cpu":
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in [y, x] + tensors)


def lora_outputs(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, sizes: tuple[int, ...],
                 ranks: tuple[int, ...], scales: tuple[float, ...], bs: list[torch.Tensor | None]
                 ) -> tuple[torch.Tensor, ...]:
    """Per part i: y_i + scales[i] * (x A_i^T) B_i^T, for y (..., sum(sizes)) the parts' base outputs side
    by side, x (..., in), a (sum(ranks), in) the parts' A stacked, bs[i] (sizes[i], ranks[i]) or None
    for a part without adapter (rank 0). Returns the parts' outputs, each (..., sizes[i]) contiguous."""
    tensors = [y, x, a] + [b for b in bs if b is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _lora_forward(y, x, a, sizes, ranks, scales, bs)[0]  # no autograd node (evaluation)
    return _LoRAOutputs.apply(y, x, a, tuple(sizes), tuple(ranks), tuple(scales), *bs)
