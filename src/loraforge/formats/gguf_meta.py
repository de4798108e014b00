"""GGUF key/value metadata as plain Python values.

`gguf.GGUFReader` keeps every field as a list of numpy views, one (or two, for strings)
per array element. Converting a 49k-entry token list element by element is slow, so
arrays are read here straight from the memory map in one slice: numeric arrays as one
numpy view, string arrays by walking one contiguous byte buffer.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

# Fields the reader synthesises from the file header; they are not key/value pairs.
_HEADER_PSEUDO_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


def metadata_dict(reader: GGUFReader) -> dict[str, Any]:
    """Every key/value field of a GGUF file as a Python value.

    Scalars become `int`, `float`, `bool` or `str`; arrays become lists of those
    (string arrays decoded as UTF-8 `str`). The reader's header pseudo-fields
    (`GGUF.version`, ...) are left out.
    """
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name in _HEADER_PSEUDO_FIELDS:
            continue
        out[name] = field_value(reader, field)
    return out


def field_value(reader: GGUFReader, field: ReaderField) -> Any:
    """One field's value (see `metadata_dict`)."""
    main_type = field.types[0]
    if main_type == GGUFValueType.STRING:
        return _decode(bytes(field.parts[-1]))
    if main_type != GGUFValueType.ARRAY:
        return _scalar(field.parts[-1], main_type)
    if not field.data or len(field.types) < 2:
        return []
    item_type = field.types[1]
    if item_type == GGUFValueType.ARRAY:
        # Nested arrays are rare (no tokenizer or model key uses them): go element by element.
        return field.contents()
    if item_type == GGUFValueType.STRING:
        return _string_array(reader, field)
    return _numeric_array(reader, field, item_type)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace")


def _scalar(part: np.ndarray, value_type: GGUFValueType) -> Any:
    value = part[0].item()
    return bool(value) if value_type == GGUFValueType.BOOL else value


def _offset_in_file(reader: GGUFReader, part: np.ndarray) -> int:
    """Byte offset of a numpy view of the reader's memory map."""
    return part.ctypes.data - reader.data.ctypes.data


def _numeric_array(reader: GGUFReader, field: ReaderField, value_type: GGUFValueType) -> list[Any]:
    first = field.parts[field.data[0]]
    count = len(field.data)
    start = _offset_in_file(reader, first)
    values = reader.data[start : start + count * first.dtype.itemsize].view(first.dtype)
    if value_type == GGUFValueType.BOOL:
        return [bool(v) for v in values.tolist()]
    return values.tolist()


def _string_array(reader: GGUFReader, field: ReaderField) -> list[str]:
    # Layout in the file: for each element a uint64 length, then that many bytes.
    first_length = field.parts[field.data[0] - 1]
    last = field.parts[field.data[-1]]
    start = _offset_in_file(reader, first_length)
    end = _offset_in_file(reader, last) + last.nbytes
    raw = reader.data[start:end].tobytes()
    byteorder = sys.byteorder if reader.byte_order == "I" else ("big" if sys.byteorder == "little" else "little")
    from_bytes = int.from_bytes
    strings: list[str] = []
    append = strings.append
    pos = 0
    for _ in range(len(field.data)):
        length = from_bytes(raw[pos : pos + 8], byteorder)
        pos += 8
        chunk = raw[pos : pos + length]
        pos += length
        try:
            append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            append(chunk.decode("utf-8", errors="replace"))
    if pos != len(raw):
        raise ValueError(f"GGUF string array {field.name!r}: lengths do not add up to its bytes")
    return strings
