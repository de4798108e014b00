"""Quantization throughput: loraforge's torch quantizers against llama.cpp's C reference, one run.

For each type, a float32 matrix of a 7B model's shape (default 4096 x 4096, normal weights with
a few outliers) is encoded by `loraforge.quant.quantize.quantize_tensor` and by llama.cpp's
`ggml_quantize_chunk` (the function llama-quantize calls, loaded from llama-cpp-python's
libggml; single-threaded, as one llama-quantize worker), best of --repeat runs each. The bytes
are compared too. Throughput is MB/s of float32 input; the 7B column extrapolates to a
Llama-2-7B (6.74e9 weights) quantized entirely in that type.

  python bench/quantize_speed.py                         # all types, torch's default threads
  python bench/quantize_speed.py --threads 1 --types Q4_K,Q6_K --rows 1024
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ensure_loraforge_importable, header  # noqa: E402

WEIGHTS_7B = 6.74e9


def llama_cpp_quantizer():
    """ggml_quantize_chunk(type, x) -> bytes, or None without llama-cpp-python."""
    try:
        from llama_cpp._ggml import libggml
    except ImportError:
        return None
    fn = libggml.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]

    def quantize(qtype: int, x: np.ndarray, row_bytes: int) -> np.ndarray:
        out = np.empty((x.shape[0], row_bytes), dtype=np.uint8)
        fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return quantize


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--types", default="Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--markdown-out", default=None)
    args = parser.parse_args()
    ensure_loraforge_importable()
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from loraforge.quant.quantize import quantize_tensor

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32) * 0.02
    x[rng.random(x.shape) < 0.002] *= 20
    xt = torch.from_numpy(x)
    reference = llama_cpp_quantizer()
    mb = x.nbytes / 1e6
    lines = ["| type | loraforge MB/s | llama.cpp (1 thread) MB/s | ratio | 7B in this type, loraforge "
             "| bytes equal |",
             "|---|---:|---:|---:|---:|---|"]
    for name in args.types.split(","):
        qtype = GGMLQuantizationType[name.strip().upper()]
        ours_s, ours = best_time(lambda: quantize_tensor(xt, qtype), args.repeat)
        block, size = GGML_QUANT_SIZES[qtype]
        theirs_s, equal = float("nan"), "-"
        if reference is not None:
            theirs_s, theirs = best_time(lambda: reference(qtype, x, args.cols // block * size), args.repeat)
            equal = "yes" if np.array_equal(ours, theirs) else "NO"
        full_s = WEIGHTS_7B * 4 / 1e6 / (mb / ours_s)
        lines.append(f"| {qtype.name} | {mb / ours_s:.1f} | {mb / theirs_s:.1f} | {theirs_s / ours_s:.2f} | "
                     f"{full_s / 60:.1f} min | {equal} |")
        print(lines[-1], flush=True)
    head = header([f"input: {args.rows} x {args.cols} float32 ({mb:.0f} MB), torch threads "
                   f"{torch.get_num_threads()}, best of {args.repeat}"])
    text = "\n".join(["- " + h for h in head] + [""] + lines)
    print("\n" + text)
    if args.markdown_out:
        with open(args.markdown_out, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
