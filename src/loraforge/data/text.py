"""Plain-text training samples formed the way llama.cpp's finetune forms them.

The file is tokenized whole (no BOS). Without `sample_start`, a sample begins at every token
position (ctx tokens long), so a file of N tokens gives N - ctx samples. With `sample_start`,
samples begin at each occurrence of that string. A batch row is [BOS, s0 .. s(ctx-2)] with
targets [s0 .. s(ctx-1)]; a short sample is filled with EOS, or with the next samples
(`fill_with_next_samples`, separated by EOS/BOS when asked).
"""

from __future__ import annotations

import codecs
import hashlib
import os
from dataclasses import dataclass

import torch

from loraforge.data.batch import Batch
from loraforge.errors import file_error


@dataclass
class TextSampleOptions:
    sample_start: str = ""
    include_sample_start: bool = False
    escape: bool = False
    overlapping_samples: bool = False
    fill_with_next_samples: bool = False
    separate_with_eos: bool = False
    separate_with_bos: bool = True


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32 LE first: it starts like UTF-16 LE


def read_text_file(path: str) -> str:
    """The file as text: UTF-8, or UTF-16/32 with a byte-order mark. Binary content, UTF-16 without
    a mark and other encodings are a one-line error with the offset and an iconv command that fits."""
    if not os.path.exists(path):
        raise file_error(path, "no such file")
    if os.path.isdir(path):
        raise file_error(path, "is a folder, expected a text file")
    with open(path, "rb") as f:
        raw = f.read()
    codec = next((name for bom, name in _BOMS if raw.startswith(bom)), "utf-8")
    if codec in ("utf-16", "utf-32"):
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as e:
            raise file_error(path, f"starts with a {codec.upper()} byte-order mark but has invalid data at offset "
                                   f"{e.start}") from None
        if not text.strip():
            raise file_error(path, "is empty (no training text)")
        return text
    if not raw.strip():
        raise file_error(path, "is empty (no training text)")
    if b"\x00" in raw:
        utf16 = _utf16_without_bom(raw)
        if utf16:
            raise file_error(path, f"looks like {utf16.upper()} text without a byte-order mark; convert it to UTF-8 "
                                   f"first (e.g. iconv -f {utf16} -t utf-8 {path} > {path}.utf8)")
        offset = raw.index(b"\x00")
        raise file_error(path, f"looks binary (NUL byte at offset {offset}), expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise file_error(path, not_utf8_message(raw, e)) from None
    return text[1:] if text.startswith("\ufeff") else text


def _utf16_without_bom(raw: bytes) -> str | None:
    """"utf-16le" / "utf-16be" when NUL bytes sit at every other position as in ASCII-heavy UTF-16."""
    head = raw[:8192]
    even, odd = head[0::2], head[1::2]
    if len(odd) < 2:
        return None
    even_nul, odd_nul = even.count(0) / len(even), odd.count(0) / len(odd)
    if odd_nul > 0.3 and even_nul < 0.05:
        return "utf-16le"
    if even_nul > 0.3 and odd_nul < 0.05:
        return "utf-16be"
    return None


def _cjk_punctuation(c: str) -> bool:
    return "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef"


# Legacy encodings recognised by the script their double-byte characters decode to (in this
# order: Shift-JIS bytes also decode as Hangul in cp949, and Korean bytes as CJK in gbk).
_SCRIPTS = (
    ("shift_jis", "Japanese", lambda c: "\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" or _cjk_punctuation(c)),
    ("cp949", "Korean", lambda c: "\uac00" <= c <= "\ud7a3" or _cjk_punctuation(c)),
    ("gbk", "Chinese", lambda c: "\u4e00" <= c <= "\u9fff" or _cjk_punctuation(c)),
)


def guess_legacy_encoding(raw: bytes) -> tuple[str, str]:
    """(iconv encoding name, description) of non-UTF-8 text: a CJK double-byte encoding when its
    non-ASCII bytes come in runs (not single accented letters between ASCII ones) and nearly all of
    them decode to that script; else cp1252 (bytes 0x80-0x9f used) or latin1."""
    sample = raw[:65536]
    high = [i for i, b in enumerate(sample) if b >= 0x80]
    isolated = sum(1 for i in high if (i == 0 or sample[i - 1] < 0x80)
                   and (i + 1 == len(sample) or sample[i + 1] < 0x80))
    for codec, language, in_script in _SCRIPTS if isolated <= len(high) // 2 else ():
        try:
            text = sample.decode(codec)
        except UnicodeDecodeError as e:
            if e.start < len(sample) - 1:  # not merely a character cut at the sample's end
                continue
            text = sample[:e.start].decode(codec)
        wide = [c for c in text if ord(c) > 0x7F]
        if wide and sum(map(in_script, wide)) >= 0.9 * len(wide):
            return codec, f"{language} ({codec})"
    if any(0x80 <= b <= 0x9F for b in sample):
        try:
            sample.decode("cp1252")
            return "cp1252", "Windows-1252"
        except UnicodeDecodeError:
            pass
    return "latin1", "Latin-1 (ISO-8859-1)"


def not_utf8_message(raw: bytes, e: UnicodeDecodeError) -> str:
    """The problem text for a file that is not UTF-8: where, and which iconv command converts it."""
    line = raw[: e.start].count(b"\n") + 1
    bad = raw[e.start: e.start + 4].hex(" ")
    codec, description = guess_legacy_encoding(raw)
    return (f"is not UTF-8: invalid byte(s) {bad} at offset {e.start} (line {line}); it looks like "
            f"{description} text: convert it to UTF-8 first (e.g. iconv -f {codec} -t utf-8)")


def data_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class TextSamples:
    """Token windows over one tokenized text, addressable by sample index."""

    def __init__(self, tokens: list[int], ctx: int, bos_id: int, eos_id: int, vocab_size: int,
                 options: TextSampleOptions, sample_start_ids: list[int] | None = None,
                 batch_size: int = 1) -> None:
        self.items_per_batch = batch_size
        self.tokens = torch.tensor(tokens, dtype=torch.long).clamp_(0, vocab_size - 1)
        self.ctx, self.bos_id, self.eos_id = ctx, bos_id, eos_id
        self.options = options
        self.begins, self.sizes = self._sample_bounds(sample_start_ids or [])

    def _sample_bounds(self, start_ids: list[int]) -> tuple[list[int], list[int]]:
        n, ctx = len(self.tokens), self.ctx
        if not start_ids:
            begins = [0] + list(range(1, max(n - ctx, 0)))
            sizes = [min(ctx, n)] + [ctx] * (len(begins) - 1)
            return begins, sizes
        toks = self.tokens.tolist()
        k = len(start_ids)
        starts = [i for i in range(n - k + 1) if toks[i:i + k] == start_ids]
        if not starts:
            starts = [0]
        begins, sizes = [], []
        for j, s in enumerate(starts):
            b = s if self.options.include_sample_start else s + k
            end = n if (self.options.overlapping_samples or j + 1 == len(starts)) else starts[j + 1]
            if end > b:
                begins.append(b)
                sizes.append(min(end - b, ctx) if not self.options.overlapping_samples else min(n - b, ctx))
        return begins, sizes

    def __len__(self) -> int:
        return len(self.begins)

    @property
    def n_items(self) -> int:
        return len(self.begins)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def make_batch(self, sample_ids: list[int]) -> Batch:
        """input_ids and labels (B, ctx) for samples in order (fill-with-next takes following ids)."""
        rows_in, rows_tgt = [], []
        order = list(sample_ids)
        for k, first in enumerate(order):
            inputs, targets = self._row(first, order[k + 1:] if self.options.fill_with_next_samples else [])
            rows_in.append(inputs)
            rows_tgt.append(targets)
        return Batch(torch.stack(rows_in), torch.stack(rows_tgt))

    def _row(self, sample: int, following: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ctx, opts = self.ctx, self.options
        target: list[int] = []
        pieces = [sample] + following
        idx = 0
        while len(target) < ctx:
            b, size = self.begins[pieces[idx]], self.sizes[pieces[idx]]
            target.extend(self.tokens[b:b + min(size, ctx - len(target))].tolist())
            if len(target) >= ctx or not opts.fill_with_next_samples or idx + 1 >= len(pieces):
                break
            if opts.separate_with_eos and len(target) < ctx:
                target.append(self.eos_id)
            if opts.separate_with_bos and len(target) < ctx:
                target.append(self.bos_id)
            idx += 1
        target = (target + [self.eos_id] * ctx)[:ctx]
        inputs = [self.bos_id] + target[:-1]
        return torch.tensor(inputs), torch.tensor(target)


def disjoint_windows(samples: TextSamples, max_windows: int = 0) -> TextSamples:
    """Keep every ctx-th window, so each token is predicted once (for evaluation); at most
    `max_windows` of them (0: all)."""
    keep = slice(None, max_windows * samples.ctx if max_windows else None, samples.ctx)
    samples.begins, samples.sizes = samples.begins[keep], samples.sizes[keep]
    return samples


def unescape(s: str) -> str:
    """Process \\n, \\t, \\\\ ... escapes as llama.cpp's --escape does."""
    return s.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
