"""AdamW and learning-rate schedules.

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


OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")


def check_optimizer(name: str, device: torch.device) -> None:
    """Fail before loading anything when the optimizer cannot run here."""
    if name not in OPTIMIZERS:
        raise LoraforgeError(f"--optim {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if name != "adamw_torch":
        raise LoraforgeError(f"--optim {name} is not available in this build (use adamw_torch)")


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, beta1: float, beta2: float,
                   eps: float = 1e-8, decay_min_ndim: int = 2, name: str = "adamw_torch") -> torch.optim.AdamW:
    """AdamW; weight decay only on tensors with at least `decay_min_ndim` dims (as llama.cpp)."""
    if lr <= 0:
        raise LoraforgeError(f"learning rate must be positive, got {lr}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise LoraforgeError("Adam betas must be in [0, 1)")
    decay = [p for p in params if p.ndim >= decay_min_ndim]
    no_decay = [p for p in params if p.ndim < decay_min_ndim]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = all(p.is_cuda for p in params) and len(params) > 0
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, foreach=not fused, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

