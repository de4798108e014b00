"""Flags shared by several commands (model, adapters, device, threads, base dtype) and the
one place that turns them into a loaded model."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

BASE_DTYPE_CHOICES = ("auto", "f32", "f16", "bf16", "quantized")


def add_model_flag(parser: argparse.ArgumentParser | Any, *names: str) -> None:
    """The base model: a GGUF file or an HF folder (default: the embedded SmolLM2)."""
    parser.add_argument(*(names or ("-m", "--model")), dest="model", metavar="PATH", default=None,
                        help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")


def add_adapter_flags(parser: argparse.ArgumentParser | Any) -> None:
    """`--lora FILE` (scale 1) and `--lora-scaled FILE SCALE`, both repeatable."""
    parser.add_argument("--lora", metavar="FILE", action="append", default=[],
                        help="LoRA adapter (GGUF LoRA, PEFT folder, checkpoint or old ggla .bin) at scale 1; "
                             "repeatable")
    parser.add_argument("--lora-scaled", metavar=("FILE", "SCALE"), nargs=2, action="append", default=[],
                        help="LoRA adapter at a user scale; repeatable; adapters add up")


def add_runtime_flags(parser: argparse.ArgumentParser | Any, base_dtype: bool = True) -> None:
    """`-t/--threads`, `--device` and (for commands that load a base) `--base-dtype`."""
    parser.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (0: all cores, torch's default)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N")
    if base_dtype:
        parser.add_argument("--base-dtype", default="auto", choices=BASE_DTYPE_CHOICES,
                            help="how the base weights are held: kept quantized (a GGUF's blocks), or "
                                 "dequantized to f32/f16/bf16; auto keeps a large quantized GGUF quantized")


def load_with_adapters(args: argparse.Namespace, adapters: list[tuple[str, float]]) -> tuple[Any, str]:
    """Threads, device, model and unmerged adapters from the shared flags.

    Returns the LoadedModel and a one-line summary for stderr.
    """
    from loraforge.generate import attach_adapters
    from loraforge.loader import load_model
    from loraforge.runtime import resolve_device, set_threads

    set_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    loaded = load_model(args.model, base_dtype=args.base_dtype, device=device)
    attach_adapters(loaded.model, adapters, loaded.config)
    loaded.model.eval()
    names = ", ".join(f"{os.path.basename(p.rstrip('/'))} x{s:g}" for p, s in adapters) or "none"
    summary = (f"model: {loaded.source} ({loaded.base_dtype}, {device}); adapters: {names}; "
               f"load time {time.perf_counter() - started:.1f} s")
    return loaded, summary
