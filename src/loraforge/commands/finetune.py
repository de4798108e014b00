"""`loraforge finetune`: llama.cpp finetune's flags and files, plus instruction tuning.

Plain text (the default, llama.cpp style): token windows of --ctx over the whole file.
A .json/.jsonl/.csv/.parquet --train-data is an instruction/chat dataset (see data/).

The flags are made from the run spec (`train/spec.py`): each spec field is one flag (with its
aliases) and one config key. `--config FILE` reads a YAML/JSON file of those keys; flags given
on the command line override it; `--print-config` writes the effective spec and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from loraforge.train.spec import RunSpec

GROUP_TITLES = {
    "model": "model and run", "lora": "LoRA (llama.cpp --rank-* names too)", "data": "training data",
    "optimizer": "optimizer and schedule (llama.cpp names, HF aliases)", "loop": "loop",
    "outputs": "files (llama.cpp finetune names)", "logging": "tracking",
}


def _python_type(annotation: str) -> type | None:
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            return kind
    return None


def _default_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if value == "" else str(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from loraforge.train.spec import sections, spec_fields

    p.add_argument("--config", metavar="FILE", default=None,
                   help="read settings from a YAML or JSON file (flags given here override it)")
    p.add_argument("--print-config", metavar="FILE", nargs="?", const="-", default=None,
                   help="write the effective settings as YAML (to FILE, or stdout) and exit")
    groups = {s.name: p.add_argument_group(GROUP_TITLES[s.name]) for s in sections()}
    for name, (section, f) in spec_fields().items():
        meta, g = f.metadata, groups[section]
        kind = _python_type(str(f.type))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = _default_text(default)
        help_text = meta["help"] + (f" (default: {shown}; config key {name})" if shown
                                    else f" (config key {name})")
        common = dict(dest=name, default=argparse.SUPPRESS)
        if kind is bool:
            g.add_argument(*meta["flags"], action="store_true", help=help_text, **common)
            if meta["negative"]:
                g.add_argument(meta["negative"], action="store_false", help=f"turn {meta['flags'][0]} off",
                               **common)
            for alias in meta["hidden"]:
                g.add_argument(alias, action="store_true", help=argparse.SUPPRESS, **common)
            continue
        g.add_argument(*meta["flags"], type=kind, choices=meta["choices"], metavar=meta["metavar"],
                       help=help_text, **common)
        for alias in meta["hidden"]:
            g.add_argument(alias, type=kind, help=argparse.SUPPRESS, **common)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run spec from --config and the flags given on the command line (which win)."""
    from loraforge.train.spec import build_spec, flatten_config, read_config_file, spec_fields

    file_values = flatten_config(read_config_file(args.config), args.config) if args.config else {}
    flag_values = {name: (getattr(args, name), f.metadata["flags"][0])
                   for name, (_, f) in spec_fields().items() if hasattr(args, name)}
    return build_spec(file_values, flag_values)


def run(args: argparse.Namespace) -> int:
    from loraforge.train.spec import to_yaml

    spec = spec_from_args(args)
    if args.print_config is not None:
        text = to_yaml(spec)
        if args.print_config == "-":
            sys.stdout.write(text)
        else:
            from loraforge.atomic import atomic_path

            with atomic_path(args.print_config) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"finetune: wrote the run spec to {args.print_config}", file=sys.stderr)
        return 0
    from loraforge.train.finetune import run_finetune

    return run_finetune(spec)
