"""Instruction / chat datasets from local JSON, JSONL, CSV and Parquet files.

Every good row becomes a record:
  {"row": n, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  (alpaca rows also keep "fields": {"instruction", "input", "output"} for user templates),
or, for plain text, {"row": n, "text": str}.

Formats (detected from the columns unless given):
  messages           {"messages": [{"role", "content"}, ...]}            (OpenAI style)
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
  alpaca             {"instruction", "input" (optional), "output"}   -> user / assistant
  prompt_completion  {"prompt", "completion"}                         -> user / assistant
  text               {"text"}
`columns` maps these field names to the file's own, e.g. {"instruction": "question"} (or the
command-line form "instruction=question,output=answer").

Row numbers are 1-based: the line number in JSONL, the item number in a JSON array, the data
row in CSV (header not counted) and Parquet. A bad row (missing field, wrong type, empty
response, unknown role) is never dropped silently: with on_bad_row="skip" it is left out and
listed as a `BadRow`; with "error" the first one stops the load with a one-line message.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from loraforge.errors import LoraforgeError, file_error

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
BAD_ROW_POLICIES = ("skip", "error")
EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (and a few common variants) -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system"}
FIELDS = ("instruction", "input", "output", "prompt", "completion", "text", "messages", "conversations")
_DETECT_ROWS = 50


@dataclass(frozen=True)
class BadRow:
    """A row left out (or rejected), with its 1-based row number and the reason."""

    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


class RecordList(list):
    """The good records of a file (a list of dicts) plus what the load found.

    Attributes: path, format, rows_read (rows in the file), bad_rows (list[BadRow]).
    """

    def __init__(self, records: list[dict], path: str, fmt: str, rows_read: int, bad_rows: list[BadRow]):
        super().__init__(records)
        self.path, self.format, self.rows_read, self.bad_rows = path, fmt, rows_read, bad_rows


def load_records(path: str | os.PathLike, fmt: str = "auto", columns: dict[str, str] | str | None = None,
                 on_bad_row: str = "skip") -> RecordList:
    """Read a .json / .jsonl / .csv / .parquet file into normalised records (see module doc)."""
    path = os.fspath(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise LoraforgeError(f"--data-format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise LoraforgeError(f"--on-bad-row must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_row!r}")
    columns = parse_columns(columns) if isinstance(columns, str) else _check_columns(columns or {})
    if not os.path.isfile(path):
        raise file_error(path, "no such file")
    raw_rows = list(_read_rows(path))
    if not raw_rows:
        raise file_error(path, "no rows")
    rows = [(n, _rename(r, columns) if isinstance(r, dict) else r) for n, r in raw_rows]
    if fmt == "auto":
        fmt = detect_format([r for _, r in rows], path)
    records: list[dict] = []
    bad: list[BadRow] = []
    for n, row in rows:
        try:
            records.append(normalise_row(row, fmt, n))
        except _RowProblem as problem:
            if on_bad_row == "error":
                raise file_error(path, f"row {n}: {problem} (use --on-bad-row skip to leave such rows "
                                       "out)") from None
            bad.append(BadRow(n, str(problem)))
    if not records:
        first = f"; first problem: {bad[0]}" if bad else ""
        raise file_error(path, f"no usable rows in {len(rows)} ({fmt} format){first}")
    return RecordList(records, path, fmt, len(rows), bad)


def parse_columns(spec: str) -> dict[str, str]:
    """"instruction=question,output=answer" -> {"instruction": "question", "output": "answer"}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise LoraforgeError(f"--columns: expected FIELD=COLUMN pairs separated by commas, got {part!r}")
        out[ours.strip()] = theirs.strip()
    return _check_columns(out)


