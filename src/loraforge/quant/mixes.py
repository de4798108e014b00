"""llama.cpp's named quantization mixes (Q4_K_M, Q5_K_M, Q6_K, Q8_0, ...): which type each tensor gets.

`llama-quantize model.gguf out.gguf Q4_K_M` does not write every matrix as Q4_K: the
per-tensor choice of src/llama-quant.cpp (`llama_tensor_get_type` and its helpers, the path
without an importance matrix) gives attn_v and some ffn_down layers more bits, stores the
output matrix (or the tied token embedding) as Q6_K, and falls back to a 32-weight type when a
row is not a whole number of 256-weight super-blocks. This module repeats those rules for the
dense llama-family models loraforge handles (no experts), so a file written with a mix here
has the types llama.cpp's own quantizer would give it (tests/parity/test_quantize_llamacpp.py
compares them tensor by tensor).

Outtype names: every llama-quantize file type (q4_0 ... q8_0, q2_k, q3_k_s/m/l, q4_k_s/m,
q5_k_s/m, q6_k, f16, bf16, f32) means that mix; q3_k, q4_k and q5_k, which are no file type of
their own, mean every quantizable matrix in that type (llama-quantize --pure).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import LoraforgeError

T = GGMLQuantizationType
F = LlamaFileType

# llama-quantize file type -> the type most matrices get (llama_ftype_get_default_type)
MIX_DEFAULT_TYPES: dict[str, T] = {
    "f32": T.F32, "f16": T.F16, "bf16": T.BF16,
    "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0,
    "q2_k": T.Q2_K, "q3_k_s": T.Q3_K, "q3_k_m": T.Q3_K, "q3_k_l": T.Q3_K,
    "q4_k_s": T.Q4_K, "q4_k_m": T.Q4_K, "q5_k_s": T.Q5_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K,
}
# names that are a single type for every quantizable matrix (no llama.cpp file type of their own)
PURE_TYPES: dict[str, T] = {"q3_k": T.Q3_K, "q4_k": T.Q4_K, "q5_k": T.Q5_K}

# general.file_type written for each outtype (pure K types: what llama.cpp's loader guesses for them)
FILE_TYPES: dict[str, int] = {
    "f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
    "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "q5_0": F.MOSTLY_Q5_0, "q5_1": F.MOSTLY_Q5_1,
    "q8_0": F.MOSTLY_Q8_0, "q2_k": F.MOSTLY_Q2_K, "q3_k_s": F.MOSTLY_Q3_K_S, "q3_k_m": F.MOSTLY_Q3_K_M,
    "q3_k_l": F.MOSTLY_Q3_K_L, "q4_k_s": F.MOSTLY_Q4_K_S, "q4_k_m": F.MOSTLY_Q4_K_M,
    "q5_k_s": F.MOSTLY_Q5_K_S, "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K,
    "q3_k": F.MOSTLY_Q3_K_M, "q4_k": F.MOSTLY_Q4_K_M, "q5_k": F.MOSTLY_Q5_K_M,
}
OUTTYPES: tuple[str, ...] = tuple(MIX_DEFAULT_TYPES) + tuple(PURE_TYPES)

# the file type llama.cpp's loader infers from the most common tensor type (llama_model_loader)
_GUESSED_FILE_TYPES: dict[int, int] = {
    T.F32: F.ALL_F32, T.F16: F.MOSTLY_F16, T.BF16: F.MOSTLY_BF16, T.Q4_0: F.MOSTLY_Q4_0,
    T.Q4_1: F.MOSTLY_Q4_1, T.Q5_0: F.MOSTLY_Q5_0, T.Q5_1: F.MOSTLY_Q5_1, T.Q8_0: F.MOSTLY_Q8_0,
    T.Q2_K: F.MOSTLY_Q2_K, T.Q3_K: F.MOSTLY_Q3_K_M, T.Q4_K: F.MOSTLY_Q4_K_M, T.Q5_K: F.MOSTLY_Q5_K_M,
    T.Q6_K: F.MOSTLY_Q6_K,
}

# K-quant fallback when a row is not whole super-blocks (tensor_type_fallback)
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


@dataclass(frozen=True)
class ArchInfo:
    """What the rules read from the model besides a tensor's name and shape.

    arch: GGUF general.architecture; n_head / n_head_kv: attention heads (n_gqa = n_head / n_head_kv);
    tied: True when the file has no output.weight (the token embedding is also the output layer).
    """

    arch: str = "llama"
    n_head: int = 1
    n_head_kv: int = 1
    tied: bool = False

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(1, self.n_head_kv)


def parse_outtype(name: str) -> str:
    """Normalise an outtype ("Q4_K_M" -> "q4_k_m"); raise LoraforgeError for unknown names."""
    key = name.strip().lower()
    if key not in MIX_DEFAULT_TYPES and key not in PURE_TYPES:
        raise LoraforgeError(f"unknown quantization type {name!r}; choose one of {', '.join(OUTTYPES)}")
    return key


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes matrices whose name ends in "weight", except norms and a few small kinds."""
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    skip = ("ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d", "attn_rel_b.weight",
            "position_embd", "token_types", "time_mix_", "shortconv.conv.weight", ".patch_embd")
    return not any(part in name for part in skip)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                      ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                      ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                      ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def _mix_rule(mix: str, default: T, category: str, n_cols: int, i_wv: int, n_wv: int, i_ffn: int,
              n_ffn: int, info: ArchInfo) -> T:
    """llama_tensor_get_type_impl for the file types above (no imatrix, no experts)."""
    falcon = info.arch == "falcon"
    if category == "output" or (info.tied and category == "token_embd"):
        if falcon or n_cols % GGML_QUANT_SIZES[default][0]:
            return T.Q8_0
        return default if default == T.Q8_0 else T.Q6_K
    if category == "attn_v":
        new = default
        if mix == "q2_k":
            new = T.Q4_K if info.n_gqa >= 4 else T.Q3_K
        elif mix == "q3_k_m":
            new = T.Q5_K if i_wv < 2 else T.Q4_K
        elif mix == "q3_k_l":
            new = T.Q5_K
        elif mix in ("q4_k_m", "q5_k_m") and _use_more_bits(i_wv, n_wv):
            new = T.Q6_K
        elif mix == "q4_k_s" and i_wv < 4:
            new = T.Q5_K
        if info.arch == "llama" and n_ffn == 80 and info.n_head != info.n_head_kv and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K  # LLM_TYPE_70B (80 llama blocks with GQA): attn_v is 8x smaller than attn_q there
        return new
    if category == "ffn_down":
        if mix == "q2_k":
            return T.Q3_K
        if mix == "q3_k_m":
            if i_ffn < n_ffn // 16:
                return T.Q5_K
            return T.Q4_K if not falcon or _use_more_bits(i_ffn, n_ffn) else T.Q3_K
        if mix == "q3_k_l":
            return T.Q4_K if falcon else T.Q5_K
        if mix == "q4_k_m":
            if falcon:
                return T.Q6_K if i_ffn < n_ffn // 16 else T.Q5_K if _use_more_bits(i_ffn, n_ffn) else T.Q4_K
            return T.Q6_K if _use_more_bits(i_ffn, n_ffn) else default
        if mix == "q5_k_m" and _use_more_bits(i_ffn, n_ffn):
            return T.Q6_K
        if mix == "q4_k_s" and not falcon and i_ffn < n_ffn // 8:
            return T.Q5_K
        return default
    if category == "attn_output":
        if falcon:
            return T.Q4_K if mix == "q3_k_l" else default
        return {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}.get(mix, default)
    return default


