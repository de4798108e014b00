"""Tokenizer parity: loraforge.tokenizer against transformers, sentencepiece and the gguf package.

- SmolLM2 GGUF (byte-level BPE, pre "smollm") vs transformers' GGUF tokenizer.
- A SentencePiece BPE model trained here, written to a GGUF, vs sentencepiece itself and
  transformers' LlamaTokenizer(legacy=True). legacy=True is the mode that matches llama.cpp:
  a "▁" goes before the text and after every special token. Its Metaspace pre-tokenizer
  collapses whitespace at the start of a stretch ("  a" -> "▁▁a", where llama.cpp and
  sentencepiece give "▁▁▁a"), so texts starting with spaces are checked against sentencepiece.
- Hugging Face folders saved by transformers vs transformers loading the same folder.
- StreamDecoder: pushing ids one by one gives the full decode, never a broken character.
"""

from __future__ import annotations

import ctypes
import io
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from loraforge.errors import LoraforgeError  # noqa: E402
from loraforge.formats.gguf_meta import metadata_dict  # noqa: E402
from loraforge.tokenizer import StreamDecoder, Tokenizer, _split_pre_tokenizer  # noqa: E402

MULTILINGUAL = [
    "Hello, world! It's a test of the tokenizer.",
    "안녕하세요, 세계! 한국어 텍스트를 토큰화합니다.",
    "中文：你好，世界！我们测试分词器。",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 and ❤️ done",
    "def f(x):\n\tif x:\n\t\treturn x ** 2\n    else:\n        return None\n",
    "   three leading spaces",
    " one leading space",
    "multiple     spaces   inside\t\ttabs",
    "digits 12345 3.14159 1,000,000 2024-01-01",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mixed 한국어 中文 😀 text\n\n\nwith newlines  \n",
    "",
]
STREAM_TEXTS = ["안녕하세요, 세계! 뷁 똠방각하", "中文：你好，世界！汉字龘龘", "Emoji: 😀🎉👍🏽 👨‍👩‍👧 ❤️"]


@pytest.fixture(scope="session")
def smollm_path(smollm2_path) -> Path:
    return Path(smollm2_path)


@pytest.fixture(scope="session")
def smollm_reader(smollm_path):
    return gguf.GGUFReader(smollm_path)


@pytest.fixture(scope="session")
def smollm(smollm_reader, smollm_path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata_dict(smollm_reader), str(smollm_path))


@pytest.fixture(scope="session")
def smollm_hf(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


# --- a SentencePiece BPE model, trained here, and its GGUF ----------------------------------

_SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small tokenizer test with some words.",
    "안녕하세요 세계, 한국어 문장을 토큰화합니다.",
    "오늘 날씨가 좋네요. 우리는 공원에 갑니다.",
    "你好世界，这是一个分词器测试。",
    "我们今天去公园散步，天气很好。",
    "def main():\n    print('hi')\n    return 0",
    "Numbers 12345 and 3.14159 appear here.",
]


