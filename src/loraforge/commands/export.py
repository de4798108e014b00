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
    parser.add_argument("--to", choices=("gguf", "peft"), default=None,
                        help="output format (default: gguf for a .gguf/.bin name, else peft)")
    parser.add_argument("--model-base", "-m", metavar="PATH", default=None,
                        help="base model the adapter belongs to (GGUF or HF folder; default: the embedded model)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f32",
                        help="tensor type of the output (q8_0: GGUF only; default f32)")
    parser.add_argument("--base-name", default="", help="base_model_name_or_path written into a PEFT config")


def output_format(out: str, to: str | None) -> str:
    if to:
        return to
    return "gguf" if out.lower().endswith((".gguf", ".bin")) else "peft"


def run(args: argparse.Namespace) -> int:
    from loraforge.formats.adapters import load_adapter
    from loraforge.formats.ggla import dropped_norm_note
    from loraforge.loader import resolve_model_path
    from loraforge.merge import base_config

    fmt = output_format(args.out, args.to)
    if fmt == "peft" and args.outtype == "q8_0":
        raise LoraforgeError("--outtype q8_0 is only available for GGUF adapters (PEFT: f32, f16, bf16)")
    if os.path.abspath(args.out) == os.path.abspath(args.input):
        raise file_error(args.out, "is the input adapter; choose another output path")
    if fmt == "gguf":
        from loraforge.atomic import check_writable

        check_writable(args.out)
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        raise file_error(args.out, "exists and is not a folder (a PEFT adapter is a folder)")
    base = resolve_model_path(args.model_base)
    cfg, gguf_arch = base_config(base)
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

        write_peft(args.out, adapter, cfg, base_name=args.base_name or os.path.basename(base.rstrip("/")),
                   dtype=args.outtype)
    ranks = sorted({adapter.rank(m) for m in adapter.modules()})
    print(f"wrote {args.out} ({'GGUF LoRA' if fmt == 'gguf' else 'PEFT folder'}, {len(adapter.modules())} "
          f"modules, rank {'/'.join(map(str, ranks))}, alpha {adapter.alpha:g}"
          f"{', rsLoRA' if adapter.use_rslora else ''}, {args.outtype})")
    return 0
