"""CPU large case: a Llama-2-7B-shaped Q8_0 GGUF with random weights, trained with the base kept
quantized (`loraforge finetune --base-dtype quantized`) on the seeds' settings (batch 4, ctx 64,
LoRA r4 on the seven projections, bundled Shakespeare), against the seeds' own tool on the same
file: llama.cpp's removed `finetune`, built from llama-cpp-python 0.2.80's vendored llama.cpp by
bench/build_llamacpp_finetune.py (into ~/.cache/loraforge-bench on first use; a few minutes).

The file (n_embd 4096, n_ff 11008, 32 heads = 32 key/value heads, vocab 32000) is written tensor
by tensor with the `gguf` package into --cache-dir and deleted at the end unless --keep. Its
tokenizer is a llama SentencePiece vocabulary of 32000 pieces: <unk> <s> </s>, the 256 byte
tokens, the characters of the training text, then dummy pieces; its keys are the 17 the seeds'
Llama-2-7b.Q8_0.gguf has, which the 2024 finetune reads. llama.cpp's finetune trains only
models whose key/value heads equal their query heads (it asserts on GQA), hence the Llama-2 shape.
A few layers give the per-layer comparison (default 4, ~1 GB file); --layers 32 is the whole 7B
shape (~7.2 GB; llama.cpp's finetune takes many minutes per iteration there).

Contenders (each in its own subprocess; same file, data, batch, ctx, threads, LoRA rank 4 alpha 4):
  loraforge          `loraforge finetune --base-dtype quantized`, step times from its metrics JSONL
  llamacpp-finetune  llama-finetune with the seeds' flags (its defaults also train rank-4 adapters on
                     the token embeddings and the output and rank-1 on the norms); iteration times
                     from the arrival of its `train_opt_callback: iter=` lines (read through a pty)

Reference: the seeds' llama.cpp `finetune` run of the real Llama-2-7b.Q8_0.gguf (6 threads,
--no-checkpointing) logged 5-9 minutes per 256-token iteration: ~0.6 tokens/s.

  python bench/cpu_7b_q8.py                           # 4 layers, both contenders, 3 iterations (1 warm-up)
  python bench/cpu_7b_q8.py --quick                   # 2 layers, 2 iterations: smoke run
  python bench/cpu_7b_q8.py --layers 32 --only loraforge --adam-iter 2   # the whole 7B shape
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_llamacpp_finetune import VERSION as LLAMACPP_VERSION  # noqa: E402
from build_llamacpp_finetune import default_cache_dir, ensure_finetune  # noqa: E402
from common import (Result, emit_result, ensure_loraforge_importable, header, lora_flops_per_token,  # noqa: E402
                    markdown_table, mean_causal_keys, measure_cpu_sgemm_flops, memory_description, mfu,
                    peak_rss_mib, run_contender, step_stats, write_json)

LLAMA2_7B = dict(n_layers=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, n_vocab=32000, n_ctx=4096)
Q8_0_BLOCK, Q8_0_BYTES = 32, 34  # weights per block, bytes per block (f16 scale + 32 int8)
WEIGHT_STD = 0.02
CONTENDERS = ("loraforge", "llamacpp-finetune")
LLAMACPP_REFERENCE = ("llama.cpp finetune (seeds' log, real Llama-2-7b.Q8_0, 6 threads, --no-checkpointing): "
                      "~0.6 tokens/s")


# -- the GGUF file ---------------------------------------------------------------------------------

def spm_vocab(n_vocab: int, text: str) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a llama SentencePiece vocabulary of n_vocab pieces."""
    normal, unknown, control, unused, byte = 1, 2, 3, 5, 6
    tokens, types = ["<unk>", "<s>", "</s>"], [unknown, control, control]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [byte] * 256
    chars = sorted({("\u2581" if c == " " else c) for c in text if c not in "\r\n"} | {"\u2581"})
    tokens += chars
    types += [normal] * len(chars)
    seen = set(tokens)
    i = 0
    while len(tokens) < n_vocab:
        piece = f"<dummy{i:05d}>"
        i += 1
        if piece not in seen:
            tokens.append(piece)
            types.append(unused)
    tokens, types = tokens[:n_vocab], types[:n_vocab]
    scores = [0.0] * 3 + [0.0] * 256 + [-float(k) for k in range(n_vocab - 259)]
    return tokens, scores, types


