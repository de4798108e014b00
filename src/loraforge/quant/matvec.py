"""The one-row product of quantized layers (decoding a token), from `matvec.c`.

torch has no kernel for x @ W^T with W held as int8 values and float16 group factors (its
int4/int8 weight-only CPU kernels want per-channel or bfloat16 factors), and decoding W into
float32 for every token costs more than the product itself. `matvec.c` is built at first use
with the system C compiler (`$CC`, else `cc`) into a per-user cache folder
($LORAFORGE_CACHE, else ~/.cache/loraforge) and called through ctypes. Where no compiler works
the callers decode instead (`available()` is False, with the reason in `unavailable_reason`).

Measured on SmolLM2-135M Q4_1 (its 211 matrices, 134.5M weights, one row each, one thread, CPU
time on a shared 2-core AVX-512 machine): this kernel 10.6-11.7 ms, the same sums compiled by
torch.compile (Inductor) 18.8-22 ms, decode-then-multiply 44-53 ms, and the float32 model's own
matmuls 33-35 ms. On the 49152 x 576 LM head alone it reads 21.8 G weights/s.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from importlib import resources

import torch

_SOURCE = "matvec.c"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_FLAGS_NO_OPENMP = ("-O3", "-march=native", "-shared", "-fPIC")  # e.g. Apple's clang: one thread


class _Library:
    def __init__(self) -> None:
        self.function = None
        self.decode = None
        self.unavailable_reason = ""
        self._tried = False

    def load(self):
        """The ctypes function, building the library on first use; None where that fails."""
        if not self._tried:
            self._tried = True
            try:
                self.function, self.decode = _build_and_load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                self.unavailable_reason = str(e)
        return self.function


_library = _Library()


def _cache_dir() -> str:
    return os.environ.get("LORAFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loraforge")


def _build_and_load():
    if not sys.platform.startswith("linux") and sys.platform != "darwin":
        raise RuntimeError(f"no build recipe for {sys.platform}")
    source = (resources.files("loraforge.quant") / _SOURCE).read_bytes()
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(source + " ".join((compiler,) + _FLAGS).encode()).hexdigest()[:16]
    folder = _cache_dir()
    path = os.path.join(folder, f"loraforge_matvec_{key}.so")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = os.path.join(tmp, _SOURCE)
            with open(src, "wb") as f:
                f.write(source)
            out = os.path.join(tmp, "lib.so")
            for flags in (_FLAGS, _FLAGS_NO_OPENMP):
                proc = subprocess.run([compiler, *flags, src, "-o", out], capture_output=True, text=True,
                                      timeout=120)
                if proc.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[:300]}")
            os.replace(out, path)  # atomic: concurrent builders never see a half-written library
    lib = ctypes.CDLL(path)
    fn = lib.loraforge_split_matvec
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    decode = lib.loraforge_split_decode
    decode.restype = ctypes.c_int
    decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return fn, decode


def available() -> bool:
    return _library.load() is not None


def unavailable_reason() -> str:
    return _library.unavailable_reason


def split_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
                 ) -> torch.Tensor | None:
    """y (R,) float32 = (q * scale (+ offset)) @ x for x (G * S,) float32, q (R, G, S) int8 with
    S 16 or 32, scale / offset (R, G, 1) float16 or float32 on the CPU; None when not applicable."""
    fn = _library.load()
    if fn is None or q.dim() != 3 or q.shape[2] not in (16, 32) or scale.dtype not in (torch.float16, torch.float32):
        return None
    if offset is not None and offset.dtype != scale.dtype:
        return None
    if not (q.is_contiguous() and scale.is_contiguous() and (offset is None or offset.is_contiguous())):
        return None
    x = x.contiguous()
    rows, groups, size = q.shape
    y = torch.empty(rows, dtype=torch.float32)
    rc = fn(q.data_ptr(), scale.data_ptr(), None if offset is None else offset.data_ptr(), scale.element_size(),
            x.data_ptr(), y.data_ptr(), rows, groups, size, torch.get_num_threads())
    return y if rc == 0 else None


def split_decode(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> bool:
    """out (R, G, S) float32 = q * scale (+ offset), bit-identical to torch's multiply then add, in one
    pass over the int8 values; q (R, G, S) int8 with S 16 or 32, scale / offset (R, G, 1) float16 or
    float32, all contiguous on the CPU. False (out untouched) when not applicable."""
    _library.load()
    fn = _library.decode
    if (fn is None or q.dim() != 3 or q.shape[2] not in (16, 32) or scale.dtype not in (torch.float16, torch.float32)
            or out.dtype != torch.float32 or out.shape != q.shape or q.device.type != "cpu"):
        return False
    if offset is not None and offset.dtype != scale.dtype:
        return False
    if not all(t.is_contiguous() for t in (out, q, scale) + (() if offset is None else (offset,))):
        return False
    rows, groups, size = q.shape
    rc = fn(q.data_ptr(), scale.data_ptr(), None if offset is None else offset.data_ptr(), scale.element_size(),
            out.data_ptr(), rows * groups, size, torch.get_num_threads())
    return rc == 0