def _fallback(qtype: T, n_cols: int) -> T:
    """A type whose blocks fit a row of n_cols weights (tensor_type_fallback; F16 as the last resort).

    llama.cpp refuses a row that is not whole 32-weight blocks for the 32-weight types; F16 is
    written here instead.
    """
    if n_cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, T.F16)
    return qtype if n_cols % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def _choose(name: str, shape: tuple[int, ...], mix: str, i_wv: int, n_wv: int, i_ffn: int, n_ffn: int,
            info: ArchInfo) -> T | None:
    if not allows_quantization(name, shape):
        return None
    if mix in PURE_TYPES:
        return _fallback(PURE_TYPES[mix], shape[-1])
    default = MIX_DEFAULT_TYPES[mix]
    if default in (T.F32, T.F16, T.BF16):
        return default
    return _fallback(_mix_rule(mix, default, _category(name), shape[-1], i_wv, n_wv, i_ffn, n_ffn, info), shape[-1])


_BLOCK = re.compile(r"blk\.(\d+)\.")


def mix_tensor_type(gguf_name: str, shape: tuple[int, ...], mix: str, n_layers: int,
                    arch_info: ArchInfo) -> T | None:
    """The type llama-quantize gives tensor `gguf_name` (torch-order `shape`, (rows, cols)) in `mix`.

    None: llama.cpp does not quantize this tensor (1-D, norms, ...): it keeps its type. The
    layer rules read the block number of the name (blk.N.); llama.cpp counts attn_v and
    ffn_down tensors in layer order, which is the same for models with one of each per block
    (use `mix_tensor_types` for a whole file, which counts as llama.cpp does).
    """
    mix = parse_outtype(mix)
    match = _BLOCK.search(gguf_name)
    layer = int(match.group(1)) if match else 0
    return _choose(gguf_name, tuple(shape), mix, layer, n_layers, layer, n_layers, arch_info)


