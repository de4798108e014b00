"""Bad files and sizes met by `generate`, `merge`, `eval`, `chat`, `inspect` and `finetune`: one line
naming the file (or flag) and the problem, exit status 2, no traceback, nothing written or lost.

Adapters made for another model of the same architecture, contexts longer than the model's,
damaged checkpoint metadata, and text in encodings other than UTF-8.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from gguf_damage import write_tiny_checkpoint
from loraforge.cli import main
from loraforge.errors import LoraforgeError


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    _, err = capsys.readouterr()
    return rc, err


def assert_one_line(rc: int, err: str, command: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"loraforge {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- an adapter for another model of the same architecture ----------------------------------------------

@pytest.fixture(scope="module")
def wide_adapter(tmp_path_factory, smollm2_path) -> str:
    """A llama-arch GGUF LoRA for a 2048-wide model (32 heads): q/k rows SmolLM2 cannot un-permute."""
    from loraforge.formats.gguf_lora import write_gguf_adapter
    from loraforge.lora import Adapter
    from loraforge.merge import base_config

    cfg = base_config(smollm2_path)[0].replace(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                                               head_dim=64, intermediate_size=5632)
    torch.manual_seed(0)
    tensors = {f"model.layers.0.self_attn.{m}.lora_{ab}": torch.randn(shape)
               for m, out in (("q_proj", 2048), ("k_proj", 512))
               for ab, shape in (("A", (8, 2048)), ("B", (out, 8)))}
    path = tmp_path_factory.mktemp("wide") / "wide-lora.gguf"
    write_gguf_adapter(path, Adapter(tensors, alpha=16.0), cfg, "llama")
    return str(path)


def test_adapter_for_a_wider_model_generate_and_merge(tmp_path, capsys, smollm2_path, wide_adapter):
    """It once crashed with "cannot reshape array of size 16384 into shape (9,113,2,8)"."""
    out = tmp_path / "merged.gguf"
    rc, err = run_cli(["merge", "-m", smollm2_path, "--lora", wide_adapter, "-o", str(out)], capsys)
    assert_one_line(rc, err, "merge", wide_adapter, "do not fit the base model")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rc, err = run_cli(["generate", "-m", smollm2_path, "--lora", wide_adapter, "-p", "x", "-n", "1"], capsys)
    assert_one_line(rc, err, "generate", wide_adapter, "do not fit the base model")


def test_ggla_adapter_for_a_wider_model(tmp_path, smollm2_path):
    from loraforge.formats.ggla import read_ggla
    from loraforge.merge import base_config

    path = tmp_path / "wide.bin"
    with open(path, "wb") as f:  # finetune.cpp's layout: header, then per tensor n_dims, name length, type, ne
        f.write(struct.pack("<4I", 0x67676C61, 1, 8, 16))
        for name, n in (("blk.0.attn_q.weight.loraA", 2048), ("blk.0.attn_q.weight.loraB", 2048)):
            f.write(struct.pack("<5I", 2, len(name), 0, 8, n) + name.encode())
            f.write(b"\0" * (-f.tell() % 32) + np.zeros((n, 8), np.float32).tobytes())
    with pytest.raises(LoraforgeError, match="do not fit the base model") as e:
        read_ggla(path, base_config(smollm2_path)[0])
    assert str(e.value).startswith(f"{path}: ")


# --- contexts longer than the model's ---------------------------------------------------------------------

def test_context_above_the_models(tmp_path, capsys, smollm2_path):
    """`eval --ctx 1000000` once grew to 11.7 GiB over 229 s; `generate -c 100000000` tracebacked."""
    started = time.perf_counter()
    rc, err = run_cli(["eval", "-m", smollm2_path, "--ctx", "1000000"], capsys)
    assert_one_line(rc, err, "eval", "--ctx 1000000 is above the model's context length 8192")
    rc, err = run_cli(["generate", "-m", smollm2_path, "-c", "100000000", "-p", "x", "-n", "1"], capsys)
    assert_one_line(rc, err, "generate", "--ctx-size 100000000 is above the model's context length 8192")
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    rc, err = run_cli(["chat", "-m", smollm2_path, "-c", "100000000", "--messages", str(messages)], capsys)
    assert_one_line(rc, err, "chat", "--ctx-size 100000000 is above the model's context length 8192")
    assert time.perf_counter() - started < 60  # refused from the header, nothing allocated
    with pytest.raises(SystemExit) as e:
        main(["generate", "-c", "1e8", "-p", "x"])
    assert e.value.code == 2 and "invalid int value: '1e8'" in capsys.readouterr().err


def test_eval_batch_that_cannot_fit_in_memory(capsys, smollm2_path):
    rc, err = run_cli(["eval", "-m", smollm2_path, "--ctx", "8192", "--batch", "1000000"], capsys)
    assert_one_line(rc, err, "eval", "need at least", "lower --ctx or --batch")


# --- damaged checkpoint metadata ----------------------------------------------------------------------------

def rewrite_checkpoint(src: str, dst: Path, change: Callable[[dict], Any]) -> Path:
    """A copy of checkpoint `src` whose JSON metadata went through `change` (which edits it in place
    or returns a replacement); tensors copied as they are."""
    import gguf

    from loraforge.train.checkpoint import CHECKPOINT_TYPE, STATE_KEY

    reader = gguf.GGUFReader(src)
    field = reader.fields[STATE_KEY]
    meta = json.loads(bytes(field.parts[field.data[0]]).decode())
    replaced = change(meta)
    writer = gguf.GGUFWriter(str(dst), "llama")
    writer.add_type(CHECKPOINT_TYPE)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    writer.add_string(STATE_KEY, json.dumps(meta if replaced is None else replaced))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
    return change


CHECKPOINT_DAMAGE = {
    "rng not base64": (_set("rng.torch", "not base64 at all!"), "rng.torch is not valid base64", False),
    "rng wrong length": (_set("rng.torch", base64.b64encode(b"\0" * 100).decode()), "rng.torch holds 100 bytes",
                         False),
    "rng a number": (_set("rng.torch", 5), "rng.torch is int", False),
    "rng missing": (lambda m: m.pop("rng") and None, "rng is NoneType", False),
    "state a list": (_set("state", [1, 2]), "state is list", True),
    "iteration a string": (_set("state.iteration", "12"), "state.iteration is str", True),
    "iteration negative": (_set("state.iteration", -3), "state.iteration is -3", False),
    "epoch a bool": (_set("state.epoch", True), "state.epoch is bool", True),
    "unknown state field": (_set("state.colour", "red"), "state.colour is not a known field", False),
    "lora a list": (_set("lora", ["r", 4]), "lora is list", True),
    "lora rank a word": (_set("lora.r", "four"), "lora is not a valid LoRA configuration", False),
    "metadata a list": (lambda m: [m], "the metadata is list", True),
    "model_shape a string": (_set("model_shape", "big"), "model_shape is str", False),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("chk") / "chk-LATEST.gguf")


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_metadata(case, tmp_path, capsys, good_checkpoint):
    from loraforge.train.checkpoint import load_checkpoint

    change, words, inspect_sees_it = CHECKPOINT_DAMAGE[case]
    path = rewrite_checkpoint(good_checkpoint, tmp_path / "chk-LATEST.gguf", change)
    with pytest.raises(LoraforgeError) as e:
        load_checkpoint(str(path))
    assert str(e.value).startswith(f"{path}: damaged checkpoint metadata") and words in str(e.value), str(e.value)
    rc, err = run_cli(["inspect", str(path)], capsys)
    if inspect_sees_it:
        assert_one_line(rc, err, "inspect", str(path), words)
    else:
        assert rc == 0, err


def test_finetune_resume_from_damaged_checkpoint(tmp_path, capsys, good_checkpoint, tiny_llama_folder):
    path = rewrite_checkpoint(good_checkpoint, tmp_path / "chk-LATEST.gguf", _set("rng.torch", "%%%"))
    before = path.read_bytes()
    data = tmp_path / "data.txt"
    data.write_text("to be or not to be " * 20)
    rc, err = run_cli(["finetune", "--model-base", tiny_llama_folder, "--train-data", str(data),
                       "--checkpoint-in", str(path), "--checkpoint-out", str(tmp_path / "chk-ITERATION.gguf"),
                       "--lora-out", str(tmp_path / "lora-ITERATION.gguf"), "--adam-iter", "1", "--ctx", "16",
                       "--batch", "1"], capsys)
    assert_one_line(rc, err, "finetune", str(path), "rng.torch is not valid base64")
    assert path.read_bytes() == before


# --- text encodings ------------------------------------------------------------------------------------------

TEXT = "ROMEO: But soft, what light through yonder window breaks?\n" * 3
ENCODING_CASES = ["utf16le", "utf16be", "latin1-french", "latin1-german", "cp1252", "cp949", "gbk", "shift_jis"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be-bom", "utf-32", "utf-8-sig"])
def test_text_with_a_byte_order_mark_is_read(tmp_path, encoding):
    from loraforge.data.text import read_text_file

    raw = ("\ufeff" + TEXT).encode("utf-16-be") if encoding == "utf-16-be-bom" else TEXT.encode(encoding)
    path = tmp_path / "data.txt"
    path.write_bytes(raw)
    assert read_text_file(str(path)) == TEXT


@pytest.mark.parametrize("text, encoding, words, not_words", ids=ENCODING_CASES, argvalues=[
    (TEXT, "utf-16-le", ["UTF-16LE text without a byte-order mark", "iconv -f utf-16le -t utf-8"], ["binary"]),
    (TEXT, "utf-16-be", ["UTF-16BE text without a byte-order mark", "iconv -f utf-16be -t utf-8"], ["binary"]),
    ("Roméo et Juliette, à Vérone.\n", "latin-1", ["Latin-1", "iconv -f latin1 -t utf-8"], ["cp949", "gbk"]),
    ("Straße, Müller, Ärger über Öl\n", "latin-1", ["iconv -f latin1 -t utf-8"], ["cp949", "gbk"]),
    ("He said \u201chello\u201d \u2014 and left.\n", "cp1252", ["Windows-1252", "iconv -f cp1252"], ["cp949"]),
    ("로미오와 줄리엣. 사랑은 무엇인가?\n", "cp949", ["Korean", "iconv -f cp949 -t utf-8"], ["latin1"]),
    ("今天天气很好。我们正在学习中文。\n", "gbk", ["Chinese", "iconv -f gbk -t utf-8"], ["cp949"]),
    ("今日はいい天気ですね。日本語の文章です。\n", "shift_jis", ["Japanese", "iconv -f shift_jis"], ["cp949"]),
])
def test_text_in_another_encoding(tmp_path, text, encoding, words, not_words):
    from loraforge.data.text import read_text_file

    path = tmp_path / "data.txt"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(LoraforgeError) as e:
        read_text_file(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for word in words:
        assert word in message, message
    for word in not_words:
        assert word not in message, message


def test_binary_is_still_binary(tmp_path):
    from loraforge.data.text import read_text_file

    path = tmp_path / "data.txt"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00>\x00")
    with pytest.raises(LoraforgeError, match="looks binary"):
        read_text_file(str(path))


def test_eval_and_dataset_report_the_encoding(tmp_path, capsys, tiny_gguf_path):
    from loraforge.data.datasets import load_records

    text = tmp_path / "latin.txt"
    text.write_bytes("Roméo et Juliette\n".encode("latin-1") * 20)
    rc, err = run_cli(["eval", "-m", tiny_gguf_path, "--data", str(text), "--ctx", "16"], capsys)
    assert_one_line(rc, err, "eval", str(text), "iconv -f latin1 -t utf-8")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(json.dumps({"text": "Roméo"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(LoraforgeError, match="iconv -f latin1 -t utf-8"):
        load_records(rows)
    rows.write_bytes(json.dumps({"text": "Romeo"}).encode("utf-16"))
    with pytest.raises(LoraforgeError, match="is UTF-16 text"):
        load_records(rows)
