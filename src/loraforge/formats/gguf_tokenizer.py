"""A Hugging Face tokenizer folder as GGUF `tokenizer.ggml.*` keys, the way llama.cpp's converter
writes them (conversion/base.py: `_set_vocab_sentencepiece`, `_set_vocab_llama_hf`, `_set_vocab_gpt2`).

Three sources, tried in llama.cpp's order:
- `tokenizer.model` (SentencePiece, read with the `sentencepiece` package): model "llama", the
  pieces' own scores and types, added tokens from tokenizer_config.json's added_tokens_decoder
  (and tokenizer.json's added tokens it does not list, as llama.cpp's Phi-3 converter reads them):
  special or special-looking ones (`<start_of_turn>`, `<|end|>` ...) become control tokens.
  `add_space_prefix` follows the model's own normalizer (Gemma adds no leading space; llama.cpp's
  converter writes false for Gemma by name) unless tokenizer_config.json says add_prefix_space.
- `tokenizer.json` holding a SentencePiece-style vocabulary (BPE with byte fallback, or Unigram):
  model "llama". Unigram pieces keep their scores; BPE pieces get `-rank` of the merge that makes
  them, so llama.cpp's highest-score-first merging replays the merge order (llama.cpp's own
  converter writes -1000 for every piece here, which merges in the wrong order).
- `tokenizer.json` byte-level BPE: model "gpt2" with its merges and `tokenizer.ggml.pre`.

`tokenizer.ggml.pre` names the split rule llama.cpp applies before BPE. llama.cpp's converter picks
it by hashing the ids of a check text, which only works for the exact vocabularies it lists. Here
the folder's own pre-tokenizer is run on check texts and compared with llama.cpp's rule for every
known name (`tokenizer.PRE_TOKENIZER_SPLITS`); the first name in `PREFERRED_PRE` order with the
same pieces wins (vocabulary independent, so fine-tuned and resized vocabularies work too). No
match is an error naming the way out (`--tokenizer-pre NAME`).

Special token ids, add_bos/add_eos, merges and the chat template come from gguf's own
`SpecialVocab` (the class llama.cpp's converter uses).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError, file_error
from loraforge.tokenizer import Tokenizer, adds_space_prefix, hf_chat_template

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's hash check text (convert_hf_to_gguf.py get_vocab_base_pre) plus a few more.
CHECK_TEXTS = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL",
    "Hello, world! It's a test.  안녕하세요, 세계! 中文：你好，世界！ 😀🎉👍🏽",
    "def f(x):\n\tif x:\n\t\treturn x ** 2\r\n    else:\n        return None\n\n\n",
    "CamelCaseWords andMore ÉCOLE école 12345 3.14159 1,000,000 2024-01-01 $100 <tag> a/b\\c",
    "   three leading spaces, trailing   ",
)

# Among names with the same split rule, the one written (the common, canonical name first).
PREFERRED_PRE = ("gpt-2", "llama-bpe", "qwen2", "smollm", "tekken", "gpt-4o", "qwen35", "deepseek-v3",
                 "deepseek-llm", "deepseek-coder", "falcon", "default", "starcoder", "dbrx")

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class TokenizerKV:
    """The `tokenizer.ggml.*` values of one model (see `write`)."""

    model: str  # "gpt2" (byte-level BPE) | "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" | "eos" | "unk" | "pad" | ... -> id
    add_special: dict[str, bool] = field(default_factory=dict)  # "bos" | "eos" | ... -> add it
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer: Any) -> None:
        """Add the keys to a `gguf.GGUFWriter`."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            add = getattr(writer, f"add_{kind}_token_id", None)
            if add is not None:
                add(token_id)
        for kind, value in self.add_special.items():
            add = getattr(writer, f"add_add_{kind}_token", None)
            if add is not None:
                add(value)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)

    def metadata(self) -> dict[str, Any]:
        """The same keys as `write` adds, as the dict `Tokenizer.from_gguf_metadata` reads."""
        meta: dict[str, Any] = {"tokenizer.ggml.model": self.model, "tokenizer.ggml.pre": self.pre,
                                "tokenizer.ggml.tokens": self.tokens, "tokenizer.ggml.token_type": self.token_types}
        if self.scores is not None:
            meta["tokenizer.ggml.scores"] = self.scores
        if self.merges:
            meta["tokenizer.ggml.merges"] = self.merges
        for kind, token_id in self.special_ids.items():
            meta[f"tokenizer.ggml.{_SPECIAL_ID_KEYS.get(kind, kind)}_token_id"] = token_id
        for kind, value in self.add_special.items():
            meta[f"tokenizer.ggml.add_{kind}_token"] = value
        if self.add_space_prefix is not None:
            meta["tokenizer.ggml.add_space_prefix"] = self.add_space_prefix
        if self.chat_template is not None:
            meta["tokenizer.chat_template"] = self.chat_template
        return meta


