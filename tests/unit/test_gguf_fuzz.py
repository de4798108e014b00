"""Fuzzing the GGUF readers with damaged copies of real headers: whatever the bytes, the only
exception is a one-line LoraforgeError, and no more memory is taken than a small bound over the
file's size (nothing is allocated for a count or length before it is checked against the file).

Mutations aim at the structural fields (counts, lengths, types, dims, offsets) with values at the
edges (0, 2^31, 2^32-1, 2^63 ...), plus random header bytes and truncation. Derandomized, so a
run is repeatable; example counts keep it to about a minute on two cores (FUZZ_N and FUZZ_N_HEAD
in the environment raise them for a longer search).
"""

from __future__ import annotations

import os
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_damage import header_fields, tiny_model_config, write_tiny_adapter, write_tiny_checkpoint
from loraforge.errors import LoraforgeError

EDGE_VALUES = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 48, 64, 255, 256, 2**16 - 1, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
SMALL_ALLOCATION = 4 << 20
BYTES_PER_FILE_BYTE = 24  # numeric arrays become Python lists: up to ~18 bytes per uint16 in the file


class Target:
    """A valid file, where its structural fields lie, and the readers to run on damaged copies."""

    def __init__(self, path: str, readers) -> None:
        self.data = open(path, "rb").read()
        self.fields = [f for f in header_fields(self.data) if f.size in (4, 8) and f.role not in ("key", "name")]
        self.value_types = [f for f in self.fields if f.role == "value_type"]
        self.header_end = max(f.offset + f.size for f in header_fields(self.data))
        self.readers = readers
        self.scratch = path + ".damaged"


def mutations(target: Target):
    field_edit = st.tuples(st.just("field"), st.sampled_from(target.fields),
                           st.one_of(st.sampled_from(EDGE_VALUES), st.integers(0, 2**64 - 1)))
    # a scalar read as another type of the same width: uint32 as int32 (-1) or float32 (NaN) ...
    retype = st.tuples(st.just("field"), st.sampled_from(target.value_types), st.sampled_from([4, 5, 6, 7, 0, 1]))
    byte_edit = st.tuples(st.just("byte"), st.integers(0, target.header_end - 1), st.integers(0, 255))
    cut = st.tuples(st.just("cut"), st.integers(0, len(target.data) - 1), st.just(0))
    return st.lists(st.one_of(field_edit, field_edit, retype, byte_edit, cut), min_size=1, max_size=3)


def damaged(target: Target, edits) -> bytes:
    data = bytearray(target.data)
    for kind, where, value in sorted(edits, key=lambda e: e[0] == "cut"):  # cuts last
        if kind == "field":
            width = where.size
            data[where.offset:where.offset + width] = struct.pack("<I" if width == 4 else "<Q", value % 2**(8 * width))
        elif kind == "byte":
            data[where] = value
        else:
            del data[where:]
    return bytes(data)


def only_one_line_errors(target: Target, edits) -> None:
    data = damaged(target, edits)
    with open(target.scratch, "wb") as f:
        f.write(data)
    for reader in target.readers:
        tracemalloc.start()
        try:
            reader(target.scratch)
        except LoraforgeError as e:
            assert "\n" not in str(e) and target.scratch in str(e), str(e)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        bound = SMALL_ALLOCATION + BYTES_PER_FILE_BYTE * len(data)
        assert peak < bound, f"{reader.__name__}: {peak} bytes allocated for a {len(data)}-byte file"


FUZZ = settings(max_examples=int(os.environ.get("FUZZ_N", 150)), deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def smollm2_head(smollm2_path, tmp_path_factory) -> Target:
    """The first 2.5 MB of SmolLM2: its whole header (49k-token vocabulary) and the first tensors."""
    from loraforge.formats.gguf_file import read_gguf

    path = tmp_path_factory.mktemp("fuzz") / "smollm2-head.gguf"
    with open(smollm2_path, "rb") as src:
        path.write_bytes(src.read(2_500_000))
    return Target(str(path), [read_gguf])


@pytest.fixture(scope="module")
def tiny_files(tiny_gguf_path, tmp_path_factory) -> list[Target]:
    from loraforge.commands.inspect import describe
    from loraforge.formats.gguf import read_model
    from loraforge.formats.gguf_lora import read_gguf_adapter
    from loraforge.loader import load_model
    from loraforge.merge import kv_records
    from loraforge.train.checkpoint import load_checkpoint

    folder = tmp_path_factory.mktemp("fuzz")
    cfg = tiny_model_config()

    def adapter_for_tiny_model(path: str):
        return read_gguf_adapter(path, cfg)

    model = folder / "model.gguf"
    model.write_bytes(open(tiny_gguf_path, "rb").read())
    return [Target(str(model), [describe, read_model, kv_records, load_model]),
            Target(write_tiny_adapter(folder / "adapter.gguf"), [describe, adapter_for_tiny_model]),
            Target(write_tiny_checkpoint(folder / "chk.gguf"), [describe, load_checkpoint])]


def test_fuzz_smollm2_header(smollm2_head):
    @settings(FUZZ, max_examples=int(os.environ.get("FUZZ_N_HEAD", 40)))
    @given(mutations(smollm2_head))
    def run(edits):
        only_one_line_errors(smollm2_head, edits)

    run()
    os.remove(smollm2_head.scratch)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["model", "adapter", "checkpoint"])
def test_fuzz_tiny_files(tiny_files, which):
    target = tiny_files[which]

    @FUZZ
    @given(mutations(target))
    def run(edits):
        only_one_line_errors(target, edits)

    run()