def _llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (weight_name_comparer): non-block tensors first, then by block, then name."""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def mix_tensor_types(tensors: Iterable[tuple[str, tuple[int, ...]]], mix: str, n_layers: int,
                     arch_info: ArchInfo) -> dict[str, T | None]:
    """`mix_tensor_type` for every tensor of a model, with llama.cpp's counters.

    tensors: (GGUF name, torch-order shape) pairs; n_layers: the model's block count.
    Returns name -> type (None: kept as it is). attn_v-like tensors and ffn_down tensors are
    numbered in llama.cpp's processing order (by block, then name).
    """
    mix = parse_outtype(mix)
    items = sorted(((name, tuple(shape)) for name, shape in tensors), key=lambda item: _llama_order(item[0]))
    n_wv = sum(1 for name, _ in items if _category(name) == "attn_v")
    i_wv = i_ffn = 0
    out: dict[str, T | None] = {}
    for name, shape in items:
        out[name] = _choose(name, shape, mix, i_wv, n_wv, i_ffn, n_layers, arch_info)
        if out[name] is not None and mix not in PURE_TYPES:
            i_wv += _category(name) == "attn_v"
            i_ffn += _category(name) == "ffn_down"
    return out


def file_type_default(file_type: int) -> T | None:
    """The type most matrices of a file of this general.file_type have (None: not a type named here)."""
    for name, value in FILE_TYPES.items():
        if int(value) == int(file_type) and name in MIX_DEFAULT_TYPES:
            return MIX_DEFAULT_TYPES[name]
    return None


def guess_file_type(types: Iterable[int]) -> int:
    """general.file_type for a file whose matrices have these types: the most common one's file type
    (as llama.cpp's loader guesses it when the key is missing)."""
    counts: dict[int, int] = {}
    best, best_count = int(T.F32), 0
    for qtype in types:
        counts[int(qtype)] = counts.get(int(qtype), 0) + 1
        if counts[int(qtype)] > best_count:
            best, best_count = int(qtype), counts[int(qtype)]
    return int(_GUESSED_FILE_TYPES.get(best, F.ALL_F32))


def file_type_name(value: int) -> str:
    """"Q4_K_M" for 15, "F16" for 1 ... (the names llama-quantize uses)."""
    try:
        return LlamaFileType(int(value) & ~int(F.GUESSED)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {int(value)}"
