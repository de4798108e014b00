"""GGUF quantization without llama.cpp: the legacy types against the gguf package's numpy
quantizers (an independent port of the same reference code), properties of the K-quants that
hold whatever the reference does (round trip within the format's step, chunking and threads
not changing a byte), the outtype names, the merge command's refusals, and CUDA = CPU bytes.
The byte-for-byte comparison with llama.cpp itself is tests/parity/test_quantize_llamacpp.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.quant.ggml import dequantize
from loraforge.quant.mixes import ArchInfo, mix_tensor_type, parse_outtype
from loraforge.quant.quantize import quantize_tensor, quantize_tensor_torch

T = GGMLQuantizationType
LEGACY = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16, T.BF16]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# RMSE / std of the bulk of `weights` (0.2% outliers 25x larger widen some blocks' steps) after a
# round trip; measured 0.400 / 0.211 / 0.134 / 0.068 / 0.044, bounds ~15% above
KQUANT_ROUND_TRIP = {T.Q2_K: 0.46, T.Q3_K: 0.24, T.Q4_K: 0.155, T.Q5_K: 0.078, T.Q6_K: 0.051}


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    spikes = rng.random(w.shape) < 0.002
    w[spikes] *= 25
    w[0] = 0.0
    w[1, :64] = 0.5
    return w


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_types_equal_the_gguf_package(qtype):
    x = weights(64, 512)
    ours = quantize_tensor(torch.from_numpy(x), qtype)
    theirs = np.asarray(gguf_quants.quantize(x, qtype)).view(np.uint8).reshape(ours.shape)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_kquant_round_trip_error(qtype):
    x = torch.from_numpy(weights(32, 1024, seed=1))
    data = quantize_tensor(x, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    assert data.shape == (32, 1024 // block * size)
    back = dequantize(torch.from_numpy(data), qtype, x.shape)
    assert torch.equal(back[0], torch.zeros(1024))  # a zero row decodes to zeros
    normal = x[2:].abs() < 0.1  # the outliers are kept too, but judge the bulk
    rel = float(torch.sqrt(torch.mean((back[2:] - x[2:])[normal] ** 2)) / x[2:][normal].std())
    assert rel < KQUANT_ROUND_TRIP[qtype], f"{qtype.name}: relative RMSE {rel:.3f}"


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q3_K, T.Q8_0], ids=lambda t: t.name)
def test_chunks_and_threads_change_no_byte(qtype, monkeypatch):
    """A tensor split over many chunks (and threads) encodes exactly as row slices encoded alone."""
    import loraforge.quant.quantize as q

    x = torch.from_numpy(weights(48, 768, seed=2))
    monkeypatch.setitem(q._CHUNK_WEIGHTS, qtype, 2048)
    monkeypatch.setattr(q, "_DEFAULT_CHUNK", 2048)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole = quantize_tensor(x, qtype)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    parts = np.concatenate([quantize_tensor(x[i:i + 5], qtype) for i in range(0, 48, 5)])
    assert np.array_equal(whole, parts)


def test_bad_shapes_and_types_are_refused():
    with pytest.raises(LoraforgeError, match="multiple of 256"):
        quantize_tensor(torch.zeros(4, 128), T.Q4_K)
    with pytest.raises(LoraforgeError, match="cannot quantize"):
        quantize_tensor(torch.zeros(4, 256), T.IQ2_XXS)


def test_outtype_names():
    assert parse_outtype("Q4_K_M") == "q4_k_m"
    with pytest.raises(LoraforgeError, match="unknown quantization type 'q4_k_x'"):
        parse_outtype("q4_k_x")
    info = ArchInfo("llama", 32, 8, tied=False)
    assert mix_tensor_type("blk.0.attn_norm.weight", (4096,), "q4_k_m", 32, info) is None
    assert mix_tensor_type("output.weight", (32000, 4096), "q4_k_m", 32, info) == T.Q6_K
    assert mix_tensor_type("blk.5.ffn_up.weight", (11008, 4096), "q4_k", 32, info) == T.Q4_K
    assert mix_tensor_type("blk.5.ffn_up.weight", (11008, 4000), "q4_k", 32, info) == T.Q5_0  # fallback
    assert mix_tensor_type("blk.5.ffn_up.weight", (11008, 4001), "q8_0", 32, info) == T.F16  # no 32-block fits


@pytest.mark.parametrize("argv,words", [
    (["--outtype", "q9_9"], ["--outtype 'q9_9' is not available for GGUF output", "q4_k_m"]),
    (["--outtype", "q4_k_m", "--to", "hf"], ["quantized types are for GGUF output"]),
])
def test_merge_refuses_unknown_outtypes(tmp_path, capsys, tiny_gguf_path, argv, words):
    out = tmp_path / ("m.gguf" if "hf" not in argv else "m")
    rc = main(["merge", "-m", tiny_gguf_path, "-o", str(out)] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    for word in words:
        assert word in err[0], err[0]
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", LEGACY[:5] + KQUANTS, ids=lambda t: t.name)
def test_cuda_encodes_the_same_bytes(qtype):
    x = torch.from_numpy(weights(64, 1024, seed=3))
    cpu = quantize_tensor_torch(x, qtype)
    gpu = quantize_tensor_torch(x.cuda(), qtype)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


def test_merge_with_overflowing_scale_writes_nothing(tmp_path, capsys, tiny_gguf_path):
    from loraforge.formats.gguf_lora import write_gguf_adapter
    from loraforge.lora import Adapter
    from loraforge.merge import base_config

    cfg, arch = base_config(tiny_gguf_path)
    g = torch.Generator().manual_seed(0)
    adapter = Adapter(tensors={"model.layers.0.self_attn.q_proj.lora_A": torch.randn(2, cfg.hidden_size, generator=g),
                               "model.layers.0.self_attn.q_proj.lora_B": torch.randn(cfg.hidden_size, 2, generator=g)},
                      alpha=2.0)
    write_gguf_adapter(tmp_path / "a.gguf", adapter, cfg, arch)
    out = tmp_path / "m.gguf"
    rc = main(["merge", "-m", tiny_gguf_path, "--lora-scaled", str(tmp_path / "a.gguf"), "1e38", "-o", str(out),
               "--outtype", "q4_0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "non-finite" in err[-1] and "blk.0.attn_q.weight" in err[-1], err
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "a.gguf"]
