"""`loraforge convert` proven by llama.cpp itself (llama-cpp-python) against transformers.

- Tiny random HF models (llama untied and tied, GQA, llama3 rope scaling, linear rope scaling,
  mistral, qwen2 with q/k/v biases) converted to f32: llama.cpp's logits equal transformers'
  (max abs diff <= 1e-3); converted to q8_0: the top-1 token agrees on >= 99% of 256 positions.
- Tokenizers: byte-level BPE tokenizers trained here with realistic merges (llama3, qwen2 and GPT-2
  split rules) and a SentencePiece BPE model trained here (read from tokenizer.model, and from
  tokenizer.json alone): llama.cpp's token ids equal transformers' on multilingual text (English,
  Korean, Chinese, emoji, code); the special ids, add_bos and the chat template travel.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import make_tiny_hf_model
from convert_models import cycle_tokens, llama_logits, tokens_for, train_on_cycle
from convert_tokenizers import CHATML, LLAMA3_SPLIT, QWEN2_SPLIT, TEXTS, train_byte_level, train_sentencepiece
from loraforge.formats.convert import convert_hf_to_gguf

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")

N_POS = 256


# (arch, config overrides)
MODELS = {
    "llama-untied-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral": ("mistral", {"sliding_window": 4096}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """get(name, outtype, trained) -> (transformers model, folder, gguf path), made on first use."""
    made: dict[str, tuple] = {}

    def get(name: str, outtype: str, trained: bool = False):
        key = (name, trained)
        if key not in made:
            arch, overrides = MODELS[name]
            folder = tmp_path_factory.mktemp(name)
            model = make_tiny_hf_model(folder, arch, seed=3, **overrides)
            if trained:
                train_on_cycle(model)
                model.save_pretrained(folder)
            made[key] = (model, folder, {})
        model, folder, paths = made[key]
        if outtype not in paths:
            paths[outtype] = str(folder / f"model-{outtype}.gguf")
            convert_hf_to_gguf(folder, paths[outtype], outtype, log=lambda s: None)
        return model, folder, paths[outtype]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_f32_logits_equal_transformers(converted, name):
    model, _, path = converted(name, "f32")
    tokens = tokens_for(model.config.vocab_size, 64)
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    got = llama_logits(path, tokens)
    diff = float(np.abs(got - expected).max())
    assert diff <= 1e-3, f"{name}: max |llama.cpp - transformers| = {diff:.2e} (logits up to {np.abs(expected).max():.2f})"


def test_rope_scaling_written_as_llama_cpp_reads_it(converted):
    """llama3: rope_freqs.weight holds the divisors of transformers' own inverse frequencies;
    linear: the rope.scaling keys."""
    from loraforge.formats.gguf_file import read_gguf

    model, _, path = converted("llama3-rope", "f32")
    gf = read_gguf(path)
    freqs = next(gf.data(t) for t in gf.tensors if t.name == "rope_freqs.weight").reshape(-1)
    dim = model.config.head_dim
    plain = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    expected = (plain / model.model.rotary_emb.inv_freq).numpy()
    assert np.allclose(freqs, expected, rtol=1e-5) and freqs.max() == 8.0
    _, _, path = converted("llama-linear-rope", "f32")
    meta = read_gguf(path).metadata
    assert (meta["llama.rope.scaling.type"], meta["llama.rope.scaling.factor"]) == ("linear", 2.0)


@pytest.mark.parametrize("name", ["llama-untied-gqa", "qwen2"])
def test_q8_0_top1_agrees(converted, name):
    model, _, path = converted(name, "q8_0", trained=True)
    tokens = cycle_tokens(model.config.vocab_size, N_POS, start=11)
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    got = llama_logits(path, tokens)
    agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    print(f"{name}: q8_0 top-1 agreement {agree:.4f}")
    assert agree >= 0.99, f"{name}: top-1 agreement {agree:.3f} over {N_POS} positions"


def test_converted_metadata(converted):
    from loraforge.formats.gguf_file import read_gguf

    _, _, path = converted("mistral", "q8_0")
    gf = read_gguf(path)
    meta = gf.metadata
    assert meta["general.architecture"] == "llama"  # llama.cpp's converter labels Mistral "llama"
    assert meta["general.file_type"] == 7 and meta["llama.vocab_size"] == 260
    types = {t.name: t.qtype for t in gf.tensors}
    assert types["blk.0.attn_q.weight"] == 8 and types["blk.0.attn_norm.weight"] == 0  # Q8_0 / F32
    _, _, path = converted("llama3-rope", "f32")
    assert "rope_freqs.weight" in {t.name for t in read_gguf(path).tensors}


# --- tokenizers ------------------------------------------------------------------------------------

TOKENIZERS = {  # name -> (builder, expected tokenizer.ggml.model, expected pre)
    "bpe-llama3": (lambda f: train_byte_level(f, LLAMA3_SPLIT, True), "gpt2", "llama-bpe"),
    "bpe-qwen2": (lambda f: train_byte_level(f, QWEN2_SPLIT, False), "gpt2", "qwen2"),
    "bpe-gpt2": (lambda f: train_byte_level(f, None, False), "gpt2", "gpt-2"),
    "spm": (train_sentencepiece, "llama", "default"),
    "spm-json-only": (train_sentencepiece, "llama", "default"),
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_tokenizer_ids_equal_transformers(tmp_path, name):
    from transformers import AutoTokenizer

    from loraforge.formats.gguf_file import read_gguf

    build, want_model, want_pre = TOKENIZERS[name]
    vocab = build(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path, legacy=True) if name.startswith("spm") else \
        AutoTokenizer.from_pretrained(tmp_path)
    if name == "spm-json-only":
        (tmp_path / "tokenizer.model").unlink()
    make_tiny_hf_model(tmp_path / "model", "llama", vocab_size=vocab, bos_token_id=reference.bos_token_id,
                       eos_token_id=reference.eos_token_id)
    for f in tmp_path.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / "model" / f.name)  # this tokenizer over the helper's default one
    out = tmp_path / "model.gguf"
    convert_hf_to_gguf(tmp_path / "model", out, "f32", log=lambda s: None)
    meta = read_gguf(out).metadata
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == (want_model, want_pre)
    assert meta["tokenizer.chat_template"] == CHATML
    assert meta["tokenizer.ggml.eos_token_id"] == reference.eos_token_id
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in TEXTS:
        if name.startswith("spm") and text[0].isspace():
            continue  # transformers' Metaspace collapses leading spaces; llama.cpp and sentencepiece do not
        expected = reference(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == expected, f"{name}: {text!r}"
