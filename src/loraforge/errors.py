"""The one exception type users see as a one-line message (exit status 2)."""

from __future__ import annotations

import os


class LoraforgeError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


def file_error(path: str | os.PathLike, problem: str) -> LoraforgeError:
    """An error that names the file and the problem: `"<path>: <problem>"`."""
    return LoraforgeError(f"{os.fspath(path)}: {problem}")
