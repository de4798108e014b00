"""Command-line entry: `loraforge <command> ...`.

Each subcommand lives in its own module under `loraforge.commands`, which
exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their command runs, so `loraforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from loraforge.errors import LoraforgeError

DESCRIPTION = ("loraforge: LoRA and QLoRA fine-tuning of llama-family language models on a CPU or a GPU, "
               "from a GGUF file (kept quantized) or a Hugging Face folder, with exact resume; adapters "
               "go out to llama.cpp (GGUF LoRA), Ollama and PEFT.")

# name -> (module under loraforge.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "finetune": ("finetune", "train a LoRA adapter (llama.cpp finetune flags, instruction datasets)"),
    "generate": ("generate", "generate text, optionally with several LoRA adapters mixed by scale"),
    "chat": ("chat", "chat with a model using its chat template or a training template"),
    "eval": ("evaluate", "loss and perplexity of a model (+adapters) on a text or dataset"),
    "export": ("export", "convert adapters between GGUF LoRA, PEFT and checkpoints"),
    "merge": ("merge", "merge adapters into a base model (GGUF or HF folder)"),
    "convert": ("convert", "convert a Hugging Face model folder to GGUF (llama.cpp, Ollama)"),
    "inspect": ("inspect", "describe a model, adapter or checkpoint file"),
    "plot": ("plot", "plot training and eval loss of one or more runs as a PNG"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Flags listed once with their aliases and one metavar (`-m, --model-base, --model PATH`),
    and every flag's default shown in its help (`(default: 4)`)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = list(dict.fromkeys(action.option_strings))  # an alias given twice is shown once
        if action.nargs == 0:
            return ", ".join(names)
        default = self._get_default_metavar_for_optional(action)
        return f"{', '.join(names)} {self._format_args(action, default)}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.nargs == 0:
            return text
        if action.default is None or action.default is argparse.SUPPRESS or action.default == []:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        if action.type is int:
            return "N"
        if action.type is float:
            return "X"
        return action.dest.upper()


class ArgumentParser(argparse.ArgumentParser):
    """An unknown flag is answered with the subcommand's own usage and the closest known flag."""

    def unknown_flags_error(self, extras: list[str]) -> None:
        known: dict[str, str] = {}  # every option string -> the action's first (main) name
        for action in self._actions:
            if action.help is argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                known.setdefault(option, action.option_strings[0])
        flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
        if not flags:
            self.error(f"unexpected argument(s): {' '.join(extras)}")
        parts = []
        for flag in flags:
            close = difflib.get_close_matches(flag, list(known), n=1, cutoff=0.6)
            parts.append(f"{flag} (did you mean {known[close[0]]}?)" if close else flag)
        self.error(f"unknown flag{'s' if len(flags) > 1 else ''}: {', '.join(parts)}")


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(f"loraforge.commands.{module_name}")


def command_parser(name: str) -> ArgumentParser:
    """The parser of one subcommand, with its arguments registered."""
    module = _load(name)
    usage = getattr(module, "USAGE", f"loraforge {name} [options]")
    parser = ArgumentParser(prog=f"loraforge {name}", usage=usage, description=COMMANDS[name][1],
                            formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return parser


def command_list() -> str:
    """`loraforge` alone / `--help`: what the tool is and each command in one line."""
    width = max(len(n) for n in COMMANDS) + 2
    lines = ["usage: loraforge COMMAND [options]", "", DESCRIPTION, "", "commands:"]
    lines += [f"  {name:<{width}}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `loraforge COMMAND --help` for a command's flags and their defaults.",
              "Other options: --version, --help"]
    return "\n".join(lines)


def _version() -> str:
    from loraforge import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _force_utf8_stdio()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(command_list())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"loraforge {_version()}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"loraforge: unknown command {name!r}{hint}\n\n{command_list()}", file=sys.stderr)
        return 2
    parser = command_parser(name)
    args, extras = parser.parse_known_args(argv[1:])
    if extras:
        parser.unknown_flags_error(extras)
    args.command = name
    try:
        return int(_load(name).run(args) or 0)
    except LoraforgeError as e:
        print(f"loraforge {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraforge {name}: interrupted", file=sys.stderr)
        return 130


def _force_utf8_stdio() -> None:
    """Read and write UTF-8 whatever the console's code page (Korean/Chinese text on a Windows
    console set to cp949/cp936/cp1252, or a POSIX shell under LANG=C)."""
    for stream in (sys.stdout, sys.stderr, sys.stdin):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and (stream.encoding or "").lower() not in ("utf-8", "utf8"):
            try:
                reconfigure(encoding="utf-8", errors="replace")
            except (ValueError, OSError):
                pass
