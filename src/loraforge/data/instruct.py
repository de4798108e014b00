"""Instruction / chat samples: tokenization with exact loss masks, length limits, packing,
padded batches and the train/eval split.

Labels are shift-aligned for `CausalLM.loss`: labels[t] is the token that should follow
input_ids[t], or -100 where nothing is learned (prompt tokens unless train_on_inputs, the
last position, padding). So for a sample `prompt + response + EOS`, the last prompt position
predicts the first response token and the last response token predicts EOS.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from loraforge.data.batch import Batch
from loraforge.data.datasets import BadRow, load_records
from loraforge.data.templates import EOS, Eos, Segment, Template, default_template_name, get_template
from loraforge.errors import LoraforgeError, file_error
from loraforge.model import IGNORE_INDEX

OVERFLOW_POLICIES = ("truncate", "drop")


@dataclass
class Sample:
    """One tokenized record: input_ids and shift-aligned labels (same length), its row number."""

    input_ids: list[int]
    labels: list[int]
    row: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for y in self.labels if y != IGNORE_INDEX)


@dataclass
class InstructionData:
    """What happened to a data file on its way to samples (for the start-up report)."""

    path: str = ""
    format: str = ""
    template: str = ""
    rows_read: int = 0
    samples: int = 0
    skipped: list[BadRow] = field(default_factory=list)  # bad rows, with reasons
    truncated: list[int] = field(default_factory=list)  # row numbers cut to max_seq_length
    dropped: list[int] = field(default_factory=list)  # row numbers left out as over-long
    tokens: int = 0
    trainable_tokens: int = 0
    max_seq_length: int = 0
    train_on_inputs: bool = False

    def lines(self, max_rows: int = 10) -> list[str]:
        """Human-readable report lines; row lists are cut after max_rows entries."""
        def rows(numbers: Sequence[int]) -> str:
            shown = ", ".join(map(str, numbers[:max_rows]))
            return shown + (f", ... ({len(numbers) - max_rows} more)" if len(numbers) > max_rows else "")

        out = [f"data {self.path}: {self.format} format, template {self.template}, "
               f"{self.rows_read} rows -> {self.samples} samples",
               f"  tokens {self.tokens}, trained on {self.trainable_tokens} "
               f"({'prompts and responses' if self.train_on_inputs else 'responses only'})"]
        if self.skipped:
            out.append(f"  skipped {len(self.skipped)} bad rows:")
            out += [f"    {b}" for b in self.skipped[:max_rows]]
            if len(self.skipped) > max_rows:
                out.append(f"    ... {len(self.skipped) - max_rows} more")
        if self.truncated:
            out.append(f"  truncated to {self.max_seq_length} tokens: {len(self.truncated)} rows "
                       f"({rows(self.truncated)})")
        if self.dropped:
            out.append(f"  dropped as longer than {self.max_seq_length} tokens: {len(self.dropped)} rows "
                       f"({rows(self.dropped)})")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "template": self.template,
                "rows_read": self.rows_read, "samples": self.samples,
                "skipped": [{"row": b.row, "reason": b.reason} for b in self.skipped],
                "truncated": list(self.truncated), "dropped": list(self.dropped),
                "tokens": self.tokens, "trainable_tokens": self.trainable_tokens,
                "max_seq_length": self.max_seq_length, "train_on_inputs": self.train_on_inputs}


# -- tokenization ---------------------------------------------------------------------------

def _stop_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "eot_ids", None) or ())
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return ids


def _stop_texts(tokenizer: Any) -> list[str]:
    """Texts of the end-of-turn tokens that encode back to exactly that one token."""
    texts = []
    for i in sorted(_stop_ids(tokenizer)):
        text = tokenizer.decode([i])
        if text and tokenizer.encode(text, add_bos=False) == [i]:
            texts.append(text)
    return texts


def _cache(tokenizer: Any) -> dict:
    cache = getattr(tokenizer, "_loraforge_data_cache", None)
    if cache is None:
        cache = {}
        try:
            setattr(tokenizer, "_loraforge_data_cache", cache)
        except AttributeError:  # a tokenizer object without a __dict__: no caching
            pass
    return cache


def _eos_text(tokenizer: Any) -> tuple[str | None, list[str]]:
    """(text that encodes to exactly [eos_id] or None, texts of all stop tokens)."""
    cache = _cache(tokenizer)
    if "eos" not in cache:
        if tokenizer.eos_id is None:
            raise LoraforgeError("the tokenizer has no end-of-sequence token; instruction data needs one")
        text = tokenizer.decode([tokenizer.eos_id])
        ok = bool(text) and tokenizer.encode(text, add_bos=False) == [tokenizer.eos_id]
        cache["eos"] = (text if ok else None, _stop_texts(tokenizer))
    return cache["eos"]


def _adds_bos(tokenizer: Any) -> bool:
    cache = _cache(tokenizer)
    if "bos" not in cache:
        bos = tokenizer.bos_id
        cache["bos"] = bos is not None and tokenizer.encode("", add_bos=None) == [bos]
    return cache["bos"]


def _encode_spans(texts: list[str], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Encode the concatenation of texts once; return ids and, per id, the index of the text it
    belongs to. Boundaries come from encoding each prefix: where a token straddles a boundary
    it belongs to the text it ends in."""
    full = "".join(texts)
    ids = tokenizer.encode(full, add_bos=False)
    owner = [len(texts) - 1] * len(ids)
    start, prefix = 0, ""
    for j, text in enumerate(texts[:-1]):
        prefix += text
        p = tokenizer.encode(prefix, add_bos=False)
        n = 0
        limit = min(len(p), len(ids))
        while n < limit and p[n] == ids[n]:
            n += 1
        end = max(start, n)  # on a mismatch only the shared part is surely this text's
        for t in range(start, end):
            owner[t] = j
        start = end
    return ids, owner


