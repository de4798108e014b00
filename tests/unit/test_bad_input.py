"""Bad model paths give one line naming the file and the problem, exit status 2, no traceback:
through `loraforge inspect` (in-process `cli.main` and a real `python -m loraforge` process) and
through `load_model`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import loraforge
from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.loader import load_model


def run_inspect(capsys, path: str) -> tuple[int, str, str]:
    rc = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, path, *words: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("loraforge inspect: error: ")
    assert str(path) in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def _gguf_writer(path, arch: str):
    import gguf

    return gguf.GGUFWriter(str(path), arch)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_missing_path(capsys, tmp_path):
    path = tmp_path / "nope.gguf"
    rc, _, err = run_inspect(capsys, path)
    assert_one_line_error(rc, err, path, "no such file")
    with pytest.raises(LoraforgeError, match="no such file"):
        load_model(str(path))


def test_not_a_gguf_file(capsys, tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, I am text\n")
    rc, _, err = run_inspect(capsys, path)
    assert_one_line_error(rc, err, path, "not a GGUF file")
    with pytest.raises(LoraforgeError, match="not a GGUF file"):
        load_model(str(path))


def test_empty_file(capsys, tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    rc, _, err = run_inspect(capsys, path)
    assert_one_line_error(rc, err, path, "not a GGUF file")


@pytest.mark.parametrize("fraction", [0.00001, 0.01, 0.5, 0.99])
def test_truncated_gguf(capsys, tmp_path, smollm2_path, fraction):
    """The real model file cut inside the header, the vocabulary, and the tensor data."""
    size = os.path.getsize(smollm2_path)
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(int(size * fraction)))
    rc, _, err = run_inspect(capsys, path)
    assert_one_line_error(rc, err, path, "truncated")
    with pytest.raises(LoraforgeError, match="truncated"):
        load_model(str(path))


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_unsupported_architecture(capsys, tmp_path, arch):
    import numpy as np

    path = tmp_path / f"{arch}.gguf"
    w = _gguf_writer(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_context_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    _finish(w)
    rc, _, err = run_inspect(capsys, path)
    assert_one_line_error(rc, err, path, f"architecture '{arch}' is not supported")
    with pytest.raises(LoraforgeError, match="not supported"):
        load_model(str(path))


def _patch_tensor_type(src: str, dst, type_id: int) -> None:
    """Copy a GGUF file and change the ggml type id of its first tensor in the copy."""
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(str(dst), "r+")
    type_part = reader.tensors[0].field.parts[4]  # name length, name, n_dims, dims, type, offset
    type_part[0] = type_id
    reader.data.flush()
    del reader


def test_unknown_tensor_type(capsys, tmp_path, tiny_gguf_path):
    path = tmp_path / "unknown-type.gguf"
    _patch_tensor_type(tiny_gguf_path, path, 99)
    rc, _, err = run_inspect(capsys, path)
    assert_one_line_error(rc, err, path, "unknown type", "99")
    with pytest.raises(LoraforgeError, match="unknown type"):
        load_model(str(path))


def test_known_but_unsupported_tensor_type(capsys, tmp_path, tiny_gguf_path):
    """A real ggml type we do not decode (IQ4_NL): inspect describes the file and says so; loading refuses."""
    import gguf

    path = tmp_path / "iq4nl.gguf"
    _patch_tensor_type(tiny_gguf_path, path, int(gguf.GGMLQuantizationType.IQ4_NL))
    rc, out, _ = run_inspect(capsys, path)
    assert rc == 0
    assert "not loadable" in out and "IQ4_NL" in out
    with pytest.raises(LoraforgeError, match=r"IQ4_NL.*not supported") as e:
        load_model(str(path))
    assert str(path) in str(e.value)


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    rc, _, err = run_inspect(capsys, tmp_path)
    assert_one_line_error(rc, err, tmp_path, "no config.json")
    with pytest.raises(LoraforgeError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_with_unsupported_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    rc, _, err = run_inspect(capsys, tmp_path)
    assert_one_line_error(rc, err, tmp_path / "config.json", "model_type 'gpt2' is not supported")


def test_folder_with_broken_config_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    rc, _, err = run_inspect(capsys, tmp_path)
    assert_one_line_error(rc, err, tmp_path / "config.json", "not valid JSON")


def test_folder_without_weights(capsys, tmp_path, tiny_llama_folder):
    shutil.copyfile(os.path.join(tiny_llama_folder, "config.json"), tmp_path / "config.json")
    rc, _, err = run_inspect(capsys, tmp_path)
    assert_one_line_error(rc, err, tmp_path, "no .safetensors weights")
    with pytest.raises(LoraforgeError, match="no .safetensors weights"):
        load_model(str(tmp_path), base_dtype="f32")


def test_old_ggla_lora_file(capsys, tmp_path):
    path = tmp_path / "lora.bin"
    path.write_bytes(b"algg" + bytes(60))
    rc, _, err = run_inspect(capsys, path)
    assert_one_line_error(rc, err, path, "ggla")


def _python_m_loraforge(*args: str) -> subprocess.CompletedProcess:
    src = os.path.dirname(os.path.dirname(loraforge.__file__))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_real_process_exit_status_and_one_line(tmp_path, smollm2_path):
    missing = tmp_path / "missing.gguf"
    proc = _python_m_loraforge("inspect", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"loraforge inspect: error: {missing}: no such file or folder"
    assert proc.stdout == ""

    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(3_000_000))
    proc = _python_m_loraforge("inspect", str(cut))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cut) in lines[0] and "truncated" in lines[0]
