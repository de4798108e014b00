"""Where the structural fields of a GGUF header lie, for tests that damage them on purpose.

A plain walk over the layout of the GGUF specification (ggml/docs/gguf.md), kept apart from
`loraforge.formats.gguf_file` so the tests do not find their targets with the code under test.
Only valid files are walked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class Field:
    offset: int  # byte offset in the file
    size: int  # 4 or 8 (little-endian unsigned), or the length of a string's bytes
    role: str  # version, n_tensors, n_kv, key_len, key, value_type, string_len, array_type, array_count,
    #            value, name_len, name, n_dims, dim, tensor_type, tensor_offset
    owner: str  # the key or tensor name the field belongs to ("" for the file header)


def header_fields(data: bytes, items_per_array: int = 3) -> list[Field]:
    """Every structural field of a valid GGUF header (of string arrays, the first few items' lengths)."""
    fields = [Field(4, 4, "version", ""), Field(8, 8, "n_tensors", ""), Field(16, 8, "n_kv", "")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(role_len: str, role: str, owner: str) -> tuple[str, int]:
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        fields.append(Field(pos, 8, role_len, owner))
        text = data[pos + 8: pos + 8 + n].decode("utf-8", errors="replace")
        if role:
            fields.append(Field(pos + 8, n, role, owner or text))
        pos += 8 + n
        return text, n

    for _ in range(n_kv):
        key, _ = string("key_len", "key", "")
        vtype = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(pos, 4, "value_type", key))
        pos += 4
        if vtype in SCALAR_SIZES:
            fields.append(Field(pos, SCALAR_SIZES[vtype], "value", key))
            pos += SCALAR_SIZES[vtype]
        elif vtype == STRING:
            string("string_len", "", key)
        else:
            etype, count = struct.unpack_from("<IQ", data, pos)
            fields += [Field(pos, 4, "array_type", key), Field(pos + 4, 8, "array_count", key)]
            pos += 12
            if etype in SCALAR_SIZES:
                pos += count * SCALAR_SIZES[etype]
            else:
                for i in range(count):
                    n = struct.unpack_from("<Q", data, pos)[0]
                    if i < items_per_array:
                        fields.append(Field(pos, 8, "string_len", key))
                    pos += 8 + n
    for _ in range(n_tensors):
        name, _ = string("name_len", "name", "")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append(Field(pos, 4, "n_dims", name))
        pos += 4
        for _ in range(n_dims):
            fields.append(Field(pos, 8, "dim", name))
            pos += 8
        fields += [Field(pos, 4, "tensor_type", name), Field(pos + 4, 8, "tensor_offset", name)]
        pos += 12
    return fields


def find(fields: list[Field], role: str, owner: str | None = None, nth: int = 0) -> Field:
    """The nth field with this role (and owner, when given)."""
    hits = [f for f in fields if f.role == role and (owner is None or f.owner == owner)]
    return hits[nth]


def patched(data: bytes, field: Field, value: int) -> bytes:
    """`data` with the integer field set to `value` (little-endian, the field's width)."""
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[field.size]
    return data[:field.offset] + struct.pack(fmt, value) + data[field.offset + field.size:]


# --- small valid files to damage ------------------------------------------------------------------

TINY_MODEL = dict(arch="llama", vocab_size=260, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_model_config():
    from loraforge.config import ModelConfig

    return ModelConfig(**TINY_MODEL)


def tiny_lora_model(seed: int = 0):
    """(CausalLM with rank-4 LoRA on q/v/down and AdamW moments after one step, optimizer, LoraConfig)."""
    import torch

    from loraforge import lora
    from loraforge.model import CausalLM

    torch.manual_seed(seed)
    model = CausalLM(tiny_model_config())
    lora_cfg = lora.LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    lora.inject(model, lora_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 260, (1, 8))
    model.loss(ids, ids)[0].backward()
    optimizer.step()
    return model, optimizer, lora_cfg


def write_tiny_adapter(path, seed: int = 0) -> str:
    """A GGUF LoRA (q/v/down of the tiny model) written by loraforge."""
    from loraforge import lora
    from loraforge.formats.gguf_lora import write_gguf_adapter

    model, _, lora_cfg = tiny_lora_model(seed)
    write_gguf_adapter(str(path), lora.to_adapter(model, lora_cfg), tiny_model_config(), "llama")
    return str(path)


def write_tiny_checkpoint(path, seed: int = 0) -> str:
    from loraforge.train.checkpoint import TrainState, save_checkpoint

    model, optimizer, lora_cfg = tiny_lora_model(seed)
    save_checkpoint(str(path), model, optimizer, lora_cfg, TrainState(iteration=1, seed=seed),
                    tiny_model_config(), {"batch": 1})
    return str(path)


def write_small_gguf(path, alignment: int | None = None) -> str:
    """Three tensors (f32, Q8_0, f32 1-D) and a few keys of each kind, written by gguf-py."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_string("test.string", "hello")
    w.add_uint32("test.aaa", 7)
    w.add_uint32("test.bbb", 8)
    w.add_array("test.words", ["one", "two", "three"])
    w.add_array("test.numbers", [1, 2, 3, 4])
    rng = np.random.default_rng(0)
    w.add_tensor("ta", rng.standard_normal((4, 8)).astype(np.float32))
    q = rng.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("tq", gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("tb", rng.standard_normal((5,)).astype(np.float32))  # 20 bytes: the file ends in padding
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
