"""`loraforge generate`: continue a prompt, llama-cli style, with any number of LoRA adapters
applied unmerged at their scales (`--lora FILE`, `--lora-scaled FILE SCALE`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from loraforge.commands.common import add_adapter_flags, add_model_flag, add_runtime_flags
from loraforge.errors import LoraforgeError, file_error


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, adapter, context, device and sampling flags shared by `generate` and `chat`."""
    g = parser.add_argument_group("model")
    add_model_flag(g)
    add_adapter_flags(g)
    g.add_argument("-c", "--ctx-size", type=int, default=0,
                   help="context size in tokens (default 0: the model's, at most 4096)")
    add_runtime_flags(g)
    s = parser.add_argument_group("sampling (llama.cpp defaults and order)")
    s.add_argument("--temp", "--temperature", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
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
    parser.add_argument("--template", metavar="NAME|FILE", default=None,
                        help="format the prompt as an instruction the way finetune's --template trained it "
                             "(alpaca, chatml, model, raw or a template file); default: plain text")
    parser.add_argument("--system", default=None, help="system text for --template")
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
    from loraforge.commands.common import load_with_adapters

    context = (args.ctx_size, "--ctx-size", {"kv_cache": True}) if args.ctx_size > 0 else None
    return load_with_adapters(args, adapters, context)


def template_from_args(args: argparse.Namespace, tokenizer: Any):
    """The `--template` as a data.templates.Template, or None for plain text / the model's chat template."""
    if not getattr(args, "template", None):
        return None
    from loraforge.data.templates import get_template

    return get_template(args.template, tokenizer)


def check_template_flag(args: argparse.Namespace) -> None:
    """A --template that names neither a template nor a file fails before the model loads."""
    from loraforge.data.templates import TEMPLATE_NAMES

    spec = getattr(args, "template", None)
    if spec and spec not in TEMPLATE_NAMES and not os.path.isfile(spec):
        raise LoraforgeError(f"--template: {spec!r} is neither a template name ({', '.join(TEMPLATE_NAMES)}) "
                             "nor an existing file")


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
        from loraforge.commands.common import check_context

        check_context(args.ctx_size, loaded.config, "--ctx-size", kv_cache=True)
        return args.ctx_size
    return default_ctx_size(loaded.config)


# -- the command --------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from loraforge.generate import (MAX_TOKENS_TO_FINISH_CHARACTER, GenerationStats, generate_tokens,
                                    stream_text, write_utf8)

    adapters = check_common_arguments(args)
    check_template_flag(args)
    if args.system is not None and not args.template:
        raise LoraforgeError("--system needs --template (plain-text generation has no system part)")
    prompt = read_prompt(args)
    settings = sampler_from_args(args)
    loaded, summary = load_for_generation(args, adapters)
    tokenizer = loaded.tokenizer
    template = template_from_args(args, tokenizer)
    if template is not None:
        from loraforge.data.instruct import prompt_token_ids

        ids = prompt_token_ids(template, tokenizer, [{"role": "user", "content": prompt}], args.system)
        shown = tokenizer.decode([i for i in ids if i != tokenizer.bos_id])
    else:
        ids = tokenizer.encode(prompt)
        shown = prompt
    if not ids:
        raise LoraforgeError("the prompt is empty and the model adds no BOS token: give -p or -f")
    print(summary, file=sys.stderr)
    stats = GenerationStats()
    if shown and not args.no_display_prompt:
        write_utf8(sys.stdout, shown)
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
