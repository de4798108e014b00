"""Writing a run's checkpoints and adapters: ITERATION files, LATEST and BEST copies, pruning.

Order of one save: checkpoint-N, adapter-N, checkpoint-LATEST, adapter-LATEST, then numbered
files beyond --save-total-limit are removed. Every write is atomic, so a kill at any point
leaves loadable files; a resumed run re-writes adapter-LATEST from the checkpoint when a kill
left the two apart.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from loraforge.atomic import atomic_copy
from loraforge.errors import LoraforgeError
from loraforge.lora import Adapter, LoraConfig, to_adapter
from loraforge.train.checkpoint import TrainState, save_checkpoint
from loraforge.train.outputs import pattern_path, prune_iterations
from loraforge.train.report import out


class Saver:
    def __init__(self, spec: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lora_cfg: LoraConfig, loaded: Any) -> None:
        """spec: train.spec.RunSpec; loaded: loader.LoadedModel."""
        self.spec, self.model, self.optimizer, self.lora_cfg, self.loaded = spec, model, optimizer, lora_cfg, loaded
        self.cfg = loaded.config
        self.gguf_arch = loaded.metadata.get("general.architecture", self.cfg.arch)
        self.noted_bin = False
        self.best: tuple[int, float, Adapter] | None = None  # (iteration, eval loss, adapter)

    def adapter(self, iteration: int) -> Adapter:
        return to_adapter(self.model, self.lora_cfg, metadata={
            "base": os.path.basename(self.loaded.source), "iteration": iteration,
            "dropout": self.lora_cfg.dropout})

    def _check_finite(self, iteration: int) -> None:
        for name, p in self.model.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                raise LoraforgeError(f"iteration {iteration}: adapter weights are not finite ({name}); nothing "
                                     "was saved over the previous files (try a lower --lr or --lora-alpha)")

    def write_adapter(self, path: str, adapter: Adapter) -> None:
        from loraforge.formats.gguf_lora import write_gguf_adapter

        if path.endswith(".bin") and not self.noted_bin:
            out(f"note: {path} holds a GGUF LoRA adapter (what llama.cpp --lora loads today), not the old "
                "ggla format")
            self.noted_bin = True
        write_gguf_adapter(path, adapter, self.cfg, self.gguf_arch)

    def save(self, state: TrainState) -> None:
        """Checkpoint and adapter of this iteration, and their LATEST copies.

        The pair is written checkpoint first; if the adapter then cannot be written, the new
        checkpoint file is removed again, so a failed save leaves no half pair behind.
        """
        o, it = self.spec.outputs, state.iteration
        self._check_finite(it)
        lora_path, ckpt_path = pattern_path(o.lora_out, it), pattern_path(o.checkpoint_out, it)
        new_ckpt = not os.path.exists(ckpt_path)
        save_checkpoint(ckpt_path, self.model, self.optimizer, self.lora_cfg, state, self.cfg,
                        self.spec.to_dict())
        try:
            self.write_adapter(lora_path, self.adapter(it))
        except BaseException:
            if new_ckpt and ckpt_path != pattern_path(o.checkpoint_out, "LATEST"):
                with contextlib.suppress(OSError):
                    os.unlink(ckpt_path)
            raise
        # LATEST: the checkpoint first; a resumed run re-writes an adapter-LATEST left behind it
        if "ITERATION" in o.checkpoint_out:
            atomic_copy(ckpt_path, pattern_path(o.checkpoint_out, "LATEST"))
        if "ITERATION" in o.lora_out:
            atomic_copy(lora_path, pattern_path(o.lora_out, "LATEST"))
        out(f"save_checkpoint: saved {ckpt_path} and {lora_path} (iteration {it})")
        if o.save_total_limit:
            removed = prune_iterations([o.checkpoint_out, o.lora_out], o.save_total_limit)
            if removed:
                out(f"save_checkpoint: removed {len(removed)} older file(s) (--save-total-limit "
                    f"{o.save_total_limit})")

    def new_best(self, state: TrainState, eval_loss: float) -> None:
        """The adapter now has the lowest eval loss so far: keep it (and write ...-BEST if asked)."""
        if not self.spec.outputs.load_best_at_end:
            return
        self._check_finite(state.iteration)
        adapter = self.adapter(state.iteration)
        self.best = (state.iteration, eval_loss, adapter)
        path = pattern_path(self.spec.outputs.lora_out, "BEST")
        self.write_adapter(path, adapter)
        out(f"save_checkpoint: best eval loss so far ({eval_loss:.6f}, iteration {state.iteration}): {path}")

    def finish(self, state: TrainState) -> None:
        """End of the run: the PEFT folder (of the best adapter with --load-best-at-end)."""
        o = self.spec.outputs
        if not o.peft_out:
            return
        from loraforge.formats.peft import write_peft

        adapter = self.best[2] if self.best is not None else self.adapter(state.iteration)
        write_peft(o.peft_out, adapter, self.cfg, base_name=self.loaded.source)
        which = f"best, iteration {self.best[0]}" if self.best is not None else f"iteration {state.iteration}"
        out(f"finetune: PEFT adapter ({which}) written to {o.peft_out}")

    def sync_latest_adapter(self, state: TrainState) -> None:
        """After a kill between the two LATEST writes the adapter can lag (or lead) the checkpoint:
        re-write it from the checkpoint being resumed."""
        o = self.spec.outputs
        if "ITERATION" not in o.lora_out:
            return
        path = pattern_path(o.lora_out, "LATEST")
        mine = self.adapter(state.iteration)
        if os.path.isfile(path):
            from loraforge.formats.gguf_lora import read_gguf_adapter

            try:
                theirs = read_gguf_adapter(path, self.cfg)
                same = set(theirs.tensors) == set(mine.tensors) and all(
                    torch.allclose(theirs.tensors[k].float(), mine.tensors[k], rtol=1e-5, atol=1e-8) for k in mine.tensors)
            except LoraforgeError:
                same = False
            if same:
                return
        self.write_adapter(path, mine)
        out(f"finetune: {path} did not match the checkpoint (an interrupted save); re-written from "
            f"iteration {state.iteration}")