# SpecialVocab's kinds whose GGUF key differs from `<kind>_token_id` (gguf.Keys.Tokenizer's spelling).
_SPECIAL_ID_KEYS = {"unk": "unknown", "pad": "padding", "sep": "seperator"}


def hf_folder_tokenizer(folder: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of an HF model folder: its tokenizer.json, or, for folders that ship only a
    SentencePiece `tokenizer.model` (Baichuan 2, older Llama and Mistral repositories), that model
    read as the converted GGUF holds it and tokenized as llama.cpp does (needs `sentencepiece`).

    vocab_size: the model's (config.json); the vocabulary is padded to it with unused tokens.
    """
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file() or not (folder / "tokenizer.model").is_file():
        return Tokenizer.from_hf_folder(folder)
    if vocab_size is None:  # 0: the SentencePiece model's own size
        vocab_size = int(_read_json(folder / "config.json").get("vocab_size") or 0)
    kv = tokenizer_kv(folder, vocab_size)
    tokenizer = Tokenizer.from_gguf_metadata(kv.metadata(), source=str(folder))
    tokenizer.chat_template = hf_chat_template(folder, _read_json(folder / "tokenizer_config.json"))
    return tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise file_error(path, f"not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _looks_special(token: str) -> bool:
    """llama.cpp's converter treats these added tokens as control even when not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _special_vocab(folder: Path, n_vocab: int, load_merges: bool):
    import gguf

    return gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)


def _finish(kv: TokenizerKV, folder: Path, load_merges: bool) -> TokenizerKV:
    special = _special_vocab(folder, len(kv.tokens), load_merges)
    if load_merges:
        kv.merges = list(special.merges)
        if not kv.merges:
            raise file_error(folder / "tokenizer.json", "a byte-level BPE tokenizer without merges")
    kv.special_ids = dict(special.special_token_ids)
    kv.add_special = dict(special.add_special_token)
    template = special.chat_template
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    kv.chat_template = template if isinstance(template, str) else None
    return kv


def tokenizer_kv(folder: str | os.PathLike, vocab_size: int, pre: str | None = None) -> TokenizerKV:
    """The GGUF tokenizer of an HF folder, padded to the model's `vocab_size` with unused tokens.

    pre: force `tokenizer.ggml.pre` (byte-level BPE only) instead of detecting it.
    """
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            sentencepiece = None
        if sentencepiece is not None:
            return _finish(_sentencepiece_model(folder, vocab_size), folder, load_merges=False)
        if not (folder / "tokenizer.json").is_file():
            raise file_error(folder / "tokenizer.model", "reading a SentencePiece model needs the sentencepiece "
                                                         "package (pip install sentencepiece)")
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise file_error(folder, "no tokenizer.json or tokenizer.model in this folder")
    spec = _read_json(path)
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "Unigram" or (kind == "BPE" and model.get("byte_fallback")):
        return _finish(_sentencepiece_json(path, spec, vocab_size), folder, load_merges=False)
    if kind == "BPE":
        return _finish(_byte_level_json(path, spec, vocab_size, pre), folder, load_merges=True)
    raise file_error(path, f"tokenizer model {kind!r} cannot be written as GGUF (BPE or Unigram)")


