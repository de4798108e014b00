"""`loraforge eval`: loss and perplexity of a model (with adapters) on a text file or a dataset.

Text is cut into disjoint --ctx windows; a dataset is rendered and masked as for training.
"""

from __future__ import annotations

import argparse

import torch

from loraforge.errors import LoraforgeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE", help="adapter at scale 1; repeatable")
    p.add_argument("--lora-scaled", action="append", nargs=2, default=[], metavar=("FILE", "SCALE"))
    p.add_argument("--data", default=None, help="text file or .json/.jsonl/.csv/.parquet dataset "
                                                 "(default: bundled Shakespeare)")
    p.add_argument("--ctx", type=int, default=128, help="window length for text (default %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-windows", type=int, default=0, help="evaluate at most this many text windows")
    p.add_argument("--template", default="auto")
    p.add_argument("--data-format", default="auto")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--base-dtype", default="auto", choices=("auto", "f32", "f16", "bf16", "quantized"))


def run(args: argparse.Namespace) -> int:
    from loraforge.commands.finetune import DATASET_SUFFIXES
    from loraforge.commands.generate import check_context
    from loraforge.formats.adapters import parse_lora_args
    from loraforge.generate import attach_adapters
    from loraforge.loader import load_model, resolve_model_path
    from loraforge.merge import base_config
    from loraforge.train.evaluate import evaluate_source
    from loraforge.train.finetune import _bundled_text, resolve_device

    for name in ("ctx", "batch"):
        if getattr(args, name) <= 0:
            raise LoraforgeError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = parse_lora_args(args.lora, args.lora_scaled)
    device = resolve_device(args.device)
    check_context(args.ctx, base_config(resolve_model_path(args.model))[0], "--ctx", batch=args.batch,
                  device=device.type)  # from the header, before the weights load
    loaded = load_model(args.model, args.base_dtype, device)
    attach_adapters(loaded.model, adapters, loaded.config)
    path = args.data or _bundled_text()
    tok = loaded.tokenizer
    if path.lower().endswith(DATASET_SUFFIXES):
        from loraforge.data.instruct import InstructionSource, prepare_instruction_data

        samples, report = prepare_instruction_data(path, tok, fmt=args.data_format, template=args.template,
                                                   max_seq_length=args.ctx)
        source = InstructionSource(samples, args.batch, tok.pad_id or tok.eos_id or 0, group_by_length=False)
    else:
        from loraforge.data.text import TextSampleOptions, TextSamples, read_text_file

        ids = tok.encode(read_text_file(path), add_bos=False, parse_special=False)
        source = TextSamples(ids, args.ctx, tok.bos_id if tok.bos_id is not None else tok.eos_id, tok.eos_id,
                             loaded.config.vocab_size, TextSampleOptions(), batch_size=args.batch)
        keep = slice(None, None, args.ctx)  # disjoint windows
        source.begins, source.sizes = source.begins[keep], source.sizes[keep]
        if args.max_windows:
            source.begins, source.sizes = source.begins[:args.max_windows], source.sizes[:args.max_windows]
    loss, ppl = evaluate_source(loaded.model, source, device)
    print(f"eval: {path}: {source.n_items} items, loss {loss:.6f}, perplexity {ppl:.4f}")
    return 0
