"""NF4 against bitsandbytes itself (its CPU backend here, its CUDA kernels where a GPU is present):
the same packed codes and double-quantized scales, dequantization bit for bit in both directions,
and QLoRA forward/backward through `bitsandbytes.matmul_4bit` equal to the torch path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.quant import nf4
from loraforge.quant.nf4 import NF4Linear, NF4Tensor, dynamic_map, quantize_model

bnb = pytest.importorskip("bitsandbytes")
functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 512, generator=g) * 0.02
    w[5, 9] = 0.4  # an outlier block
    return w


def test_bitsandbytes_layout_and_dequantization(weight):
    packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = NF4Tensor.quantize(weight, backend="torch")
    # the 4-bit codes, two a byte with the first value in the high nibble, and the scale levels
    assert packed.shape == (weight.numel() // 2, 1) and torch.equal(packed.view(-1), ours.packed)
    assert torch.equal(state.state2.absmax, ours.absmax2) and torch.equal(state.offset, ours.offset)
    assert torch.equal(state.state2.code, dynamic_map()) and torch.equal(state.code, nf4.nf4_code())
    # Double-quantized scale codes: ours round to the nearest dynamic-map value as bitsandbytes' CUDA
    # kernel does; its CPU kernel looks the code up in a 65536-bin table over [-1, 1], so a value
    # within one bin of a midpoint can land one code away. Measured here: 1 code of 3072.
    differ = (state.absmax != ours.qabsmax).nonzero().flatten()
    assert len(differ) <= 0.005 * ours.qabsmax.numel()
    code = dynamic_map()
    centered = weight.reshape(-1, 64).abs().amax(dim=1) - ours.offset
    scaled = centered * (1.0 / ours.absmax2).repeat_interleave(256)[:centered.numel()]
    for i in differ.tolist():
        a, b = int(state.absmax[i]), int(ours.qabsmax[i])
        assert abs(a - b) == 1
        assert abs(float(scaled[i]) - float(code[a] + code[b]) / 2) <= 2.0 / 65535
    # dequantization: ours of bitsandbytes' state, and bitsandbytes' of ours, bit for bit
    theirs = NF4Tensor.from_bnb(packed, state)
    assert torch.equal(theirs.dequantize(), functional.dequantize_4bit(packed, state))
    assert torch.equal(functional.dequantize_4bit(ours.packed.view(-1, 1), ours.to_bnb_state()), ours.dequantize())
    # the decoded weights differ only where a scale code does (one block of 64 per code)
    diff_blocks = (theirs.dequantize() != ours.dequantize()).reshape(-1, 64).any(dim=1).nonzero().flatten()
    assert set(diff_blocks.tolist()) <= set(differ.tolist())


def test_odd_sized_tensor_has_bitsandbytes_byte_count():
    w = torch.randn(3, 70)  # 210 values: a partial last block
    packed, state = functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = NF4Tensor.quantize(w, backend="torch")
    assert ours.packed.shape == packed.view(-1).shape == (105,)
    assert torch.equal(NF4Tensor.from_bnb(packed, state).dequantize(), functional.dequantize_4bit(packed, state))
    assert torch.equal(functional.dequantize_4bit(ours.packed.view(-1, 1), ours.to_bnb_state()), ours.dequantize())


def _layer_pair(seed: int = 0) -> tuple[NF4Linear, NF4Linear]:
    torch.manual_seed(seed)
    torch_layer = NF4Linear.from_linear(nn.Linear(256, 192, bias=True), backend="torch")
    bnb_layer = copy.deepcopy(torch_layer)
    bnb_layer.backend = "bnb"
    return torch_layer, bnb_layer


def test_matmul_4bit_forward_backward_equal_torch_path():
    torch_layer, bnb_layer = _layer_pair()
    x = torch.randn(2, 7, 256)
    xt, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yb = torch_layer(xt), bnb_layer(xb)
    torch.testing.assert_close(yb, yt, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(yt)
    yt.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xt.grad, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # one row without gradient: bitsandbytes' gemv path
        one = torch.randn(1, 1, 256)
        torch.testing.assert_close(bnb_layer(one), torch_layer(one), rtol=1e-5, atol=1e-6)
    assert "backend=bnb" in repr(bnb_layer)


def test_qlora_model_same_loss_and_lora_gradients(tiny_hf_factory):
    from loraforge import lora
    from loraforge.loader import load_model

    _, folder = tiny_hf_factory("llama", seed=3)
    base = load_model(folder, base_dtype="f32").model
    reference = copy.deepcopy(base)
    # backend="bnb" quantizes with bitsandbytes: its state, as bitsandbytes.functional makes it
    assert quantize_model(base, "nf4", backend="bnb") == 7 * base.config.num_hidden_layers
    q_proj = base.model.layers[1].self_attn.q_proj
    packed, state = functional.quantize_4bit(reference.model.layers[1].self_attn.q_proj.weight.detach(),
                                             blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q_proj.packed, packed.view(-1)) and torch.equal(q_proj.qabsmax, state.absmax)
    # the same state through both products: bitsandbytes' matmul_4bit and the torch path (the tiny
    # model's 112-wide down_proj rows are not whole 64-weight blocks: those stay on the torch path)
    models = [base, copy.deepcopy(base)]
    for m in models[1].modules():
        if isinstance(m, NF4Linear):
            m.backend = "torch"
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for model in models:
        torch.manual_seed(0)
        lora.inject(model, lora.LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        loss, _ = model.loss(ids, ids.roll(-1, dims=1))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * base.config.num_hidden_layers
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_backend_errors(monkeypatch):
    with pytest.raises(LoraforgeError, match="NF4 backend must be one of auto, bnb, torch"):
        NF4Tensor.quantize(torch.randn(4, 64), backend="cuda")
    assert not nf4.use_bitsandbytes("auto", "cpu")  # auto: bitsandbytes only on CUDA
    monkeypatch.setattr(nf4, "bitsandbytes_available", lambda: False)
    with pytest.raises(LoraforgeError, match=r"needs bitsandbytes: pip install 'loraforge\[bnb\]'"):
        NF4Tensor.quantize(torch.randn(4, 64), backend="bnb")
    assert not nf4.use_bitsandbytes("auto", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bitsandbytes_quantizes_like_torch_and_multiplies(weight):
    """On CUDA "auto" is bitsandbytes; its kernel rounds scales to the nearest code exactly as ours."""
    w = weight.cuda()
    via_bnb = NF4Tensor.quantize(w, backend="auto")
    via_torch = NF4Tensor.quantize(w, backend="torch")
    for field in ("packed", "qabsmax", "absmax2", "offset"):
        assert torch.equal(getattr(via_bnb, field), getattr(via_torch, field)), field
    layer = NF4Linear.from_linear(nn.Linear(512, 384).cuda())
    assert layer.backend == "auto" and nf4.use_bitsandbytes(layer.backend, "cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    ref = nn.functional.linear(x.detach().float(), layer.dequantized_weight(torch.float32), layer.bias.float())
    assert (y.float() - ref).abs().max() < 0.05 and x.grad is not None