# --- SentencePiece --------------------------------------------------------------------------------

def _pad(tokens: list[str], types: list[int], scores: list[float] | None, vocab_size: int) -> None:
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _apply_added_tokens(folder: Path, tokens: list[str], types: list[int], scores: list[float]) -> None:
    """tokenizer_config.json's added_tokens_decoder (and added_tokens.json) over the pieces."""
    added = _read_json(folder / "added_tokens.json")
    for text, token_id in added.items():
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            tokens[token_id], types[token_id], scores[token_id] = text, TOKEN_USER_DEFINED, -1000.0
    decoder = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
    entries = [(int(key), data) for key, data in decoder.items() if isinstance(data, dict)]
    # tokenizer.json's added tokens for ids tokenizer_config.json does not list (transformers 5 writes
    # no added_tokens_decoder), as llama.cpp's Phi-3 converter reads them; the pieces the SentencePiece
    # model itself types as control, unknown or byte keep their type
    listed = {token_id for token_id, _ in entries}
    for data in _read_json(folder / "tokenizer.json").get("added_tokens") or []:
        if isinstance(data, dict) and isinstance(data.get("id"), int) and data["id"] not in listed \
                and 0 <= data["id"] < len(tokens) and types[data["id"]] in (TOKEN_NORMAL, TOKEN_UNUSED):
            entries.append((data["id"], data))
    for token_id, data in entries:
        if not 0 <= token_id < len(tokens):
            continue
        text = str(data.get("content", ""))
        if data.get("special") or _looks_special(text):
            types[token_id] = TOKEN_CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[token_id] = TOKEN_USER_DEFINED
        tokens[token_id], scores[token_id] = text, -1000.0


def _adds_dummy_prefix(sp: Any) -> bool:
    """The SentencePiece model's normalizer adds a leading "\u2581" (add_dummy_prefix; Llama yes, Gemma
    no): seen in the pieces of "a", which hold no "\u2581" (or its first byte, 0xE2) of their own."""
    pieces = sp.EncodeAsPieces("a")
    return bool(pieces) and (pieces[0].startswith("\u2581") or pieces[0] == "<0xE2>")


def _sentencepiece_model(folder: Path, vocab_size: int) -> TokenizerKV:
    from sentencepiece import SentencePieceProcessor

    path = folder / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise file_error(path, f"not a SentencePiece model ({e})") from None
    vocab_size = vocab_size or sp.vocab_size()
    n = min(sp.vocab_size(), vocab_size)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [TOKEN_UNUSED] * vocab_size
    for i in range(n):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (TOKEN_UNKNOWN if sp.IsUnknown(i) else TOKEN_CONTROL if sp.IsControl(i)
                    else TOKEN_UNUSED if sp.IsUnused(i) else TOKEN_BYTE if sp.IsByte(i) else TOKEN_NORMAL)
    _apply_added_tokens(folder, tokens, types, scores)
    config = _read_json(folder / "tokenizer_config.json")
    prefix = config.get("add_prefix_space")
    if not isinstance(prefix, bool):  # llama.cpp's default for SentencePiece is a leading space
        prefix = None if _adds_dummy_prefix(sp) else False
    return TokenizerKV("llama", "default", tokens, types, scores, add_space_prefix=prefix)


