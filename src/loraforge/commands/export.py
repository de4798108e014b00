"""`loraforge export`: convert an adapter between formats.

  loraforge export --in lora.gguf --out peft_dir --to peft
  loraforge export --in peft_dir --out lora.gguf --to gguf --model-base base.gguf --outtype f16
  loraforge export --in lora-...-LATEST.bin --out lora.gguf   (old llama.cpp finetune adapter)

Any adapter (GGUF LoRA, PEFT folder, loraforge checkpoint, old ggla .bin) is accepted as input;
the base model gives the architecture, shapes and the q/k head counts.
"""

from __future__ import annotations

import argparse
import os
import sys

from loraforge.errors import LoraforgeError, file_error

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", metavar="PATH", required=True,
                        help="adapter to convert: GGUF LoRA, PEFT folder, checkpoint or old ggla .bin")
    parser.add_argument("--out", metavar="PATH", required=True,
                        help="output: a .gguf file (GGUF LoRA) or a folder (PEFT)")
    parser.add_argument("--to", choices=("gguf", "peft", "ollama"), default=None,
                        help="output format (default: gguf for a .gguf/.bin name, else peft); ollama: a GGUF "
                             "LoRA plus a Modelfile (FROM the base GGUF, ADAPTER this file)")
    parser.add_argument("--model-base", "-m", metavar="PATH", default=None,
                        help="base model the adapter belongs to (GGUF or HF folder; default: a PEFT adapter's "
                             "base_model_name_or_path when it is a local path, else the embedded model)")
    parser.add_argument("--base-gguf", metavar="FILE", default=None,
                        help="--to ollama with an HF base: the base as GGUF for the Modelfile's FROM (converted "
                             "there, f16, when the file does not exist yet)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f32",
                        help="tensor type of the output (q8_0: GGUF only; default f32)")
    parser.add_argument("--base-name", default="", help="base_model_name_or_path written into a PEFT config")
    from loraforge.commands.convert import add_ollama_arguments

    add_ollama_arguments(parser)


def output_format(out: str, to: str | None) -> str:
    if to:
        return to
    return "gguf" if out.lower().endswith((".gguf", ".bin")) else "peft"


def adapter_base(adapter_path: str, model_base: str | None) -> str:
    """The base model path: -m, else a PEFT adapter's base_model_name_or_path when it exists locally,
    else (for other adapter formats) the embedded model. A PEFT adapter never silently gets the
    embedded model: its base is named in the error instead."""
    import json

    from loraforge.formats.adapters import detect_format
    from loraforge.loader import resolve_model_path

    if model_base:
        return resolve_model_path(model_base)
    if detect_format(adapter_path) == "peft":
        folder = adapter_path if os.path.isdir(adapter_path) else os.path.dirname(os.path.abspath(adapter_path))
        try:
            with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
                named = json.load(f).get("base_model_name_or_path")
        except (OSError, ValueError):
            named = None
        if isinstance(named, str) and named and os.path.exists(named):
            return named
        hint = f" (its adapter_config.json names {named!r}, which is not a local path)" if named else ""
        raise file_error(adapter_path, f"converting a PEFT adapter needs its base model{hint}: pass -m/--model-base "
                                       "with the base's HF folder or GGUF file")
    return resolve_model_path(None)


def run(args: argparse.Namespace) -> int:
    from loraforge.formats.adapters import load_adapter
    from loraforge.formats.ggla import dropped_norm_note
    from loraforge.merge import base_config

    ollama = args.to == "ollama" or args.ollama
    if args.to == "ollama":
        args.to = "gguf"
    fmt = output_format(args.out, args.to)
    if ollama and fmt != "gguf":
        raise LoraforgeError("--ollama needs a GGUF adapter (--to gguf or ollama)")
    if fmt == "peft" and args.outtype == "q8_0":
        raise LoraforgeError("--outtype q8_0 is only available for GGUF adapters (PEFT: f32, f16, bf16)")
    if os.path.abspath(args.out) == os.path.abspath(args.input):
        raise file_error(args.out, "is the input adapter; choose another output path")
    if fmt == "gguf":
        from loraforge.atomic import check_writable

        check_writable(args.out)
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        raise file_error(args.out, "exists and is not a folder (a PEFT adapter is a folder)")
    if not os.path.exists(args.input):
        raise file_error(args.input, "no such adapter file or folder")
    base = adapter_base(args.input, args.model_base)
    cfg, gguf_arch = base_config(base)
    modelfile = _plan_ollama(args, base) if ollama else None
    adapter = load_adapter(args.input, cfg)
    note = dropped_norm_note(adapter)
    if note:
        print(note, file=sys.stderr)
    if fmt == "gguf":
        from loraforge.formats.gguf_lora import write_gguf_adapter

        if args.out.lower().endswith(".bin"):
            print(f"note: {args.out} is written in GGUF format (llama.cpp no longer loads the old ggla .bin "
                  "format)", file=sys.stderr)
        write_gguf_adapter(args.out, adapter, cfg, gguf_arch, args.outtype)
    else:
        from loraforge.formats.peft import write_peft

        write_peft(args.out, adapter, cfg, base_name=args.base_name or base, dtype=args.outtype)
    ranks = sorted({adapter.rank(m) for m in adapter.modules()})
    print(f"wrote {args.out} ({'GGUF LoRA' if fmt == 'gguf' else 'PEFT folder'}, {len(adapter.modules())} "
          f"modules, rank {'/'.join(map(str, ranks))}, alpha {adapter.alpha:g}"
          f"{', rsLoRA' if adapter.use_rslora else ''}, {args.outtype})")
    if modelfile is not None:
        modelfile()
    return 0


def _plan_ollama(args: argparse.Namespace, base: str):
    """Check the Modelfile's inputs before any work; return the function writing base GGUF (if needed) + Modelfile."""
    from loraforge.formats.ollama import modelfile_for_model

    if os.path.isdir(base):
        if not args.base_gguf:
            raise LoraforgeError("--to ollama with an HF base folder needs --base-gguf FILE: the base as GGUF for the "
                                 "Modelfile's FROM (an existing converted file, or where to convert it)")
        base_gguf = args.base_gguf
        if not os.path.exists(base_gguf):  # converted at the end: refuse a base llama.cpp cannot hold now
            from loraforge.formats.convert import convertible_config

            convertible_config(base)
    else:
        base_gguf = base
    write_modelfile = modelfile_for_model(gguf_path=args.out, tokenizer_source=base, template_spec=args.prompt_template,
                                          ollama_template=args.ollama_template, system=args.system,
                                          modelfile_path=args.modelfile, adapter_path=args.out, base_gguf=base_gguf)

    def write() -> None:
        if not os.path.exists(base_gguf):
            from loraforge.formats.convert import convert_hf_to_gguf

            convert_hf_to_gguf(base, base_gguf, "f16")
            print(f"wrote {base_gguf} (the base as GGUF, f16)")
        write_modelfile()

    return write
