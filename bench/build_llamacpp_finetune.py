"""Build the seeds' own trainer, llama.cpp's `finetune` (removed from llama.cpp in mid-2024), from
the llama.cpp source that llama-cpp-python 0.2.80's sdist vendors.

Steps (each skipped when its output exists in the cache folder, default
~/.cache/loraforge-bench, or $LORAFORGE_BENCH_CACHE, or --cache-dir):
  1. pip download --no-deps --no-binary :all: llama-cpp-python==0.2.80   (the sdist, ~50 MB)
  2. unpack it; the source is vendor/llama.cpp
  3. cmake -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release, then build only the
     `llama-finetune` target (a few minutes on 2 cores)

The binary is <cache>/llama-cpp-python-0.2.80-build/bin/llama-finetune. It trains llama models
with as many key/value heads as query heads only (it asserts on GQA), from GGUF v2/v3 files read
by its own gguf code, with a 2024-era tokenizer (`tokenizer.ggml.model` "llama": tokens, scores,
token types, byte tokens <0xXX>).

  python bench/build_llamacpp_finetune.py            # build (or find) it, print its path
  python bench/build_llamacpp_finetune.py --cache-dir /tmp/lf-cache
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile

VERSION = "0.2.80"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
TARGET = "llama-finetune"


def default_cache_dir() -> str:
    return os.environ.get("LORAFORGE_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "loraforge-bench")


def finetune_binary(cache_dir: str) -> str:
    return os.path.join(cache_dir, f"llama-cpp-python-{VERSION}-build", "bin", TARGET)


def _run(cmd: list[str], log) -> None:
    print("[build] " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}); see {log.name}")


def ensure_finetune(cache_dir: str | None = None, jobs: int | None = None) -> str:
    """The path of a built llama-finetune, building it first when it is not in the cache."""
    cache_dir = cache_dir or default_cache_dir()
    binary = finetune_binary(cache_dir)
    if os.access(binary, os.X_OK):
        return binary
    os.makedirs(cache_dir, exist_ok=True)
    log_path = os.path.join(cache_dir, f"build-{TARGET}.log")
    with open(log_path, "w", encoding="utf-8") as log:
        sdist = os.path.join(cache_dir, SDIST)
        if not os.path.exists(sdist):
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={VERSION}", "-d", cache_dir], log)
        source_root = os.path.join(cache_dir, f"llama_cpp_python-{VERSION}")
        source = os.path.join(source_root, "vendor", "llama.cpp")
        if not os.path.isdir(os.path.join(source, "examples", "finetune")):
            print(f"[build] unpacking {sdist}", flush=True)
            with tarfile.open(sdist) as tar:
                tar.extractall(cache_dir, filter="data")
        build = os.path.dirname(os.path.dirname(binary))
        _run(["cmake", "-S", source, "-B", build, "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF"], log)
        _run(["cmake", "--build", build, "--target", TARGET, "-j", str(jobs or os.cpu_count() or 1)], log)
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"the build finished but {binary} is missing; see {log_path}")
    return binary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=None, help="where the sdist, source and build go")
    p.add_argument("--jobs", type=int, default=None, help="parallel build jobs (default: all CPUs)")
    args = p.parse_args(argv)
    try:
        print(ensure_finetune(args.cache_dir, args.jobs))
    except (OSError, RuntimeError) as e:
        print(f"build_llamacpp_finetune.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
