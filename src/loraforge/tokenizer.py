"""Tokenizers for llama-family models, built with the `tokenizers` library.

Two sources:
- GGUF metadata (`tokenizer.ggml.*`), following llama.cpp's rules: "gpt2" byte-level BPE
  with the split regexes llama.cpp applies for each `tokenizer.ggml.pre`, or "llama"
  SentencePiece BPE (merges ranked by score, `<0xNN>` byte fallback, "▁" for spaces).
- A Hugging Face folder (`tokenizer.json` + `tokenizer_config.json` and friends).

Also here: chat templates rendered with jinja2 the way transformers renders them, and a
streaming decoder that never splits a multi-byte UTF-8 character.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from loraforge.errors import LoraforgeError, file_error

log = logging.getLogger(__name__)

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a generation, as llama.cpp decides them: end-of-turn tokens, and the
# fill-in-the-middle pad / repository / file-separator tokens. llama.cpp treats all as control.
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
)
FIM_END_TOKENS = (
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
)


def end_of_generation_ids(vocab: Mapping[str, int]) -> set[int]:
    """Ids of the tokens in `vocab` (text -> id) that end a generation, by their text."""
    ids = {vocab[t] for t in END_OF_TURN_TOKENS + FIM_END_TOKENS if t in vocab}
    if all(t in vocab for t in ("<|return|>", "<|call|>", "<|end|>")):
        ids.discard(vocab["<|end|>"])  # gpt-oss: "<|end|>" closes a message, not the generation
    return ids

# --- pre-tokenizer split rules, per `tokenizer.ggml.pre` (as llama.cpp's llm_tokenizer_bpe) ---
# Each rule is a list of regexes applied one after the other; every match and every gap
# between matches becomes its own piece ("isolated" splits), then BPE runs per piece.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+"
)
_NO_SPLIT_PUNCT = r" ?[^(\s|.,!?…。，、।۔،)]+"

_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _same(rule: tuple[str, ...], *names: str) -> dict[str, tuple[str, ...]]:
    return {name: rule for name in names}


PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **_same((_GPT2,), "gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2", "roberta-bpe", "gigachat", "jina-es",
            "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code", "a.x-4.0", "mellum",
            "modern-bert", "exaone4", "trillion", "granite-docling"),
    **_same((_LLAMA3,), "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
            "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4", "glm5"),
    **_same((r"\p{N}", _GPT2), "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
            "minerva-7b", "mellum2"),
    **_same((_QWEN2,), "qwen2", "stablelm2", "megrez", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan",
            "solar-open"),
    "qwen35": (_QWEN35,),
    **_same((_GPT4O,), "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
    "deepseek-llm": (r"[\r\n]", _DEEPSEEK_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     r"\s+$", _CJK_HANGUL, r"\p{N}+"),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    **_same(_DEEPSEEK3, "deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "tekken": (_TEKKEN,),
    **_same((_NO_SPLIT_PUNCT,), "poro-chat", "bloom", "gpt3-finnish"),
    "viking": (_NO_SPLIT_PUNCT, r"\p{N}"),
}
# Pre-tokenizers for which llama.cpp looks a whole piece up before merging, and adds BOS.
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                      "jina-v5-nano", "tekken", "glm4", "glm5"}
_ADD_BOS_PRE = (_IGNORE_MERGES_PRE - {"glm4", "glm5"}) | {"chameleon"}

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, reversed: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _byte_level_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level BPE token; a token outside the alphabet is taken as UTF-8 text."""
    alphabet = _byte_level_alphabet()
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _sentencepiece_bytes(token: str) -> bytes:
    """Raw bytes of a SentencePiece token: `<0xNN>` is one byte, "▁" is a space."""
    match = _BYTE_TOKEN.match(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float], skip: Iterable[int] = ()) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    SentencePiece BPE (and llama.cpp) repeatedly joins the adjacent pair whose
    concatenation is the highest-scoring token. As a ranked merge list: every split of
    every token into two tokens, ordered by the joined token's score (ties: token id).
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    skip = set(skip)
    ranked: list[tuple[float, int, int, str, str]] = []
    for index, token in enumerate(tokens):
        if index in skip or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[index]), index, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    `token_bytes(id)` is the raw bytes a token stands for; `decode` and `StreamDecoder`
    join those bytes, so both agree byte for byte.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        pieces: Sequence[str],
        piece_kind: str,
        raw_ids: set[int],
        special_ids: set[int],
        bos_id: int | None,
        eos_id: int | None,
        eot_ids: set[int],
        pad_id: int | None,
        unk_id: int | None,
        add_bos: bool,
        add_eos: bool,
        strip_space_after_bos: bool,
        chat_template: str | None,
        source: str = "",
    ):
        """Use `from_gguf_metadata` or `from_hf_folder`.

        pieces: token text per id; piece_kind: "byte_level", "sentencepiece" or "other"
        (how a piece maps to bytes); raw_ids: ids whose text is taken literally as UTF-8.
        """
        self.backend = backend
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.eot_ids = set(eot_ids)
        if eos_id is not None:
            self.eot_ids.add(eos_id)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.special_ids = set(special_ids)
        self.source = source
        self._pieces = list(pieces)
        self._piece_kind = piece_kind
        self._raw_ids = set(raw_ids)
        self._strip_space_after_bos = strip_space_after_bos
        self._bytes_cache: list[bytes | None] = [None] * len(self._pieces)

    # --- constructors -------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "") -> "Tokenizer":
        """Build from GGUF key/values (see `formats.gguf_meta.metadata_dict`)."""
        where = source or "GGUF metadata"
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise file_error(where, "no tokenizer in the metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n_tokens = len(tokens)
        token_types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * n_tokens)
        if len(token_types) != n_tokens:
            raise file_error(where, f"{len(token_types)} token types for {n_tokens} tokens")
        for i, token in enumerate(tokens):  # llama.cpp treats these as control whatever the file says
            if token_types[i] == TOKEN_NORMAL and (token in END_OF_TURN_TOKENS or token in FIM_END_TOKENS):
                token_types[i] = TOKEN_CONTROL
        vocab = {token: index for index, token in enumerate(tokens)}
        if len(vocab) != n_tokens:
            raise file_error(where, "the token list has duplicate entries")

        def token_id(key: str, default: int | None) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}", default)
            return int(value) if value is not None and 0 <= int(value) < n_tokens else None

        if model == "gpt2":
            pre = meta.get("tokenizer.ggml.pre") or "default"
            backend = _byte_level_backend(vocab, meta.get("tokenizer.ggml.merges") or [], pre, where)
            piece_kind, add_bos, strip_space = "byte_level", pre in _ADD_BOS_PRE, False
            bos_id, eos_id, unk_id = token_id("bos_token_id", None), token_id("eos_token_id", None), None
        elif model == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * n_tokens
            add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            unk_id = token_id("unknown_token_id", 0)
            backend = _sentencepiece_backend(tokens, scores, token_types, unk_id, add_space_prefix)
            piece_kind, add_bos, strip_space = "sentencepiece", True, add_space_prefix
            bos_id, eos_id = token_id("bos_token_id", 1), token_id("eos_token_id", 2)
        else:
            raise file_error(where, f"tokenizer model {model!r} is not supported (expected 'gpt2' or 'llama')")

        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        special_types = (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
        added = [
            AddedToken(tokens[i], special=(t != TOKEN_USER_DEFINED), normalized=False)
            for i, t in enumerate(token_types) if t in special_types
        ]
        backend.add_special_tokens([a for a in added if a.special])
        backend.add_tokens([a for a in added if not a.special])

        eot_ids = end_of_generation_ids(vocab)
        eot_ids |= {i for i in (token_id("eot_token_id", None), token_id("eom_token_id", None)) if i is not None}
        return cls(
            backend,
            pieces=tokens,
            piece_kind=piece_kind,
            raw_ids={i for i, t in enumerate(token_types) if t in special_types},
            special_ids={i for i, t in enumerate(token_types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)},
            bos_id=bos_id,
            eos_id=eos_id,
            eot_ids=eot_ids,
            pad_id=token_id("padding_token_id", None),
            unk_id=unk_id,
            add_bos=add_bos and bos_id is not None,
            add_eos=add_eos and eos_id is not None,
            strip_space_after_bos=strip_space,
            chat_template=meta.get("tokenizer.chat_template"),
            source=source,
        )

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """Build from a Hugging Face folder: tokenizer.json (required), tokenizer_config.json,
        special_tokens_map.json, generation_config.json, chat_template.jinja (all optional)."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise file_error(folder, "no tokenizer.json in this folder")
        try:
            spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises plain Exception
            raise file_error(tokenizer_file, f"cannot be read: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")

        def special_token(name: str) -> int | None:
            for source in (config, special_map):
                value = source.get(name)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    return backend.token_to_id(value)
            value = generation.get(f"{name}_id")
            if isinstance(value, list):
                value = value[0] if value else None
            return value if isinstance(value, int) else None

        bos_id, eos_id = special_token("bos_token"), special_token("eos_token")
        pad_id, unk_id = special_token("pad_token"), special_token("unk_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds_bos(spec.get("post_processor"), backend, bos_id)
        add_eos = bool(config.get("add_eos_token", False))

        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        pieces = [backend.id_to_token(i) or "" for i in range(vocab_size)]
        added = backend.get_added_tokens_decoder()
        piece_kind, strip_space = _hf_piece_kind(spec)
        eot_ids = end_of_generation_ids(backend.get_vocab(with_added_tokens=True))
        generation_eos = generation.get("eos_token_id")
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        eot_ids |= {int(i) for i in generation_eos or [] if 0 <= int(i) < vocab_size}
        return cls(
            backend,
            pieces=pieces,
            piece_kind=piece_kind,
            raw_ids=set(),  # transformers runs added tokens through the decoder like any other
            special_ids={i for i, a in added.items() if a.special},
            bos_id=bos_id,
            eos_id=eos_id,
            eot_ids=eot_ids,
            pad_id=pad_id,
            unk_id=unk_id,
            add_bos=bool(add_bos) and bos_id is not None,
            add_eos=add_eos and eos_id is not None,
            strip_space_after_bos=strip_space,
            chat_template=hf_chat_template(folder, config),
            source=str(folder),
        )

    # --- text <-> ids -------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. add_bos None follows the model's rule; parse_special False
        reads control tokens such as "<|im_start|>" as plain text (user-defined ones stay whole)."""
        previous = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = not parse_special
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = previous
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (byte-fallback `<0xE3>` -> b"\\xe3", "Ġ" -> b" ")."""
        cached = self._bytes_cache[token_id]
        if cached is None:
            piece = self._pieces[token_id]
            if token_id in self._raw_ids:
                cached = piece.encode("utf-8")
            elif self._piece_kind == "byte_level":
                cached = _byte_level_bytes(piece)
            elif self._piece_kind == "sentencepiece":
                cached = _sentencepiece_bytes(piece)
            else:
                cached = self.backend.decode([token_id], skip_special_tokens=False).encode("utf-8")
            self._bytes_cache[token_id] = cached
        return cached

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD). With a SentencePiece prefix space, the
        first space after a leading BOS is dropped (as llama-cpp-python does), so
        decode(encode(text), skip_special=True) == text; ids without a leading BOS keep it."""
        stream = StreamDecoder(self, skip_special=skip_special)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def id_of(self, token_str: str) -> int | None:
        """Id of a token given as the vocabulary spells it ("<|im_end|>", "Ġthe", "▁the"), or None."""
        return self.backend.token_to_id(token_str)

    # --- chat -----------------------------------------------------------------------------

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        template: str | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]) from the chat template,
        rendered as transformers' `apply_chat_template(..., tokenize=False)` does."""
        template = template if template is not None else self.chat_template
        if template is None:
            raise LoraforgeError(f"{self.source or 'tokenizer'}: the model has no chat template")
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id, "unk_token": self.unk_id}
        variables = {name: self._pieces[i] for name, i in names.items() if i is not None}
        variables.update(extra)
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text completed by that token.

    Bytes of an unfinished UTF-8 character are held back until the token that completes
    them, so Korean, Chinese or emoji split across byte tokens come out whole. The joined
    output of all pushes plus `flush()` equals `Tokenizer.decode` of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._n_pushed = 0
        self._strip_next_space = False

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        is_leading_bos = self._n_pushed == 0 and token_id == tok.bos_id
        self._n_pushed += 1
        if is_leading_bos:
            self._strip_next_space = tok._strip_space_after_bos
        piece = b"" if self.skip_special and token_id in tok.special_ids else tok.token_bytes(token_id)
        if self._strip_next_space and piece and not is_leading_bos:
            self._strip_next_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    @property
    def pending(self) -> bool:
        """True while the bytes of an unfinished UTF-8 character are held back."""
        return bool(self._utf8.getstate()[0])

    def flush(self) -> str:
        """Whatever is held back (an unfinished character becomes U+FFFD); resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._n_pushed = 0
        self._strip_next_space = False
        return text


# --- chat templates ----------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` marker; renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
    """Render a Hugging Face chat template (sandboxed jinja2, trim_blocks, lstrip_blocks).

    variables: bos_token, eos_token, tools, documents, ... as the template expects.
    Raises LoraforgeError for a template that does not compile or raises while rendering.
    """
    try:
        compiled = _compile_template(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise LoraforgeError(f"chat template: syntax error at line {exc.lineno}: {exc.message}") from exc
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise LoraforgeError(f"chat template: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise LoraforgeError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from exc


# --- backend builders --------------------------------------------------------------------


def _split_pre_tokenizer(pre: str, where: str) -> pre_tokenizers.PreTokenizer:
    regexes = PRE_TOKENIZER_SPLITS.get(pre)
    if regexes is None:
        log.warning("%s: unknown pre-tokenizer %r; using the GPT-2 split rule", where, pre)
        regexes = (_GPT2,)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_backend(vocab: dict[str, int], merges: Sequence[str], pre: str, where: str) -> BackendTokenizer:
    """Byte-level BPE ("gpt2"): llama.cpp's split regexes, then bytes -> printable characters."""
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise file_error(where, f"bad merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((parts[0], parts[1]))
    try:
        model = BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES_PRE)
    except Exception as exc:  # tokenizers raises plain Exception for merges outside the vocabulary
        raise file_error(where, f"tokenizer merges do not fit the vocabulary: {exc}") from exc
    backend = BackendTokenizer(model)
    backend.pre_tokenizer = _split_pre_tokenizer(pre, where)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int],
                           unk_id: int | None, add_space_prefix: bool) -> BackendTokenizer:
    """SentencePiece BPE ("llama"): spaces as "▁", a "▁" before the text and after every special
    token when add_space_prefix (as llama.cpp does), `<0xNN>` tokens for bytes without a token."""
    vocab = {token: index for index, token in enumerate(tokens)}
    byte_ids = {i for i, t in enumerate(token_types) if t == TOKEN_BYTE}
    merges = sentencepiece_merges(tokens, scores, skip=byte_ids)
    unk = tokens[unk_id] if unk_id is not None else None
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # A normalizer (not Metaspace) so "  a" keeps all its spaces: llama.cpp gives "▁▁▁a".
    # It runs on each stretch of text between special tokens, so each gets its own "▁".
    spaces = normalizers.Replace(" ", "\u2581")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if add_space_prefix else spaces
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


