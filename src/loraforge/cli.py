"""Command-line entry: `loraforge <command> ...`.

Each subcommand lives in its own module under `loraforge.commands`, which
exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their command runs, so `loraforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loraforge.errors import LoraforgeError

# name -> (module under loraforge.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "finetune": ("finetune", "train a LoRA adapter (llama.cpp finetune flags, instruction datasets)"),
    "generate": ("generate", "generate text, optionally with several LoRA adapters mixed by scale"),
    "chat": ("chat", "chat with a model using its chat template"),
    "export": ("export", "convert adapters between GGUF LoRA, PEFT and checkpoints"),
    "merge": ("merge", "merge adapters into a base model (GGUF or HF folder)"),
    "convert": ("convert", "convert a Hugging Face model folder to GGUF (llama.cpp, Ollama)"),
    "inspect": ("inspect", "describe a model, adapter or checkpoint file"),
    "eval": ("evaluate", "loss and perplexity of a model (+adapters) on a text or dataset"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(f"loraforge.commands.{module_name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s own arguments are registered."""
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"loraforge {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _load(name).add_arguments(p)
    return parser


def _version() -> str:
    from loraforge import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _force_utf8_stdio()
    try:
        return int(_load(args.command).run(args) or 0)
    except LoraforgeError as e:
        print(f"loraforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraforge {args.command}: interrupted", file=sys.stderr)
        return 130


def _force_utf8_stdio() -> None:
    """Write UTF-8 whatever the console's locale (Korean/Chinese output on Windows)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and (stream.encoding or "").lower() not in ("utf-8", "utf8"):
            try:
                reconfigure(encoding="utf-8", errors="replace")
            except (ValueError, OSError):
                pass
