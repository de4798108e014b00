"""Frozen linear and embedding layers whose weights stay quantized in memory.

A block-quantized GGUF tensor (Q8_0, Q4_K, ...) is held split (`ggml.split_groups`): its
integer values as int8, one byte per weight, and the factors of each 16/32-weight group
(float16 where exact, else float32); F16/BF16 tensors are held as they are. Three passes (int8 -> float, times scale, plus
offset) decode a weight, bit-identical to dequantizing the file's blocks, several times faster
than unpacking bits on every use.

The weight is decoded on the fly for each use and never kept: the custom operator below
decodes in forward, keeps nothing but references to the resident buffers, decodes again in
backward and returns only the input gradient (the matmuls go through `kernels.cpu_linear`). Decoding goes into a reused scratch buffer, a slice of
rows at a time for large matrices (an LM head), so a step allocates no full-size weights.

A single input row (decoding one token) skips the decoding into float: a C kernel
(`quant/matvec.c`, built at first use with the system compiler) reads the int8 values and the
group factors once and sums scale_g * (q_g . x_g) (+ offset_g * sum(x_g)) per row, never
writing a float weight: 2-4x less time per token than decode-then-multiply, and less than the
float32 model's own matmuls (figures in `quant/matvec.py`). Without a compiler it decodes.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import LoraforgeError
from ..kernels.cpu_linear import linear_no_grad, matmul_no_grad
from . import matvec
from .ggml import check_supported, dequantize, is_block_quantized, split_groups, type_name

# Weights decoded at once: larger matrices go by slices of rows (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22

_scratch_buffers: dict[torch.device, torch.Tensor] = {}


def _scratch(n_elements: int, device: torch.device) -> torch.Tensor:
    """A reused flat float32 buffer of n_elements on device (contents undefined)."""
    buf = _scratch_buffers.get(device)
    if buf is None or buf.numel() < n_elements:
        buf = _scratch_buffers[device] = torch.empty(n_elements, dtype=torch.float32, device=device)
    return buf[:n_elements]


# -- one input row straight from the split form ----------------------------------------------------

class _FusedMatvec:
    """One token through a quantized layer without decoding it (`matvec.split_matvec`, a C kernel
    built at first use). Off with LORAFORGE_FUSED_MATVEC=0; where the kernel cannot be built the
    layers decode as for training, with one warning."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("LORAFORGE_FUSED_MATVEC", "1") != "0"

    def __call__(self, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor | None:
        """layer(x) for one row x (..., n_cols) float32 on the CPU, or None where this does not
        apply (switched off, another device or dtype, autocast on, a float table)."""
        if (not self.enabled or layer.scale is None or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.is_autocast_enabled("cpu")):
            return None
        if not matvec.available():
            self.enabled = False
            warnings.warn(f"quantized matvec kernel unavailable ({matvec.unavailable_reason()}); decoding "
                          "weights per token instead", RuntimeWarning, stacklevel=3)
            return None
        y = matvec.split_matvec(x.reshape(-1), layer.q, layer.scale, layer.offset)
        if y is None:
            return None
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*x.shape[:-1], layer.n_rows)


fused_matvec = _FusedMatvec()


def set_fused_matvec(enabled: bool) -> None:
    """Switch the one-row kernel on or off (e.g. to compare with decode-then-multiply)."""
    fused_matvec.enabled = bool(enabled)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with x runs in: the autocast dtype when autocast is on, else x's."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _table_shape(q: torch.Tensor, scale: torch.Tensor | None) -> tuple[int, int]:
    """(n_rows, n_cols) of a table held as q (n_rows, groups, size) with factors, or as floats (n_rows, n_cols)."""
    return (q.shape[0], q.shape[1] * q.shape[2]) if scale is not None else (q.shape[0], q.shape[1])


def _row_slices(n_rows: int, n_cols: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of at most CHUNK_ELEMENTS weights each."""
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _decode(q: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None, start: int, stop: int,
            dtype: torch.dtype, scratch: bool) -> torch.Tensor:
    """Weights of rows start..stop-1 (stop - start, n_cols) in dtype; scratch=True decodes into the shared
    scratch buffer (valid until the next scratch decode), else into a fresh tensor."""
    if scale is None:
        values = q[start:stop]
        return values.to(dtype) if scratch else values.to(dtype, copy=True)
    n = stop - start
    shape = (n, q.shape[1], q.shape[2])
    out = (_scratch(n * q.shape[1] * q.shape[2], q.device).view(shape) if scratch
           else torch.empty(shape, dtype=torch.float32, device=q.device))
    _decode_into(out, q[start:stop], scale[start:stop], None if offset is None else offset[start:stop])
    out = out.view(n, -1)
    return out if dtype == torch.float32 else out.to(dtype)


# The matmul over a table held split is one custom operator with its own input-gradient operator:
# opaque to torch.compile (which never traces the slice loop or the scratch buffer) and, for autograd,
# a node that keeps the resident buffers as plain references (nothing goes through saved-tensor hooks,
# which would copy them under CPU offload or checkpointing).

@torch.library.custom_op("loraforge::split_linear", mutates_args=())
def split_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b, W decoded from (q, scale, offset) slice by slice into the scratch buffer, in x's dtype.

    x (..., n_cols); q, scale, offset as `_QuantTable` holds them; bias (n_rows,) or None -> (..., n_rows).
    """
    n_rows, n_cols = _table_shape(q, scale)
    slices = _row_slices(n_rows, n_cols)
    if len(slices) == 1:
        return linear_no_grad(x, _decode(q, scale, offset, 0, n_rows, x.dtype, scratch=True), bias)
    x2d = x.reshape(-1, n_cols)
    y = x2d.new_empty(x2d.shape[0], n_rows)
    for start, stop in slices:
        y[:, start:stop] = linear_no_grad(x2d, _decode(q, scale, offset, start, stop, x.dtype, scratch=True))
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], n_rows)