def _block_pool(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Random Q8_0 blocks (n_blocks, 34) uint8: f16 scale near WEIGHT_STD / std(q), int8 q uniform."""
    pool = np.empty((n_blocks, Q8_0_BYTES), dtype=np.uint8)
    q_std = np.sqrt(((2 * 127 + 1) ** 2 - 1) / 12.0)  # std of uniform integers in [-127, 127]
    scales = (WEIGHT_STD / q_std * rng.uniform(0.5, 1.5, n_blocks)).astype(np.float16)
    pool[:, :2] = scales.view(np.uint8).reshape(n_blocks, 2)
    pool[:, 2:] = rng.integers(-127, 128, (n_blocks, Q8_0_BLOCK), dtype=np.int8).view(np.uint8)
    return pool


def _q8_0_tensor(rng: np.random.Generator, pool: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows, cols / 32 * 34) uint8 of random blocks, taken from the pool at random offsets."""
    n = rows * cols // Q8_0_BLOCK
    out = np.empty((n, Q8_0_BYTES), dtype=np.uint8)
    done = 0
    while done < n:
        take = min(n - done, len(pool) // 2)
        start = int(rng.integers(0, len(pool) - take + 1))
        out[done:done + take] = pool[start:start + take]
        done += take
    return out.reshape(rows, cols // Q8_0_BLOCK * Q8_0_BYTES)


def write_random_q8_0_gguf(path: str, n_layers: int, text: str, seed: int = 0, shape: dict | None = None) -> int:
    """Write a llama-arch Q8_0 GGUF with random weights, one tensor at a time. Returns its size."""
    import gguf

    s = dict(LLAMA2_7B if shape is None else shape)
    s["n_layers"] = n_layers
    e, f, v = s["n_embd"], s["n_ff"], s["n_vocab"]
    kv = e // s["n_head"] * s["n_head_kv"]
    rng = np.random.default_rng(seed)
    pool = _block_pool(rng, 1 << 20)
    q8 = gguf.GGMLQuantizationType.Q8_0
    f32 = gguf.GGMLQuantizationType.F32
    plan: list[tuple[str, tuple[int, int] | tuple[int], int]] = [("token_embd.weight", (v, e), q8)]
    for i in range(n_layers):
        plan += [(f"blk.{i}.attn_norm.weight", (e,), f32), (f"blk.{i}.attn_q.weight", (e, e), q8),
                 (f"blk.{i}.attn_k.weight", (kv, e), q8), (f"blk.{i}.attn_v.weight", (kv, e), q8),
                 (f"blk.{i}.attn_output.weight", (e, e), q8), (f"blk.{i}.ffn_norm.weight", (e,), f32),
                 (f"blk.{i}.ffn_gate.weight", (f, e), q8), (f"blk.{i}.ffn_up.weight", (f, e), q8),
                 (f"blk.{i}.ffn_down.weight", (e, f), q8)]
    plan += [("output_norm.weight", (e,), f32), ("output.weight", (v, e), q8)]

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random Llama-2-7B shape, {n_layers} layers")
    w.add_context_length(s["n_ctx"])
    w.add_embedding_length(e)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(f)
    w.add_rope_dimension_count(e // s["n_head"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = spm_vocab(v, text)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    for name, shape_, qtype in plan:
        if qtype == q8:
            rows, cols = shape_
            w.add_tensor_info(name, (rows, cols // Q8_0_BLOCK * Q8_0_BYTES), np.dtype(np.uint8),
                              rows * cols // Q8_0_BLOCK * Q8_0_BYTES, raw_dtype=q8)
        else:
            w.add_tensor_info(name, shape_, np.dtype(np.float32), int(np.prod(shape_)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape_, qtype in plan:
        if qtype == q8:
            w.write_tensor_data(_q8_0_tensor(rng, pool, *shape_))
        else:
            w.write_tensor_data(np.ones(shape_, dtype=np.float32))
    w.close()
    return os.path.getsize(path)


# -- run -------------------------------------------------------------------------------------------

def run_worker(args: argparse.Namespace) -> int:
    ensure_loraforge_importable()
    work = tempfile.mkdtemp(prefix="lf-bench-7b-", dir=args.work)
    try:
        if args.worker == "llamacpp-finetune":
            result = run_llamacpp_finetune(args, work)
        else:
            result = run_loraforge(args, work)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = Result(name="", error=f"{type(e).__name__}: {e}", peak_rss_mib=peak_rss_mib())
    result.name = args.worker
    shutil.rmtree(work, ignore_errors=True)
    emit_result(result)
    return 0 if not result.error else 1


def run_loraforge(args: argparse.Namespace, work: str) -> Result:
    from cpu_smollm2 import loraforge_finetune_argv, run_loraforge_finetune

    argv = loraforge_finetune_argv(args.gguf, args.train_data, "quantized", args.checkpointing, args.adam_iter,
                                   args.threads, work, args.batch, args.ctx)
    result = run_loraforge_finetune(argv, work, args.warmup)
    result.notes = (f"`loraforge finetune --base-dtype quantized --batch {args.batch} --ctx {args.ctx} "
                    f"--{'use' if args.checkpointing else 'no'}-checkpointing --adam-iter {args.adam_iter}`; "
                    f"step times {', '.join(f'{t:.1f}' for t in result.step_times)} s")
    return result


ITER_LINE = re.compile(rb"train_opt_callback: iter=\s*(\d+)")


def llamacpp_finetune_argv(binary: str, args: argparse.Namespace, work: str) -> list[str]:
    """The seeds' command line, on this file and these settings."""
    return [binary, "--model-base", args.gguf, "--train-data", args.train_data,
            "--checkpoint-in", os.path.join(work, "chk-LATEST.gguf"),
            "--checkpoint-out", os.path.join(work, "chk-ITERATION.gguf"),
            "--lora-out", os.path.join(work, "lora-ITERATION.bin"), "--save-every", "0",
            "--threads", str(args.threads), "--adam-iter", str(args.adam_iter), "--batch", str(args.batch),
            "--ctx", str(args.ctx), "--lora-r", "4", "--lora-alpha", "4", "--seed", "1",
            "--use-checkpointing" if args.checkpointing else "--no-checkpointing", "--no-flash"]


def run_llamacpp_finetune(args: argparse.Namespace, work: str) -> Result:
    """Run llama-finetune under a pty (so it writes line by line) and time its iteration lines."""
    import pty

    argv = llamacpp_finetune_argv(args.finetune_binary, args, work)
    print("[llamacpp] " + " ".join(argv), flush=True)
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True, cwd=work)
    os.close(slave)
    stamps: dict[int, float] = {}
    pending = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        now = time.perf_counter()
        sys.stdout.buffer.write(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            m = ITER_LINE.search(line)
            if m:
                stamps.setdefault(int(m.group(1)), now)
    os.close(master)
    _, status, usage = os.wait4(proc.pid, 0)
    sys.stdout.flush()
    code = os.waitstatus_to_exitcode(status)
    iters = sorted(stamps)
    times = [stamps[i] - stamps[i - 1] for i in iters if i - 1 in stamps]
    rss = usage.ru_maxrss / 1024
    if code != 0 or not times:
        return Result(name="", error=f"llama-finetune exit code {code}, {len(times)} timed iterations",
                      peak_rss_mib=rss)
    stats = step_stats(times, args.warmup, args.batch * args.ctx)
    notes = (f"llama.cpp finetune (built from llama-cpp-python {LLAMACPP_VERSION}'s llama.cpp), seeds' flags `--batch {args.batch} --ctx {args.ctx} --lora-r 4 --lora-alpha 4 "
             f"--{'use' if args.checkpointing else 'no'}-checkpointing --no-flash --adam-iter {args.adam_iter}`; "
             f"iteration times {', '.join(f'{t:.1f}' for t in times)} s")
    return Result(name="", tokens_per_s=stats.tokens_per_s, median_step_s=stats.median_s, steps=len(stats.times),
                  step_times=times, tokens_per_step=args.batch * args.ctx, peak_rss_mib=rss, notes=notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B shape (32 = all of it)")
    p.add_argument("--adam-iter", type=int, default=3, help="iterations to run (the first `--warmup` untimed)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing (default off, as the seeds' llama.cpp run)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 2 iterations")
    p.add_argument("--cache-dir", default=None, help="where the GGUF is written (default: a temp folder)")
    p.add_argument("--llamacpp-cache", default=None,
                   help="where llama.cpp's finetune is built (default ~/.cache/loraforge-bench)")
    p.add_argument("--keep", action="store_true", help="keep the GGUF (reused by the next run with --cache-dir)")
    p.add_argument("--train-data", default=None, help="text file (default: bundled Shakespeare)")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--json-out", default=None)
    p.add_argument("--markdown-out", default=None, help="append the markdown table to this file")
    p.add_argument("--worker", default=None, choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--finetune-binary", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.adam_iter, args.warmup = 2, 2, 1
    if args.worker:
        return run_worker(args)
    names = [n.strip() for n in (args.only or ",".join(CONTENDERS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    ensure_loraforge_importable()
    from cpu_smollm2 import bundled_text

    args.train_data = args.train_data or bundled_text()
    binary = ensure_finetune(args.llamacpp_cache or default_cache_dir()) if "llamacpp-finetune" in names else ""
    cache = args.cache_dir or tempfile.mkdtemp(prefix="loraforge-bench-7b-")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"random-llama2-7b-shape-{args.layers}L-Q8_0.gguf")
    try:
        if os.path.exists(path):
            print(f"[bench] reusing {path} ({os.path.getsize(path) / 2**30:.2f} GiB)", flush=True)
        else:
            t0 = time.perf_counter()
            with open(args.train_data, encoding="utf-8") as f:
                text = f.read()
            size = write_random_q8_0_gguf(path + ".part", args.layers, text)
            os.replace(path + ".part", path)
            print(f"[bench] wrote {path}: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
        peak = measure_cpu_sgemm_flops(args.threads)
        print(f"[bench] fp32 sgemm peak with {args.threads} threads: {peak / 1e9:.0f} GFLOP/s", flush=True)
        from loraforge.formats.gguf import read_model

        cfg = read_model(path).config
        results = []
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--gguf", path, "--work", cache,
                   "--adam-iter", str(args.adam_iter), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--ctx", str(args.ctx), "--threads", str(args.threads), "--train-data", args.train_data,
                   "--finetune-binary", binary]
            if args.checkpointing:
                cmd.append("--checkpointing")
            r = run_contender(name, cmd, os.path.join(cache, f"{name}-7b.log"), args.timeout)
            if not r.error:
                r.flops_per_token = lora_flops_per_token(cfg, mean_causal_keys([args.ctx]), args.checkpointing)
                r.mfu = mfu(r.tokens_per_s, r.flops_per_token, peak)
            results.append(r)
        worst = max((r.peak_rss_mib for r in results if r.peak_rss_mib == r.peak_rss_mib), default=float("nan"))
        fits = "yes" if worst < 24 * 1024 else "NO"
        lines = header([f"model: random Llama-2-7B shape, {args.layers} of its 32 layers, Q8_0 "
                        f"({os.path.getsize(path) / 2**30:.2f} GiB file), N = {cfg.n_matmul_params() / 1e9:.2f}B "
                        "matmul params, base kept quantized, the same file for every contender",
                        f"settings: batch {args.batch} x ctx {args.ctx}, LoRA r4 alpha 4, AdamW lr 1e-3, "
                        f"{args.threads} threads, {args.warmup} warm-up + {max(args.adam_iter - args.warmup, 1)} "
                        "timed iterations, median",
                        f"MFU against a measured fp32 sgemm peak of {peak / 1e9:.0f} GFLOP/s; FLOPs/token 4N "
                        "(+2N with checkpointing) + causal attention for every contender",
                        f"peak RSS within 24 GB: {fits} ({memory_description()} here)",
                        LLAMACPP_REFERENCE])
        table = markdown_table(results, f"CPU large: Llama-2-7B shape ({args.layers} layers) Q8_0, base quantized",
                               lines, peer_names=("llamacpp-finetune",))
        print("\n" + table + "\n")
        if args.markdown_out:
            with open(args.markdown_out, "a", encoding="utf-8") as f:
                f.write(table + "\n\n")
        if args.json_out:
            write_json(args.json_out, results, {"peak_flops": peak, "header": lines})
        return 0 if all(not r.error for r in results) else 1
    finally:
        if not args.keep:
            if os.path.exists(path):
                os.remove(path)
            if not args.cache_dir:
                shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
