"""Atomic file writes: write a temporary file in the same folder, fsync, check it, rename.

A crash at any point leaves either the old file or the new one, never half of one. A write
that fails (disk full, quota, file-size limit, I/O error) becomes one `LoraforgeError` naming
the file, the temporary file is removed and the previous file stays as it was. A write that
fails *silently* (numpy's `tofile` does not report a short write of a small array) is caught
by the `verify` hook, which re-reads the temporary file before it may replace anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Callable, Iterator, Sequence

from loraforge.errors import LoraforgeError, file_error

Verify = Callable[[str], None]  # raises LoraforgeError when the file at the path is not complete

# errno values that mean "the storage could not take the bytes" (EDQUOT is absent on Windows)
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def human_bytes(n: int, byte_unit: str = "bytes") -> str:
    """n bytes as "512 bytes" (or byte_unit), "1.5 KiB", "3.2 MiB", "7.0 GiB"."""
    for unit in (byte_unit, "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == byte_unit else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _folder_of(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) or "."


def check_free_space(path: str | os.PathLike, n_bytes: int) -> None:
    """Refuse before writing when the disk holding `path` has fewer than `n_bytes` free."""
    path = os.fspath(path)
    try:
        free = shutil.disk_usage(_folder_of(path)).free
    except OSError:
        return  # no figure to go by; the write itself is still checked
    if free < n_bytes:
        raise file_error(path, f"not written: it needs about {human_bytes(n_bytes)} but only "
                               f"{human_bytes(free)} is free on its disk")


def _write_failure(path: str, existed: bool, e: OSError) -> LoraforgeError:
    """One line for an OSError met while writing `path`."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason = f"the disk is full ({e.strerror})"
    elif e.errno == errno.EFBIG:
        reason = f"the file would exceed the size limit ({e.strerror})"
    elif e.errno is not None and e.errno in _STORAGE_ERRNOS:
        reason = e.strerror or str(e)
    else:
        reason = str(e)
    return file_error(path, f"could not be written: {reason}; {_kept(existed)}")


def _kept(existed: bool) -> str:
    return "the previous file is unchanged" if existed else "no file was left behind"


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], verify: Sequence[Verify | None] = (),
                 size_hint: int = 0) -> Iterator[list[str]]:
    """Temporary paths next to each of `paths`; when the block ends without an error each is
    fsynced, checked by its `verify` hook and renamed onto its path (all written before any is
    replaced). `size_hint`: bytes the files will take together, checked against free space first.

    Any OSError inside the block, or while finishing, is a one-line LoraforgeError naming the
    first path; every temporary file is removed and nothing under a final name is touched.
    """
    finals = [os.fspath(p) for p in paths]
    for path in finals:
        check_writable(path)
    if size_hint > 0:
        check_free_space(finals[0], size_hint)
    existed = [os.path.exists(p) for p in finals]
    temps: list[str] = []
    current = finals[0]
    try:
        for path in finals:
            current = path
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=_folder_of(path))
            temps.append(tmp)
            os.close(fd)
        current = finals[0]
        yield list(temps)
        checks = list(verify) + [None] * (len(finals) - len(verify))
        for path, tmp, check in zip(finals, temps, checks):
            current = path
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if check is not None:
                try:
                    check(tmp)
                except LoraforgeError as e:
                    detail = str(e).replace(f"{tmp}: ", "")
                    raise file_error(path, f"could not be written completely, the disk may be full ({detail}); "
                                           f"{_kept(existed[finals.index(path)])}") from None
        for path, tmp in zip(finals, temps):
            current = path
            # mkstemp makes 0600 (and some writers recreate the file): give it the usual permissions
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
            _fsync_dir(_folder_of(path))
    except OSError as e:
        _remove(temps)
        raise _write_failure(current, existed[finals.index(current)], e) from None
    except BaseException:
        _remove(temps)
        raise


def _remove(temps: Sequence[str]) -> None:
    for tmp in temps:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, verify: Verify | None = None, size_hint: int = 0) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it is fsynced, checked by `verify`
    (when given) and renamed onto `path`. See `atomic_paths` for errors and `size_hint`."""
    with atomic_paths([path], [verify], size_hint) as temps:
        yield temps[0]


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy src to dst atomically (used for the LATEST copies); the copy must be as long as src."""
    size = os.path.getsize(src)

    def same_size(tmp: str) -> None:
        if os.path.getsize(tmp) != size:
            raise file_error(tmp, f"copy has {os.path.getsize(tmp)} bytes, {os.fspath(src)} has {size}")

    with atomic_path(dst, verify=same_size, size_hint=size) as tmp:
        shutil.copyfile(src, tmp)


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before any work, if `path` cannot be written."""
    path = os.fspath(path)
    folder = _folder_of(path)
    if not os.path.isdir(folder):
        raise file_error(path, "the output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise file_error(path, "the output folder is not writable")
    if os.path.isdir(path):
        raise file_error(path, "is a folder, expected a file name")
