"""`loraforge convert`: a Hugging Face model folder (optionally with adapters merged in) to one GGUF
file for llama.cpp and Ollama, without llama.cpp's converter or any compiled tool.

  loraforge convert ./Meta-Llama-3.1-8B-Instruct -o llama31.gguf --outtype q8_0
  loraforge convert ./base --lora my-peft-adapter -o merged.gguf --ollama --system "Be brief."
"""

from __future__ import annotations

import argparse
import os

from loraforge.errors import LoraforgeError, file_error


def add_ollama_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by convert, merge and export for writing an Ollama Modelfile."""
    g = parser.add_argument_group("Ollama")
    g.add_argument("--ollama", action="store_true",
                   help="also write an Ollama Modelfile next to the GGUF (TEMPLATE, stop tokens, SYSTEM)")
    g.add_argument("--ollama-template", metavar="FILE", default=None,
                   help="Ollama (Go text/template) TEMPLATE to use as is, instead of translating the chat template")
    g.add_argument("--template", dest="prompt_template", metavar="NAME|FILE", default=None,
                   help="prompt format the model was trained with (alpaca, chatml or a template file; "
                        "default: the model's own chat template)")
    g.add_argument("--system", default=None, help="default system prompt (Modelfile SYSTEM)")
    g.add_argument("--modelfile", metavar="PATH", default=None,
                   help="where to write the Modelfile (default: Modelfile next to the GGUF)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from loraforge.quant.mixes import OUTTYPES

    parser.add_argument("model", metavar="HF_FOLDER", help="Hugging Face model folder (config.json, safetensors, "
                                                           "tokenizer files)")
    parser.add_argument("-o", "--out", metavar="FILE", required=True, help="GGUF file to write")
    parser.add_argument("--outtype", type=str.lower, choices=OUTTYPES, default="f16",
                        help="f32/f16/bf16/q8_0 as llama.cpp's converter writes them, or a llama-quantize type "
                             "(q4_k_m, q5_k_m, q6_k, q4_0 ...) with its per-tensor mix; 1-D tensors stay f32")
    parser.add_argument("--lora", metavar="PATH", action="append", default=[],
                        help="adapter to merge in at scale 1 (PEFT folder, GGUF LoRA, checkpoint); repeatable")
    parser.add_argument("--lora-scaled", metavar=("PATH", "SCALE"), nargs=2, action="append", default=[],
                        help="adapter to merge in at a scale; repeatable")
    parser.add_argument("--tokenizer-pre", metavar="NAME", default=None,
                        help="llama.cpp pre-tokenizer name to write (default: detected from tokenizer.json)")
    add_ollama_arguments(parser)


def check_output(out: str, base: str) -> None:
    """Fail before any work when the GGUF output cannot be written or would overwrite the base."""
    from loraforge.atomic import check_writable

    if os.path.abspath(out) == os.path.abspath(base):
        raise file_error(out, "is the base model; choose another output path")
    if os.path.isdir(out):
        raise file_error(out, "is a folder; give the GGUF file name to write")
    check_writable(out)


def convert_folder(base: str, out: str, outtype: str, specs: list[tuple[str, float]], args: argparse.Namespace,
                   tokenizer_pre: str | None = None) -> dict:
    """Convert (and merge) an HF folder to GGUF; write the Modelfile when asked. Shared with `merge`."""
    from loraforge.formats.adapters import load_adapters
    from loraforge.formats.convert import convert_hf_to_gguf, convertible_config

    cfg = convertible_config(base)
    modelfile = plan_modelfile(args, base, out)
    adapters = load_adapters(specs, cfg)
    labels = [f"{os.path.basename(p.rstrip('/'))} x{s:g}" for p, s in specs]
    summary = convert_hf_to_gguf(base, out, outtype, adapters=adapters, labels=labels, tokenizer_pre=tokenizer_pre)
    if modelfile is not None:
        modelfile()
    return summary


def plan_modelfile(args: argparse.Namespace, base: str, out: str):
    """Check the Ollama options before the slow work; return the function that writes the Modelfile."""
    if not getattr(args, "ollama", False):
        if getattr(args, "ollama_template", None) or getattr(args, "modelfile", None):
            raise LoraforgeError("--ollama-template / --modelfile need --ollama")
        return None
    from loraforge.formats.ollama import modelfile_for_model

    return modelfile_for_model(gguf_path=out, tokenizer_source=base, template_spec=args.prompt_template,
                               ollama_template=args.ollama_template, system=args.system,
                               modelfile_path=args.modelfile)


def run(args: argparse.Namespace) -> int:
    from loraforge.formats.adapters import parse_lora_args
    from loraforge.formats.hf import is_hf_folder

    if not os.path.isdir(args.model):
        raise file_error(args.model, "no such folder" if not os.path.exists(args.model) else
                         "is not a folder (convert takes a Hugging Face model folder; a GGUF needs no converting)")
    if not is_hf_folder(args.model):
        raise file_error(args.model, "no config.json in this folder (not a Hugging Face model folder)")
    specs = parse_lora_args(args.lora, args.lora_scaled)
    check_output(args.out, args.model)
    summary = convert_folder(args.model, args.out, args.outtype, specs, args, tokenizer_pre=args.tokenizer_pre)
    merged = f", {summary['changed']} tensors changed by {len(specs)} adapter(s)" if specs else ""
    print(f"wrote {args.out} (GGUF {summary['arch']}, {summary['tensors']} tensors, {args.outtype}, "
          f"{summary['bytes'] / 2**20:.1f} MiB{merged})")
    return 0