@pytest.fixture(scope="session")
def spm_files(tmp_path_factory) -> dict[str, Path]:
    """tokenizer.model (BPE, byte fallback, 700 pieces) and tiny.gguf carrying its vocabulary."""
    from sentencepiece import sentencepiece_model_pb2

    folder = tmp_path_factory.mktemp("spm")
    lines = [f"{_SPM_CORPUS[i % 8]} {_SPM_CORPUS[(3 * i + 1) % 8]}" for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=700,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        user_defined_symbols=["<|im_start|>"], control_symbols=["<|im_end|>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())

    # GGUF token types use SentencePiece's piece types (1 normal .. 6 byte), as llama.cpp's converter does.
    writer = gguf.GGUFWriter(folder / "tiny.gguf", "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_tensor("token_embd.weight", np.zeros((len(proto.pieces), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"folder": folder, "model": folder / "tokenizer.model", "gguf": folder / "tiny.gguf"}


@pytest.fixture(scope="session")
def spm_ours(spm_files) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata_dict(gguf.GGUFReader(spm_files["gguf"])), str(spm_files["gguf"]))


@pytest.fixture(scope="session")
def spm_processor(spm_files):
    return spm.SentencePieceProcessor(model_file=str(spm_files["model"]))


@pytest.fixture(scope="session")
def spm_hf_legacy(spm_files):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(spm_files["folder"], legacy=True)


# --- GGUF metadata ------------------------------------------------------------------------------


def test_metadata_dict_matches_gguf_reader_contents(smollm_reader):
    meta = metadata_dict(smollm_reader)
    for name, field in smollm_reader.fields.items():
        if name.startswith("GGUF."):
            assert name not in meta
            continue
        expected = field.contents()
        assert meta[name] == expected, name
        assert type(meta[name]) is type(expected), name
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.pre"] == "smollm"


# --- SmolLM2 (byte-level BPE from GGUF) -----------------------------------------------------


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_smollm_ids_match_transformers(smollm, smollm_hf, text):
    assert smollm.encode(text) == smollm_hf(text)["input_ids"]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_smollm_decode_round_trip(smollm, smollm_hf, text):
    ids = smollm.encode(text)
    assert smollm.decode(ids) == text
    assert smollm.decode(ids) == smollm_hf.decode(ids)
    assert smollm.decode(ids, skip_special=True) == smollm_hf.decode(ids, skip_special_tokens=True)


def test_smollm_special_tokens_parse_or_not(smollm, smollm_hf):
    text = "<|im_start|>user\nhi<|im_end|>"
    parsed = smollm.encode(text)
    assert parsed[0] == smollm_hf.convert_tokens_to_ids("<|im_start|>") == smollm.id_of("<|im_start|>")
    as_text = smollm.encode(text, parse_special=False)
    assert as_text == smollm_hf(text, split_special_tokens=True)["input_ids"]
    assert smollm.id_of("<|im_start|>") not in as_text


def test_smollm_special_ids(smollm, smollm_hf):
    im_end = smollm_hf.convert_tokens_to_ids("<|im_end|>")
    assert smollm.vocab_size == len(smollm_hf) == 49152
    assert smollm.eos_id == smollm_hf.eos_token_id == im_end
    assert smollm.bos_id == smollm_hf.bos_token_id
    assert smollm.pad_id == smollm_hf.pad_token_id
    assert smollm.add_bos is False and smollm.add_eos is False
    # llama.cpp's end-of-generation set: eos, <|endoftext|> and the FIM repository token.
    names = ("<|im_end|>", "<|endoftext|>", "<reponame>")
    assert smollm.eot_ids == {smollm_hf.convert_tokens_to_ids(name) for name in names}
    assert smollm.encode("hi", add_bos=True, add_eos=True) == [smollm.bos_id, *smollm_hf("hi")["input_ids"], im_end]


def test_smollm_token_bytes_follow_gpt2_byte_alphabet(smollm, smollm_hf):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(smollm_hf.all_special_ids)
    for token_id in range(0, smollm.vocab_size, 7):
        token = smollm_hf.convert_ids_to_tokens(token_id)
        expected = token.encode() if token_id in special else bytes(byte_of[c] for c in token)
        assert smollm.token_bytes(token_id) == expected, token_id
    assert smollm.token_bytes(smollm.id_of("Ġ")) == b" "
    assert smollm.token_bytes(smollm.id_of("Ċ")) == b"\n"


CHATS = [
    [{"role": "user", "content": "Hi! 안녕?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "You answer in Korean."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "안녕하세요!"},
        {"role": "user", "content": "What is 中文?"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS, ids=["user", "system", "multi-turn"])
def test_smollm_render_chat_matches_transformers(smollm, smollm_hf, chat, add_generation_prompt):
    expected = smollm_hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm.render_chat(chat, add_generation_prompt=add_generation_prompt) == expected


CUSTOM_TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {% if loop.first %}first:{% endif %}
    {{ message['role'] }}={{ message | tojson }}
{% endfor %}
{% if add_generation_prompt %}{{ eos_token }}<gen>{% endif %}
{%- if tools %}{{ tools | tojson(indent=2) }}{% endif %}"""


def test_custom_template_matches_transformers(smollm, smollm_hf):
    chat = CHATS[2]
    tools = [{"name": "lookup", "description": "찾기"}]
    expected = smollm_hf.apply_chat_template(
        chat, chat_template=CUSTOM_TEMPLATE, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert smollm.render_chat(chat, template=CUSTOM_TEMPLATE, tools=tools) == expected
    assert "찾기" in expected  # tojson keeps non-ASCII text as is


def test_bad_templates_raise_loraforge_error(smollm):
    with pytest.raises(LoraforgeError, match="unknown role"):
        smollm.render_chat([{"role": "tool", "content": "x"}], template=CUSTOM_TEMPLATE)
    with pytest.raises(LoraforgeError, match="syntax"):
        smollm.render_chat(CHATS[0], template="{% for m in messages %}{{ m }")
    with pytest.raises(LoraforgeError):
        smollm.render_chat(CHATS[0], template="{{ ''.__class__.__mro__ }}{{ ''.__class__.mro() }}")


# --- SentencePiece BPE from GGUF -------------------------------------------------------------

SPM_TEXTS = [t for t in MULTILINGUAL if "<|" not in t] + [
    "처음 보는 글자: 뷁 똠 and 汉字龘 😀",
    "ends with spaces   ",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_ids_match_sentencepiece(spm_ours, spm_processor, text):
    # llama.cpp adds BOS for a "llama" vocabulary; sentencepiece itself does not.
    assert spm_ours.encode(text) == [1, *spm_processor.encode(text)]


@pytest.mark.parametrize("text", [t for t in SPM_TEXTS if t and not t[0].isspace()] + [
    "x<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|>안녕<|im_start|>中文",
])
def test_spm_ids_match_transformers_llama_legacy(spm_ours, spm_hf_legacy, text):
    assert spm_ours.encode(text, add_bos=False) == spm_hf_legacy(text, add_special_tokens=False)["input_ids"]


def test_spm_special_tokens_and_bytes(spm_ours, spm_processor):
    assert spm_ours.bos_id == 1 and spm_ours.eos_id == 2 and spm_ours.unk_id == 0
    assert spm_ours.add_bos is True and spm_ours.eos_id in spm_ours.eot_ids
    assert spm_ours.id_of("<|im_end|>") == spm_processor.piece_to_id("<|im_end|>")
    assert spm_ours.token_bytes(spm_ours.id_of("<0xE3>")) == b"\xe3"
    assert spm_ours.token_bytes(spm_ours.id_of("▁the")) == b" the"
    # A user-defined token stays whole even when special tokens are read as text (as in llama.cpp).
    assert spm_ours.id_of("<|im_start|>") in spm_ours.encode("a<|im_start|>b", parse_special=False)
    assert spm_ours.id_of("<|im_end|>") not in spm_ours.encode("a<|im_end|>b", parse_special=False)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_decode_round_trip(spm_ours, spm_processor, text):
    ids = spm_ours.encode(text)
    assert spm_ours.decode(ids, skip_special=True) == text == spm_processor.decode(ids[1:])
    # Without the leading BOS the prefix space is kept, as a continuation needs.
    assert spm_ours.decode(ids[1:]) == (" " + text if text else "")


# --- Hugging Face folders -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_folder(smollm_hf, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("smollm_hf")
    smollm_hf.save_pretrained(folder)
    return folder


def test_hf_folder_matches_transformers(smollm_folder, smollm):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm_folder)
    ours = Tokenizer.from_hf_folder(smollm_folder)
    for text in MULTILINGUAL:
        assert ours.encode(text) == reference(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == reference.decode(reference(text)["input_ids"])
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert ours.chat_template == smollm.chat_template
    assert ours.render_chat(CHATS[1]) == reference.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    assert ours.eot_ids == smollm.eot_ids


@pytest.mark.parametrize("add_bos", [False, True])
def test_hf_folder_sentencepiece_matches_transformers(spm_files, tmp_path, add_bos):
    from transformers import AutoTokenizer, LlamaTokenizer

    # With add_bos_token the saved tokenizer.json's post-processor puts <s> first.
    LlamaTokenizer.from_pretrained(spm_files["folder"], legacy=True, add_bos_token=add_bos).save_pretrained(tmp_path)
    # tokenizer_config.json does not keep `legacy`; without it transformers rebuilds the
    # pre-tokenizer as prepend_scheme="first" instead of the saved tokenizer.json's "always".
    reference = AutoTokenizer.from_pretrained(tmp_path, legacy=True)
    ours = Tokenizer.from_hf_folder(tmp_path)
    for text in SPM_TEXTS + ["x<|im_start|>user\nhi<|im_end|>"]:
        expected = reference(text)["input_ids"]
        assert ours.encode(text) == expected, text
        # transformers' Strip decoder drops the first space of any decode; ours drops the one after a
        # leading BOS only (so a streamed continuation keeps its space): compare with BOS in front.
        with_bos = expected if add_bos else [ours.bos_id, *expected]
        assert ours.decode(with_bos, skip_special=True) == reference.decode(expected, skip_special_tokens=True)


def test_hf_folder_errors(tmp_path):
    with pytest.raises(LoraforgeError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LoraforgeError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_hf_folder_with_tokenizer_model_only(spm_files, tmp_path):
    """A folder that ships only a SentencePiece tokenizer.model (Baichuan 2, older Llama and Mistral
    repositories): tokenized as sentencepiece itself and transformers' LlamaTokenizer tokenize it,
    padded to the model's vocabulary, special ids from tokenizer_config.json."""
    from transformers import AutoTokenizer

    from loraforge.formats.gguf_tokenizer import hf_folder_tokenizer

    shutil.copy(spm_files["model"], tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "legacy": true, "add_bos_token": true, "bos_token": "<s>", '
        '"eos_token": "</s>", "unk_token": "<unk>", "chat_template": "{{ messages[0].content }}"}', encoding="utf-8")
    processor = spm.SentencePieceProcessor(model_file=str(spm_files["model"]))
    reference = AutoTokenizer.from_pretrained(tmp_path, legacy=True)
    ours = hf_folder_tokenizer(tmp_path, processor.vocab_size() + 8)
    assert ours.vocab_size == processor.vocab_size() + 8
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.add_bos) == (1, 2, 0, True)
    assert ours.chat_template == "{{ messages[0].content }}"
    for text in SPM_TEXTS:
        assert ours.encode(text) == [1, *processor.encode(text)], text
        assert ours.decode(ours.encode(text), skip_special=True) == text
        if text and not text[0].isspace():
            assert ours.encode(text) == reference(text)["input_ids"], text
    assert hf_folder_tokenizer(tmp_path).vocab_size == processor.vocab_size()  # no config.json: the model's size
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false}', encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[-1].content }}", encoding="utf-8")
    plain = hf_folder_tokenizer(tmp_path)
    assert plain.chat_template == "{{ messages[-1].content }}" and not plain.add_bos
    assert plain.encode("hello") == processor.encode("hello")


def test_model_folder_with_tokenizer_model_only_runs(tiny_hf_factory, tmp_path, shakespeare_file):
    """The CLI on such a folder: finetune, generate and inspect read the SentencePiece vocabulary."""
    from convert_tokenizers import write_llama_spm_tokenizer

    _, source = tiny_hf_factory("llama", vocab_size=640)
    folder = tmp_path / "spm-model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(source) / name, folder / name)
    assert write_llama_spm_tokenizer(folder) <= 640 and not (folder / "tokenizer.json").exists()

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("finetune", "-m", str(folder), "--train-data", str(shakespeare_file), "--adam-iter", "2", "--batch", "2",
        "--ctx", "16", "--lora-out", "lora-ITERATION.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
        "--save-every", "0", "--compile", "off", "--no-plot-loss")
    assert (tmp_path / "lora-LATEST.gguf").is_file()
    assert run("generate", "-m", str(folder), "--lora", "lora-LATEST.gguf", "-p", "안녕 hello", "-n", "4", "--temp", "0")
    assert "SentencePiece" in run("inspect", str(folder))


# --- streaming decode -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("which", ["smollm", "spm_ours"])
def test_stream_decoder_gives_whole_characters(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text)
    for skip_special in (False, True):
        stream = StreamDecoder(tok, skip_special=skip_special)
        chunks = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(chunks) == tok.decode(ids, skip_special=skip_special)
        assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == text
    # Some token carried only part of a character; its push held the bytes back.
    assert any(not _is_utf8(tok.token_bytes(i)) for i in ids)
    assert any(chunk == "" for chunk in chunks[:-1])


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_decoder_flush_marks_unfinished_character(spm_ours):
    ids = spm_ours.encode("뷁", add_bos=False)
    stream = StreamDecoder(spm_ours)
    assert "".join(stream.push(i) for i in ids[:-1]) == " "
    assert stream.flush() == "\ufffd"


# --- pre-tokenizer split rules vs transformers' own ------------------------------------------


def _pieces(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "tekken", "gpt-2"])
def test_split_rules_match_transformers(pre):
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    if pre == "gpt-2":  # what GPT2Tokenizer uses
        reference = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        reference = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(mapping.GGUF_PRE_TOKENIZER_SPLITS[pre]), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    ours = _split_pre_tokenizer(pre, "test")
    for text in MULTILINGUAL + ["I'M sure you'LL see\r\n\r\n  x", "CamelCaseWords andMore ÉCOLE école"]:
        assert _pieces(ours, text) == _pieces(reference, text), text


def test_unknown_pre_tokenizer_warns_and_uses_gpt2(smollm_reader, caplog):
    meta = metadata_dict(smollm_reader)
    with caplog.at_level(logging.WARNING, logger="loraforge.tokenizer"):
        odd = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "no-such-pre"}, "odd.gguf")
    assert "no-such-pre" in caplog.text
    gpt2 = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "gpt-2"}, "gpt2.gguf")
    for text in MULTILINGUAL:
        assert odd.encode(text) == gpt2.encode(text)


