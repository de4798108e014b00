"""Frozen linear and embedding layers whose weights stay as ggml blocks in memory.

The weight is decoded on the fly for each use and never kept: the autograd Function below
decodes in forward, saves nothing but a reference to the (already resident) raw buffer,
decodes again in backward and returns only the input gradient. A frozen base thus costs
its quantized size in memory, plus one transient full-precision copy of one matrix at a time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraforgeError
from .ggml import bytes_per_row, check_supported, dequantize, dequantize_rows, type_name


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with x runs in: the autocast dtype when autocast is on, else x's."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _QuantLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W decoded from ggml blocks; gradient for x only."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        raw: torch.Tensor,
        qtype: int,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        weight = dequantize(raw, qtype, (out_features, in_features), dtype)
        # raw is kept as a plain attribute, not through save_for_backward: it is a resident
        # module buffer, so saved-tensor hooks (CPU offload, checkpointing) must not copy it.
        ctx.raw, ctx.qtype, ctx.shape = raw, qtype, (out_features, in_features)
        return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize(ctx.raw, ctx.qtype, ctx.shape, grad_out.dtype)
            grad_x = grad_out @ weight  # (..., out) @ (out, in) -> (..., in)
        return grad_x, None, None, None, None, None


class _QuantTable(nn.Module):
    """Shared storage of a 2-D ggml tensor: buffer `raw` (rows, bytes_per_row) uint8.

    `output_dtype` (float32 by default) is the dtype `weight` decodes to; it follows
    module casts such as `.to(torch.bfloat16)` / `.half()`, like a float parameter would.
    """

    def __init__(self, raw: torch.Tensor, qtype: int, n_rows: int, n_cols: int):
        super().__init__()
        self.qtype = int(check_supported(qtype))
        row_bytes = bytes_per_row(self.qtype, n_cols)
        if raw.numel() != n_rows * row_bytes:
            raise LoraforgeError(
                f"{type_name(qtype)} tensor of {n_rows}x{n_cols} needs {n_rows * row_bytes} bytes, "
                f"got {raw.numel()}"
            )
        if raw.dtype != torch.uint8:
            raw = raw.contiguous().view(torch.uint8)
        self.register_buffer("raw", raw.reshape(n_rows, row_bytes))
        self.output_dtype = torch.float32

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # Follow dtype casts (model.to(torch.bfloat16)) that would apply to a float weight.
        self.output_dtype = fn(torch.empty(0, dtype=self.output_dtype)).dtype
        return super()._apply(fn, recurse)

    def _decoded(self, n_rows: int, n_cols: int, dtype: torch.dtype | None) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, (n_rows, n_cols), dtype or self.output_dtype)


class QuantLinear(_QuantTable):
    """Frozen linear layer over a ggml-quantized weight (out_features, in_features).

    Buffers: `raw` (out_features, bytes_per_row) uint8, `bias` (out_features,) or None.
    forward: x (..., in_features) -> (..., out_features) in x's dtype (or the autocast dtype).
    """

    def __init__(
        self,
        raw: torch.Tensor,
        qtype: int,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__(raw, qtype, out_features, in_features)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise LoraforgeError(f"bias of shape {tuple(bias.shape)}, expected ({self.out_features},)")
            bias = bias.detach().to(device=self.raw.device)
        self.register_buffer("bias", bias)

    @classmethod
    def from_raw(
        cls,
        raw: torch.Tensor,
        qtype: int,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Wrap the GGUF bytes of a weight; raw is (out_features, bytes_per_row) or flat uint8."""
        return cls(raw, qtype, out_features, in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLinearFunction.apply(
            x, self.raw, self.qtype, self.out_features, self.in_features, self.bias
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded weight (out_features, in_features), a fresh tensor on raw's device."""
        return self._decoded(self.out_features, self.in_features, dtype)

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
    """Frozen embedding table over a ggml-quantized weight (num_embeddings, embedding_dim).

    forward: ids (...) -> (..., embedding_dim) in `output_dtype`; decodes only the rows asked for.
    """

    def __init__(self, raw: torch.Tensor, qtype: int, num_embeddings: int, embedding_dim: int):
        super().__init__(raw, qtype, num_embeddings, embedding_dim)
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)

    @classmethod
    def from_raw(
        cls, raw: torch.Tensor, qtype: int, num_embeddings: int, embedding_dim: int
    ) -> "QuantEmbedding":
        """Wrap the GGUF bytes of a table; raw is (num_embeddings, bytes_per_row) or flat uint8."""
        return cls(raw, qtype, num_embeddings, embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.raw, self.qtype, ids, self.embedding_dim, self.output_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded table (num_embeddings, embedding_dim), a fresh tensor on raw's device."""
        return self._decoded(self.num_embeddings, self.embedding_dim, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Decoded table in `output_dtype`, for reading (e.g. a tied LM head); writes are lost."""
        return self.dequantized_weight()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={type_name(self.qtype)}"
