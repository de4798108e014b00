"""CPU large case: a Llama-2-7B-shaped Q8_0 GGUF with random weights, trained with the base kept
quantized (`loraforge finetune --base-dtype quantized`) on the seeds' settings (batch 4, ctx 64,
LoRA r4 on the seven projections, bundled Shakespeare).

The file (32 layers, n_embd 4096, n_ff 11008, 32 heads, vocab 32000: about 7.2 GB) is written
tensor by tensor with the `gguf` package into --cache-dir and deleted at the end unless --keep.
Its tokenizer is a llama SentencePiece vocabulary of 32000 pieces: <unk> <s> </s>, the 256 byte
tokens, the characters of the training text, then dummy pieces.

Reference: the seeds' llama.cpp `finetune` run of Llama-2-7b.Q8_0.gguf on the same settings
(6 threads, --no-checkpointing) logged 5-9 minutes per 256-token iteration: ~0.6 tokens/s.

  python bench/cpu_7b_q8.py                        # full 7B shape, 2 iterations (1 warm-up)
  python bench/cpu_7b_q8.py --quick                # 2 layers, smoke run
  python bench/cpu_7b_q8.py --adam-iter 4 --keep --checkpointing
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Result, emit_result, ensure_loraforge_importable, header, lora_flops_per_token,  # noqa: E402
                    markdown_table, mean_causal_keys, measure_cpu_sgemm_flops, memory_description, mfu,
                    peak_rss_mib, run_contender, write_json)

LLAMA2_7B = dict(n_layers=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, n_vocab=32000, n_ctx=4096)
Q8_0_BLOCK, Q8_0_BYTES = 32, 34  # weights per block, bytes per block (f16 scale + 32 int8)
WEIGHT_STD = 0.02
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
    from cpu_smollm2 import loraforge_finetune_argv, run_loraforge_finetune

    work = tempfile.mkdtemp(prefix="lf-bench-7b-", dir=args.work)
    argv = loraforge_finetune_argv(args.gguf, args.train_data, "quantized", args.checkpointing, args.adam_iter,
                                   args.threads, work, args.batch, args.ctx)
    try:
        result = run_loraforge_finetune(argv, work, args.warmup)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = Result(name="", error=f"{type(e).__name__}: {e}", peak_rss_mib=peak_rss_mib())
    result.name = "loraforge"
    result.notes = (f"`loraforge finetune --base-dtype quantized --batch {args.batch} --ctx {args.ctx} "
                    f"--{'use' if args.checkpointing else 'no'}-checkpointing --adam-iter {args.adam_iter}`; "
                    f"step times {', '.join(f'{t:.1f}' for t in result.step_times)} s")
    shutil.rmtree(work, ignore_errors=True)
    emit_result(result)
    return 0 if not result.error else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=LLAMA2_7B["n_layers"], help="decoder layers (32 = the 7B shape)")
    p.add_argument("--adam-iter", type=int, default=2, help="iterations to run (the first `--warmup` untimed)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing (default off, as the seeds' llama.cpp run)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 2 iterations")
    p.add_argument("--cache-dir", default=None, help="where the GGUF is written (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the GGUF (reused by the next run with --cache-dir)")
    p.add_argument("--train-data", default=None, help="text file (default: bundled Shakespeare)")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--json-out", default=None)
    p.add_argument("--markdown-out", default=None, help="append the markdown table to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.adam_iter, args.warmup = 2, 2, 1
    if args.worker:
        return run_worker(args)
    ensure_loraforge_importable()
    from cpu_smollm2 import bundled_text

    args.train_data = args.train_data or bundled_text()
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
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--gguf", path, "--work", cache,
               "--adam-iter", str(args.adam_iter), "--warmup", str(args.warmup), "--batch", str(args.batch),
               "--ctx", str(args.ctx), "--threads", str(args.threads), "--train-data", args.train_data]
        if args.checkpointing:
            cmd.append("--checkpointing")
        r = run_contender("loraforge", cmd, os.path.join(cache, "loraforge-7b.log"), args.timeout)
        if not r.error:
            r.flops_per_token = lora_flops_per_token(cfg, mean_causal_keys([args.ctx]), args.checkpointing)
            r.mfu = mfu(r.tokens_per_s, r.flops_per_token, peak)
        fits = "yes" if r.peak_rss_mib == r.peak_rss_mib and r.peak_rss_mib < 24 * 1024 else "NO"
        lines = header([f"model: random Llama-2-7B shape, {args.layers} layers, Q8_0 "
                        f"({os.path.getsize(path) / 2**30:.2f} GiB file), N = {cfg.n_matmul_params() / 1e9:.2f}B "
                        "matmul params, base kept quantized",
                        f"settings: batch {args.batch} x ctx {args.ctx}, LoRA r4 alpha 4 on the 7 projections, "
                        f"AdamW lr 1e-3, {args.threads} threads, {args.warmup} warm-up + "
                        f"{max(args.adam_iter - args.warmup, 1)} timed iterations",
                        f"MFU against a measured fp32 sgemm peak of {peak / 1e9:.0f} GFLOP/s",
                        f"peak RSS within 24 GB: {fits} ({memory_description()} here)",
                        LLAMACPP_REFERENCE])
        table = markdown_table([r], f"CPU large: Llama-2-7B shape ({args.layers} layers) Q8_0, base quantized",
                               lines)
        print("\n" + table + "\n")
        if args.markdown_out:
            with open(args.markdown_out, "a", encoding="utf-8") as f:
                f.write(table + "\n\n")
        if args.json_out:
            write_json(args.json_out, [r], {"peak_flops": peak, "header": lines})
        return 0 if not r.error else 1
    finally:
        if not args.keep:
            if os.path.exists(path):
                os.remove(path)
            if not args.cache_dir:
                shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
