"""One fine-tuning run from parsed `finetune` arguments: load, build data, resume, train, save.

Output follows llama.cpp's finetune: a start-up report, one line per iteration
(iter, sample, sched, loss, dt, eta), checkpoints and adapters named by the ITERATION
pattern plus LATEST copies, and an end summary (time, tokens/s, peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import torch

from loraforge.atomic import atomic_copy
from loraforge.errors import LoraforgeError, file_error
from loraforge.lora import LoraConfig, count_parameters, inject, load_adapter_tensors, to_adapter
from loraforge.train.checkpoint import (TrainState, load_checkpoint, restore_optimizer, restore_rng,
                                        save_checkpoint)
from loraforge.train.loop import LoopOptions, StepLog, format_hms, train
from loraforge.train.optim import Schedule, make_optimizer

DEFAULT_ITERS = 256


def out(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoraforgeError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LoraforgeError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def pattern_path(pattern: str, tag: int | str) -> str:
    return pattern.replace("ITERATION", str(tag))


def peak_memory_text(device: torch.device) -> str:
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = f"peak RSS {rss_mib:.0f} MiB"
    if device.type == "cuda":
        text += f", max GPU reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB"
    return text


class Finetune:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = resolve_device(args.device)

    # -- configuration ---------------------------------------------------------------------------
    def lora_config(self, tied: bool) -> LoraConfig:
        a = self.args
        from loraforge.commands.finetune import NORM_RANK_FLAGS, RANK_FLAGS

        targets = a.target_modules or "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        cfg = LoraConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, use_rslora=a.use_rslora,
                         target_modules=targets)
        ranks: dict[str, int] = {}
        extra_targets = []
        for flag, module in RANK_FLAGS.items():
            value = getattr(a, f"rank_{flag}")
            if value is None:
                continue
            if value < 0:
                raise LoraforgeError(f"--rank-{flag} must be >= 0, got {value}")
            if module == "lm_head" and tied and value > 0:
                warn(f"--rank-out {value} ignored: this model ties its output to the token embeddings and has "
                     "no output tensor, so llama.cpp could not load an output adapter")
                continue
            ranks[module] = value
            if value > 0 and module not in cfg.target_modules:
                extra_targets.append(module)
        for flag in NORM_RANK_FLAGS:
            value = getattr(a, f"rank_{flag}")
            if value:
                warn(f"--rank-{flag.replace('_', '-')} {value} ignored: norm adapters are not trained, since "
                     "llama.cpp ignores *_norm tensors in LoRA files (the trained result would be lost)")
        return LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                          target_modules=cfg.target_modules + tuple(extra_targets), rank_pattern=ranks)

    def schedule(self, total_steps: int) -> Schedule:
        a = self.args
        warmup = a.warmup
        if warmup is None:
            warmup = round(a.warmup_ratio * total_steps) if a.warmup_ratio else (100 if a.lr_scheduler == "llama"
                                                                                else 0)
        return Schedule(kind=a.lr_scheduler, warmup_steps=warmup, total_steps=total_steps,
                        cos_decay_steps=a.cos_decay_steps, cos_min=a.cos_decay_min,
                        cos_restart=a.cos_decay_restart, enable_restart=a.enable_restart)

    # -- data ------------------------------------------------------------------------------------
    def build_data(self, loaded, seed: int) -> tuple[Any, Any, str, dict[str, Any]]:
        """(train source, eval source or None, data fingerprint, report numbers)."""
        from loraforge.commands.finetune import DATASET_SUFFIXES

        a = self.args
        path = a.train_data or _bundled_text()
        if os.path.splitext(path)[1].lower() in DATASET_SUFFIXES and a.data_format != "text":
            from loraforge.data.sources import build_instruction_sources

            return build_instruction_sources(a, path, loaded.tokenizer, seed, out)
        return self._text_data(path, loaded)

    def _text_data(self, path: str, loaded) -> tuple[Any, Any, str, dict[str, Any]]:
        from loraforge.data.text import TextSampleOptions, TextSamples, data_fingerprint, read_text_file, unescape

        a, tok, cfg = self.args, loaded.tokenizer, loaded.config
        if a.ctx > cfg.max_position_embeddings:
            raise LoraforgeError(f"--ctx {a.ctx} is above the model's context length "
                                 f"{cfg.max_position_embeddings}")
        text = read_text_file(path)
        out(f"finetune: tokenize training data from {path}")
        tokens = tok.encode(text, add_bos=False, parse_special=False)
        sample_start = unescape(a.sample_start) if a.escape else a.sample_start
        start_ids = tok.encode(sample_start, add_bos=False, parse_special=False) if sample_start else None
        opts = TextSampleOptions(sample_start, a.include_sample_start, a.escape, a.overlapping_samples,
                                 a.fill_with_next_samples, a.separate_with_eos, a.separate_with_bos)
        eos = tok.eos_id if tok.eos_id is not None else 0
        bos = tok.bos_id if tok.bos_id is not None else eos
        samples = TextSamples(tokens, a.ctx, bos, eos, cfg.vocab_size, opts, start_ids, batch_size=a.batch)
        if len(tokens) < 2:
            raise file_error(path, "has too little text: fewer than 2 tokens")
        out(f"finetune: sample-start: {sample_start!r}")
        out(f"finetune: include-sample-start: {str(a.include_sample_start).lower()}")
        out(f"tokenize_file: total number of samples: {len(samples)}")
        out(f"finetune: number of training tokens: {len(tokens)}")
        out(f"finetune: number of unique tokens: {len(set(tokens))}")
        return samples, None, data_fingerprint(text + f"|ctx={a.ctx}|{sample_start}"), {"tokens": len(tokens)}

    # -- run -------------------------------------------------------------------------------------
    def run(self) -> None:
        from loraforge.loader import load_model

        a = self.args
        seed = a.seed if a.seed >= 0 else int(time.time()) % (2**31)
        ckpt = None
        if a.checkpoint_in and os.path.exists(a.checkpoint_in):
            ckpt = load_checkpoint(a.checkpoint_in)
            if a.seed >= 0 and a.seed != ckpt.state.seed:
                warn(f"--seed {a.seed} ignored: resuming with the checkpoint's seed {ckpt.state.seed}")
            seed = ckpt.state.seed
        out(f"finetune: seed: {seed}")
        loaded = load_model(a.model_base, a.base_dtype, self.device, a.quantize)
        cfg, model = loaded.config, loaded.model
        out(f"finetune: model base = '{loaded.source}' ({cfg.arch}, {cfg.num_hidden_layers} layers, "
            f"n_embd {cfg.hidden_size}, n_head {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
            f"n_ff {cfg.intermediate_size}, n_vocab {cfg.vocab_size}; base kept as {loaded.base_dtype} "
            f"on {self.device})")
        lora_cfg = self.lora_config(cfg.tie_word_embeddings)
        source, eval_source, data_fp, _ = self.build_data(loaded, seed)
        if source.n_items == 0:
            raise LoraforgeError("no training samples (the data is shorter than --ctx?)")

        torch.manual_seed(seed)
        wrapped = inject(model, lora_cfg)
        if not wrapped:
            raise LoraforgeError("no module gets a LoRA adapter: every rank is 0")
        model.gradient_checkpointing = a.checkpointing
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, a.lr, a.weight_decay, a.adam_beta1, a.adam_beta2)
        state = TrainState(seed=seed, n_items=source.n_items, data_fingerprint=data_fp,
                           base_fingerprint=loaded.fingerprint)
        if ckpt is not None:
            state = self._resume(ckpt, model, optimizer, lora_cfg, loaded, source, data_fp)

        total_steps = self._total_steps(source, state)
        n_iter = max(0, total_steps - state.iteration)
        schedule = self.schedule(total_steps)
        trainable, total = count_parameters(model)
        lora_bytes = sum(p.numel() * p.element_size() for p in params)
        for module, rank in _rank_report(lora_cfg, wrapped).items():
            out(f"print_lora_params: n_rank_{module:<12}: {rank}")
        out(f"finetune: total train_iterations {state.iteration}")
        out(f"finetune: seen train_samples     {state.samples_seen}")
        out(f"finetune: seen train_tokens      {state.tokens_seen}")
        out(f"finetune: completed train_epochs {state.epoch}")
        out(f"finetune: lora_size = {lora_bytes} bytes ({lora_bytes / 2**20:.1f} MB); trainable params "
            f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
        out(f"finetune: opt_size  = {2 * lora_bytes} bytes ({2 * lora_bytes / 2**20:.1f} MB)")
        out(f"finetune: begin training ({n_iter} iterations, batch {a.batch}, grad-acc {a.grad_acc})")

        saver = _Saver(a, model, optimizer, lora_cfg, cfg, loaded, self._train_config())
        metrics = _Metrics(a.metrics_out or _default_metrics_path(a.lora_out), resume=ckpt is not None)
        evaluator = None
        if eval_source is not None:
            from loraforge.train.evaluate import evaluate_source

            def evaluator(st: TrainState) -> None:
                loss, ppl = evaluate_source(model, eval_source, self.device)
                out(f"eval: iter={st.iteration} eval_loss={loss:.6f} ppl={ppl:.3f}")
                metrics.write({"iter": st.iteration, "eval_loss": loss, "eval_ppl": ppl})

        printer = _StepPrinter(metrics, n_iter)
        opts = LoopOptions(n_iter=n_iter, lr=a.lr, grad_acc=a.grad_acc, grad_clip=a.grad_clip,
                           save_every=a.save_every, eval_every=a.eval_every, device=str(self.device))
        started, tokens_before = time.perf_counter(), state.tokens_seen
        state = train(model, source, optimizer, schedule, opts, state, printer, saver.save, evaluator)
        elapsed = time.perf_counter() - started
        printer.close()
        if evaluator is not None and (not a.eval_every or state.iteration % a.eval_every):
            evaluator(state)
        if a.peft_out:
            from loraforge.formats.peft import write_peft

            write_peft(a.peft_out, to_adapter(model, lora_cfg), cfg, base_name=loaded.source)
            out(f"finetune: PEFT adapter written to {a.peft_out}")
        tokens = state.tokens_seen - tokens_before
        out(f"finetune: done: {n_iter} iterations in {format_hms(elapsed)} ({elapsed:.1f} s), "
            f"{tokens / max(elapsed, 1e-9):.1f} tokens/s, {peak_memory_text(self.device)}")
        metrics.write({"summary": True, "iterations": n_iter, "seconds": elapsed,
                       "tokens_per_s": tokens / max(elapsed, 1e-9),
                       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        metrics.close()

    def _total_steps(self, source, state: TrainState) -> int:
        """The step count this invocation trains up to.

        --adam-iter N runs N more iterations (llama.cpp: a resumed run continues for N more);
        --max-steps N and --epochs E are totals, so re-running the same command after an
        interruption finishes the planned run.
        """
        a = self.args
        if a.adam_iter is not None:
            return state.iteration + a.adam_iter
        if a.max_steps is not None:
            return a.max_steps
        if a.epochs is not None:
            per_step = source.items_per_batch * a.grad_acc
            return max(1, int(round(a.epochs * source.n_items / per_step)))
        return state.iteration + DEFAULT_ITERS

    def _resume(self, ckpt, model, optimizer, lora_cfg: LoraConfig, loaded, source, data_fp: str) -> TrainState:
        from loraforge.train.checkpoint import model_shape

        a = self.args
        path = a.checkpoint_in
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
        restore_optimizer(optimizer, model, ckpt)
        restore_rng(ckpt.rng)
        state = ckpt.state
        if state.data_fingerprint != data_fp or state.n_items != source.n_items:
            out("finetune: train data seems to have changed. restarting shuffled epoch.")
            state.epoch_pos, state.n_items, state.data_fingerprint = 0, source.n_items, data_fp
        out(f"finetune: resuming from {path} at iteration {state.iteration}")
        return state

    def _train_config(self) -> dict[str, Any]:
        keep = ("batch", "ctx", "grad_acc", "lr", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip",
                "lr_scheduler", "warmup", "cos_decay_steps", "cos_decay_min", "cos_decay_restart", "lora_r",
                "lora_alpha", "checkpointing")
        return {k: getattr(self.args, k) for k in keep}


def _bundled_text() -> str:
    from importlib import resources

    return str(resources.files("loraforge") / "assets" / "shakespeare.txt")


def _default_metrics_path(lora_pattern: str) -> str:
    root, _ = os.path.splitext(pattern_path(lora_pattern, "metrics"))
    return root + ".jsonl"


def _rank_report(cfg: LoraConfig, wrapped: list[str]) -> dict[str, int]:
    names = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "ffn_gate",
             "down_proj": "ffn_down", "up_proj": "ffn_up", "embed_tokens": "tok_embeddings", "lm_head": "output"}
    report = {v: 0 for v in names.values()}
    for module in wrapped:
        short = module.rsplit(".", 1)[-1]
        report[names[short]] = cfg.rank_for(module)
    return report


class _Metrics:
    def __init__(self, path: str, resume: bool) -> None:
        self.path = path
        self.f = open(path, "a" if resume else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class _StepPrinter:
    """Per-iteration lines like llama.cpp's train_opt_callback, plus a progress bar on a terminal."""

    def __init__(self, metrics: _Metrics, n_iter: int) -> None:
        self.metrics = metrics
        self.prev_loss: float | None = None
        self.bar = None
        if sys.stderr.isatty() and n_iter > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=n_iter, unit="it", dynamic_ncols=True, leave=False, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, log: StepLog) -> None:
        bar = ""
        if self.prev_loss is not None:
            improvement = self.prev_loss - log.loss
            bar = "|" + "-" * max(0, int(1 + improvement * 10 + 0.5)) + ">"
        self.prev_loss = log.loss
        line = (f"train_opt_callback: iter={log.iteration:6d} sample={log.sample}/{log.n_items} "
                f"sched={log.sched:.6f} loss={log.loss:.6f} dt={format_hms(log.dt)} eta={format_hms(log.eta)} {bar}")
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            self.bar.set_postfix(loss=f"{log.loss:.4f}")
            self.bar.update(1)
        else:
            out(line)
        self.metrics.write({"iter": log.iteration, "sample": log.sample, "epoch": log.epoch, "sched": log.sched,
                            "lr": log.lr, "loss": log.loss, "grad_norm": log.grad_norm, "tokens": log.tokens,
                            "dt": log.dt, "eta": log.eta})