# --- Hugging Face folder helpers -----------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise file_error(path, f"not valid JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


def hf_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """An HF folder's chat template: tokenizer_config.json's (`config`), chat_template.jinja or .json."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None


def tokenizer_components(node: Any, type_name: str) -> list[dict[str, Any]]:
    """Every part of a tokenizer.json component (nested Sequences included) of type `type_name`."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if node.get("type") == type_name:
            found.append(node)
        for value in node.values():
            found += tokenizer_components(value, type_name)
    elif isinstance(node, list):
        for value in node:
            found += tokenizer_components(value, type_name)
    return found


def _hf_piece_kind(spec: Mapping[str, Any]) -> tuple[str, bool]:
    """(how tokens map to bytes, whether a "▁" is put before the text) for a tokenizer.json."""
    model_type = (spec.get("model") or {}).get("type")
    decoder, pre = spec.get("decoder"), spec.get("pre_tokenizer")
    if model_type == "BPE" and (tokenizer_components(decoder, "ByteLevel")
                                or tokenizer_components(pre, "ByteLevel")):
        return "byte_level", False
    if model_type in ("BPE", "Unigram") and (tokenizer_components(decoder, "ByteFallback")
                                             or tokenizer_components(decoder, "Metaspace")):
        return "sentencepiece", adds_space_prefix(spec)
    return "other", False


def adds_space_prefix(spec: Mapping[str, Any]) -> bool:
    """A SentencePiece-style tokenizer.json puts a "▁" before the text (a Prepend normalizer, or a
    Metaspace pre-tokenizer that prepends)."""
    return bool(tokenizer_components(spec.get("normalizer"), "Prepend")) or any(
        m.get("prepend_scheme", "always") != "never" and m.get("add_prefix_space", True)
        for m in tokenizer_components(spec.get("pre_tokenizer"), "Metaspace"))


def _post_processor_adds_bos(processor: Any, backend: BackendTokenizer, bos_id: int | None) -> bool:
    """Whether tokenizer.json's TemplateProcessing puts the BOS token first."""
    if not isinstance(processor, dict) or bos_id is None:
        return False
    if processor.get("type") == "Sequence":
        return any(_post_processor_adds_bos(p, backend, bos_id) for p in processor.get("processors", []))
    if processor.get("type") != "TemplateProcessing":
        return False
    single = processor.get("single") or []
    first = single[0] if single else {}
    token = (first.get("SpecialToken") or {}).get("id")
    return token is not None and backend.token_to_id(token) == bos_id
