"""A run's files: ITERATION/LATEST/BEST names, checks before the first step, the output lock,
stale temporary files, and the keep-the-newest-N policy.

Every write goes through `atomic.atomic_path` (a temporary file beside the final one, renamed
into place), so a kill leaves either the old file or the new one. A kill can leave temporary
files (`.NAME.*.tmp`) behind; a new run on the same outputs removes those of its own names.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import sys
import time
from typing import Iterable

from loraforge.errors import LoraforgeError, file_error

TAGS = ("LATEST", "BEST")


def pattern_path(pattern: str, tag: int | str) -> str:
    """`chk-ITERATION.gguf` -> `chk-20.gguf` / `chk-LATEST.gguf`."""
    return pattern.replace("ITERATION", str(tag))


def _temp_regex(final_pattern: str) -> re.Pattern:
    """Temporary files atomic_path makes for any name of this pattern: `.NAME.XXXX.tmp`."""
    base = os.path.basename(final_pattern)
    if "ITERATION" in base:
        head, tail = base.split("ITERATION", 1)
        name = re.escape(head) + r"(?:\d+|LATEST|BEST)" + re.escape(tail)
    else:
        name = re.escape(base)
    return re.compile(r"^\." + name + r"\.[^/\\]*\.tmp$")


def check_output_path(path: str, what: str) -> None:
    """The folder exists and is writable, and `path` is not a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise file_error(path, f"the output folder does not exist ({what})")
    if not os.access(folder, os.W_OK):
        raise file_error(path, f"the output folder is not writable ({what})")
    if os.path.isdir(path):
        raise file_error(path, f"is a folder, expected a file name ({what})")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise file_error(path, f"exists and cannot be replaced ({what})")


def check_run_outputs(patterns: dict[str, str], iterations: Iterable[int]) -> None:
    """Every file the run will write (each saved iteration, LATEST, BEST) can be written."""
    for what, pattern in patterns.items():
        tags: list[int | str] = ["LATEST", "BEST", *iterations] if "ITERATION" in pattern else ["x"]
        for tag in tags:
            check_output_path(pattern_path(pattern, tag), what)


def remove_stale_temps(patterns: Iterable[str], say) -> int:
    """Delete temporary files a killed run left for these output names; returns how many."""
    removed = 0
    for pattern in patterns:
        folder = os.path.dirname(os.path.abspath(pattern))
        regex = _temp_regex(pattern)
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if regex.match(name):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except OSError:
                    pass
    if removed:
        say(f"finetune: removed {removed} temporary file(s) left by an interrupted run")
    return removed


def iteration_files(pattern: str) -> list[tuple[int, str]]:
    """(iteration, path) of the numbered files of an ITERATION pattern that exist, oldest first."""
    if "ITERATION" not in pattern:
        return []
    head, tail = pattern.split("ITERATION", 1)
    regex = re.compile(re.escape(os.path.basename(head)) + r"(\d+)" + re.escape(tail) + "$")
    found = []
    for path in glob.glob(glob.escape(head) + "*" + glob.escape(tail)):
        m = regex.match(os.path.basename(path))
        if m and os.path.isfile(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def prune_iterations(patterns: Iterable[str], keep: int, protect: Iterable[int] = ()) -> list[str]:
    """Remove numbered files beyond the newest `keep` of each pattern (LATEST/BEST untouched,
    iterations in `protect` kept). Returns the removed paths."""
    removed = []
    protect = set(protect)
    for pattern in patterns:
        files = iteration_files(pattern)
        for iteration, path in files[:-keep] if keep else []:
            if iteration in protect:
                continue
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


class RunLock:
    """An advisory lock on a run's outputs, so a second run writing the same files is refused.

    One lock file per output pattern (`.NAME.lock` beside it), held for the life of the run:
    fcntl.flock on POSIX, msvcrt.locking on Windows; the lock goes when the process ends, however
    it ends. The file records who holds it, for the refusal message.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.paths = sorted({self.lock_path(p) for p in patterns})
        self.handles: list = []

    @staticmethod
    def lock_path(pattern: str) -> str:
        folder, base = os.path.split(os.path.abspath(pattern))
        return os.path.join(folder, f".{base}.lock")

    def acquire(self) -> "RunLock":
        for path in self.paths:
            self.handles.append((path, self._lock_one(path)))
        return self

    def _lock_one(self, path: str):
        while True:
            f = open(path, "a+", encoding="utf-8")
            if not _try_lock(f):
                try:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                except OSError:  # Windows refuses to read a locked region
                    holder = "another process"
                f.close()
                self.release()
                raise file_error(path, f"another run is writing these outputs ({holder}); wait for it to "
                                       "finish or choose other --checkpoint-out / --lora-out names")
            try:  # the holder before us may have removed the file between our open and our lock
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
            except OSError:
                same = False
            if same:
                break
            _unlock(f)
            f.close()
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        return f

    def release(self) -> None:
        """Remove the lock files and let go (a killed run leaves its file, unlocked, for the next)."""
        for path, f in self.handles:
            try:
                os.unlink(path)
            except OSError:
                pass
            try:
                _unlock(f)
                f.close()
            except OSError:
                pass
        self.handles = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(f) -> bool:
    if sys.platform == "win32":
        import msvcrt

        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(f) -> None:
    if sys.platform == "win32":
        import msvcrt

        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def refuse_same_file(paths: dict[str, str]) -> None:
    """Two outputs (or an output and an input) pointing at one file is a mistake caught up front."""
    seen: dict[str, str] = {}
    for what, path in paths.items():
        if not path:
            continue
        key = os.path.normcase(os.path.abspath(path))
        if key in seen:
            raise LoraforgeError(f"{what} and {seen[key]} name the same file {path}")
        seen[key] = what
