"""Training and eval sources for `finetune` from the run spec's data section.

Plain text (llama.cpp style): token windows of `ctx` over the whole file; `eval_split` holds out
the end of the file (disjoint windows), `eval_data` is another text file. A .json/.jsonl/.csv/
.parquet file is an instruction/chat dataset, rendered with a template and masked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from loraforge.errors import LoraforgeError, file_error

TEXT_SUFFIXES = (".txt", ".text", ".md", "")
DATASET_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def bundled_text() -> str:
    """Path of the Shakespeare text shipped with the package (the default training data)."""
    from importlib import resources

    return str(resources.files("loraforge") / "assets" / "shakespeare.txt")


def is_dataset(path: str, data_format: str = "auto") -> bool:
    return os.path.splitext(path)[1].lower() in DATASET_SUFFIXES and data_format != "text"


@dataclass
class DataSources:
    train: Any  # train.loop.BatchSource
    eval: Any | None
    fingerprint: str  # identity of the training items (a resumed run checks it)
    report: dict[str, Any] = field(default_factory=dict)


def check_input_files(data) -> None:
    """Fail before any model loads when a data file or template file is missing or unreadable.

    data: train.spec.DataSpec.
    """
    from loraforge.data.templates import TEMPLATE_NAMES

    for flag, path in (("--train-data", data.train_data), ("--eval-data", data.eval_data)):
        if path is None:
            continue
        if not os.path.exists(path):
            raise file_error(path, f"no such file ({flag})")
        if os.path.isdir(path):
            raise file_error(path, f"is a folder, expected a text or dataset file ({flag})")
        if not os.access(path, os.R_OK):
            raise file_error(path, f"cannot be read ({flag})")
        if not is_dataset(path, data.data_format):
            from loraforge.data.text import read_text_file

            read_text_file(path)  # not UTF-8 text / empty: say so now, not after loading
    if data.template not in (*TEMPLATE_NAMES, "auto") and not os.path.isfile(data.template):
        raise LoraforgeError(f"--template: {data.template!r} is neither a template name "
                             f"({', '.join(TEMPLATE_NAMES)}) nor an existing file")


def build_sources(data, tokenizer: Any, model_cfg: Any, seed: int, out: Callable[[str], None]) -> DataSources:
    """The training source, the eval source (or None), the data fingerprint and report numbers."""
    path = data.train_data or bundled_text()
    if is_dataset(path, data.data_format):
        return _instruction_sources(data, path, tokenizer, seed, out)
    return _text_sources(data, path, tokenizer, model_cfg, out)


def _text_options(data):
    from loraforge.data.text import TextSampleOptions, unescape

    sample_start = unescape(data.sample_start) if data.escape else data.sample_start
    return sample_start, TextSampleOptions(sample_start, data.include_sample_start, data.escape,
                                           data.overlapping_samples, data.fill_with_next_samples,
                                           data.separate_with_eos, data.separate_with_bos)


def _text_sources(data, path: str, tok: Any, cfg: Any, out: Callable[[str], None]) -> DataSources:
    from loraforge.data.text import TextSamples, data_fingerprint, disjoint_windows, read_text_file

    if data.ctx > cfg.max_position_embeddings:
        raise LoraforgeError(f"--ctx {data.ctx} is above the model's context length {cfg.max_position_embeddings}")
    text = read_text_file(path)
    out(f"finetune: tokenize training data from {path}")
    tokens = tok.encode(text, add_bos=False, parse_special=False)
    if len(tokens) < 2:
        raise file_error(path, "has too little text: fewer than 2 tokens")
    sample_start, opts = _text_options(data)
    start_ids = tok.encode(sample_start, add_bos=False, parse_special=False) if sample_start else None
    eos = tok.eos_id if tok.eos_id is not None else 0
    bos = tok.bos_id if tok.bos_id is not None else eos

    def windows(ids: list[int], batch: int) -> TextSamples:
        return TextSamples(ids, data.ctx, bos, eos, cfg.vocab_size, opts, start_ids, batch_size=batch)

    eval_source = None
    if data.eval_split:
        if data.eval_split >= 1:
            raise LoraforgeError(f"--eval-split {data.eval_split:g}: plain text is held out by fraction "
                                 "(e.g. 0.05 for the last 5%), not by a count of samples")
        cut = int(len(tokens) * (1.0 - data.eval_split))
        if len(tokens) - cut < data.ctx or cut < data.ctx:
            raise file_error(path, f"is too short to hold out {data.eval_split:g} of it as --ctx {data.ctx} "
                                   "windows and still train")
        tokens, held_out = tokens[:cut], tokens[cut:]
        eval_source = disjoint_windows(windows(held_out, data.batch))
        out(f"finetune: held out the last {len(held_out)} tokens ({data.eval_split:g}) for evaluation: "
            f"{eval_source.n_items} windows of {data.ctx}")
    elif data.eval_data:
        held_out = tok.encode(read_text_file(data.eval_data), add_bos=False, parse_special=False)
        eval_source = disjoint_windows(windows(held_out, data.batch))
        out(f"finetune: eval data {data.eval_data}: {eval_source.n_items} windows of {data.ctx}")
    samples = windows(tokens, data.batch)
    out(f"finetune: sample-start: {sample_start!r}")
    out(f"finetune: include-sample-start: {str(data.include_sample_start).lower()}")
    out(f"tokenize_file: total number of samples: {len(samples)}")
    out(f"finetune: number of training tokens: {len(tokens)}")
    out(f"finetune: number of unique tokens: {len(set(tokens))}")
    held = f"|eval={data.eval_split}" if data.eval_split else ""
    fingerprint = data_fingerprint(text + f"|ctx={data.ctx}|{sample_start}{held}")
    return DataSources(samples, eval_source, fingerprint, {"tokens": len(tokens)})


def _instruction_sources(data, path: str, tokenizer: Any, seed: int, out: Callable[[str], None]) -> DataSources:
    from loraforge.data.instruct import (InstructionSource, prepare_instruction_data, samples_fingerprint,
                                         train_eval_split)

    max_len = data.max_seq_length or data.ctx
    common = dict(fmt=data.data_format, columns=data.columns, template=data.template,
                  train_on_inputs=data.train_on_inputs, max_seq_length=max_len, overflow=data.overflow,
                  on_bad_row=data.on_bad_row)
    samples, report = prepare_instruction_data(path, tokenizer, **common)
    for line in report.lines():
        out(f"finetune: {line}")
    eval_samples = []
    if data.eval_data:
        eval_samples, eval_report = prepare_instruction_data(data.eval_data, tokenizer, **common)
        for line in eval_report.lines():
            out(f"finetune: eval {line}")
    elif data.eval_split:
        samples, eval_samples = train_eval_split(samples, data.eval_split, seed)
        out(f"finetune: held out {len(eval_samples)} samples for evaluation")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    if data.packing and max_len < max(len(s) for s in samples):
        raise LoraforgeError(f"--packing: a sample is longer than the row length {max_len}")
    source = InstructionSource(samples, data.batch, pad_id, seq_len=max_len if data.packing else 0,
                               packing=data.packing, group_by_length=not data.packing, seed=seed)
    eval_source = (InstructionSource(eval_samples, data.batch, pad_id, group_by_length=False)
                   if eval_samples else None)
    mode = "packed rows" if data.packing else "length-grouped padded batches"
    out(f"finetune: {source.n_items} items per epoch ({mode}), {len(samples)} samples")
    return DataSources(source, eval_source, samples_fingerprint(samples), report.as_dict())
