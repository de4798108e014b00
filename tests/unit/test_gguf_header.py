"""Hostile or damaged GGUF headers: one line naming the file, exit status 2, nothing allocated for a
size the file cannot hold. The checks are llama.cpp's (ggml/src/gguf.cpp `gguf_init_from_reader`);
the reader is also compared with gguf-py's on valid files.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

import loraforge
from gguf_damage import find, header_fields, patched, write_small_gguf, write_tiny_adapter, write_tiny_checkpoint
from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.formats.gguf_file import read_gguf

SMALL_ALLOCATION = 4 << 20  # bytes a rejected header may cost beyond the file size


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    return open(write_small_gguf(tmp_path_factory.mktemp("small") / "small.gguf", alignment=64), "rb").read()


def refused(tmp_path, data: bytes, *words: str, name: str = "bad.gguf") -> str:
    """Write `data`, parse it; assert a LoraforgeError naming the file and `words`, fast and small."""
    path = tmp_path / name
    path.write_bytes(data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(LoraforgeError) as e:
            read_gguf(path)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for word in words:
        assert word in message, message
    assert peak < SMALL_ALLOCATION + len(data), f"{peak} bytes allocated for a {len(data)}-byte file"
    assert seconds < 5, seconds
    return message


# --- agreement with gguf-py on valid files ---------------------------------------------------------

def _same_as_gguf_py(path: str) -> None:
    from loraforge.formats.gguf import _reader_class  # gguf.GGUFReader over plain views: same parse, faster

    ours = read_gguf(path)
    theirs = _reader_class()(path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.shape == tuple(int(d) for d in reversed(b.shape.tolist())), a.name
        assert a.qtype == int(b.tensor_type) and a.offset == b.data_offset and a.n_bytes == b.n_bytes, a.name
    assert ours.alignment == theirs.alignment
    for key, field in theirs.fields.items():
        if key.startswith("GGUF.") or len(field.types) != 1:
            continue
        expected = field.contents()
        assert ours.metadata[key] == pytest.approx(expected) if isinstance(expected, float) else \
            ours.metadata[key] == expected, key


def test_reader_agrees_with_gguf_py(tmp_path, smollm2_path):
    _same_as_gguf_py(smollm2_path)
    _same_as_gguf_py(write_small_gguf(tmp_path / "a64.gguf", alignment=64))
    _same_as_gguf_py(write_tiny_adapter(tmp_path / "adapter.gguf"))


# --- one check per field --------------------------------------------------------------------------

def test_n_dims_huge(tmp_path, small_gguf):
    """n_dims = 2^32-1 once made the reader loop over 4 billion dims (963 MiB, 46 s)."""
    data = patched(small_gguf, find(header_fields(small_gguf), "n_dims", "ta"), 2**32 - 1)
    refused(tmp_path, data, "'ta'", "4294967295 dimensions")


def test_alignment_zero_and_not_power_of_two(tmp_path, small_gguf):
    value = find(header_fields(small_gguf), "value", "general.alignment")
    refused(tmp_path, patched(small_gguf, value, 0), "general.alignment is 0")
    refused(tmp_path, patched(small_gguf, value, 48), "general.alignment is 48, not a power of 2")


def test_alignment_of_wrong_type(tmp_path, small_gguf):
    vtype = find(header_fields(small_gguf), "value_type", "general.alignment")
    refused(tmp_path, patched(small_gguf, vtype, 5), "general.alignment must be a uint32")  # int32


def test_misaligned_tensor_offset(tmp_path, small_gguf):
    """llama.cpp refuses it; reading it would shift every weight by 4 bytes."""
    offset = find(header_fields(small_gguf), "tensor_offset", "tq")
    value = struct.unpack_from("<Q", small_gguf, offset.offset)[0]
    refused(tmp_path, patched(small_gguf, offset, value + 4), "'tq'", "not a multiple of the alignment 64")


def test_overlapping_tensors(tmp_path, small_gguf):
    fields = header_fields(small_gguf)
    first = struct.unpack_from("<Q", small_gguf, find(fields, "tensor_offset", "ta").offset)[0]
    refused(tmp_path, patched(small_gguf, find(fields, "tensor_offset", "tq"), first), "overlap")


@pytest.mark.parametrize("role, owner, value, words", [
    ("dim", "ta", 0, ("impossible dimensions",)),
    ("dim", "ta", 2**63, ("impossible dimensions",)),
    ("dim", "tq", 48, ("not whole blocks of 32", "Q8_0")),
    ("dim", "tb", 10**6, ("truncated", "tb")),
    ("tensor_type", "ta", 4, ("unknown type id 4",)),  # Q4_2, removed from ggml
    ("tensor_type", "ta", 2**31, ("unknown type id",)),
    ("tensor_offset", "tb", 2**64 - 64, ("truncated", "tb")),
    ("n_tensors", "", 2**63, ("truncated", "cannot fit")),
    ("n_kv", "", 2**40, ("truncated", "cannot fit")),
    ("version", "", 1, ("version 1",)),
    ("version", "", 0x03000000, ("big-endian",)),
    ("key_len", None, 2**62, ("truncated",)),
    ("name_len", "", 2**64 - 1, ("truncated",)),
    ("array_count", "test.words", 2**61, ("test.words", "cannot fit")),
    ("array_count", "test.numbers", 2**62 + 1, ("test.numbers", "cannot fit")),
    ("array_type", "test.words", 9, ("test.words", "unsupported GGUF value type 9")),  # nested array
    ("value_type", "test.aaa", 13, ("test.aaa", "unknown GGUF value type 13")),
])
def test_damaged_field(tmp_path, small_gguf, role, owner, value, words):
    refused(tmp_path, patched(small_gguf, find(header_fields(small_gguf), role, owner), value), *words)


def test_duplicate_key_and_tensor_name(tmp_path, small_gguf):
    key = find(header_fields(small_gguf), "key", "test.bbb")
    data = small_gguf[:key.offset] + b"test.aaa" + small_gguf[key.offset + key.size:]
    refused(tmp_path, data, "'test.aaa' appears twice")
    name = find(header_fields(small_gguf), "name", "tb")
    data = small_gguf[:name.offset] + b"ta" + small_gguf[name.offset + name.size:]
    refused(tmp_path, data, "'ta' appears twice")


def test_empty_key(tmp_path, small_gguf):
    key_len = find(header_fields(small_gguf), "key_len", None, nth=1)
    key = find(header_fields(small_gguf), "key", None, nth=1)
    data = patched(small_gguf, key_len, 0)
    data = data[:key.offset] + data[key.offset + key.size:]
    refused(tmp_path, data, "empty key")


# --- every reader goes through the checks ------------------------------------------------------------

def test_adapter_checkpoint_and_merge_readers_refuse_a_hostile_header(tmp_path, monkeypatch):
    """gguf-py's reader (behind the adapter and checkpoint readers) and merge's key/value copy
    never see a header the checks refuse."""
    import gguf

    from loraforge.formats.gguf_lora import read_gguf_adapter
    from loraforge.merge import kv_records
    from loraforge.train.checkpoint import load_checkpoint

    def must_not_run(*args, **kwargs):
        raise AssertionError("gguf.GGUFReader reached with an unchecked header")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", must_not_run)
    for source, reader in ((write_tiny_adapter(tmp_path / "a.gguf"), read_gguf_adapter),
                           (write_tiny_checkpoint(tmp_path / "c.gguf"), load_checkpoint),
                           (write_tiny_adapter(tmp_path / "m.gguf"), kv_records)):
        data = open(source, "rb").read()
        first = header_fields(data)[-1].owner  # the last tensor's name
        bad = tmp_path / ("bad-" + os.path.basename(source))
        bad.write_bytes(patched(data, find(header_fields(data), "n_dims", first), 2**32 - 1))
        with pytest.raises(LoraforgeError, match="dimensions"):
            reader(str(bad))


# --- through the command line ----------------------------------------------------------------------

def _dims_2_32(tiny_gguf_path: str) -> bytes:
    data = open(tiny_gguf_path, "rb").read()
    fields = header_fields(data)
    for nth in range(2):
        data = patched(data, find(fields, "dim", "token_embd.weight", nth=nth), 2**32)
    return data


def test_inspect_refuses_dims_2_32_by_2_32(tmp_path, capsys, tiny_gguf_path):
    """It once exited 0 reporting 18,446,744,073,815,755,072 parameters."""
    path = tmp_path / "huge.gguf"
    path.write_bytes(_dims_2_32(tiny_gguf_path))
    rc = main(["inspect", str(path)])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"loraforge inspect: error: {path}: ") and "token_embd.weight" in lines[0]


def test_real_process_exit_status_for_hostile_headers(tmp_path, small_gguf, tiny_gguf_path):
    """`python -m loraforge inspect` and `generate` on n_dims 2^32-1 and on 2^32 x 2^32 dims."""
    src = os.path.dirname(os.path.dirname(loraforge.__file__))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(_dims_2_32(tiny_gguf_path))
    many = tmp_path / "many-dims.gguf"
    data = open(tiny_gguf_path, "rb").read()
    many.write_bytes(patched(data, find(header_fields(data), "n_dims", "blk.0.attn_q.weight"), 2**32 - 1))
    code = ("import sys; from loraforge.cli import main\n"
            "for path in sys.argv[1:]:\n"
            "    for args in (['inspect', path], ['generate', '-m', path, '-p', 'x', '-n', '1']):\n"
            "        print(main(args), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(huge), str(many)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.stdout.split() == ["2"] * 4, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert str(huge) in lines[0] and str(huge) in lines[1] and str(many) in lines[2] and str(many) in lines[3]


def test_valid_small_file_still_reads(tmp_path, small_gguf):
    path = tmp_path / "ok.gguf"
    path.write_bytes(small_gguf)
    gf = read_gguf(path)
    assert gf.metadata["test.words"] == ["one", "two", "three"] and gf.alignment == 64
    assert [t.shape for t in gf.tensors] == [(4, 8), (2, 64), (5,)]
    assert np.asarray(gf.data(gf.tensors[0])).shape == (4, 8)
