"""Shared pieces of the benchmark scripts: timing, peak memory, FLOPs/MFU, machine description,
per-contender subprocesses and the markdown results table.

Conventions (DESIGN.md section 5):
- A step is one optimizer step on one batch. The first `warmup` steps are dropped; tokens/s is
  tokens per step / median step time of the rest.
- Each contender runs in its own subprocess, so peak RSS (VmHWM / ru_maxrss) and the CUDA
  allocator's peak (`torch.cuda.max_memory_reserved`) belong to that contender alone.
- FLOPs per trained token: 4N for LoRA (2N forward, 2N input gradients; frozen weights get no
  weight gradient), +2N with activation checkpointing (the forward runs twice), where N is
  `ModelConfig.n_matmul_params()` (decoder linears + LM head), plus attention (below).
  This counts recomputation, so with checkpointing it is a hardware-FLOPs utilisation.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "


def ensure_loraforge_importable() -> None:
    """Import loraforge from this checkout's src/ (ahead of any installed copy), so the scripts
    always measure the code they ship with."""
    src = os.path.join(REPO_ROOT, "src")
    if os.path.isdir(os.path.join(src, "loraforge")) and sys.path[:1] != [src]:
        sys.path.insert(0, src)


def worker_env() -> dict[str, str]:
    """Environment for contender subprocesses: src/ importable, no tokenizer thread pools."""
    env = dict(os.environ)
    src = os.path.join(REPO_ROOT, "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def hf_dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """transformers' dtype keyword: `dtype` from 4.56 on, `torch_dtype` before."""
    from importlib import metadata

    major, minor = (int(x) for x in metadata.version("transformers").split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


# -- timing ----------------------------------------------------------------------------------------

@dataclass
class StepStats:
    """Step times (s) after warm-up and what they give."""

    times: list[float]
    tokens_per_step: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def tokens_per_s(self) -> float:
        m = self.median_s
        return self.tokens_per_step / m if m and m == m else float("nan")


def step_stats(all_times: Sequence[float], warmup: int, tokens_per_step: int) -> StepStats:
    """Drop the first `warmup` step times (at least one step is always kept)."""
    times = list(all_times)
    keep = times[warmup:] if len(times) > warmup else times[-1:]
    return StepStats(keep, tokens_per_step)


class StepTimer:
    """Times steps with perf_counter; on CUDA it synchronizes before reading the clock."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        return dt


# -- memory ----------------------------------------------------------------------------------------

def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing), MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def cuda_peak_gib() -> tuple[float, float]:
    """(max_memory_reserved, max_memory_allocated) in GiB on the current CUDA device."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30, torch.cuda.max_memory_allocated() / 2**30


# -- FLOPs -----------------------------------------------------------------------------------------

def attention_flops_per_token(cfg: Any, mean_keys: float, checkpointing: bool) -> float:
    """Attention matmul FLOPs per trained token: QK^T and AV take 2 * 2 * q_size * keys per layer
    in the forward; input gradients take twice that; checkpointing adds one more forward.

    mean_keys: keys an average query attends to, (T + 1) / 2 for causal rows of T tokens, or
    the mean over packed documents (see `mean_causal_keys`).
    """
    forward = 4.0 * cfg.num_hidden_layers * cfg.q_size * mean_keys
    return forward * (4.0 if checkpointing else 3.0)


def mean_causal_keys(doc_lengths: Sequence[int]) -> float:
    """Mean number of keys a query sees when each document of the given lengths is causal."""
    total = sum(doc_lengths)
    return sum(n * (n + 1) / 2 for n in doc_lengths) / max(total, 1)


def lora_flops_per_token(cfg: Any, mean_keys: float, checkpointing: bool) -> float:
    """4N (+2N with checkpointing) + attention, N = cfg.n_matmul_params()."""
    n = cfg.n_matmul_params()
    return (6.0 if checkpointing else 4.0) * n + attention_flops_per_token(cfg, mean_keys, checkpointing)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    if not peak_flops or tokens_per_s != tokens_per_s:
        return float("nan")
    return tokens_per_s * flops_per_token / peak_flops


def _best_rate(fn, flops: float, seconds: float) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def measure_cpu_matmul_peaks(threads: int, size: int = 1024, seconds: float = 1.5) -> dict[str, float]:
    """Best-of-repeats FLOP/s of size x size matmuls with `threads` threads: float32 through torch's
    BLAS (`torch.mm`: MKL, which runs AVX2 code on non-Intel CPUs), float32 through oneDNN (the
    kernels loraforge uses for frozen weights, `kernels.cpu_linear`), and bfloat16 (`torch.mm`,
    oneDNN underneath)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        c = torch.empty(size, size)
        flops = 2.0 * size ** 3
        peaks = {"fp32_blas": _best_rate(lambda: torch.mm(a, b, out=c), flops, seconds)}
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            bt = b.t().contiguous()
            peaks["fp32_onednn"] = _best_rate(lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], ""),
                                              flops, seconds)
        a16, b16 = a.bfloat16(), b.bfloat16()
        peaks["bf16"] = _best_rate(lambda: torch.mm(a16, b16), flops, seconds)
        return peaks
    finally:
        torch.set_num_threads(old)


def measure_cpu_sgemm_flops(threads: int, size: int = 1024, seconds: float = 1.5) -> float:
    """Peak float32 matmul FLOP/s of this CPU with `threads` threads: the better of torch's BLAS and
    oneDNN (see measure_cpu_matmul_peaks), so that MFU is against what the machine can do in float32."""
    peaks = measure_cpu_matmul_peaks(threads, size, seconds)
    return max(v for k, v in peaks.items() if k.startswith("fp32"))


def describe_peaks(peaks: dict[str, float]) -> str:
    names = {"fp32_blas": "fp32 torch.mm (MKL)", "fp32_onednn": "fp32 oneDNN", "bf16": "bf16 torch.mm (oneDNN)"}
    return ", ".join(f"{names[k]} {v / 1e9:.0f}" for k, v in peaks.items()) + " GFLOP/s"


# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by GPU name fragment.
GPU_BF16_PEAK = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12,
                 "L40S": 362.0e12, "A10": 125.0e12, "4090": 165.2e12}


def gpu_bf16_peak_flops(name: str) -> float:
    for key, value in GPU_BF16_PEAK.items():
        if key in name:
            return value
    return float("nan")


# -- machine ---------------------------------------------------------------------------------------

def cpu_description() -> str:
    """'AMD EPYC, 2 cores' from lscpu (model name, CPUs), else platform's answer."""
    model, cpus = "", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and not model:
                model = value.strip()
            elif key.strip() == "CPU(s)" and not cpus:
                cpus = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            text = f.read()
        have = [x for x in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma", "amx_tile") if f" {x}" in text]
        flags = "/".join(have)
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    cpus = cpus or str(os.cpu_count())
    return f"{model}, {cpus} cores" + (f" ({flags})" if flags else "")


def memory_description() -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return f"{total / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        return "RAM unknown"


def software_versions(names: Sequence[str] = ("torch", "transformers", "peft")) -> str:
    from importlib import metadata

    parts = []
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def running_others(seconds: float = 5.0) -> float:
    """Mean number of runnable tasks on the machine other than this one over `seconds` (/proc/loadavg's
    running count, sampled), nan where /proc is missing."""
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                samples.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return float("nan")
        time.sleep(0.25)
    return sum(samples) / max(len(samples), 1)


def wait_for_quiet(max_others: float = 0.5, max_wait_s: float = 1800.0) -> float:
    """Before a contender runs: wait (up to max_wait_s) until other tasks use less than `max_others`
    cores on average (a 2-thread step on a 2-core machine slows down many times when anything else
    runs). Returns the last figure; prints what it waits for."""
    started = time.perf_counter()
    while True:
        others = running_others()
        if not others > max_others or time.perf_counter() - started > max_wait_s:
            return others
        print(f"[bench] waiting for a quiet machine: {others:.1f} other runnable tasks on average", flush=True)
        time.sleep(20)


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} / {five:.2f} (1 / 5 min)"
    except OSError:
        return ""


# -- contenders in subprocesses -------------------------------------------------------------------

@dataclass
class Result:
    """One contender's figures (what a worker prints after RESULT_PREFIX, as JSON)."""

    name: str
    tokens_per_s: float = float("nan")
    median_step_s: float = float("nan")
    steps: int = 0
    step_times: list[float] = field(default_factory=list)
    tokens_per_step: int = 0
    peak_rss_mib: float = float("nan")
    gpu_reserved_gib: float = float("nan")
    gpu_allocated_gib: float = float("nan")
    flops_per_token: float = float("nan")
    mfu: float = float("nan")
    load_s: float = float("nan")
    compile_s: float = 0.0
    group: str = ""  # ratios are against the peers of the same group (e.g. "fp32", "bf16")
    notes: str = ""
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def emit_result(result: Result) -> None:
    """Worker side: print the result line the parent parses."""
    print(RESULT_PREFIX + result.to_json(), flush=True)


def run_contender(name: str, argv: list[str], log_path: str, timeout_s: float,
                  cwd: str | None = None, echo: bool = True, env: dict[str, str] | None = None) -> Result:
    """Run one worker command in its own process; parse its result line.

    The worker's stdout+stderr go to `log_path`. The child's own peak RSS is also taken from
    os.wait4 (ru_maxrss of that child alone) and kept when the worker could not report it.
    """
    if echo:
        print(f"[bench] {name}: {' '.join(argv[1:])}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env={**worker_env(), **(env or {})})
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    result = None
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith(RESULT_PREFIX):
            result = Result.from_dict(json.loads(line[len(RESULT_PREFIX):]))
    if result is None:
        tail = " | ".join(lines[-6:])
        why = "timed out" if wall >= timeout_s else f"exit code {proc.returncode}"
        result = Result(name=name, error=f"{why}; log {log_path}: {tail[-600:]}")
    result.name = name
    child_rss = usage.ru_maxrss / 1024
    if result.peak_rss_mib != result.peak_rss_mib:  # NaN: the worker died before reporting
        result.peak_rss_mib = child_rss
    if echo:
        if result.error:
            print(f"[bench] {name}: FAILED: {result.error}", flush=True)
        else:
            print(f"[bench] {name}: {result.tokens_per_s:.1f} tokens/s, median step {result.median_step_s:.3f} s, "
                  f"peak RSS {result.peak_rss_mib:.0f} MiB ({wall:.0f} s wall)", flush=True)
    return result


# -- results table ---------------------------------------------------------------------------------

def _fmt(x: float, spec: str, missing: str = "-") -> str:
    return missing if x != x else format(x, spec)


def markdown_table(results: Sequence[Result], title: str, header_lines: Sequence[str],
                   peer_names: Sequence[str] = (), memory: str = "rss") -> str:
    """A markdown section: title, date/machine lines, one row per contender.

    Ratios are against the fastest peer (tokens/s) and the leanest peer (memory) among
    `peer_names`, so each ratio is the conservative one.
    """
    peers = [r for r in results if r.name in peer_names and not r.error]
    mem_of = (lambda r: r.peak_rss_mib / 1024) if memory == "rss" else (lambda r: r.gpu_reserved_gib)
    best_peer_tps = {g: max((p.tokens_per_s for p in peers if p.group == g), default=float("nan"))
                     for g in {r.group for r in results}}
    lean_peer_mem = {g: min((mem_of(p) for p in peers if p.group == g), default=float("nan"))
                     for g in {r.group for r in results}}
    mem_head = "peak RSS GiB" if memory == "rss" else "max reserved GiB"
    lines = [f"### {title}", ""]
    lines += [f"- {h}" for h in header_lines]
    lines += ["", f"| contender | tokens/s | median step s | {mem_head} | MFU | x peer tokens/s | x peer memory |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error[:120]} | | | | | |")
            continue
        mem = mem_of(r)
        lines.append(
            f"| {r.name} | {_fmt(r.tokens_per_s, '.1f')} | {_fmt(r.median_step_s, '.3f')} | {_fmt(mem, '.2f')} | "
            f"{_fmt(100 * r.mfu, '.1f')}% | {_fmt(r.tokens_per_s / best_peer_tps[r.group], '.2f')} | "
            f"{_fmt(mem / lean_peer_mem[r.group], '.2f')} |")
    notes = [f"- {r.name}: {r.notes}" for r in results if r.notes and not r.error]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def header(extra: Sequence[str] = ()) -> list[str]:
    """Date, machine and software lines for a results table."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"date: {now}", f"machine: {cpu_description()}, {memory_description()}",
             f"software: Python {platform.python_version()}, {software_versions()}"]
    load = load_average()
    if load:
        lines.append(f"{load} at the end of the run")
    return lines + list(extra)


def write_json(path: str, results: Sequence[Result], meta: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)
