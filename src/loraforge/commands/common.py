"""Flags shared by several commands (model, adapters, device, threads, base dtype) and the
one place that turns them into a loaded model."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from loraforge.errors import LoraforgeError

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


def check_context(tokens: int, cfg: Any, flag: str, kv_cache: bool = False, batch: int = 1,
                  device: str = "cpu") -> None:
    """One line, before any memory is spent, when `tokens` (a --ctx / --ctx-size value) is longer than
    the model's context or clearly cannot fit in memory: the KV cache (L, 2, G, tokens, D) float32
    for generation, or (batch, tokens) activations (4 hidden + 3 feed-forward wide, float32) for eval."""
    limit = cfg.max_position_embeddings
    if limit and tokens > limit:
        raise LoraforgeError(f"{flag} {tokens} is above the model's context length {limit}")
    if device != "cpu":
        return
    if kv_cache:
        need = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * tokens * 4
        what = f"the KV cache for {flag} {tokens}"
    else:
        need = batch * tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4
        what = f"the activations of {batch} x {tokens} tokens"
    from loraforge.runtime import available_memory_bytes

    free = available_memory_bytes()
    if free is not None and need > free:
        from loraforge.atomic import human_bytes

        raise LoraforgeError(f"{what} need at least {human_bytes(need)}, more than the {human_bytes(free)} of "
                             f"memory available; lower {flag}" + ("" if kv_cache else " or --batch"))


def load_with_adapters(args: argparse.Namespace, adapters: list[tuple[str, float]],
                       context: tuple[int, str, dict[str, Any]] | None = None) -> tuple[Any, str]:
    """Threads, device, model and unmerged adapters from the shared flags.

    Before the weights load, the model's header is read to check `context` ((tokens, flag, options
    for check_context)) and the adapters' shapes, so a wrong value fails in seconds.
    Returns the LoadedModel and a one-line summary for stderr.
    """
    from loraforge.generate import attach_adapters
    from loraforge.loader import load_model, resolve_model_path
    from loraforge.runtime import resolve_device, set_threads

    set_threads(args.threads)
    device = resolve_device(args.device)
    if context is not None or adapters:
        from loraforge.formats.adapters import load_adapters
        from loraforge.merge import base_config

        header_config = base_config(resolve_model_path(args.model))[0]
        if context is not None:
            tokens, flag, options = context
            check_context(tokens, header_config, flag, device=device.type, **options)
        load_adapters(adapters, header_config)
    started = time.perf_counter()
    loaded = load_model(args.model, base_dtype=args.base_dtype, device=device)
    attach_adapters(loaded.model, adapters, loaded.config)
    loaded.model.eval()
    names = ", ".join(f"{os.path.basename(p.rstrip('/'))} x{s:g}" for p, s in adapters) or "none"
    summary = (f"model: {loaded.source} ({loaded.base_dtype}, {device}); adapters: {names}; "
               f"load time {time.perf_counter() - started:.1f} s")
    return loaded, summary
