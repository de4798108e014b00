"""Instruction/chat datasets as training and eval sources for `finetune`."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from loraforge.data.instruct import (InstructionSource, prepare_instruction_data, samples_fingerprint,
                                     train_eval_split)
from loraforge.errors import LoraforgeError


def build_instruction_sources(args: argparse.Namespace, path: str, tokenizer: Any, seed: int,
                              out: Callable[[str], None]) -> tuple[Any, Any, str, dict[str, Any]]:
    """(train source, eval source or None, data fingerprint, report) from the finetune flags."""
    max_len = args.max_seq_length or args.ctx
    common = dict(fmt=args.data_format, columns=args.columns, template=args.template,
                  train_on_inputs=args.train_on_inputs, max_seq_length=max_len, overflow=args.overflow,
                  on_bad_row=args.on_bad_row)
    samples, report = prepare_instruction_data(path, tokenizer, **common)
    for line in report.lines():
        out(f"finetune: {line}")
    eval_samples = []
    if args.eval_data:
        eval_samples, eval_report = prepare_instruction_data(args.eval_data, tokenizer, **common)
        for line in eval_report.lines():
            out(f"finetune: eval {line}")
    elif args.eval_split:
        samples, eval_samples = train_eval_split(samples, args.eval_split, seed)
        out(f"finetune: held out {len(eval_samples)} samples for evaluation")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    if args.packing and max_len < max(len(s) for s in samples):
        raise LoraforgeError(f"--packing: a sample is longer than the row length {max_len}")
    source = InstructionSource(samples, args.batch, pad_id, seq_len=max_len if args.packing else 0,
                               packing=args.packing, group_by_length=not args.packing, seed=seed)
    eval_source = (InstructionSource(eval_samples, args.batch, pad_id, group_by_length=False)
                   if eval_samples else None)
    mode = "packed rows" if args.packing else "length-grouped padded batches"
    out(f"finetune: {source.n_items} items per epoch ({mode}), {len(samples)} samples")
    return source, eval_source, samples_fingerprint(samples), report.as_dict()
