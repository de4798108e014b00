"""`loraforge merge`: bake adapters into a base model.

  loraforge merge -m base.gguf --lora a.gguf --lora-scaled b_peft_dir 0.5 -o merged.gguf --outtype q8_0
  loraforge merge -m base.gguf --lora a.gguf -o merged_hf_dir --to hf

The output keeps the base's metadata (tokenizer, chat template, ...). GGUF output types: f32,
f16, bf16, q8_0, or `same` (each tensor keeps the base's type; untouched tensors are copied
byte for byte). HF output: f32, f16, bf16 or same.
"""

from __future__ import annotations

import argparse
import os

from loraforge.errors import LoraforgeError, file_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model-base", metavar="PATH", default=None,
                        help="base model, GGUF file or HF folder (default: the embedded model)")
    parser.add_argument("--lora", metavar="FILE", action="append", default=[],
                        help="adapter (GGUF, PEFT folder, checkpoint, ggla .bin) at scale 1; repeatable")
    parser.add_argument("--lora-scaled", metavar=("FILE", "SCALE"), nargs=2, action="append", default=[],
                        help="adapter at a user scale; repeatable")
    parser.add_argument("-o", "--out", metavar="PATH", required=True,
                        help="merged model: a .gguf file or an HF folder")
    parser.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0", "same"), default="same",
                        help="tensor type of the merged model (default: same as the base)")
    parser.add_argument("--to", choices=("gguf", "hf"), default=None,
                        help="output format (default: gguf for a .gguf name, else hf)")
    from loraforge.commands.convert import add_ollama_arguments

    add_ollama_arguments(parser)


def output_format(out: str, to: str | None) -> str:
    if to:
        return to
    return "gguf" if out.lower().endswith(".gguf") else "hf"


def run(args: argparse.Namespace) -> int:
    from loraforge.formats.adapters import load_adapters, parse_lora_args
    from loraforge.loader import resolve_model_path
    from loraforge.merge import base_config, merge_to_gguf, merge_to_hf

    specs = parse_lora_args(args.lora, args.lora_scaled)
    fmt = output_format(args.out, args.to)
    if fmt == "hf" and args.outtype == "q8_0":
        raise LoraforgeError("--outtype q8_0 is only available for GGUF output (HF: f32, f16, bf16, same)")
    base = resolve_model_path(args.model_base)
    if os.path.abspath(args.out) == os.path.abspath(base):
        raise file_error(args.out, "is the base model; choose another output path")
    if fmt == "gguf":
        from loraforge.atomic import check_writable

        check_writable(args.out)
        if os.path.isdir(base):  # an HF base: converted to GGUF with the adapters merged, streamed
            from loraforge.commands.convert import convert_folder

            from loraforge.formats.convert import native_outtype

            outtype = native_outtype(base) if args.outtype == "same" else args.outtype
            summary = convert_folder(base, args.out, outtype, specs, args)
            print(f"wrote {args.out} (GGUF {summary['arch']} from an HF base, {summary['tensors']} tensors, "
                  f"{summary['changed']} changed by {len(specs)} adapter(s), {outtype})")
            return 0
    cfg, _ = base_config(base)
    adapters = load_adapters(specs, cfg)
    labels = [f"{os.path.basename(p.rstrip('/'))} x{s:g}" for p, s in specs]
    if fmt == "gguf":
        from loraforge.commands.convert import plan_modelfile

        write_modelfile = plan_modelfile(args, base, args.out)
        summary = merge_to_gguf(base, adapters, args.out, args.outtype, labels=labels)
        print(f"wrote {args.out} (GGUF, {summary['tensors']} tensors, {summary['changed']} changed by "
              f"{len(adapters)} adapter(s), {args.outtype})")
        if write_modelfile is not None:
            write_modelfile()
    else:
        summary = merge_to_hf(base, adapters, args.out, args.outtype)
        print(f"wrote {args.out} (HF folder, {summary['changed']} tensors changed by {len(adapters)} "
              f"adapter(s), {args.outtype}{', untied output layer' if summary['untied'] else ''})")
    return 0
