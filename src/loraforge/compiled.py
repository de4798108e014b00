"""Decoder layers through `torch.compile` (Inductor: C++ on the CPU, Triton on CUDA), eager as fallback.

One compiled function serves every layer of a model (the layer is an argument; its weights are
graph inputs), so a 30-layer model compiles once per input shape. Packed rows then attend through
flex attention with a block mask built by a compiled `create_block_mask` (per-document causal blocks;
no T x T mask is stored). The first failure of a compiled call (no C++ compiler, an Inductor error)
switches the model back to eager layers for good, with one warning line, and the call is redone
eagerly; `probe` runs one training step under it before the timed steps, so compile time and a
failure in the (lazily compiled) backward show up there.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

MODES = ("auto", "on", "off")


def _layer_forward(layer: nn.Module, x: torch.Tensor, ropes: dict, masks: dict) -> torch.Tensor:
    return layer(x, ropes, masks, None, 0)


def _is_control_flow(e: BaseException) -> bool:
    """Exceptions torch uses to steer a computation, not failures: gradient checkpointing stops a
    recomputation early by raising one through the layer."""
    return type(e).__name__ == "_StopRecomputationError"


def _default_warning(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class CompiledLayer:
    """Runs decoder layers through one torch.compile'd function (training and evaluation, not the KV
    cache of generation); `active` turns False for good after a failure."""

    def __init__(self, on_failure: Callable[[str], None] = _default_warning, fullgraph: bool = False) -> None:
        from loraforge.model import document_block_mask

        self.fn = torch.compile(_layer_forward, fullgraph=fullgraph)
        self.block_mask_fn = torch.compile(document_block_mask)
        self.flex_attention = True  # packed rows through flex attention (fused kernels)
        self.on_failure = on_failure
        self.error: str | None = None

    @property
    def active(self) -> bool:
        return self.error is None

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.error = f"{type(e).__name__}: {first}"
            self.on_failure(f"torch.compile failed ({self.error}); the decoder layers run eagerly")

    def block_mask(self, doc_ids: torch.Tensor, window: int | None) -> Any:
        """A flex-attention BlockMask for packed rows (model.document_block_mask, compiled)."""
        from loraforge.model import document_block_mask

        if self.active:
            try:
                return self.block_mask_fn(doc_ids, window)
            except Exception as e:  # noqa: BLE001 - any compile error means: run eagerly
                self.fail(e)
        return document_block_mask(doc_ids, window)

    def bind(self, layer: nn.Module) -> Callable[..., torch.Tensor]:
        def run(x, ropes, masks, cache, start_pos):
            if cache is None and self.active:
                try:
                    return self.fn(layer, x, ropes, masks)
                except Exception as e:  # noqa: BLE001
                    if _is_control_flow(e):
                        raise
                    self.fail(e)
            return layer(x, ropes, masks, cache, start_pos)
        return run


# --compile auto on the CPU: compiling a SmolLM2-sized layer takes ~20 s on 2 cores (21.6 s cold, ~9 s
# with Inductor's cache warm) and saves 0.06 s (no checkpointing) to 0.26 s (checkpointing) of a ~0.7-1.2 s
# step, so it pays off from a few hundred steps on (bench/cpu_smollm2.py measures both).
AUTO_MIN_CPU_STEPS = 300


def wanted(mode: str, device_type: str, n_steps: int, distributed: bool = False) -> bool:
    """Whether --compile MODE compiles a run of n_steps on this device type: on/off as said; auto on
    CUDA, and on the CPU from AUTO_MIN_CPU_STEPS steps; auto stays eager under torchrun."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if distributed:
        return False
    return device_type == "cuda" or n_steps >= AUTO_MIN_CPU_STEPS


def enable(model: nn.Module, on_failure: Callable[[str], None] = _default_warning) -> CompiledLayer:
    """Run the model's decoder layers compiled from now on (model.compiled_layer)."""
    # a failed compilation is reported by one line of ours; Inductor's own note on it is not needed
    logging.getLogger("torch._inductor.utils").setLevel(logging.ERROR)
    # random ops (LoRA dropout) draw from torch's own generator, as in eager layers, so compiled and
    # eager runs share their dropout masks and a seed means the same thing in both modes
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    model.compiled_layer = CompiledLayer(on_failure)
    return model.compiled_layer


def disable(model: nn.Module) -> None:
    model.compiled_layer = None


def probe(model: nn.Module, step: Callable[[], None]) -> tuple[float, bool]:
    """Compile by running `step` (a forward and backward on a real batch) once; its gradients are
    dropped and the random state restored, so training goes on as if it never ran. Returns (seconds,
    whether the compiled layers are still active)."""
    compiled = model.compiled_layer
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    started = time.perf_counter()
    try:
        step()
    except Exception as e:  # noqa: BLE001 - e.g. the backward's lazy compilation
        if compiled is None or _is_control_flow(e):
            raise
        compiled.fail(e)
    finally:
        for p in model.parameters():
            p.grad = None
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    seconds = time.perf_counter() - started
    return seconds, compiled is not None and compiled.active
