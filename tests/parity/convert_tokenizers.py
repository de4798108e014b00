"""Tokenizers trained here for the converter tests (no hub): byte-level BPE with llama3 / Qwen2 / GPT-2
split rules, and SentencePiece models in the Llama, Gemma and Phi-3 styles, written the way their
Hugging Face folders hold them. Each builder returns the vocabulary size.

- Gemma style (Gemma 2 / 3), tokenizer.model + tokenizer.json: BPE with byte fallback, no dummy
  prefix (no leading "\u2581"), digits split, whitespace-only pieces; ids <pad> 0, <eos> 1, <bos> 2,
  <unk> 3; `<start_of_turn>` / `<end_of_turn>` as user-defined pieces, marked special in
  tokenizer_config.json's added_tokens_decoder as Gemma 3 ships it; add_bos_token; Gemma 3's chat
  template.
- Phi-3 style, tokenizer.model + tokenizer.json: a Llama SentencePiece model (<unk> 0, <s> 1, </s> 2,
  dummy prefix) plus Phi-3's added tokens after it (<|endoftext|>, <|assistant|>, <|end|>, <|user|>,
  <|system|>, special), Phi-3.5's chat template, eos <|endoftext|>.
- Llama style (Mistral, Baichuan 2): tokenizer.model alone (Baichuan 2 ships no tokenizer.json).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from chat_templates import GEMMA3_TEMPLATE, PHI35_TEMPLATE

TEXTS = [
    "Hello, world! It's a test of the tokenizer, isn't it? I'M SURE you'LL see.",
    "안녕하세요, 세계! 한국어 텍스트를 토큰화합니다.",
    "中文：你好，世界！我们测试分词器。",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 and ❤️ done",
    "def f(x):\n\tif x:\n\t\treturn x ** 2\n    else:\n        return None\n",
    "digits 12345 3.14159 1,000,000 and   spaces\t\ttabs\n\n\nnewlines  ",
    "mixed 한국어 中文 😀 text<|im_end|> after a special token",
]
CORPUS = [t for t in TEXTS for _ in range(3)] + [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "오늘 날씨가 좋네요. 우리는 공원에 갑니다. 대한민국 서울특별시",
    "我们今天去公园散步，天气很好。北京上海广州深圳",
    "import numpy as np\nfor i in range(10):\n    print(i, np.sqrt(i))\n",
]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GEMMA_USER_DEFINED = ["<mask>", "[@BOS@]", "<start_of_turn>", "<end_of_turn>"]
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]


def train_byte_level(folder: Path, split: str | None, ignore_merges: bool) -> int:
    """A byte-level BPE tokenizer.json trained on CORPUS (split regex or GPT-2's), with ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML}), encoding="utf-8")
    return tok.get_vocab_size()


def _spm_model(gemma: bool) -> bytes:
    """A SentencePiece BPE model (byte fallback) trained on CORPUS, Gemma's or Llama's settings."""
    spm = pytest.importorskip("sentencepiece")
    lines = [f"{CORPUS[i % len(CORPUS)]} {CORPUS[(3 * i + 1) % len(CORPUS)]}" for i in range(120)]
    style = (dict(add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True, pad_id=0, eos_id=1,
                  bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                  user_defined_symbols=GEMMA_USER_DEFINED) if gemma else
             dict(add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=600, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2, **style)
    return model.getvalue()


def train_sentencepiece(folder: Path) -> int:
    """A Llama-style SentencePiece model saved by transformers: tokenizer.model + tokenizer.json."""
    from transformers import LlamaTokenizer

    raw = folder / "raw"
    raw.mkdir(parents=True)
    (raw / "tokenizer.model").write_bytes(_spm_model(gemma=False))
    tok = LlamaTokenizer.from_pretrained(raw, legacy=True, add_bos_token=True)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    shutil.move(raw / "tokenizer.model", folder / "tokenizer.model")  # transformers 5 saves tokenizer.json only
    shutil.rmtree(raw)
    return len(tok)


def _add_tokenizer_json(folder: Path) -> None:
    """tokenizer.json beside tokenizer.model, as the Gemma and Phi-3 repositories ship it: transformers'
    own conversion of the SentencePiece model and tokenizer_config.json."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))


def _added(token_id: int, content: str, special: bool) -> dict:
    return {str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": special}}


def write_gemma_tokenizer(folder: Path) -> int:
    """Gemma-style tokenizer.model + tokenizer_config.json (as the Gemma 3 repositories hold them)."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    proto = _spm_model(gemma=True)
    (folder / "tokenizer.model").write_bytes(proto)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    decoder: dict = {}
    for name in ("<pad>", "<eos>", "<bos>", "<unk>") + tuple(GEMMA_USER_DEFINED):
        decoder.update(_added(sp.PieceToId(name), name, name not in ("<mask>", "[@BOS@]")))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
        "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>", "added_tokens_decoder": decoder,
        "chat_template": GEMMA3_TEMPLATE, "spaces_between_special_tokens": False}), encoding="utf-8")
    _add_tokenizer_json(folder)
    return sp.vocab_size()


def write_phi3_tokenizer(folder: Path) -> int:
    """Phi-3-style tokenizer.model (Llama SentencePiece) + tokenizer_config.json with Phi-3's added tokens."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    proto = _spm_model(gemma=False)
    (folder / "tokenizer.model").write_bytes(proto)
    n = sentencepiece.SentencePieceProcessor(model_proto=proto).vocab_size()
    decoder: dict = {}
    for token_id, name in enumerate(["<unk>", "<s>", "</s>"]):
        decoder.update(_added(token_id, name, True))
    for i, name in enumerate(PHI3_ADDED):
        decoder.update(_added(n + i, name, True))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
        "added_tokens_decoder": decoder, "chat_template": PHI35_TEMPLATE}), encoding="utf-8")
    _add_tokenizer_json(folder)
    return n + len(PHI3_ADDED)


def write_llama_spm_tokenizer(folder: Path) -> int:
    """A Llama-style tokenizer.model + tokenizer_config.json (Mistral, Baichuan 2 ship this kind)."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    proto = _spm_model(gemma=False)
    (folder / "tokenizer.model").write_bytes(proto)
    decoder: dict = {}
    for token_id, name in enumerate(["<unk>", "<s>", "</s>"]):
        decoder.update(_added(token_id, name, True))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "added_tokens_decoder": decoder}),
        encoding="utf-8")
    return sentencepiece.SentencePieceProcessor(model_proto=proto).vocab_size()
