"""Our GGUF quantizers and named mixes against llama.cpp's own quantizer (llama-cpp-python).

1. Every block type on the matrices of a small llama GGUF file (f32; an f16 file for four
   types, as llama.cpp's converter writes them) with realistic weights: normal values with a sprinkle of outliers
   10-50x larger, plus rows of zeros, constants and a lone spike. llama.cpp quantizes the file
   with `llama_model_quantize` (pure: every matrix in one type); each tensor's bytes must equal
   `quantize_tensor` of the same input values. The RMSE of both against the float weights is
   printed (run with -s for the table) and ours must not be worse.
2. Blocks llama.cpp's arithmetic treats specially (all zero, -0.0, subnormal, constant, scales
   that underflow, a spike over tiny values) through `ggml_quantize_chunk`, the function
   llama-quantize calls, loaded from llama-cpp-python's libggml.
3. The named mixes (Q4_K_M, Q5_K_M, Q6_K, Q8_0 and the other llama-quantize file types): the
   type of every tensor and `general.file_type` of llama.cpp's output equal `mix_tensor_types`
   on an 8-layer model (layer-dependent attn_v / ffn_down rules), a tied one (the token
   embedding is the output layer) and one whose rows (128, 192) are not whole 256-weight
   super-blocks (K-quant fallbacks); on the last, the bytes of every tensor are compared too.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from loraforge.formats.gguf_file import read_gguf  # noqa: E402
from loraforge.quant.ggml import dequantize  # noqa: E402
from loraforge.quant.mixes import FILE_TYPES, ArchInfo, mix_tensor_type, mix_tensor_types  # noqa: E402
from loraforge.quant.quantize import quantize_tensor  # noqa: E402

pytestmark = pytest.mark.llamacpp
T = GGMLQuantizationType

# block type -> a llama.cpp file type whose default type it is (quantized with pure=True)
PURE_FTYPES = {T.Q8_0: 7, T.Q4_0: 2, T.Q4_1: 3, T.Q5_0: 8, T.Q5_1: 9, T.Q2_K: 10, T.Q3_K: 12, T.Q4_K: 15,
               T.Q5_K: 17, T.Q6_K: 18}
MIXES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_k_s", "q5_k_s", "q3_k_m", "q2_k", "q4_0", "f16")


@pytest.fixture(scope="module", autouse=True)
def quiet_llamacpp():
    """llama.cpp logs every tensor it quantizes; llama-cpp-python's log hook prints by its logger level."""
    import logging

    from llama_cpp._logger import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def realistic(rng, shape: tuple[int, ...], scale: float = 0.02) -> np.ndarray:
    """Normal weights with ~0.2% outliers 10-50x larger (as trained matrices have)."""
    w = rng.standard_normal(shape).astype(np.float32) * scale
    spikes = rng.random(shape) < 0.002
    w[spikes] *= rng.uniform(10, 50, int(spikes.sum())).astype(np.float32)
    return w


