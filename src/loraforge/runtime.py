"""Process-level settings shared by the commands: device choice, CPU threads, peak memory.

Portable to Linux, macOS and Windows: POSIX-only modules (`resource`) are imported inside a
function and only where they exist; psutil covers Windows.
"""

from __future__ import annotations

import os
import sys

import torch

from loraforge.errors import LoraforgeError


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when torch sees one, else CPU), `cpu`, `cuda` or `cuda:N`; one-line errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoraforgeError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LoraforgeError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise LoraforgeError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LoraforgeError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads for torch's intra-op work (None or 0: torch's default)."""
    if threads is None or threads == 0:
        return
    if threads < 0:
        raise LoraforgeError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (0 when the platform cannot tell).

    Linux: VmHWM from /proc; macOS and other POSIX systems: getrusage (bytes on macOS,
    KiB elsewhere); Windows: psutil's peak working set.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        resource = None  # type: ignore[assignment]
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    try:
        import psutil
    except ImportError:
        return 0
    info = psutil.Process(os.getpid()).memory_info()
    return int(getattr(info, "peak_wset", 0) or info.rss)


def available_memory_bytes() -> int | None:
    """Memory the OS can still give this process (Linux MemAvailable, else psutil), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def peak_memory_text(device: torch.device) -> str:
    """"peak RSS N MiB" (+ the CUDA allocator's peak reservation on a GPU)."""
    text = f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB"
    if device.type == "cuda":
        text += f", max GPU reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB"
    return text