def tokenize_conversation(segments: list[Segment], tokenizer: Any, train_on_inputs: bool = False
                          ) -> tuple[list[int], list[int]]:
    """Token ids and shift-aligned labels of one rendered record.

    EOS markers become the tokenizer's eos id unless the text before already ends with an
    end-of-turn token (ChatML's <|im_end|>). BOS is added when the model adds one and the
    text does not already start with it. Prompt tokens get label -100 unless train_on_inputs.
    """
    eos_text, stop_texts = _eos_text(tokenizer)
    # Texts between EOS markers are encoded as a whole (as the model will see them at inference);
    # an EOS that cannot be written as text splits the encoding there.
    chunks: list[list[tuple[str, bool]]] = [[]]
    for text, trainable in segments:
        if isinstance(text, Eos):
            previous = next((t for c in reversed(chunks) for t, _ in reversed(c)), "")
            if isinstance(previous, Eos) or any(previous.endswith(s) for s in stop_texts):
                continue  # the response already ends with an end-of-turn token
            if eos_text is not None:
                chunks[-1].append((eos_text, trainable))
            else:
                chunks[-1].append((EOS, trainable))  # type: ignore[arg-type]
                chunks.append([])
        elif text:
            chunks[-1].append((text, trainable))
    ids: list[int] = []
    flags: list[bool] = []
    for chunk in chunks:
        eos_flag = None
        if chunk and isinstance(chunk[-1][0], Eos):
            eos_flag = chunk.pop()[1]
        if chunk:
            merged: list[tuple[str, bool]] = []
            for text, trainable in chunk:
                if merged and merged[-1][1] == trainable:
                    merged[-1] = (merged[-1][0] + text, trainable)
                else:
                    merged.append((text, trainable))
            chunk_ids, owner = _encode_spans([t for t, _ in merged], tokenizer)
            ids += chunk_ids
            flags += [merged[o][1] for o in owner]
        if eos_flag is not None:
            ids.append(tokenizer.eos_id)
            flags.append(eos_flag)
    bos = tokenizer.bos_id
    if _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        flags.insert(0, False)
    labels = [IGNORE_INDEX] * len(ids)
    for t in range(len(ids) - 1):
        if train_on_inputs or flags[t + 1]:
            labels[t] = ids[t + 1]
    return ids, labels


def prompt_token_ids(template: Template, tokenizer: Any, messages: list[dict[str, str]],
                     system: str | None = None) -> list[int]:
    """Token ids a tuned model is given to answer the last user message, exactly as training
    tokenized that template: the same segments, EOS ids after earlier replies, BOS as trained."""
    msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
    ids, _ = tokenize_conversation(template.render({"messages": msgs}), tokenizer)
    return ids


# -- records -> samples ---------------------------------------------------------------------