def _sentencepiece_json(path: Path, spec: dict[str, Any], vocab_size: int) -> TokenizerKV:
    """A SentencePiece-style tokenizer.json (BPE + byte fallback, or Unigram) as a "llama" vocabulary."""
    model = spec["model"]
    pieces: dict[int, tuple[str, float]] = {}
    if model["type"] == "Unigram":
        for i, (text, score) in enumerate(model.get("vocab") or []):
            pieces[i] = (text, float(score))
    else:
        rank: dict[str, int] = {}
        for r, merge in enumerate(model.get("merges") or []):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            rank.setdefault(left + right, r)
        for text, i in (model.get("vocab") or {}).items():
            # A piece no merge makes (a character, a byte) is never a merge result: its score is unused.
            pieces[int(i)] = (text, -float(rank[text]) if text in rank else 0.0)
    size = max(vocab_size, max(pieces, default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-1000.0] * size
    types = [TOKEN_UNUSED] * size
    unk = model.get("unk_token")
    unk_id = model.get("unk_id")
    for i, (text, score) in pieces.items():
        tokens[i], scores[i] = text, score
        types[i] = TOKEN_BYTE if _BYTE_PIECE.match(text) else TOKEN_NORMAL
        if text == unk or i == unk_id:
            types[i] = TOKEN_UNKNOWN
    for added in spec.get("added_tokens") or []:
        i, text = int(added["id"]), str(added["content"])
        if i >= size:
            continue
        if text == unk:
            types[i] = TOKEN_UNKNOWN
        elif added.get("special") or _looks_special(text):
            types[i] = TOKEN_CONTROL
        else:
            types[i] = TOKEN_USER_DEFINED
            text = text.replace("\u2581", " ")
        tokens[i], scores[i] = text, (scores[i] if i in pieces else -1000.0)
    tokens, types, scores = tokens[:size], types[:size], scores[:size]
    return TokenizerKV("llama", "default", tokens, types, scores, add_space_prefix=adds_space_prefix(spec))


# --- byte-level BPE -------------------------------------------------------------------------------

def _byte_level_json(path: Path, spec: dict[str, Any], vocab_size: int, pre: str | None) -> TokenizerKV:
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception
        raise file_error(path, f"cannot be read ({e})") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    size = max(vocab_size, max(vocab.values(), default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            if added[i].get("special") or _looks_special(text):
                types[i] = TOKEN_CONTROL
            else:
                tokens[i] = text.replace("\u2581", " ")
                types[i] = TOKEN_USER_DEFINED
        else:
            types[i] = TOKEN_NORMAL
    if pre is None:
        pre = detect_pre(backend, bool((spec.get("model") or {}).get("ignore_merges")), path)
    else:
        from loraforge.tokenizer import PRE_TOKENIZER_SPLITS

        if pre not in PRE_TOKENIZER_SPLITS:
            raise LoraforgeError(f"--tokenizer-pre {pre!r} is not a pre-tokenizer llama.cpp knows "
                                 f"(e.g. {', '.join(PREFERRED_PRE[:6])})")
    return TokenizerKV("gpt2", pre, tokens, types)


def _pieces(pre_tokenizer: Any, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def detect_pre(backend: Any, ignore_merges: bool, where: str | os.PathLike = "tokenizer.json") -> str:
    """The llama.cpp pre-tokenizer name whose split rule cuts the check texts exactly as the HF
    tokenizer's own pre-tokenizer does (see the module docstring)."""
    from loraforge.tokenizer import _IGNORE_MERGES_PRE, PRE_TOKENIZER_SPLITS, _split_pre_tokenizer

    theirs = backend.pre_tokenizer
    if theirs is None:
        raise file_error(where, "byte-level BPE tokenizer without a pre-tokenizer; llama.cpp has no such rule "
                                "(pass --tokenizer-pre NAME if you know the right one)")
    expected = [_pieces(theirs, text) for text in CHECK_TEXTS]
    names = list(PREFERRED_PRE) + [n for n in PRE_TOKENIZER_SPLITS if n not in PREFERRED_PRE]
    matches = []
    seen_rules: dict[tuple[str, ...], bool] = {}
    for name in names:
        rule = PRE_TOKENIZER_SPLITS[name]
        if rule not in seen_rules:
            ours = _split_pre_tokenizer(name, str(where))
            seen_rules[rule] = all(_pieces(ours, t) == e for t, e in zip(CHECK_TEXTS, expected))
        if seen_rules[rule]:
            matches.append(name)
    if not matches:
        raise file_error(where, "its pre-tokenizer splits text unlike any rule llama.cpp knows; pass "
                                "--tokenizer-pre NAME to choose one (e.g. llama-bpe, qwen2, gpt-2)")
    same_merging = [n for n in matches if (n in _IGNORE_MERGES_PRE) == ignore_merges]
    return (same_merging or matches)[0]