def test_gguf_without_tokenizer_is_a_user_error():
    with pytest.raises(LoraforgeError, match="model.gguf: no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"}, "model.gguf")
    with pytest.raises(LoraforgeError, match="not supported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]}, "m.gguf")


# --- llama.cpp itself, when llama-cpp-python is installed ---------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize("which", ["smollm", "spm"])
def test_matches_llama_cpp(request, which):
    """Ids, per-token bytes and decoded text against llama.cpp's own tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if which == "smollm":
        path, tok = request.getfixturevalue("smollm_path"), request.getfixturevalue("smollm")
        texts = MULTILINGUAL
    else:
        path, tok = request.getfixturevalue("spm_files")["gguf"], request.getfixturevalue("spm_ours")
        texts = SPM_TEXTS + ["x<|im_start|>user\nhi<|im_end|>\n", "<|im_end|> 안녕", "<s> two bos"]
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert tok.encode(text) == ids, text
        # llama-cpp-python drops the space after a leading BOS, like our decode.
        assert tok.decode(ids, skip_special=True).encode("utf-8") == llm.detokenize(ids, special=False), text
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buffer = ctypes.create_string_buffer(256)
    for token_id in range(tok.vocab_size):
        n = llama_cpp.llama_token_to_piece(vocab, token_id, buffer, len(buffer), 0, True)
        assert tok.token_bytes(token_id) == buffer.raw[:n], token_id
    assert tok.eot_ids == {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
