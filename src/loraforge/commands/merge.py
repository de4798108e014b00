"""`loraforge merge`: bake adapters into a base model.

  loraforge merge -m base.gguf --lora a.gguf --lora-scaled b_peft_dir 0.5 -o merged.gguf --outtype q8_0
  loraforge merge -m base.gguf --lora a.gguf -o merged_hf_dir --to hf

  loraforge merge -m base-f16.gguf --lora a.gguf -o merged-Q4_K_M.gguf --outtype q4_k_m

The output keeps the base's metadata (tokenizer, chat template, ...). GGUF output types:
- auto (default): untouched tensors are copied byte for byte, changed matrices keep the base's
  type when it is F32/F16/BF16/Q8_0 and become Q8_0 otherwise (re-quantizing a small adapter
  change into Q4_1 or Q4_K would round most of it away);
- same: every tensor keeps the base's type;
- a llama-quantize type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m,
  q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (llama.cpp's per-tensor mix, byte for byte what
  llama-quantize writes from the same float32 weights), or q3_k, q4_k, q5_k (every matrix in that type).
After the merge, how much of the adapters' change the written tensors keep is reported on stderr.
HF output: auto/same (the base's dtype), f32, f16 or bf16.
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
    parser.add_argument("--outtype", metavar="TYPE", default="auto",
                        help="tensor types of the merged model: auto (default; changed tensors at least Q8_0), "
                             "same, f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s/m/l, q4_k_s/m, "
                             "q5_k_s/m, q6_k (llama-quantize mixes), q3_k, q4_k, q5_k (one type)")
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
    from loraforge.merge import GGUF_OUTTYPES, HF_OUTTYPES, base_config, merge_to_gguf, merge_to_hf

    specs = parse_lora_args(args.lora, args.lora_scaled)
    fmt = output_format(args.out, args.to)
    outtype = args.outtype.lower()
    allowed = GGUF_OUTTYPES if fmt == "gguf" else HF_OUTTYPES
    if outtype not in allowed:
        hint = " (quantized types are for GGUF output)" if fmt == "hf" and outtype in GGUF_OUTTYPES else ""
        raise LoraforgeError(f"--outtype {args.outtype!r} is not available for {fmt.upper()} output{hint}; "
                             f"choose one of {', '.join(allowed)}")
    base = resolve_model_path(args.model_base)
    if os.path.abspath(args.out) == os.path.abspath(base):
        raise file_error(args.out, "is the base model; choose another output path")
    if fmt == "gguf":
        from loraforge.atomic import check_writable

        check_writable(args.out)
        if os.path.isdir(base):  # an HF base: converted to GGUF with the adapters merged, streamed
            from loraforge.commands.convert import convert_folder

            from loraforge.formats.convert import native_outtype

            outtype = native_outtype(base) if outtype in ("same", "auto") else outtype
            summary = convert_folder(base, args.out, outtype, specs, args)
            print(f"wrote {args.out} (GGUF {summary['arch']} from an HF base, {summary['tensors']} tensors, "
                  f"{summary['changed']} changed by {len(specs)} adapter(s), {outtype})")
            return 0
    cfg, _ = base_config(base)
    adapters = load_adapters(specs, cfg)
    labels = [f"{os.path.basename(p.rstrip('/'))} x{s:g}" for p, s in specs]
    if fmt == "gguf":
        from loraforge.commands.convert import plan_modelfile
        from loraforge.quant.mixes import file_type_name

        write_modelfile = plan_modelfile(args, base, args.out)
        summary = merge_to_gguf(base, adapters, args.out, outtype, labels=labels)
        file_type = summary["file_type"]
        print(f"wrote {args.out} (GGUF, {summary['tensors']} tensors, {summary['changed']} changed by "
              f"{len(adapters)} adapter(s), --outtype {outtype}"
              f"{', file type ' + file_type_name(file_type) if file_type is not None else ''})")
        if write_modelfile is not None:
            write_modelfile()
    else:
        summary = merge_to_hf(base, adapters, args.out, outtype)
        print(f"wrote {args.out} (HF folder, {summary['changed']} tensors changed by {len(adapters)} "
              f"adapter(s), {outtype}{', untied output layer' if summary['untied'] else ''})")
    return 0
