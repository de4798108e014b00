"""`loraforge generate`: continue a prompt, llama-cli style, with any number of LoRA adapters
applied unmerged at their scales (`--lora FILE`, `--lora-scaled FILE SCALE`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from loraforge.errors import LoraforgeError, file_error


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, adapter, context, device and sampling flags shared by `generate` and `chat`."""
    g = parser.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="PATH", default=None,
                   help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--lora", metavar="FILE", action="append", default=[],
                   help="LoRA adapter (GGUF, PEFT folder or checkpoint) at scale 1; repeatable")
    g.add_argument("--lora-scaled", metavar=("FILE", "SCALE"), nargs=2, action="append", default=[],
                   help="LoRA adapter at a user scale; repeatable; adapters add up")
    g.add_argument("-c", "--ctx-size", type=int, default=0,
                   help="context size in tokens (default 0: the model's, at most 4096)")
    g.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (auto: cuda when available)")
    g.add_argument("--base-dtype", default="auto", choices=("auto", "f32", "f16", "bf16", "quantized"),
                   help="how the base weights are held (default auto)")
    s = parser.add_argument_group("sampling (llama.cpp defaults and order)")
    s.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=40, help="top-k; 0 = off (default 40)")
    s.add_argument("--top-p", type=float, default=0.95, help="top-p; 1.0 = off (default 0.95)")
    s.add_argument("--min-p", type=float, default=0.05, help="min-p; 0 = off (default 0.05)")
    s.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty; 1.0 = off")
    s.add_argument("--repeat-last-n", type=int, default=64,
                   help="tokens the penalty looks back over (0 = off, -1 = whole context; default 64)")
    s.add_argument("-s", "--seed", type=int, default=-1, help="random seed (default -1: random)")
    s.add_argument("-n", "--n-predict", type=int, default=-1,
                   help="tokens to generate (default -1: until end of text or a full context)")
    s.add_argument("--special", action="store_true", help="show control tokens in the output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--prompt", default=None, help="prompt text")
    parser.add_argument("-f", "--file", metavar="FILE", default=None, help="read the prompt from a UTF-8 file")
    parser.add_argument("--no-display-prompt", action="store_true", help="do not echo the prompt")
    add_model_arguments(parser)


# -- shared helpers (also used by `chat`) -------------------------------------------------------

def check_common_arguments(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Validate flags before the model loads; the adapters as [(path, scale)] in flag order."""
    from loraforge.formats.adapters import parse_lora_args

    if args.n_predict < -1:
        raise LoraforgeError(f"-n/--n-predict must be >= 0, or -1 for no limit; got {args.n_predict}")
    if args.ctx_size < 0:
        raise LoraforgeError(f"--ctx-size must be >= 0 (0 = the model's), got {args.ctx_size}")
    if args.threads < 0:
        raise LoraforgeError(f"--threads must be >= 0, got {args.threads}")
    adapters = parse_lora_args(args.lora, args.lora_scaled)
    for path, _ in adapters:
        if not os.path.exists(path):
            raise file_error(path, "no such adapter file or folder")
    return adapters


def sampler_from_args(args: argparse.Namespace):
    from loraforge.generate import Sampler

    return Sampler(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                   seed=args.seed if args.seed >= 0 else None)


def load_for_generation(args: argparse.Namespace, adapters: list[tuple[str, float]]) -> tuple[Any, str]:
    """Set threads, load the model on the chosen device and attach the adapters.

    Returns the LoadedModel and a one-line summary for stderr (printed once all checks passed).
    """
    import torch

    from loraforge.generate import attach_adapters
    from loraforge.loader import load_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise LoraforgeError("--device cuda: no CUDA device is available to torch")
    if args.ctx_size > 0 or adapters:  # checked against the model's header before the weights load
        from loraforge.formats.adapters import load_adapters
        from loraforge.loader import resolve_model_path
        from loraforge.merge import base_config

        header_config = base_config(resolve_model_path(args.model))[0]
        if args.ctx_size > 0:
            check_context(args.ctx_size, header_config, "--ctx-size", kv_cache=True, device=device)
        load_adapters(adapters, header_config)  # a wrong adapter fails in seconds, not after the load
    t0 = time.perf_counter()
    loaded = load_model(args.model, base_dtype=args.base_dtype, device=device)
    attach_adapters(loaded.model, adapters, loaded.config)
    loaded.model.eval()
    names = ", ".join(f"{os.path.basename(p)} x{s:g}" for p, s in adapters) or "none"
    summary = (f"model: {loaded.source} ({loaded.base_dtype}, {device}); adapters: {names}; "
               f"load time {time.perf_counter() - t0:.1f} s")
    return loaded, summary


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.file is not None:
        raise LoraforgeError("give the prompt with -p or -f, not both")
    if args.file is None:
        return args.prompt or ""
    path = args.file
    if not os.path.exists(path):
        raise file_error(path, "no such prompt file")
    if os.path.isdir(path):
        raise file_error(path, "is a folder, expected a prompt text file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise file_error(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def context_size(args: argparse.Namespace, loaded: Any) -> int:
    from loraforge.generate import default_ctx_size

    if args.ctx_size > 0:
        check_context(args.ctx_size, loaded.config, "--ctx-size", kv_cache=True)
        return args.ctx_size
    return default_ctx_size(loaded.config)


def available_memory_bytes() -> int | None:
    """Memory the OS can still give this process (Linux MemAvailable, else free pages), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
    free = available_memory_bytes()
    if free is not None and need > free:
        from loraforge.atomic import human_bytes

        raise LoraforgeError(f"{what} need at least {human_bytes(need)}, more than the {human_bytes(free)} of "
                             f"memory available; lower {flag}" + ("" if kv_cache else " or --batch"))


# -- the command --------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from loraforge.generate import (MAX_TOKENS_TO_FINISH_CHARACTER, GenerationStats, generate_tokens,
                                    stream_text, write_utf8)

    adapters = check_common_arguments(args)
    prompt = read_prompt(args)
    settings = sampler_from_args(args)
    loaded, summary = load_for_generation(args, adapters)
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(prompt)
    if not ids:
        raise LoraforgeError("the prompt is empty and the model adds no BOS token: give -p or -f")
    print(summary, file=sys.stderr)
    stats = GenerationStats()
    if prompt and not args.no_display_prompt:
        write_utf8(sys.stdout, prompt)
    # -n N: N tokens, plus the few more that finish a character cut in half at the limit
    limit = args.n_predict if args.n_predict >= 0 else None
    n_predict = args.n_predict + MAX_TOKENS_TO_FINISH_CHARACTER if limit is not None else -1
    tokens = generate_tokens(loaded.model, ids, n_predict, settings, tokenizer.eot_ids,
                             context_size(args, loaded), stats=stats)
    for chunk in stream_text(tokenizer, tokens, skip_special=not args.special, limit=limit):
        write_utf8(sys.stdout, chunk)
    write_utf8(sys.stdout, "\n")
    ending = {"eos": "[end of text]", "context": "[context full]", "length": ""}[stats.stop_reason]
    if ending:
        print(ending, file=sys.stderr)
    print(stats.report(), file=sys.stderr)
    return 0