def _check_columns(columns: dict[str, str]) -> dict[str, str]:
    unknown = [k for k in columns if k not in FIELDS]
    if unknown:
        raise LoraforgeError(f"--columns: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    return dict(columns)


def _rename(row: dict, columns: dict[str, str]) -> dict:
    """Apply the column map: our field name <- the file's column name."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns}
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


# -- reading ------------------------------------------------------------------------------------

class _BadJSON:
    """A JSONL line that did not parse; reported as a bad row."""

    def __init__(self, error: str) -> None:
        self.error = error


def _read_rows(path: str) -> Iterator[tuple[int, Any]]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise file_error(path, f"unsupported data file type {ext or '(none)'!r} "
                               f"(use {', '.join(EXTENSIONS)})")
    if ext == ".parquet":
        yield from enumerate(_read_parquet(path), start=1)
        return
    try:
        with open(path, encoding="utf-8-sig", newline="" if ext == ".csv" else None) as f:
            if ext == ".csv":
                yield from enumerate(_read_csv(f, path), start=1)
            elif ext == ".jsonl":
                yield from _read_jsonl(f)
            else:
                text = f.read()
                yield from _read_json(text, path)
    except UnicodeDecodeError:
        from loraforge.data.text import not_utf8_message

        with open(path, "rb") as f:
            raw = f.read()
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise file_error(path, "is UTF-16 text; convert it to UTF-8 first "
                                   f"(e.g. iconv -f utf-16 -t utf-8 {path} > {path}.utf8)") from None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise file_error(path, not_utf8_message(raw, e)) from None
        raise


def _read_jsonl(lines) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, _BadJSON(f"not valid JSON ({e.msg} at column {e.colno})")


def _read_json(text: str, path: str) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl(text.splitlines())
            return
        raise file_error(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and ("data" in data or "rows" in data or "train" in data):
            data = lists[0]
    if not isinstance(data, list):
        raise file_error(path, "expected a JSON array of objects (or JSON lines)")
    yield from enumerate(data, start=1)


def _read_csv(f, path: str) -> Iterator[dict]:
    reader = csv.DictReader(f)
    if not reader.fieldnames:
        raise file_error(path, "empty CSV file (no header row)")
    for row in reader:
        # a short row leaves None values; extra cells land under the key None
        yield {k: v for k, v in row.items() if k is not None and v is not None}


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise file_error(path, "reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise file_error(path, f"not a readable Parquet file ({e})") from None


# -- format detection ---------------------------------------------------------------------------

def format_of_row(row: Any) -> str | None:
    """The format a single row looks like, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def detect_format(rows: list[Any], path: str = "data") -> str:
    """The format most of the first rows have; an error naming the columns when none fits."""
    votes: dict[str, int] = {}
    for row in rows[:_DETECT_ROWS]:
        fmt = format_of_row(row)
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    if not votes:
        sample = next((r for r in rows if isinstance(r, dict)), None)
        keys = ", ".join(map(str, sample)) if sample else "none"
        raise file_error(path, f"cannot tell the data format from the columns ({keys}); expected "
                               "messages, conversations, instruction/output, prompt/completion or text; "
                               "use --data-format and --columns to say which columns to use")
    return max(votes, key=votes.get)


# -- normalisation and validation ---------------------------------------------------------------

class _RowProblem(Exception):
    pass


def _text_field(row: dict, name: str, required: bool = True, allow_empty: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise _RowProblem(f"missing field {name!r}")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise _RowProblem(f"field {name!r} is {type(value).__name__}, expected text")
    if not allow_empty and not value.strip():
        raise _RowProblem(f"empty {name!r}")
    return value


def _message_list(row: dict, name: str) -> list:
    value = row.get(name)
    if value is None:
        raise _RowProblem(f"missing field {name!r}")
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _RowProblem(f"field {name!r} is text that is not a JSON list of messages") from None
    if not isinstance(value, (list, tuple)):
        raise _RowProblem(f"field {name!r} is {type(value).__name__}, expected a list of messages")
    if not value:
        raise _RowProblem(f"field {name!r} is an empty list")
    return list(value)


def _check_conversation(messages: list[dict], name: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowProblem(f"{name}: no assistant message to train on")
    for i, m in enumerate(messages, start=1):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _RowProblem(f"{name}: message {i} is an empty assistant response")
    if any(m["role"] == "system" for m in messages[1:]):
        raise _RowProblem(f"{name}: a system message must come first")


def _normalise_messages(row: dict, name: str, role_key: str, content_key: str,
                        role_map: dict[str, str] | None) -> list[dict]:
    out = []
    for i, m in enumerate(_message_list(row, name), start=1):
        if not isinstance(m, dict):
            raise _RowProblem(f"{name}: message {i} is {type(m).__name__}, expected an object")
        role = m.get(role_key, m.get("role"))
        content = m.get(content_key, m.get("content"))
        if role is None:
            raise _RowProblem(f"{name}: message {i} has no {role_key!r}")
        if content is None:
            raise _RowProblem(f"{name}: message {i} has no {content_key!r}")
        if not isinstance(content, str):
            raise _RowProblem(f"{name}: message {i} content is {type(content).__name__}, expected text")
        role_name = str(role).lower()
        mapped = (role_map or {}).get(role_name, role_name)
        if mapped not in ROLES:
            raise _RowProblem(f"{name}: message {i} has unknown role {role!r}")
        out.append({"role": mapped, "content": content})
    _check_conversation(out, name)
    return out


def normalise_row(row: Any, fmt: str, n: int) -> dict:
    """One raw row -> a record (see module doc); raises _RowProblem for a bad row."""
    if isinstance(row, _BadJSON):
        raise _RowProblem(row.error)
    if not isinstance(row, dict):
        raise _RowProblem(f"is {type(row).__name__}, expected an object")
    if fmt == "text":
        return {"row": n, "text": _text_field(row, "text", allow_empty=False)}
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction", allow_empty=False)
        inp = _text_field(row, "input", required=False)
        output = _text_field(row, "output", allow_empty=False)
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        return {"row": n, "messages": [{"role": "user", "content": user},
                                       {"role": "assistant", "content": output}],
                "fields": {"instruction": instruction, "input": inp, "output": output}}
    if fmt == "prompt_completion":
        prompt = _text_field(row, "prompt")
        completion = _text_field(row, "completion", allow_empty=False)
        return {"row": n, "messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": completion}]}
    if fmt == "messages":
        return {"row": n, "messages": _normalise_messages(row, "messages", "role", "content", None)}
    if fmt == "sharegpt":
        return {"row": n, "messages": _normalise_messages(row, "conversations", "from", "value",
                                                          SHAREGPT_ROLES)}
    raise LoraforgeError(f"unknown data format {fmt!r}")
