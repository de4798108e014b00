"""The training loop: one function, read top to bottom.

Data comes from a `BatchSource` (text windows or instruction rows) in a shuffled order per
epoch that is a pure function of (seed, epoch), so the position in it is all a checkpoint
needs to continue exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from loraforge.data.batch import Batch
from loraforge.errors import LoraforgeError
from loraforge.train.checkpoint import TrainState
from loraforge.train.distributed import Ranks
from loraforge.train.optim import Schedule, set_lr


class BatchSource(Protocol):
    n_items: int  # samples / rows per epoch
    items_per_batch: int

    def make_batch(self, item_ids: list[int]) -> Batch: ...


@dataclass
class LoopOptions:
    n_iter: int  # optimizer steps to run in this call
    lr: float
    grad_acc: int = 1
    grad_clip: float = 1.0  # <= 0: no clipping
    save_every: int = 0
    eval_every: int = 0
    device: str = "cpu"
    ranks: Any = None  # train.distributed.Ranks under torchrun; None: this process alone


@dataclass
class StepLog:
    iteration: int
    sample: int  # 1-based index of the first sample of the step within the epoch
    n_items: int
    epoch: int
    sched: float
    lr: float
    loss: float
    grad_norm: float
    tokens: int  # trained (labelled) tokens in this step
    dt: float  # seconds for this step
    eta: float  # seconds left for this call


@dataclass
class LoopHooks:
    """What the loop calls out to. on_eval returns True to stop early (no improvement);
    should_stop is polled after every step (a Ctrl-C asks for a clean stop)."""

    on_step: Callable[[StepLog], None]
    on_save: Callable[[TrainState], None]
    on_eval: Callable[[TrainState], bool] | None = None
    should_stop: Callable[[], bool] = lambda: False


class NonFiniteLoss(LoraforgeError):
    """The loss or the gradients stopped being finite numbers; no update was applied."""


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n_items, generator=g).tolist()


def next_items(state: TrainState, count: int, order_cache: dict[int, list[int]]) -> list[int]:
    """Take `count` items from the current position, moving into the next epoch when one ends."""
    items = []
    while len(items) < count:
        order = order_cache.get(state.epoch)
        if order is None:
            order_cache.clear()
            order = order_cache[state.epoch] = epoch_order(state.n_items, state.seed, state.epoch)
        take = order[state.epoch_pos: state.epoch_pos + count - len(items)]
        items += take
        state.epoch_pos += len(take)
        if state.epoch_pos >= state.n_items:
            state.epoch, state.epoch_pos = state.epoch + 1, 0
    return items


def train(model: nn.Module, source: BatchSource, optimizer: torch.optim.Optimizer, schedule: Schedule,
          opts: LoopOptions, state: TrainState, hooks: LoopHooks) -> tuple[TrainState, str]:
    """Run up to `opts.n_iter` optimizer steps from `state` (which it advances), saving every
    `save_every` and at the end. Returns the state and why it stopped: "done", "early-stop"
    (no eval improvement) or "interrupted" (should_stop said so); a non-finite loss or gradient
    raises NonFiniteLoss before the update, with nothing saved."""
    params = [p for p in model.parameters() if p.requires_grad]
    ranks = opts.ranks if opts.ranks is not None else Ranks()
    order_cache: dict[int, list[int]] = {}
    model.train()
    started = time.perf_counter()
    last_end = started
    reason = "done"
    for step_in_call in range(1, opts.n_iter + 1):
        iteration = state.iteration + 1
        sched = schedule(iteration)
        set_lr(optimizer, opts.lr * sched)
        first_sample = state.epoch_pos + 1

        # Gradient accumulation: micro-batches weighted by their share of the step's labelled tokens.
        # Under torchrun every process builds the same global micro-batches and runs its share of
        # their rows; the weights use the global token count and the gradients are summed over the
        # processes, so the step is the single-process one.
        micro_batches = [source.make_batch(next_items(state, source.items_per_batch, order_cache))
                         for _ in range(opts.grad_acc)]
        step_tokens = sum(b.n_labelled for b in micro_batches)
        loss_sum = 0.0
        for b in micro_batches:
            if b.n_labelled:
                state.samples_seen += b.input_ids.shape[0]
            mine = ranks.rows(b)
            loss, n = model.loss(mine.input_ids.to(opts.device), mine.labels.to(opts.device),
                                 None if mine.doc_ids is None else mine.doc_ids.to(opts.device))
            if n == 0 and not ranks.collective_backward:
                continue
            (loss * (n / max(step_tokens, 1))).backward()
            loss_sum += float(loss.detach()) * n
        loss_sum = ranks.sum_gradients(params, loss_sum, step_tokens)
        step_loss = loss_sum / max(step_tokens, 1)
        grad_norm = _clip(params, opts.grad_clip)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(step_loss) else "gradient norm"
            value = step_loss if what == "loss" else grad_norm
            raise NonFiniteLoss(f"iteration {iteration}: the {what} became {value}; "
                                "training stopped before applying it, and the files saved so far are kept "
                                "(try a lower --lr or --lora-alpha)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        state.iteration = iteration
        state.tokens_seen += sum(b.input_ids.numel() for b in micro_batches)
        now = time.perf_counter()
        dt, last_end = now - last_end, now
        state.elapsed_s += dt
        per_step = (now - started) / step_in_call
        hooks.on_step(StepLog(iteration, first_sample, state.n_items, state.epoch, sched, opts.lr * sched,
                              step_loss, grad_norm, step_tokens, dt, per_step * (opts.n_iter - step_in_call)))
        last = step_in_call == opts.n_iter
        if hooks.on_eval is not None and opts.eval_every and iteration % opts.eval_every == 0:
            if hooks.on_eval(state):
                reason = "early-stop"
            model.train()
        if reason == "done" and hooks.should_stop():
            reason = "interrupted"
        if reason != "done":
            break
        if opts.save_every and iteration % opts.save_every == 0 and not last:
            hooks.on_save(state)
            last_end = time.perf_counter()  # saving time is not the next step's time
    model.eval()
    hooks.on_save(state)
    return state, reason


def _clip(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (<= 0: no clipping); returns the gradients' total norm. Gradients sharded by
    FSDP (DTensors) give the norm over all processes."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if hasattr(grads[0], "full_tensor"):  # DTensor shards: torch's clip computes the global norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

