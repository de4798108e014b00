"""AdamW (torch's, or bitsandbytes' 8-bit and paged 8-bit) and learning-rate schedules.

Optimizers (`OPTIMIZERS`, the names transformers' TrainingArguments and unsloth use):
  adamw_torch       torch.optim.AdamW (fused on CUDA), fp32 moments: 8 bytes per trained weight
  adamw_8bit        bitsandbytes.optim.AdamW8bit: both moments blockwise-quantized to 8 bits
                    (2 bytes + scales per weight); like bitsandbytes' default, tensors under 4096
                    elements (e.g. a rank-4 lora_A of a 576-wide layer) keep fp32 moments
  paged_adamw_8bit  bitsandbytes.optim.PagedAdamW8bit: the same, its states in CUDA unified memory
                    that pages to the CPU under memory pressure. On the CPU there is nothing to page
                    to: it is adamw_8bit there (the same update, the same checkpoint state).

`llama` is llama.cpp finetune's schedule: linear warmup, then cosine decay to `cos_min` over
`cos_decay_steps` (optionally restarting with steps x `cos_restart`). `linear`, `cosine` and
`constant` follow transformers' schedulers (warmup, then decay to 0 at `total_steps`).
The schedule gives a multiplier ("sched") of the base learning rate for a 1-based step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.errors import LoraforgeError

SCHEDULERS = ("llama", "linear", "cosine", "constant")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
_CLASS_NAMES = {"AdamW": "adamw_torch", "AdamW8bit": "adamw_8bit", "PagedAdamW8bit": "paged_adamw_8bit"}


@dataclass
class Schedule:
    kind: str = "llama"
    warmup_steps: int = 100
    total_steps: int = 0  # linear/cosine: decay reaches 0 here
    cos_decay_steps: int = 1000
    cos_min: float = 0.1
    cos_restart: float = 1.1
    enable_restart: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULERS:
            raise LoraforgeError(f"unknown learning-rate scheduler {self.kind!r} (one of {', '.join(SCHEDULERS)})")
        if self.warmup_steps < 0 or self.cos_decay_steps <= 0:
            raise LoraforgeError("warmup steps must be >= 0 and cosine decay steps > 0")

    def __call__(self, step: int) -> float:
        """Multiplier of the base learning rate at 1-based optimizer step `step`.

        `llama` follows llama.cpp's finetune (step / warmup during warmup, so the first step
        already moves). The HF kinds follow transformers' `get_*_schedule_with_warmup` with
        their 0-based step count: the first warmup step runs at 0, and the last step of a
        linear or cosine decay runs at 1 / (total - warmup) of the peak, not at 0.
        """
        if self.kind == "llama":
            if step < self.warmup_steps:
                return step / self.warmup_steps
            return _cosine_restart(step - self.warmup_steps, self.cos_decay_steps, self.cos_min,
                                   self.cos_restart, self.enable_restart)
        s = step - 1  # transformers' LambdaLR counts steps from 0
        if s < self.warmup_steps:
            return s / max(1, self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        if self.kind == "linear":
            return max(0.0, (self.total_steps - s) / span)
        progress = (s - self.warmup_steps) / span
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float | None,
                     kind: str) -> int:
    """Warmup length as the flags give it: explicit steps, else ceil(ratio x total) as
    transformers computes it (0.03 of 5 steps is 1 step), else llama.cpp's 100 for its
    schedule and 0 for the others."""
    if warmup_steps is not None:
        return warmup_steps
    if warmup_ratio:
        return math.ceil(warmup_ratio * total_steps)
    return 100 if kind == "llama" else 0


def _cosine_restart(step: int, decay_steps: int, minimum: float, restart_mult: float, restart: bool) -> float:
    if restart:
        while step > decay_steps:
            step -= decay_steps
            decay_steps = int(restart_mult * decay_steps)
    step = min(step, decay_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))
    return (1.0 - minimum) * cos + minimum


def check_optimizer(name: str, device: torch.device) -> None:
    """Fail before loading anything when the optimizer cannot run here (bitsandbytes missing)."""
    if name not in OPTIMIZERS:
        raise LoraforgeError(f"--optim {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if name != "adamw_torch":
        _bitsandbytes_optim(name)


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, beta1: float, beta2: float,
                   eps: float = 1e-8, decay_min_ndim: int = 2, name: str = "adamw_torch") -> torch.optim.Optimizer:
    """AdamW of kind `name` (see OPTIMIZERS); weight decay only on tensors with at least
    `decay_min_ndim` dims (as llama.cpp)."""
    if name not in OPTIMIZERS:
        raise LoraforgeError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if lr <= 0:
        raise LoraforgeError(f"learning rate must be positive, got {lr}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise LoraforgeError("Adam betas must be in [0, 1)")
    decay = [p for p in params if p.ndim >= decay_min_ndim]
    no_decay = [p for p in params if p.ndim < decay_min_ndim]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    on_cuda = all(p.is_cuda for p in params) and len(params) > 0
    sharded = any(hasattr(p, "full_tensor") for p in params)  # FSDP's DTensors: the foreach kernels
    if name == "adamw_torch":
        fused = on_cuda and not sharded
        return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, foreach=not fused, fused=fused or None)
    bnb_optim = _bitsandbytes_optim(name)
    cls = bnb_optim.PagedAdamW8bit if name == "paged_adamw_8bit" and on_cuda else bnb_optim.AdamW8bit
    return cls(groups, lr=lr, betas=(beta1, beta2), eps=eps)


def _bitsandbytes_optim(name: str):
    try:
        import bitsandbytes.optim as bnb_optim
    except Exception as e:  # not installed, or no native library for this platform
        raise LoraforgeError(f"--optim {name} needs bitsandbytes ({type(e).__name__}: {e}); "
                             "pip install 'loraforge[bnb]'") from None
    return bnb_optim


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The OPTIMIZERS name of an optimizer made by `make_optimizer` (else its class name)."""
    return _CLASS_NAMES.get(type(optimizer).__name__, type(optimizer).__name__)


def same_state_layout(a: str, b: str) -> bool:
    """Whether optimizers `a` and `b` keep interchangeable per-parameter state (8-bit AdamW paged or not)."""
    return a == b or {a, b} == {"adamw_8bit", "paged_adamw_8bit"}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