class _Saver:
    """Checkpoint + adapter at ITERATION, then LATEST copies (every write atomic)."""

    def __init__(self, args, model, optimizer, lora_cfg, cfg, loaded, train_config) -> None:
        self.args, self.model, self.optimizer = args, model, optimizer
        self.lora_cfg, self.cfg, self.loaded, self.train_config = lora_cfg, cfg, loaded, train_config
        self.noted_bin = False

    def save(self, state: TrainState) -> None:
        from loraforge.formats.gguf_lora import write_gguf_adapter

        a, it = self.args, state.iteration
        ck = pattern_path(a.checkpoint_out, it)
        save_checkpoint(ck, self.model, self.optimizer, self.lora_cfg, state, self.cfg, self.train_config)
        if "ITERATION" in a.checkpoint_out:
            atomic_copy(ck, pattern_path(a.checkpoint_out, "LATEST"))
        lo = pattern_path(a.lora_out, it)
        if lo.endswith(".bin") and not self.noted_bin:
            out(f"note: {lo} holds a GGUF LoRA adapter (what llama.cpp --lora loads today), not the old ggla format")
            self.noted_bin = True
        adapter = to_adapter(self.model, self.lora_cfg, metadata={"base": os.path.basename(self.loaded.source),
                                                                  "iteration": it})
        gguf_arch = self.loaded.metadata.get("general.architecture", self.cfg.arch)
        write_gguf_adapter(lo, adapter, self.cfg, gguf_arch)
        if "ITERATION" in a.lora_out:
            atomic_copy(lo, pattern_path(a.lora_out, "LATEST"))
        out(f"save_checkpoint: saved {ck} and {lo} (iteration {it})")
