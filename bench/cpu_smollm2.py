"""CPU benchmark on the seeds' settings: SmolLM2-135M-Instruct Q4_1 GGUF, batch 4 x ctx 64,
LoRA rank 4 (alpha 4) on q,k,v,o,gate,up,down, AdamW lr 1e-3 (constant), gradient clip 1.0.

Contenders, each in its own subprocess (so peak RSS is its own), back to back:
  peer-ckpt / peer      transformers + peft, model from the GGUF via
                        AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (dequantized fp32),
                        gradient checkpointing on / off
  lf-f32-plain          `loraforge finetune --base-dtype f32` without the speed levers: torch's own float32
                        matmuls (LORAFORGE_CPU_LINEAR=aten), separate q/k/v and gate/up products
                        (LORAFORGE_STACK_PROJECTIONS=0), eager layers
  lf-f32 / lf-f32-compiled  `loraforge finetune --base-dtype f32` (oneDNN float32 matmuls for the frozen
                        weights, stacked q/k/v and gate/up), --compile off / on
  lf-quant / lf-quant-compiled  the same with --base-dtype quantized (Q4_1 kept resident)
  lf-quant-ckpt / lf-quant-ckpt-compiled  ... with gradient checkpointing (the least memory)
  peer-bf16 / lf-bf16-compiled  an extra pair in bfloat16 (weights and activations; LoRA weights float32 in
                        both): transformers + peft with dtype=bfloat16 against --base-dtype bf16
The ratios of each row are against the faster peer of its precision (tokens/s) and the leaner one (memory).

loraforge runs through its real product path (`loraforge.cli.main(["finetune", ...])`) and its
step times are read from the metrics JSONL (`dt` per iteration). The peer trains on exactly the
batches loraforge's finetune draws (same tokenizer, windows and shuffled order for --seed 1).

  python bench/cpu_smollm2.py                 # 2 warm-up + 8 timed steps per contender
  python bench/cpu_smollm2.py --quick         # smoke run (1 + 2 steps)
  python bench/cpu_smollm2.py --only lf-f32,peer --steps 20 --threads 2 --markdown-out perf.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Result, StepTimer, describe_peaks, emit_result, ensure_loraforge_importable,  # noqa: E402
                    header, hf_dtype_kwarg, lora_flops_per_token, markdown_table, mean_causal_keys,
                    measure_cpu_matmul_peaks, mfu, peak_rss_mib, run_contender, step_stats, wait_for_quiet,
                    write_json)

BATCH, CTX, RANK, ALPHA, LR, SEED = 4, 64, 4, 4.0, 1e-3, 1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PLAIN = {"LORAFORGE_CPU_LINEAR": "aten", "LORAFORGE_STACK_PROJECTIONS": "0"}  # the levers off
# name -> (kind, checkpointing, dtype (peer) / --base-dtype (loraforge), --compile, environment)
CONTENDERS = {
    "peer-ckpt": ("peer", True, "f32", None, {}),
    "peer": ("peer", False, "f32", None, {}),
    "lf-f32-plain": ("loraforge", False, "f32", "off", PLAIN),
    "lf-f32": ("loraforge", False, "f32", "off", {}),
    "lf-f32-compiled": ("loraforge", False, "f32", "on", {}),
    "lf-quant": ("loraforge", False, "quantized", "off", {}),
    "lf-quant-compiled": ("loraforge", False, "quantized", "on", {}),
    "lf-quant-ckpt": ("loraforge", True, "quantized", "off", {}),
    "lf-quant-ckpt-compiled": ("loraforge", True, "quantized", "on", {}),
    "peer-bf16": ("peer", False, "bf16", None, {}),
    "lf-bf16-compiled": ("loraforge", False, "bf16", "on", {}),
}
PEERS = ("peer-ckpt", "peer", "peer-bf16")


def precision(name: str) -> str:
    return "bf16" if CONTENDERS[name][2] == "bf16" else "fp32"
ISSUE_PEER = ("issue's peer figure: 130 tokens/s, ~1.8 GB peak RSS (transformers 5.2x + peft 0.21, an earlier run "
              "on this machine's previous CPU)")


# -- data ------------------------------------------------------------------------------------------

def bundled_text() -> str:
    from importlib import resources

    return str(resources.files("loraforge") / "assets" / "shakespeare.txt")


def write_batches(model_path: str, text_path: str, n_steps: int, out_path: str) -> None:
    """The first n_steps batches `loraforge finetune --seed 1 --batch 4 --ctx 64` trains on,
    saved as {"input_ids", "labels"}: (n_steps, BATCH, CTX) int64."""
    import torch

    from loraforge.data.text import TextSampleOptions, TextSamples, read_text_file
    from loraforge.formats.gguf import read_model
    from loraforge.tokenizer import Tokenizer
    from loraforge.train.loop import epoch_order

    gm = read_model(model_path)
    tok = Tokenizer.from_gguf_metadata(gm.metadata, source=model_path)
    tokens = tok.encode(read_text_file(text_path), add_bos=False, parse_special=False)
    eos = tok.eos_id if tok.eos_id is not None else 0
    bos = tok.bos_id if tok.bos_id is not None else eos
    samples = TextSamples(tokens, CTX, bos, eos, gm.config.vocab_size, TextSampleOptions(), None, BATCH)
    order = epoch_order(samples.n_items, SEED, 0)
    batches = [samples.make_batch(order[i * BATCH:(i + 1) * BATCH]) for i in range(n_steps)]
    torch.save({"input_ids": torch.stack([b.input_ids for b in batches]),
                "labels": torch.stack([b.labels for b in batches])}, out_path)


# -- workers (run in their own process) ------------------------------------------------------------

def worker_peer(args: argparse.Namespace, checkpointing: bool, dtype_name: str) -> Result:
    """transformers + peft: plain PyTorch loop (forward, CE, backward, clip, AdamW step)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    folder, name = os.path.split(os.path.abspath(args.model))
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **hf_dtype_kwarg(dtype))
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=list(TARGETS))
    model = get_peft_model(model, cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    load_s = time.perf_counter() - t0
    data = torch.load(args.batches)
    timer = StepTimer()
    n = args.warmup + args.steps
    for i in range(n):
        ids, labels = data["input_ids"][i % len(data["input_ids"])], data["labels"][i % len(data["labels"])]
        timer.start()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = timer.stop()
        print(f"peer step {i + 1}/{n}: loss {float(loss):.4f} dt {dt:.3f} s", flush=True)
    stats = step_stats(timer.times, args.warmup, BATCH * CTX)
    return Result(name="", tokens_per_s=stats.tokens_per_s, median_step_s=stats.median_s, steps=len(stats.times),
                  step_times=timer.times, tokens_per_step=BATCH * CTX, peak_rss_mib=peak_rss_mib(), load_s=load_s,
                  notes=f"transformers+peft, {'bf16' if dtype_name == 'bf16' else 'fp32'} dequantized GGUF, "
                        f"LoRA weights {next(p.dtype for p in params)}, gradient checkpointing "
                        f"{'on (use_reentrant=False)' if checkpointing else 'off'}, SDPA attention")


def loraforge_finetune_argv(model: str, train_data: str, base_dtype: str, checkpointing: bool, n_iter: int,
                            threads: int, work: str, batch: int = BATCH, ctx: int = CTX,
                            compile_mode: str = "off") -> list[str]:
    """`loraforge finetune` arguments for the seeds' settings, outputs under `work`."""
    return ["finetune", "--model-base", model, "--train-data", train_data, "--base-dtype", base_dtype,
            "--compile", compile_mode,
            "--batch", str(batch), "--ctx", str(ctx), "--adam-iter", str(n_iter), "--threads", str(threads),
            "--lora-r", str(RANK), "--lora-alpha", str(ALPHA), "--adam-alpha", str(LR), "--adam-decay", "0",
            "--lr-scheduler", "constant", "--warmup", "0", "--seed", str(SEED), "--save-every", "0",
            "--use-checkpointing" if checkpointing else "--no-checkpointing",
            "--checkpoint-in", os.path.join(work, "none.gguf"),
            "--checkpoint-out", os.path.join(work, "chk-ITERATION.gguf"),
            "--lora-out", os.path.join(work, "lora-ITERATION.gguf"),
            "--metrics-out", os.path.join(work, "metrics.jsonl"), "--device", "cpu"]


def run_loraforge_finetune(argv: list[str], work: str, warmup: int) -> Result:
    """Run `loraforge finetune` in this process; step times from its metrics JSONL."""
    from loraforge.cli import main

    t0 = time.perf_counter()
    code = main(argv)
    wall = time.perf_counter() - t0
    if code:
        return Result(name="", error=f"loraforge finetune exited with {code}")
    with open(os.path.join(work, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if "dt" in r]
    times = [float(r["dt"]) for r in steps]
    tokens = int(steps[-1]["tokens"]) if steps else 0
    compile_s = sum(float(r.get("compile_s", 0.0)) for r in records if r.get("summary"))
    stats = step_stats(times, warmup, tokens)
    return Result(name="", tokens_per_s=stats.tokens_per_s, median_step_s=stats.median_s, steps=len(stats.times),
                  step_times=times, tokens_per_step=tokens, peak_rss_mib=peak_rss_mib(),
                  load_s=wall - sum(times) - compile_s, compile_s=compile_s)


def worker_loraforge(args: argparse.Namespace, checkpointing: bool, base_dtype: str, compile_mode: str,
                     env: dict[str, str]) -> Result:
    work = tempfile.mkdtemp(prefix="lf-bench-", dir=args.work)
    argv = loraforge_finetune_argv(args.model, args.train_data, base_dtype, checkpointing,
                                   args.warmup + args.steps, args.threads, work, compile_mode=compile_mode)
    result = run_loraforge_finetune(argv, work, args.warmup)
    switches = "".join(f"{k}={v} " for k, v in env.items())
    result.notes = (f"`{switches}loraforge finetune --base-dtype {base_dtype} --compile {compile_mode} "
                    f"--{'use' if checkpointing else 'no'}-checkpointing` (product path)"
                    + (f"; compiled in {result.compile_s:.0f} s before the timed steps" if result.compile_s else ""))
    shutil.rmtree(work, ignore_errors=True)
    return result


def run_worker(args: argparse.Namespace) -> int:
    kind, checkpointing, dtype, compile_mode, env = CONTENDERS[args.worker]
    if kind != "peer":
        ensure_loraforge_importable()
    try:
        if kind == "peer":
            result = worker_peer(args, checkpointing, dtype)
        else:
            result = worker_loraforge(args, checkpointing, dtype, compile_mode, env)
    except Exception as e:  # report, so the table shows why a contender is missing
        import traceback

        traceback.print_exc()
        result = Result(name="", error=f"{type(e).__name__}: {e}", peak_rss_mib=peak_rss_mib())
    result.name = args.worker
    result.group = precision(args.worker)
    emit_result(result)
    return 0 if not result.error else 1


# -- parent ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per contender (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 2 timed steps")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--no-bf16", action="store_true", help="leave out the bf16 pair")
    p.add_argument("--max-wait", type=float, default=1800,
                   help="seconds to wait before each contender for other work on the machine to stop (0: none)")
    p.add_argument("--model", default=None, help="GGUF base (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--train-data", default=None, help="text file (default: bundled Shakespeare)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per contender")
    p.add_argument("--json-out", default=None, help="write all figures as JSON here")
    p.add_argument("--markdown-out", default=None, help="append the markdown table to this file")
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, choices=tuple(CONTENDERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.worker:  # the parent passes resolved paths; the peer's process never imports loraforge
        return run_worker(args)
    ensure_loraforge_importable()
    from loraforge.loader import resolve_model_path

    args.model = resolve_model_path(args.model)
    args.train_data = args.train_data or bundled_text()

    names = list(CONTENDERS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    if args.no_bf16:
        names = [n for n in names if precision(n) != "bf16"]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    work = tempfile.mkdtemp(prefix="loraforge-bench-")
    try:
        batches = os.path.join(work, "batches.pt")
        write_batches(args.model, args.train_data, args.warmup + args.steps, batches)
        peaks = measure_cpu_matmul_peaks(args.threads)
        peak = max(v for k, v in peaks.items() if k.startswith("fp32"))
        print(f"[bench] matmul peaks with {args.threads} threads: {describe_peaks(peaks)}", flush=True)
        from loraforge.formats.gguf import read_model

        cfg = read_model(args.model).config
        keys = mean_causal_keys([CTX])
        results = []
        for name in names:
            _, checkpointing, _, _, env = CONTENDERS[name]
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--model", args.model,
                   "--train-data", args.train_data, "--work", work, "--batches", batches]
            if args.max_wait > 0:
                wait_for_quiet(max_wait_s=args.max_wait)
            r = run_contender(name, cmd, os.path.join(work, f"{name}.log"), args.timeout, env=env)
            r.group = precision(name)
            if not r.error:
                r.flops_per_token = lora_flops_per_token(cfg, keys, checkpointing)
                r.mfu = mfu(r.tokens_per_s, r.flops_per_token, peaks["bf16"] if r.group == "bf16" else peak)
            results.append(r)
        lines = header([f"model: {os.path.basename(args.model)} ({cfg.num_hidden_layers} layers, n_embd "
                        f"{cfg.hidden_size}, N = {cfg.n_matmul_params() / 1e6:.1f}M matmul params)",
                        f"settings: batch {BATCH} x ctx {CTX}, LoRA r{RANK} alpha {ALPHA:g} on {','.join(TARGETS)}, "
                        f"AdamW lr {LR:g}, {args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps, "
                        "median",
                        f"matmul peaks measured here ({args.threads} threads, 1024^3): {describe_peaks(peaks)}; MFU "
                        "of fp32 rows against the better fp32 peak, of bf16 rows against the bf16 peak; FLOPs/token "
                        "4N (+2N with checkpointing) + causal attention",
                        ISSUE_PEER])
        table = markdown_table(results, "CPU: SmolLM2-135M-Instruct Q4_1, batch 4 x ctx 64", lines, PEERS)
        print("\n" + table + "\n")
        if args.markdown_out:
            with open(args.markdown_out, "a", encoding="utf-8") as f:
                f.write(table + "\n\n")
        if args.json_out:
            write_json(args.json_out, results, {"peak_flops": peak, "peaks": peaks, "threads": args.threads,
                                                "header": lines})
        return 0 if all(not r.error for r in results) else 1
    finally:
        if not os.environ.get("LORAFORGE_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