@split_linear.register_fake
def _split_linear_shape(x, q, scale, offset, bias):
    return x.new_empty(*x.shape[:-1], q.shape[0])


@torch.library.custom_op("loraforge::split_linear_grad_input", mutates_args=())
def split_linear_grad_input(grad_out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None,
                            offset: torch.Tensor | None) -> torch.Tensor:
    """grad_out (..., n_rows) @ W (n_rows, n_cols) -> (..., n_cols), W decoded slice by slice."""
    n_rows, n_cols = _table_shape(q, scale)
    slices = _row_slices(n_rows, n_cols)
    if len(slices) == 1:
        return matmul_no_grad(grad_out, _decode(q, scale, offset, 0, n_rows, grad_out.dtype, scratch=True))
    g2d = grad_out.reshape(-1, n_rows)
    grad_x = g2d.new_zeros(g2d.shape[0], n_cols)
    for start, stop in slices:  # summed over slices
        grad_x += matmul_no_grad(g2d[:, start:stop], _decode(q, scale, offset, start, stop, grad_out.dtype,
                                                             scratch=True))
    return grad_x.reshape(*grad_out.shape[:-1], n_cols)


@split_linear_grad_input.register_fake
def _split_linear_grad_input_shape(grad_out, q, scale, offset):
    return grad_out.new_empty(*grad_out.shape[:-1], _table_shape(q, scale)[1])


def _split_linear_setup(ctx, inputs, output) -> None:
    _, ctx.q, ctx.scale, ctx.offset, _ = inputs  # references to resident buffers, not saved tensors


def _split_linear_backward(ctx, grad_out):
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = split_linear_grad_input(grad_out.contiguous(), ctx.q, ctx.scale, ctx.offset)
    return grad_x, None, None, None, None


split_linear.register_autograd(_split_linear_backward, setup_context=_split_linear_setup)


class _Split:
    """Values and factors of a table held split, to build a layer over (`QuantLinear.over_split`)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None) -> None:
        self.q, self.scale, self.offset = q, scale, offset


class _QuantTable(nn.Module):
    """Storage of a frozen 2-D quantized weight (n_rows, n_cols), shareable between modules.

    Block formats: buffers `q` (n_rows, groups, group_size) int8, `scale` and `offset`
    (n_rows, groups, 1) float16 or float32 (`offset` None for formats without one). F16/BF16: `q` is the
    (n_rows, n_cols) table itself, `scale` and `offset` None. `output_dtype` (float32 by
    default) is the dtype `weight` decodes to; it follows module casts such as
    `.to(torch.bfloat16)` / `.half()` like a float parameter would, while the stored values
    and factors keep their dtypes (only device moves apply to them).
    """

    def __init__(self, raw: torch.Tensor, qtype: int, n_rows: int, n_cols: int,
                 shared: "_QuantTable | _Split | None" = None):
        super().__init__()
        self.qtype = int(check_supported(qtype))
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        self.output_dtype = torch.float32
        if shared is not None:  # a tied LM head over the embedding table: same storage
            q, scale, offset = shared.q, shared.scale, shared.offset
        elif is_block_quantized(self.qtype):
            q, scale, offset = split_groups(raw, self.qtype, self.n_rows, self.n_cols)
        else:  # dequantize checks the byte count and views the bytes in their own dtype
            native = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[type_name(qtype)]
            q, scale, offset = dequantize(raw, self.qtype, (self.n_rows, self.n_cols), native), None, None
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # Follow dtype casts (model.to(torch.bfloat16)) in the decoded dtype only; move devices.
        probe = fn(torch.empty(0, dtype=self.output_dtype, device=self.q.device))
        self.output_dtype = probe.dtype
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = buf.to(probe.device)
                self._buffers[name] = moved if name != "bias" else fn(buf)
        return self

    def resident_bytes(self) -> int:
        """Bytes held by the stored values and factors."""
        return sum(b.numel() * b.element_size() for b in (self.q, self.scale, self.offset) if b is not None)

    def row_slices(self) -> Iterator[tuple[int, int]]:
        """(start, stop) row ranges of at most CHUNK_ELEMENTS weights each."""
        yield from _row_slices(self.n_rows, self.n_cols)

    def decode_rows(self, start: int, stop: int, dtype: torch.dtype | None = None,
                    scratch: bool = False) -> torch.Tensor:
        """Weights of rows start..stop-1: (stop - start, n_cols) in dtype (default output_dtype).

        scratch=True decodes into the shared scratch buffer: the result is valid only until the
        next scratch decode (for immediate use in a matmul); otherwise it is a fresh tensor.
        """
        return _decode(self.q, self.scale, self.offset, start, stop, dtype or self.output_dtype, scratch)

    def gather_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Weights of the rows `ids` (flat long tensor): (len(ids), n_cols) in dtype."""
        if self.scale is None:
            return self.q.index_select(0, ids).to(dtype)
        q = self.q.index_select(0, ids)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        offset = None if self.offset is None else self.offset.index_select(0, ids)
        _decode_into(out, q, self.scale.index_select(0, ids), offset)
        return out.view(len(ids), self.n_cols).to(dtype)


