"""Projections that read the same input (q, k, v; gate, up) run as one matmul over their stacked
frozen weights, plus one LoRA matmul for all their adapters, while the modules stay separate.

The model keeps Hugging Face's modules and names (`q_proj`, `k_proj`, `v_proj`, `gate_proj`,
`up_proj`), so state dicts, LoRA injection and the adapter files are per projection as before.
`refresh` stacks the parts' frozen base weights into one tensor (dense float, or the int8 values
and group factors of a resident-quantized base) and makes each part's own weight a view of its
rows, so the stack costs no memory. It is cheap to call before every forward: the stack is kept
while the parts' tensors are still those views, and rebuilt when something replaced them
(`load_state_dict(assign=True)`, a device or dtype move, FSDP's sharding, which it leaves alone).

On SmolLM2-135M (batch 4 x ctx 64): one (256 x 576) @ (576 x 960) product instead of 576 -> 576, 192,
192, one 576 -> 3072 instead of two 576 -> 1536, the adapters' x A^T products (rank 4 each) as one
rank-12 / rank-8 product, and as many fewer autograd nodes; see bench/README.md for the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from loraforge.kernels.cpu_linear import frozen_linear
from loraforge.lora import LoRALinear, adapters_stackable, stacked_outputs
from loraforge.quant.linear import QuantLinear


@dataclass(eq=False)
class StackedBase:
    """Frozen base weights of several projections stacked by rows (the parts' tensors are views).

    weight (sum out, in) and bias (sum out,) or None for dense parts; `table` for resident-quantized
    parts (a QuantLinear over the stacked values and factors). sizes: the parts' output widths.
    """

    sizes: tuple[int, ...]
    pointers: tuple  # the parts' tensors (address, shape, dtype, requires_grad) when stacked; a change: re-stack
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    table: QuantLinear | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., sum(sizes)), the parts' base outputs side by side."""
        if self.table is not None:
            return self.table(x)
        return frozen_linear(x, self.weight, self.bias)


def _hooked(module: nn.Module) -> bool:
    """Forward hooks on the module or its base, which expect it to be called on its own."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in (module, _base(module)))


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoRALinear) else module


def _tensors(base: nn.Module) -> list[torch.Tensor | None]:
    if isinstance(base, QuantLinear):
        return [base.q, base.scale, base.offset, base.bias]
    return [getattr(base, "weight", None), getattr(base, "bias", None)]


def _pointers(bases: Sequence[nn.Module]) -> tuple:
    return tuple((id(b),) + tuple(None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype, t.requires_grad)
                                  for t in _tensors(b)) for b in bases)


def _plain(t: torch.Tensor | None) -> bool:
    """A frozen ordinary tensor (not meta, not a DTensor or other subclass)."""
    return t is None or (type(t.data) is torch.Tensor and not t.is_meta and not t.requires_grad)


def _views(stacked: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(stacked.split(list(sizes), dim=0))


def _stack_dense(bases: Sequence[nn.Linear]) -> StackedBase | None:
    weights, biases = [b.weight for b in bases], [b.bias for b in bases]
    if not all(_plain(t) for t in weights + biases) or (None in biases and any(t is not None for t in biases)):
        return None
    first = weights[0]
    if any(w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device
           for w in weights):
        return None
    sizes = tuple(w.shape[0] for w in weights)
    weight = torch.cat([w.detach() for w in weights])
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    for i, base in enumerate(bases):  # the parts become views of the stack: no second copy
        base.weight = nn.Parameter(_views(weight, sizes)[i], requires_grad=False)
        if bias is not None:
            base.bias = nn.Parameter(_views(bias, sizes)[i], requires_grad=False)
    return StackedBase(sizes, _pointers(bases), weight=weight, bias=bias)


def _stack_quant(bases: Sequence[QuantLinear]) -> StackedBase | None:
    first = bases[0]
    layout = lambda b: (b.n_cols, b.scale is None, b.offset is None, b.bias is None, tuple(b.q.shape[1:]),  # noqa: E731
                        b.q.dtype, b.q.device, b.output_dtype)
    if any(layout(b) != layout(first) for b in bases) or not all(_plain(t) for b in bases for t in _tensors(b)):
        return None
    sizes = tuple(b.n_rows for b in bases)
    factor_dtype = None
    if first.scale is not None:  # float16 factors where every part has them exactly, else float32
        same = all(b.scale.dtype == first.scale.dtype and (b.offset is None or b.offset.dtype == first.scale.dtype)
                   for b in bases)
        factor_dtype = first.scale.dtype if same else torch.float32

    def cat(name: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        parts = [getattr(b, name) for b in bases]
        return None if parts[0] is None else torch.cat([p if dtype is None else p.to(dtype) for p in parts])

    q, scale, offset, bias = cat("q"), cat("scale", factor_dtype), cat("offset", factor_dtype), cat("bias")
    table = QuantLinear.over_split(first.qtype, q, scale, offset, bias, first.output_dtype)
    for i, base in enumerate(bases):
        for name, stacked in (("q", q), ("scale", scale), ("offset", offset), ("bias", bias)):
            if stacked is not None:
                setattr(base, name, _views(stacked, sizes)[i])
    return StackedBase(sizes, _pointers(bases), table=table)


def refresh(current: StackedBase | None, parts: Sequence[nn.Module]) -> StackedBase | None:
    """The stack of the parts' frozen bases: `current` while still valid, else a new one (None when
    the bases cannot be stacked: mixed kinds, trainable or sharded weights, unlike layouts)."""
    bases = [_base(p) for p in parts]
    if current is not None and current.pointers == _pointers(bases):
        return current
    if all(type(b) is QuantLinear for b in bases):
        return _stack_quant(bases)
    if all(isinstance(b, nn.Linear) for b in bases):
        return _stack_dense(bases)
    return None


def stacked_forward(x: torch.Tensor, stacked: StackedBase | None, parts: Sequence[nn.Module]
                    ) -> list[torch.Tensor] | None:
    """The parts' outputs [(..., out_i)] by one base matmul and one LoRA over the stack; None when there
    is no stack or the parts need their own paths (a LoRA dropout, forward hooks): the caller runs each."""
    if stacked is None or not adapters_stackable(parts) or any(_hooked(p) for p in parts):
        return None
    return stacked_outputs(stacked(x), x, parts, stacked.sizes)
