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
