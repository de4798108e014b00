"""One fine-tuning run from a `RunSpec`: check, load, build data, resume, train, save.

Output follows llama.cpp's finetune: a start-up report, one line per iteration
(iter, sample, sched, loss, dt, eta), checkpoints and adapters named by the ITERATION
pattern plus LATEST copies, and an end summary (time, tokens/s, peak memory).

Order matters for the user's time and files: everything that can be checked without the model
(inputs, output paths, trackers, the output lock) is checked before the model loads; what needs
the model (LoRA shapes, data length, resume compatibility) before the first step.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import LoraConfig, count_parameters, inject, load_adapter_tensors, to_adapter
from loraforge.runtime import peak_memory_text, peak_rss_bytes, set_threads
from loraforge.train.checkpoint import TrainState, load_checkpoint, restore_optimizer, restore_rng, rng_states
from loraforge.train.distributed import Ranks
from loraforge.train.loop import LoopHooks, LoopOptions, train
from loraforge.train.optim import Schedule, make_optimizer, warmup_steps_for
from loraforge.train.outputs import (RunLock, check_output_path, check_run_outputs, pattern_path,
                                     refuse_same_file, remove_stale_temps)
from loraforge.train.report import (Metrics, Silent, StepPrinter, Trackers, check_trackers, format_hms, out,
                                    warn)
from loraforge.train.saver import Saver
from loraforge.train.spec import NORM_RANKS, RANK_MODULES, RunSpec

DEFAULT_ITERS = 256
EXIT_INTERRUPTED = 130


def lora_config(spec: RunSpec, tied: bool) -> LoraConfig:
    """The adapter layout from the LoRA section: default rank, --rank-* per tensor type, targets."""
    s = spec.lora
    cfg = LoraConfig(r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout, use_rslora=s.use_rslora,
                     target_modules=s.target_modules)
    ranks: dict[str, int] = {}
    extra_targets = []
    for name, module in RANK_MODULES.items():
        value = getattr(s, name)
        if value is None:
            continue
        if module == "lm_head" and tied and value > 0:
            warn(f"--rank-out {value} ignored: this model ties its output to the token embeddings and has "
                 "no output tensor, so llama.cpp could not load an output adapter")
            continue
        if module == "embed_tokens" and tied and value > 0:
            raise LoraforgeError(
                f"--rank-tok-embd {value}: this model ties its output layer to the token embeddings, and "
                "llama.cpp applies a token_embd adapter to that output too, so the adapter could not be "
                "loaded there; train without it (--rank-tok-embd 0), or train it and deploy with "
                "`loraforge merge` (which writes a separate output matrix)")
        ranks[module] = value
        if value > 0 and module not in cfg.target_modules:
            extra_targets.append(module)
    for name in NORM_RANKS:
        if getattr(s, name):
            warn(f"--{name.replace('_', '-')} {getattr(s, name)} ignored: norm adapters are not trained, since "
                 "llama.cpp ignores *_norm tensors in LoRA files (the trained result would be lost)")
    return LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                      target_modules=cfg.target_modules + tuple(extra_targets), rank_pattern=ranks)


def make_schedule(spec: RunSpec, total_steps: int) -> Schedule:
    o = spec.optimizer
    warmup = warmup_steps_for(total_steps, o.warmup, o.warmup_ratio, o.lr_scheduler)
    schedule = Schedule(kind=o.lr_scheduler, warmup_steps=warmup, total_steps=total_steps,
                        cos_decay_steps=o.cos_decay_steps, cos_min=o.cos_decay_min,
                        cos_restart=o.cos_decay_restart, enable_restart=o.enable_restart)
    if warmup > total_steps:
        flag = "--warmup-ratio" if o.warmup is None and o.warmup_ratio else "--warmup"
        warn(f"warmup ({warmup} iterations, {flag}) is longer than this run ({total_steps} iterations): "
             f"the learning rate only reaches {schedule(total_steps):.2f} x --lr; "
             f"use e.g. --warmup {max(1, total_steps // 10)} (a tenth of the run)")
    return schedule


def total_steps(spec: RunSpec, source: Any, state: TrainState) -> int:
    """The step count this invocation trains up to.

    --adam-iter N runs N more iterations (llama.cpp: a resumed run continues for N more);
    --max-steps N and --epochs E are totals, so re-running the same command after an
    interruption finishes the planned run.
    """
    loop = spec.loop
    if loop.adam_iter is not None:
        return state.iteration + loop.adam_iter
    if loop.max_steps is not None:
        return loop.max_steps
    if loop.epochs is not None:
        per_step = source.items_per_batch * loop.grad_acc
        return max(1, int(round(loop.epochs * source.n_items / per_step)))
    return state.iteration + DEFAULT_ITERS


def default_metrics_path(lora_pattern: str) -> str:
    root, _ = os.path.splitext(pattern_path(lora_pattern, "metrics"))
    return root + ".jsonl"


class Interrupt:
    """The first Ctrl-C asks the loop to stop after the current step and save; a second aborts.

    repeat_window_s: a second SIGINT this soon after the first is the same Ctrl-C (torchrun passes
    the terminal's Ctrl-C on to its processes, which the terminal has already signalled)."""

    def __init__(self, repeat_window_s: float = 0.0) -> None:
        self.requested = False
        self.previous = None
        self.repeat_window_s = repeat_window_s
        self.first_at = 0.0

    def __enter__(self) -> "Interrupt":
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self.previous = None
        return self

    def _handler(self, signum, frame) -> None:
        if self.requested and time.monotonic() - self.first_at < self.repeat_window_s:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.first_at = True, time.monotonic()
        warn("Ctrl-C: finishing this iteration, then saving a checkpoint (press Ctrl-C again to abort "
             "without saving)")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_finetune(spec: RunSpec) -> int:
    """Run a fine-tune; returns the process exit status (0, or 130 after a Ctrl-C stop).

    Under torchrun (WORLD_SIZE > 1) this process runs its share of the run: see train/distributed.py."""
    ranks = Ranks.from_env(spec.model.fsdp)
    if ranks.world == 1:
        if spec.model.fsdp:
            warn("--fsdp ignored: this is a single process (start several with torchrun --nproc-per-node N)")
        return Finetune(spec).run()
    return ranks.run(lambda: Finetune(spec, ranks).run())


class Finetune:
    def __init__(self, spec: RunSpec, ranks: Ranks | None = None) -> None:
        self.spec = spec
        self.ranks = ranks if ranks is not None else Ranks()
        self.device = self.ranks.device_for(spec.model.device)
        o = spec.outputs
        self.metrics_path = o.metrics_out or default_metrics_path(o.lora_out)
        self.plot_path = os.path.splitext(self.metrics_path)[0] + ".png"
        self.trackers_wanted = spec.report_targets()
        self.eval_losses: list[tuple[int, float]] = []  # (iteration, held-out loss) of this invocation
        self.compile_seconds = 0.0  # --compile: time spent compiling before the timed steps

    # -- before the model loads ---------------------------------------------------------------
    def check_before_loading(self) -> None:
        from loraforge.data.sources import check_input_files
        from loraforge.loader import resolve_model_path
        from loraforge.train.optim import check_optimizer

        s, o, ranks = self.spec, self.spec.outputs, self.ranks
        set_threads(s.model.threads)
        if s.data.batch % ranks.world:
            raise LoraforgeError(f"--batch {s.data.batch} is the global batch of all {ranks.world} processes and must "
                                 f"divide by {ranks.world} "
                                 f"(e.g. --batch {ranks.world * max(1, s.data.batch // ranks.world)})")
        if ranks.fsdp and (s.model.quantize or s.model.base_dtype == "quantized"):
            what = f"--quantize {s.model.quantize}" if s.model.quantize else "--base-dtype quantized"
            raise LoraforgeError(f"--fsdp shards dense bases (f32/f16/bf16) only; a quantized base ({what}) trains "
                                 "on several processes without --fsdp (each holds the whole quantized base)")
        if ranks.fsdp and s.optimizer.optim != "adamw_torch":
            raise LoraforgeError(f"--fsdp shards the optimizer state of --optim adamw_torch only; --optim "
                                 f"{s.optimizer.optim} (bitsandbytes' 8-bit state) trains without --fsdp")
        resolve_model_path(s.model.model_base)
        check_input_files(s.data)
        check_optimizer(s.optimizer.optim, self.device)
        check_trackers(self.trackers_wanted)
        refuse_same_file({"--checkpoint-out": pattern_path(o.checkpoint_out, "LATEST"),
                          "--lora-out": pattern_path(o.lora_out, "LATEST"),
                          "--metrics-out": self.metrics_path, "--peft-out": o.peft_out,
                          "--train-data": s.data.train_data, "--model-base": s.model.model_base})
        if not ranks.is_main:
            return  # rank 0 alone reads the checkpoint and writes the outputs
        for what, pattern in (("--checkpoint-out", o.checkpoint_out), ("--lora-out", o.lora_out)):
            check_output_path(pattern_path(pattern, "LATEST"), what)
        check_output_path(self.metrics_path, "--metrics-out")
        if o.peft_out:
            if os.path.exists(o.peft_out) and not os.path.isdir(o.peft_out):
                raise file_error(o.peft_out, "exists and is not a folder (--peft-out is a folder)")
            if not os.path.isdir(o.peft_out):
                check_output_path(o.peft_out, "--peft-out")  # its parent folder must take a new folder
        if os.path.isdir(o.checkpoint_in):
            raise file_error(o.checkpoint_in, "is a folder, expected a checkpoint file (--checkpoint-in)")

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> int:
        s, o, ranks = self.spec, self.spec.outputs, self.ranks
        if ranks.world > 1:
            ranks.start(self.device, s.model.dist_timeout)
        with ranks.agreement():
            self.check_before_loading()
        lock = RunLock([o.checkpoint_out, o.lora_out, self.metrics_path])
        try:
            with ranks.agreement():
                if ranks.is_main:  # one writer: rank 0 holds the lock and cleans up
                    lock.acquire()
                    remove_stale_temps([o.checkpoint_out, o.lora_out, self.metrics_path, self.plot_path], out)
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> int:
        s, o, ranks = self.spec, self.spec.outputs, self.ranks
        seed = s.model.seed if s.model.seed >= 0 else int(time.time()) % (2**31)
        ckpt = None
        with ranks.agreement():
            if ranks.is_main and o.checkpoint_in and os.path.exists(o.checkpoint_in):
                ckpt = load_checkpoint(o.checkpoint_in)
        ckpt, seed = ranks.broadcast((ckpt, seed))  # rank 0's checkpoint and clock seed, on every process
        if ckpt is not None:
            if s.model.seed >= 0 and s.model.seed != ckpt.state.seed:
                warn(f"--seed {s.model.seed} ignored: resuming with the checkpoint's seed {ckpt.state.seed}")
            seed = ckpt.state.seed
        out(f"finetune: seed: {seed}")
        with ranks.agreement():
            loaded, data, lora_cfg = self._load(seed)
        self._check_same_inputs(loaded, data)
        model = loaded.model
        source, eval_source = data.train, data.eval

        torch.manual_seed(seed)
        with ranks.agreement():
            wrapped = inject(model, lora_cfg)
            if not wrapped:
                raise LoraforgeError("no module gets a LoRA adapter: every rank is 0")
        ranks.seed_own_stream(seed)
        model.gradient_checkpointing = s.model.checkpointing
        params = [p for p in model.parameters() if p.requires_grad]
        opt = s.optimizer

        def new_optimizer(params: list) -> torch.optim.Optimizer:
            return make_optimizer(params, opt.lr, opt.weight_decay, opt.adam_beta1, opt.adam_beta2, name=opt.optim)

        optimizer = new_optimizer(params)
        state = TrainState(seed=seed, n_items=source.n_items, data_fingerprint=data.fingerprint,
                           base_fingerprint=loaded.fingerprint)
        saver = Saver(s, model, optimizer, lora_cfg, loaded)
        if ckpt is not None:
            with ranks.agreement():
                state = self._resume(ckpt, model, optimizer, lora_cfg, loaded, source, data.fingerprint, saver)
        ranks.copy_from_first(params)
        if ranks.fsdp:  # with whole, equal weights and optimizer state on every process
            optimizer, held = ranks.shard(model, optimizer, new_optimizer)
            saver.optimizer = optimizer
            params = [p for p in model.parameters() if p.requires_grad]
            for what, label in (("base", "the base's"), ("lora", "the LoRA weights'")):
                shares = ", ".join(str(b) for b in ranks.gather(held[what][0]))
                out(f"finetune: FSDP: {label} {held[what][1]} bytes are sharded over {ranks.world} processes, "
                    f"which hold {shares} bytes")

        total = total_steps(s, source, state)
        n_iter = max(0, total - state.iteration)
        schedule = make_schedule(s, total)
        saves = [i for i in range(state.iteration + 1, total + 1) if s.loop.save_every and i % s.loop.save_every == 0]
        with ranks.agreement():
            if ranks.is_main:
                check_run_outputs({"--checkpoint-out": o.checkpoint_out, "--lora-out": o.lora_out}, saves + [total])
        self._report_start(model, params, lora_cfg, wrapped, state, n_iter)
        if n_iter > 0:  # decided on the run's length, so the same command resumes in the same mode
            self._compile(model, source, total)

        metrics = trackers = printer = Silent()  # ranks > 0 write nothing
        with ranks.agreement():
            if ranks.is_main:
                metrics = Metrics(self.metrics_path, resume_iteration=state.iteration if ckpt is not None else None)
                run_name = s.logging.run_name or os.path.basename(pattern_path(o.lora_out, "run")).rsplit(".", 1)[0]
                trackers = Trackers(self.trackers_wanted, s.logging.logging_dir
                                    or os.path.splitext(self.metrics_path)[0] + "-runs", run_name, s.to_dict())
                printer = StepPrinter(metrics, trackers, n_iter, memory=lambda: peak_rss_bytes() / 2**20)
        evaluate = self._evaluator(model, eval_source, printer, saver)
        if evaluate is not None and s.loop.eval_on_start and state.iteration == 0:
            evaluate(state)
        opts = LoopOptions(n_iter=n_iter, lr=opt.lr, grad_acc=s.loop.grad_acc, grad_clip=opt.grad_clip,
                           save_every=s.loop.save_every, eval_every=s.loop.eval_every, device=str(self.device),
                           ranks=ranks)
        started, tokens_before = time.perf_counter(), state.tokens_seen
        try:
            with Interrupt(repeat_window_s=2.0 if ranks.world > 1 else 0.0) as interrupt:
                hooks = LoopHooks(printer, lambda st: self._save(saver, st), evaluate,
                                  lambda: ranks.any(interrupt.requested))
                state, reason = train(model, source, optimizer, schedule, opts, state, hooks)
        finally:
            printer.close()
        elapsed = time.perf_counter() - started
        if evaluate is not None and reason == "done" and (not s.loop.eval_every or state.iteration % s.loop.eval_every):
            evaluate(state)
        with ranks.whole_lora(model, saver.optimizer), ranks.agreement():
            if ranks.is_main:
                saver.finish(state)
        tokens = state.tokens_seen - tokens_before
        done = state.iteration - (total - n_iter)
        out(f"finetune: done: {done} iterations in {format_hms(elapsed)} ({elapsed:.1f} s), "
            f"{tokens / max(elapsed, 1e-9):.1f} tokens/s, {peak_memory_text(self.device)}")
        metrics.write({"summary": True, "iterations": done, "seconds": elapsed, "compile_s": self.compile_seconds,
                       "tokens_per_s": tokens / max(elapsed, 1e-9), "peak_rss_mib": peak_rss_bytes() / 2**20})
        metrics.close()
        trackers.close()
        if len(self.eval_losses) > 1:
            (first_it, first), (last_it, last) = self.eval_losses[0], self.eval_losses[-1]
            out(f"finetune: held-out loss {first:.4f} (iteration {first_it}) -> {last:.4f} (iteration {last_it})")
        if o.plot_loss and ranks.is_main:
            self._plot()
        if reason == "early-stop":
            out(f"finetune: stopped early at iteration {state.iteration}: no lower eval loss in the last "
                f"{s.loop.early_stopping_patience} evaluations")
        if reason == "interrupted":
            out(f"finetune: interrupted at iteration {state.iteration}; saved, run the same command to resume")
            return EXIT_INTERRUPTED
        return 0

    def _compile(self, model, source, total: int) -> None:
        """--compile: compile the decoder layers on one step of the first batch (its time is reported and
        not counted in tokens/s); a failure falls back to eager layers with one warning. `auto` decides
        on the run's total iterations (not those left), so a resumed run keeps the mode it began in."""
        from loraforge import compiled

        mode, ranks = self.spec.model.compile, self.ranks
        if not compiled.wanted(mode, self.device.type, total, distributed=ranks.world > 1):
            return
        compiled.enable(model, warn)
        probe_batch = ranks.rows(source.make_batch(list(range(min(source.items_per_batch, source.n_items)))))
        device = self.device

        def step() -> None:
            model.train()
            loss, _ = model.loss(probe_batch.input_ids.to(device), probe_batch.labels.to(device),
                                 None if probe_batch.doc_ids is None else probe_batch.doc_ids.to(device))
            loss.backward()

        seconds, active = compiled.probe(model, step)
        self.compile_seconds = seconds
        if active:
            out(f"finetune: compile: decoder layers compiled in {seconds:.1f} s ({mode}; not counted in tokens/s)")
        else:
            compiled.disable(model)

    def _load(self, seed: int) -> tuple[Any, Any, LoraConfig]:
        """The base model, the data sources and the adapter layout. With --fsdp every process reads the
        base on the CPU (memory-mapped where the format allows) and keeps only its shard on its device."""
        from loraforge.data.sources import build_sources
        from loraforge.loader import load_model

        s = self.spec
        base_dtype, device = s.model.base_dtype, self.device
        if self.ranks.fsdp:
            if base_dtype == "auto":
                base_dtype = "bf16" if self.device.type == "cuda" else "f32"
            device = torch.device("cpu")
        loaded = load_model(s.model.model_base, base_dtype, device, s.model.quantize)
        cfg = loaded.config
        out(f"finetune: model base = '{loaded.source}' ({cfg.arch}, {cfg.num_hidden_layers} layers, "
            f"n_embd {cfg.hidden_size}, n_head {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
            f"n_ff {cfg.intermediate_size}, n_vocab {cfg.vocab_size}; base kept as {loaded.base_dtype} "
            f"on {self.device})")
        lora_cfg = lora_config(s, cfg.tie_word_embeddings)
        data = build_sources(s.data, loaded.tokenizer, cfg, seed, out)
        if data.train.n_items == 0:
            raise LoraforgeError("no training samples (the data is shorter than --ctx?)")
        return loaded, data, lora_cfg

    def _check_same_inputs(self, loaded, data) -> None:
        """Every process must read the same base and data as rank 0 (each node reads its own copies)."""
        ranks = self.ranks
        if ranks.world == 1:
            return
        views = ranks.gather((loaded.fingerprint, data.fingerprint, data.train.n_items))
        with ranks.agreement():
            if views[ranks.rank][0] != views[0][0]:
                raise LoraforgeError(f"{loaded.source}: this is another base model file than rank 0's "
                                     "(fingerprints differ); every node needs the same files")
            if views[ranks.rank][1:] != views[0][1:]:
                raise LoraforgeError(f"{self.spec.data.train_data}: this training data differs from rank 0's "
                                     "(fingerprints differ); every node needs the same files")

    def _save(self, saver: Saver, state: TrainState) -> None:
        """Checkpoint and adapter (rank 0 writes); under torchrun with every process's random stream."""
        ranks = self.ranks
        if ranks.world > 1:
            state.extra["world_size"] = ranks.world
            state.extra["rank_rng"] = ranks.gather(rng_states())
        with ranks.whole_lora(saver.model, saver.optimizer), ranks.agreement():
            if ranks.is_main:
                saver.save(state)

    def _plot(self) -> None:
        from loraforge.train.report import plot_losses

        try:
            plot_losses([self.metrics_path], self.plot_path, labels=["this run"])
        except ImportError:
            warn("no loss plot: matplotlib is not installed (pip install matplotlib)")
            return
        except LoraforgeError:
            return  # nothing trained in this invocation
        out(f"finetune: loss plot written to {self.plot_path}")

    def _evaluator(self, model, eval_source, printer: StepPrinter, saver: Saver):
        """Eval loss/perplexity on the held-out data; tracks the best; True = stop early."""
        if eval_source is None:
            return None
        from loraforge.train.evaluate import evaluate_source

        patience = self.spec.loop.early_stopping_patience
        history: dict[str, Any] = {"best": float("inf"), "since": 0, "losses": self.eval_losses}

        ranks = self.ranks

        def evaluate(state: TrainState) -> bool:
            loss, ppl = evaluate_source(model, eval_source, self.device, ranks if ranks.world > 1 else None)
            printer.eval(state.iteration, loss, ppl)
            history["losses"].append((state.iteration, loss))
            if loss < history["best"]:
                history["best"], history["since"] = loss, 0
                with ranks.whole_lora(model, saver.optimizer), ranks.agreement():
                    if ranks.is_main:
                        saver.new_best(state, loss)
            else:
                history["since"] += 1
            return bool(patience) and history["since"] >= patience

        return evaluate

    def _report_start(self, model, params, lora_cfg, wrapped, state: TrainState, n_iter: int) -> None:
        trainable, total = count_parameters(model)
        lora_bytes = sum(p.numel() * p.element_size() for p in params)
        for module, rank in _rank_report(model, wrapped).items():
            out(f"print_lora_params: n_rank_{module:<12}: {rank}")
        out(f"finetune: total train_iterations {state.iteration}")
        out(f"finetune: seen train_samples     {state.samples_seen}")
        out(f"finetune: seen train_tokens      {state.tokens_seen}")
        out(f"finetune: completed train_epochs {state.epoch}")
        out(f"finetune: lora_size = {lora_bytes} bytes ({lora_bytes / 2**20:.1f} MB); trainable params "
            f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
        out(f"finetune: opt_size  = {2 * lora_bytes} bytes ({2 * lora_bytes / 2**20:.1f} MB)")
        out(f"finetune: begin training ({n_iter} iterations, batch {self.spec.data.batch}, "
            f"grad-acc {self.spec.loop.grad_acc})")

    def _resume(self, ckpt, model, optimizer, lora_cfg: LoraConfig, loaded, source, data_fp: str,
                saver: Saver) -> TrainState:
        from loraforge.train.checkpoint import model_shape

        path = self.spec.outputs.checkpoint_in
        if ckpt.model_shape and ckpt.model_shape != model_shape(loaded.config):
            raise file_error(path, f"was made for another model ({ckpt.model_shape}); "
                                   f"this base is {model_shape(loaded.config)}")
        if ckpt.state.base_fingerprint and ckpt.state.base_fingerprint != loaded.fingerprint:
            raise file_error(path, f"was made with another base model file than {loaded.source} "
                                   "(fingerprints differ)")
        mine = {k: tuple(v.shape) for k, v in to_adapter(model, lora_cfg).tensors.items()}
        theirs = {k: tuple(v.shape) for k, v in ckpt.tensors.items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:1]
            raise file_error(path, f"LoRA shape differs from this command's (--lora-r/--rank-*): "
                                   f"e.g. {diff[0][0]} {theirs.get(diff[0][0])} in the checkpoint vs "
                                   f"{mine.get(diff[0][0])}")
        load_adapter_tensors(model, ckpt.tensors)
        try:
            restore_optimizer(optimizer, model, ckpt)
        except LoraforgeError as e:
            raise file_error(path, str(e)) from None
        restore_rng(ckpt.rng)
        state = ckpt.state
        world, saved_world = self.ranks.world, state.extra.pop("world_size", 1)
        rank_rngs = state.extra.pop("rank_rng", None)
        if saved_world == world and rank_rngs:  # every process continues its own random stream
            restore_rng(rank_rngs[self.ranks.rank])
        else:  # ranks > 0 start their own streams afresh
            self.ranks.seed_own_stream(state.seed)
        if state.data_fingerprint != data_fp or state.n_items != source.n_items:
            out("finetune: train data seems to have changed. restarting shuffled epoch.")
            state.epoch_pos, state.n_items, state.data_fingerprint = 0, source.n_items, data_fp
        out(f"finetune: resuming from {path} at iteration {state.iteration}")
        if saved_world != world:
            dropout = (f"; dropout masks (--lora-dropout {lora_cfg.dropout:g}) come from other random streams than "
                       "an uninterrupted run's" if lora_cfg.dropout else "")
            out(f"finetune: the checkpoint was written by {saved_world} process(es), this run has {world}: the data "
                f"order, global batches and schedule continue unchanged, sums are added in another order (losses can "
                f"differ in the last digits){dropout}")
        if self.ranks.is_main:
            saver.sync_latest_adapter(state)
        return state


def _rank_report(model, wrapped: list[str]) -> dict[str, int]:
    """llama.cpp's n_rank_* lines: the rank each tensor type got (stacked projections of Phi-3 and
    Baichuan under their own names), read from the adapters attached to the model."""
    names = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "ffn_gate",
             "down_proj": "ffn_down", "up_proj": "ffn_up", "embed_tokens": "tok_embeddings", "lm_head": "output",
             "qkv_proj": "wqkv", "W_pack": "wqkv", "gate_up_proj": "ffn_gate_up"}
    report = {v: 0 for k, v in names.items() if k not in ("qkv_proj", "W_pack", "gate_up_proj")}
    for module in wrapped:
        short = module.rsplit(".", 1)[-1]
        report[names.get(short, short)] = int(model.get_submodule(module).lora_A["default"].shape[0])
    return report
