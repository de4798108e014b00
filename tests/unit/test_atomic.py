"""Atomic writes when the storage fails: every OSError (in the writer, fsync, close) and every short
write caught by a verify hook is one line naming the final file; the temporary file is removed and
the previous file is untouched. (tests/e2e/test_disk_full.py makes the disk really fill up.)"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from gguf_damage import write_small_gguf
from loraforge import atomic
from loraforge.atomic import atomic_path, atomic_paths
from loraforge.errors import LoraforgeError
from loraforge.formats.gguf_file import verify_written_gguf


@pytest.fixture
def previous(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"the previous, good file")
    return path


def assert_intact(path, error: LoraforgeError, *words: str) -> None:
    message = str(error)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for word in words:
        assert word in message, message
    assert path.read_bytes() == b"the previous, good file"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EFBIG, "size limit"),
                                         (errno.EIO, "Input/output error"),
                                         (getattr(errno, "EDQUOT", errno.ENOSPC), "the disk is full")])
def test_storage_errors_in_the_writer(previous, code, words):
    with pytest.raises(LoraforgeError) as e:
        with atomic_path(previous) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"new")
            raise OSError(code, os.strerror(code))
    assert_intact(previous, e.value, "could not be written", words, "the previous file is unchanged")


def test_fsync_error_propagates(previous, monkeypatch):
    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(LoraforgeError) as e:
        with atomic_path(previous) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"new content")
    assert_intact(previous, e.value, "Input/output error")


def test_short_write_caught_by_verify(tmp_path):
    """A GGUF file one byte short (inside its last padding, where no tensor check would see it)."""
    good = tmp_path / "good.gguf"
    write_small_gguf(good)
    data = good.read_bytes()
    path = tmp_path / "out.bin"
    path.write_bytes(b"the previous, good file")
    good.unlink()
    with pytest.raises(LoraforgeError) as e:
        with atomic_path(path, verify=verify_written_gguf) as tmp:
            with open(tmp, "wb") as f:
                f.write(data[:-1])
    assert_intact(path, e.value, "could not be written completely", f"{len(data) - 1} bytes",
                  f"header says {len(data)}")


def test_interrupt_removes_the_temporary_file(previous):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(previous) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
    assert_intact(previous, LoraforgeError(f"{previous}: "))


def test_several_files_replaced_only_when_all_are_good(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text("old a")
    second.write_text("old b")

    def reject(path: str) -> None:
        raise LoraforgeError(f"{path}: not good")

    with pytest.raises(LoraforgeError, match="b.json: could not be written completely"):
        with atomic_paths([first, second], verify=[None, reject]) as (tmp_a, tmp_b):
            open(tmp_a, "w").write("new a")
            open(tmp_b, "w").write("new b")
    assert first.read_text() == "old a" and second.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    with atomic_paths([first, second]) as (tmp_a, tmp_b):
        open(tmp_a, "w").write("new a")
        open(tmp_b, "w").write("new b")
    assert first.read_text() == "new a" and second.read_text() == "new b"


def test_usual_permissions_even_when_the_writer_recreates_the_file(tmp_path):
    path = tmp_path / "out.bin"
    with atomic_path(path) as tmp:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors' writer leaves it
        os.write(fd, b"x")
        os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