def build_samples(records: Sequence[dict], template: Template, tokenizer: Any, *,
                  train_on_inputs: bool = False, max_seq_length: int = 2048, overflow: str = "truncate",
                  on_bad_row: str = "skip", report: InstructionData | None = None,
                  source: str = "data") -> list[Sample]:
    """Render, tokenize and length-limit records. Over-long samples are cut to max_seq_length
    (overflow="truncate") or left out (overflow="drop"; with on_bad_row="error" they stop the
    run); either way their row numbers go into `report`. A sample left with nothing to learn
    after truncation (its prompt alone is too long) is dropped and reported."""
    if overflow not in OVERFLOW_POLICIES:
        raise LoraforgeError(f"--overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
    if max_seq_length < 2:
        raise LoraforgeError(f"--max-seq-length must be at least 2, got {max_seq_length}")
    report = report if report is not None else InstructionData()
    report.max_seq_length, report.train_on_inputs = max_seq_length, train_on_inputs
    samples: list[Sample] = []
    for record in records:
        row = int(record.get("row", 0))
        ids, labels = tokenize_conversation(template.render(record), tokenizer, train_on_inputs)
        if len(ids) > max_seq_length:
            if overflow == "drop":
                if on_bad_row == "error":
                    raise file_error(source, f"row {row}: {len(ids)} tokens, longer than --max-seq-length "
                                             f"{max_seq_length} (use --overflow truncate or --on-bad-row skip)")
                report.dropped.append(row)
                continue
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            labels[-1] = IGNORE_INDEX  # the last position predicts nothing, as in every sample
            if all(y == IGNORE_INDEX for y in labels):
                report.dropped.append(row)
                continue
            report.truncated.append(row)
        sample = Sample(ids, labels, row)
        samples.append(sample)
        report.tokens += len(ids)
        report.trainable_tokens += sample.n_targets
    report.samples = len(samples)
    return samples


def prepare_instruction_data(path: str | os.PathLike, tokenizer: Any, *, fmt: str = "auto",
                             columns: dict[str, str] | str | None = None, template: str | None = None,
                             train_on_inputs: bool = False, max_seq_length: int = 2048,
                             overflow: str = "truncate", on_bad_row: str = "skip"
                             ) -> tuple[list[Sample], InstructionData]:
    """Load, validate, render and tokenize a data file: (samples, report).

    template None or "auto" picks the format's default (`templates.default_template_name`).
    """
    records = load_records(path, fmt, columns, on_bad_row)
    name = template if template and template != "auto" else default_template_name(records.format, tokenizer)
    chosen = get_template(name, tokenizer)
    report = InstructionData(path=os.fspath(path), format=records.format, template=chosen.name,
                             rows_read=records.rows_read, skipped=list(records.bad_rows))
    samples = build_samples(records, chosen, tokenizer, train_on_inputs=train_on_inputs,
                            max_seq_length=max_seq_length, overflow=overflow, on_bad_row=on_bad_row,
                            report=report, source=os.fspath(path))
    if not samples:
        raise file_error(path, f"no samples left after length limits ({len(report.dropped)} dropped as "
                               f"longer than {max_seq_length} tokens)")
    return samples, report


def train_eval_split(samples: Sequence[Sample], eval_split: float, seed: int = 0
                     ) -> tuple[list[Sample], list[Sample]]:
    """Random split: eval_split in (0, 1) is a fraction, >= 1 a count of eval samples."""
    n = len(samples)
    if eval_split <= 0:
        return list(samples), []
    n_eval = int(eval_split) if eval_split >= 1 else max(1, round(n * eval_split))
    if n_eval >= n:
        raise LoraforgeError(f"--eval-split {eval_split} leaves no training samples out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return ([s for i, s in enumerate(samples) if i not in eval_idx],
            [s for i, s in enumerate(samples) if i in eval_idx])


# -- batches ----------------------------------------------------------------------------------

def pack_rows(samples: Sequence[Sample], seq_len: int) -> list[list[Sample]]:
    """Group samples into rows of at most seq_len tokens, best-fit decreasing (deterministic)."""
    too_long = [s.row for s in samples if len(s) > seq_len]
    if too_long:
        raise LoraforgeError(f"cannot pack samples longer than {seq_len} tokens (rows {too_long[:5]}); "
                             "limit them with --max-seq-length first")
    rows: list[list[Sample]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for s in sorted(samples, key=len, reverse=True):
        i = bisect.bisect_left(free, (len(s), -1))
        if i < len(free):
            space, r = free.pop(i)
            rows[r].append(s)
            bisect.insort(free, (space - len(s), r))
        else:
            rows.append([s])
            bisect.insort(free, (seq_len - len(s), len(rows) - 1))
    return rows


def collate_packed(rows: Sequence[Sequence[Sample]], seq_len: int, pad_id: int) -> Batch:
    """Packed rows -> Batch (B, seq_len) with doc_ids 1, 2, ... per sample of a row, 0 on padding."""
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for d, s in enumerate(row, start=1):
            n = len(s)
            input_ids[r, t:t + n] = torch.tensor(s.input_ids)
            labels[r, t:t + n] = torch.tensor(s.labels)
            doc_ids[r, t:t + n] = d
            t += n
    return Batch(input_ids, labels, doc_ids)


def collate_padded(samples: Sequence[Sample], pad_id: int) -> Batch:
    """Samples -> Batch (B, longest) right-padded with pad_id and label -100; doc_ids None.

    Right padding needs no attention mask: causal attention never looks ahead."""
    width = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for r, s in enumerate(samples):
        input_ids[r, :len(s)] = torch.tensor(s.input_ids)
        labels[r, :len(s)] = torch.tensor(s.labels)
    return Batch(input_ids, labels)


def length_groups(lengths: Sequence[int], batch_size: int, seed: int | None = 0) -> list[list[int]]:
    """Indices in batches of similar length, as transformers' group_by_length: shuffle, sort
    within mega-batches of 50 batches (longest first), cut into batches, shuffle the batches.
    seed None: no shuffling (sorted mega-batches in the given order)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if seed is not None:
        rng.shuffle(order)
    mega = batch_size * 50
    order = [i for m in range(0, len(order), mega)
             for i in sorted(order[m:m + mega], key=lambda i: lengths[i], reverse=True)]
    groups = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    if seed is not None:
        rng.shuffle(groups)
    return groups


def pack(samples: Sequence[Sample], seq_len: int, batch_size: int = 1, pad_id: int = 0,
         seed: int | None = 0) -> list[Batch]:
    """Pack samples into rows of seq_len tokens, several samples a row; batches of batch_size rows
    (the last may have fewer). Each Batch has input_ids, labels, doc_ids (B, seq_len) int64;
    `CausalLM.loss(..., doc_ids=...)` keeps attention inside each sample and restarts positions,
    so no sample sees another. Rows are shuffled with seed (None: kept in packing order)."""
    rows = pack_rows(samples, seq_len)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return [collate_packed(rows[b:b + batch_size], seq_len, pad_id) for b in range(0, len(rows), batch_size)]


def padded_batches(samples: Sequence[Sample], batch_size: int, pad_id: int, group_by_length: bool = True,
                   seed: int | None = 0) -> list[Batch]:
    """One sample a row, right-padded to the longest of its batch: input_ids, labels (B, T) int64.

    group_by_length puts samples of similar length together (`length_groups`); otherwise the
    samples are shuffled with seed (None: the given order) and cut into batches."""
    if batch_size < 1:
        raise LoraforgeError(f"batch size must be at least 1, got {batch_size}")
    if group_by_length:
        groups = length_groups([len(s) for s in samples], batch_size, seed)
    else:
        order = list(range(len(samples)))
        if seed is not None:
            random.Random(seed).shuffle(order)
        groups = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    return [collate_padded([samples[i] for i in g], pad_id) for g in groups]


class InstructionSource:
    """Samples as a `train.loop.BatchSource`: the loop picks item ids, `make_batch` builds the Batch.

    packing: an item is a packed row of seq_len tokens; items_per_batch = batch_size.
    group_by_length (no packing): an item is a whole batch of similar-length samples (fixed at
    construction from seed; the loop shuffles their order each epoch); items_per_batch = 1.
    otherwise: an item is one sample; items_per_batch = batch_size.
    """

    def __init__(self, samples: Sequence[Sample], batch_size: int, pad_id: int, seq_len: int = 0,
                 packing: bool = False, group_by_length: bool = True, seed: int = 0) -> None:
        if not samples:
            raise LoraforgeError("no samples to train on")
        if batch_size < 1:
            raise LoraforgeError(f"batch size must be at least 1, got {batch_size}")
        self.samples, self.pad_id, self.packing = list(samples), pad_id, packing
        self.seq_len = seq_len or max(len(s) for s in self.samples)
        self.rows: list[list[Sample]] = []
        self.groups: list[list[int]] = []
        if packing:
            self.rows = pack_rows(self.samples, self.seq_len)
            self.n_items, self.items_per_batch = len(self.rows), batch_size
        elif group_by_length:
            self.groups = length_groups([len(s) for s in self.samples], batch_size, seed)
            self.n_items, self.items_per_batch = len(self.groups), 1
        else:
            self.n_items, self.items_per_batch = len(self.samples), batch_size

    def make_batch(self, item_ids: list[int]) -> Batch:
        if self.packing:
            return collate_packed([self.rows[i] for i in item_ids], self.seq_len, self.pad_id)
        if self.groups:
            return collate_padded([self.samples[j] for i in item_ids for j in self.groups[i]], self.pad_id)
        return collate_padded([self.samples[i] for i in item_ids], self.pad_id)

    def batches(self) -> list[Batch]:
        """Every item once, in order (for evaluation)."""
        return [self.make_batch(list(range(b, min(b + self.items_per_batch, self.n_items))))
                for b in range(0, self.n_items, self.items_per_batch)]


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """A short hash of the samples' ids and labels (to check a resumed run uses the same data)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(len(s).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in s.input_ids))
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in s.labels))
    return h.hexdigest()[:16]
