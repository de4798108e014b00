"""`loraforge eval`: loss and perplexity of a model (with adapters) on a text file or a dataset.

Text is cut into disjoint --ctx windows; a dataset is rendered and masked as for training.
"""

from __future__ import annotations

import argparse

from loraforge.commands.common import add_adapter_flags, add_model_flag, add_runtime_flags
from loraforge.errors import LoraforgeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flag(p)
    add_adapter_flags(p)
    p.add_argument("--data", default=None, metavar="FILE",
                   help="text file or .json/.jsonl/.csv/.parquet dataset (default: the bundled Shakespeare)")
    p.add_argument("--ctx", type=int, default=128, help="window length for text, row length for datasets")
    p.add_argument("--batch", type=int, default=8, help="windows or rows per forward pass")
    p.add_argument("--max-windows", type=int, default=0, help="evaluate at most this many text windows (0: all)")
    p.add_argument("--template", default="auto", help="dataset template, as finetune's --template")
    p.add_argument("--data-format", default="auto", help="dataset format, as finetune's --data-format")
    add_runtime_flags(p)


def run(args: argparse.Namespace) -> int:
    from loraforge.data.sources import DATASET_SUFFIXES, bundled_text
    from loraforge.commands.common import load_with_adapters
    from loraforge.formats.adapters import parse_lora_args
    from loraforge.train.evaluate import evaluate_source

    for name in ("ctx", "batch"):
        if getattr(args, name) <= 0:
            raise LoraforgeError(f"--{name} must be positive, got {getattr(args, name)}")
    adapters = parse_lora_args(args.lora, args.lora_scaled)
    loaded, _ = load_with_adapters(args, adapters, (args.ctx, "--ctx", {"batch": args.batch}))
    device = next(loaded.model.parameters()).device
    path = args.data or bundled_text()
    tok = loaded.tokenizer
    if path.lower().endswith(DATASET_SUFFIXES):
        from loraforge.data.instruct import InstructionSource, prepare_instruction_data

        samples, report = prepare_instruction_data(path, tok, fmt=args.data_format, template=args.template,
                                                   max_seq_length=args.ctx)
        source = InstructionSource(samples, args.batch, tok.pad_id or tok.eos_id or 0, group_by_length=False)
    else:
        from loraforge.data.text import TextSampleOptions, TextSamples, disjoint_windows, read_text_file

        ids = tok.encode(read_text_file(path), add_bos=False, parse_special=False)
        source = disjoint_windows(TextSamples(ids, args.ctx, tok.bos_id if tok.bos_id is not None else tok.eos_id,
                                              tok.eos_id, loaded.config.vocab_size, TextSampleOptions(),
                                              batch_size=args.batch), args.max_windows)
    loss, ppl = evaluate_source(loaded.model, source, device)
    print(f"eval: {path}: {source.n_items} items, loss {loss:.6f}, perplexity {ppl:.4f}")
    return 0