def _decode_into(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> None:
    """out = q * scale (+ offset) in float32, multiply then add (as ggml's reference decoders): by the
    C kernel in one pass where it is built (`matvec.split_decode`: measured ~10x faster than torch's
    three passes, whose int8 -> float copy alone ran at ~0.3 G weights/s on 2 AVX-512 cores), else torch."""
    if matvec.split_decode(out, q, scale, offset):
        return
    out.copy_(q)
    out.mul_(scale.float())
    if offset is not None:
        out.add_(offset.float())


class QuantLinear(_QuantTable):
    """Frozen linear layer over a quantized weight (out_features, in_features).

    Buffers: see `_QuantTable`; `bias` (out_features,) or None.
    forward: x (..., in_features) -> (..., out_features) in x's dtype (or the autocast dtype).
    """

    def __init__(self, raw: torch.Tensor | None, qtype: int, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None, shared: "_QuantTable | _Split | None" = None):
        super().__init__(raw, qtype, out_features, in_features, shared)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise LoraforgeError(f"bias of shape {tuple(bias.shape)}, expected ({self.out_features},)")
            bias = bias.detach().to(device=self.q.device)
        self.register_buffer("bias", bias)

    @classmethod
    def from_raw(cls, raw: torch.Tensor, qtype: int, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap the GGUF bytes of a weight; raw is (out_features, bytes_per_row) or flat uint8."""
        return cls(raw, qtype, out_features, in_features, bias)

    @classmethod
    def over_split(cls, qtype: int, q: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None,
                   bias: torch.Tensor | None, output_dtype: torch.dtype) -> "QuantLinear":
        """A layer over values and factors already held split (e.g. several layers' rows stacked);
        qtype names the format they came from (for display)."""
        n_rows, n_cols = _table_shape(q, scale)
        layer = cls(None, qtype, n_rows, n_cols, bias, shared=_Split(q, scale, offset))
        layer.output_dtype = output_dtype
        return layer

    @classmethod
    def tied_to(cls, embedding: "QuantEmbedding") -> "QuantLinear":
        """An LM head over an embedding table's storage (tied weights): no second copy."""
        return cls(None, embedding.qtype, embedding.n_rows, embedding.n_cols, shared=embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() == self.n_cols and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling()):
            y = fused_matvec(x, self)  # one token, no gradient: straight from the int8 values
            if y is not None:
                return y
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return split_linear(x.to(dtype), self.q, self.scale, self.offset, bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight (out_features, in_features), a fresh tensor on the module's device."""
        return self.decode_rows(0, self.n_rows, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Decoded weight in `output_dtype`, for reading (e.g. merging); writes are lost."""
        return self.dequantized_weight()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, qtype={type_name(self.qtype)}"
        )


class QuantEmbedding(_QuantTable):
    """Frozen embedding table over a quantized weight (num_embeddings, embedding_dim).

    forward: ids (...) -> (..., embedding_dim) in `output_dtype`; decodes only the rows asked for.
    """

    def __init__(self, raw: torch.Tensor, qtype: int, num_embeddings: int, embedding_dim: int):
        super().__init__(raw, qtype, num_embeddings, embedding_dim)
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)

    @classmethod
    def from_raw(cls, raw: torch.Tensor, qtype: int, num_embeddings: int, embedding_dim: int
                 ) -> "QuantEmbedding":
        """Wrap the GGUF bytes of a table; raw is (num_embeddings, bytes_per_row) or flat uint8."""
        return cls(raw, qtype, num_embeddings, embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(device=self.q.device, dtype=torch.long)
        return self.gather_rows(flat, self.output_dtype).reshape(*ids.shape, self.n_cols)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded table (num_embeddings, embedding_dim), a fresh tensor on the module's device."""
        return self.decode_rows(0, self.n_rows, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Decoded table in `output_dtype`, for reading (e.g. a tied LM head); writes are lost."""
        return self.dequantized_weight()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={type_name(self.qtype)}"