def write_model(path, gguf_writer, layers: int, hidden: int, ff: int, heads: int, kv_heads: int, tied: bool,
                seed: int, qtype=None) -> str:
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    config = dict(model_type="llama", hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=300,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    tensors = {"model.embed_tokens.weight": realistic(rng, (300, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv_heads * head_dim, hidden)),
                            ("self_attn.v_proj", (kv_heads * head_dim, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (ff, hidden)), ("mlp.up_proj", (ff, hidden)),
                            ("mlp.down_proj", (hidden, ff))):
            tensors[p + name + ".weight"] = realistic(rng, shape)
        tensors[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)
        tensors[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)
    special = tensors["model.layers.0.mlp.up_proj.weight"]
    special[0] = 0.0  # a zero row
    special[1] = 0.03125  # a constant row
    special[2, : hidden // 2] = 0.0
    special[2, 7] = 0.9  # a lone spike among zeros
    special[3] = np.abs(special[3])  # all positive (no negative minimum)
    tensors["model.norm.weight"] = np.ones(hidden, np.float32)
    if not tied:
        tensors["lm_head.weight"] = realistic(rng, (300, hidden))
    return gguf_writer(path, config, tensors, qtype=qtype)


@pytest.fixture(scope="module")
def models(tmp_path_factory, gguf_writer) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("quant-models")
    return {
        "f32": write_model(folder / "f32.gguf", gguf_writer, 2, 256, 512, 8, 2, False, seed=1),
        "f16": write_model(folder / "f16.gguf", gguf_writer, 2, 256, 512, 8, 2, False, seed=2, qtype=T.F16),
        "untied8": write_model(folder / "untied8.gguf", gguf_writer, 8, 256, 512, 8, 2, False, seed=3),
        "tied8": write_model(folder / "tied8.gguf", gguf_writer, 8, 256, 512, 8, 4, True, seed=4),
        "narrow8": write_model(folder / "narrow8.gguf", gguf_writer, 8, 128, 192, 4, 2, True, seed=5),
    }


def llama_quantize(src: str, dst: str, ftype: int, pure: bool = False) -> str:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = pure
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for file type {ftype}"
    return dst


def float_tensors(path: str) -> dict[str, torch.Tensor]:
    """The model's tensors as float32 (what llama.cpp quantizes: f16 is widened exactly)."""
    gf = read_gguf(path)
    return {t.name: dequantize(torch.from_numpy(np.ascontiguousarray(gf.data(t)).view(np.uint8)), t.qtype, t.shape)
            for t in gf.tensors}


def rmse(qtype: int, data: np.ndarray, shape: tuple[int, ...], reference: torch.Tensor) -> float:
    values = dequantize(torch.from_numpy(np.ascontiguousarray(data).view(np.uint8)), qtype, shape)
    return float(torch.sqrt(torch.mean((values.double() - reference.double()) ** 2)))


@pytest.mark.parametrize("model", ["f32", "f16"])
def test_every_block_type_is_byte_identical_to_llamacpp(models, model, tmp_path):
    src = models[model]
    inputs = float_tensors(src)
    rows = []
    # f16 input only widens exactly to float32 first: a few types show that path
    types = PURE_FTYPES if model == "f32" else {t: PURE_FTYPES[t] for t in (T.Q8_0, T.Q4_1, T.Q4_K, T.Q6_K)}
    for qtype, ftype in types.items():
        out = read_gguf(llama_quantize(src, str(tmp_path / f"{qtype.name}.gguf"), ftype, pure=True))
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_blocks = n_equal = 0
        err_ours = err_theirs = 0.0
        for t in out.tensors:
            if t.qtype != qtype:
                assert len(t.shape) == 1, f"{t.name} is {T(t.qtype).name} in llama.cpp's pure {qtype.name} file"
                continue
            theirs = np.asarray(out.data(t)).view(np.uint8).reshape(-1, type_size)
            ours = quantize_tensor(inputs[t.name], qtype).reshape(-1, type_size)
            n_blocks += len(ours)
            n_equal += int((ours == theirs).all(axis=1).sum())
            err_ours += rmse(qtype, ours, t.shape, inputs[t.name]) ** 2 * inputs[t.name].numel()
            err_theirs += rmse(qtype, theirs, t.shape, inputs[t.name]) ** 2 * inputs[t.name].numel()
        n_weights = n_blocks * block_size
        rows.append((qtype.name, n_blocks, n_equal / n_blocks, (err_ours / n_weights) ** 0.5,
                     (err_theirs / n_weights) ** 0.5))
    print(f"\n{model} model: type | blocks | byte-equal blocks | RMSE ours | RMSE llama.cpp")
    for name, n, equal, ours, theirs in rows:
        print(f"{name:5s} | {n:6d} | {100 * equal:7.3f}% | {ours:.4e} | {theirs:.4e}")
    for name, n, equal, ours, theirs in rows:
        assert ours <= theirs * (1 + 1e-9) + 1e-12, f"{name}: RMSE {ours:.4e} worse than llama.cpp's {theirs:.4e}"
        assert equal == 1.0, f"{name}: only {100 * equal:.3f}% of {n} blocks byte-identical"


def edge_rows(rng) -> np.ndarray:
    rows = [np.zeros(256), -np.zeros(256), np.where(np.arange(256) % 3 == 0, -0.0, 0.0), np.full(256, 0.25),
            np.full(256, -0.25), np.full(256, 3e-39), rng.standard_normal(256) * 1e-30,
            rng.standard_normal(256) * 1e-38, np.abs(rng.standard_normal(256)) + 5,
            -np.abs(rng.standard_normal(256)) - 5, np.round(rng.standard_normal(256) * 4) / 4,
            rng.integers(-3, 4, 256) * 0.125, rng.standard_normal(256) * 6e4]
    spike = rng.standard_normal(256) * 1e-7
    spike[5] = 1.0
    lone = np.zeros(256)
    lone[40], lone[41] = -1e-3, 1e-20
    half = rng.standard_normal(256)
    half[rng.random(256) < 0.5] = 0.0
    return np.stack(rows + [spike, lone, half]).astype(np.float32)


@pytest.mark.parametrize("qtype", list(PURE_FTYPES) + [T.F16, T.BF16], ids=lambda t: t.name)
def test_edge_blocks_match_ggml_quantize_chunk(qtype):
    libggml = pytest.importorskip("llama_cpp._ggml", reason="llama-cpp-python without its ggml module").libggml

    libggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    libggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(edge_rows(np.random.default_rng(7)))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    theirs = np.zeros((x.shape[0], x.shape[1] // block_size * type_size), dtype=np.uint8)
    libggml.ggml_quantize_chunk(int(qtype), x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], x.shape[1], None)
    ours = quantize_tensor(torch.from_numpy(x), qtype)
    bad = [i for i in range(len(x)) if not np.array_equal(ours[i], theirs[i])]
    assert not bad, f"{qtype.name}: rows {bad} differ from ggml_quantize_chunk"


@pytest.mark.parametrize("model", ["untied8", "tied8", "narrow8"])
def test_named_mixes_give_llamacpp_types(models, model, tmp_path):
    src = models[model]
    gf = read_gguf(src)
    meta = gf.metadata
    info = ArchInfo("llama", meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
                    tied=not any(t.name == "output.weight" for t in gf.tensors))
    n_layers = meta["llama.block_count"]
    inputs = float_tensors(src) if model == "narrow8" else {}
    ours_cache: dict[tuple[str, int], np.ndarray] = {}
    for mix in MIXES:
        out = read_gguf(llama_quantize(src, str(tmp_path / f"{mix}.gguf"), FILE_TYPES[mix]))
        ours = mix_tensor_types([(t.name, t.shape) for t in gf.tensors], mix, n_layers, info)
        source_types = {t.name: t.qtype for t in gf.tensors}
        for t in out.tensors:
            expected = ours[t.name] if ours[t.name] is not None else source_types[t.name]
            assert t.qtype == expected, (f"{model} {mix}: {t.name} is {T(t.qtype).name} in llama.cpp's file, "
                                         f"{T(expected).name} here")
            single = mix_tensor_type(t.name, t.shape, mix, n_layers, info)
            assert single == ours[t.name], f"{mix}: {t.name}: one-tensor rule {single}, counted {ours[t.name]}"
            if inputs and t.qtype != source_types[t.name]:
                key = (t.name, t.qtype)
                if key not in ours_cache:
                    ours_cache[key] = quantize_tensor(inputs[t.name], t.qtype)
                theirs = np.asarray(out.data(t)).view(np.uint8).reshape(ours_cache[key].shape)
                assert np.array_equal(ours_cache[key], theirs), f"{mix}: {t.name} ({T(t.qtype).name}) bytes differ"
        assert out.metadata["general.file_type"] == FILE_TYPES[mix]
    if model == "narrow8":  # the fallbacks really happened
        used = {qtype for _, qtype in ours_cache}
        assert {T.Q5_0, T.Q8_0, T.Q4_0} <= used, sorted(T(t).name for t in used)
    else:
        q4km = mix_tensor_types([(t.name, t.shape) for t in gf.tensors], "q4_k_m", n_layers, info)
        by_type = {q: sorted(n for n, v in q4km.items() if v == q) for q in (T.Q4_K, T.Q6_K)}
        assert any("attn_v" in n for n in by_type[T.Q6_K]) and any("attn_v" in n for n in by_type[T.Q4_K])
        assert any("ffn_down" in n for n in by_type[T.Q6_K]) and any("ffn_down" in n for n in by_type[T.Q4_K])
