"""8-bit AdamW (bitsandbytes) as `make_optimizer(name=...)`: it learns a small task as torch's
AdamW does, and its quantized state survives a checkpoint exactly (N steps == k + resume + N-k)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, inject, load_adapter_tensors
from loraforge.train.checkpoint import TrainState, load_checkpoint, restore_optimizer, save_checkpoint
from loraforge.train.optim import make_optimizer, optimizer_name

pytest.importorskip("bitsandbytes")

# Wide enough that most LoRA tensors reach bitsandbytes' 4096-element threshold for 8-bit state
# (rank 16: every lora_A is 16 x 256; q/o/gate/up lora_B are 256 or 512 x 16; k/v's 128 x 16 stay fp32).
WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
LORA = LoraConfig(r=16, alpha=16)
LR, STEPS, BATCH, SEQ, N_TOKENS = 1e-2, 20, 8, 16, 16


@pytest.fixture(scope="module")
def wide_folder(tiny_hf_factory) -> str:
    return tiny_hf_factory("llama", seed=11, **WIDE)[1]


def _model(folder: str):
    from loraforge.loader import load_model

    loaded = load_model(folder, base_dtype="f32")
    torch.manual_seed(0)
    inject(loaded.model, LORA)
    return loaded


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed mapping to learn: 16 input tokens, each labelled with its own (random) output token."""
    sources = torch.randperm(256, generator=torch.Generator().manual_seed(7))[:N_TOKENS]
    targets = torch.randperm(256, generator=torch.Generator().manual_seed(123))[:N_TOKENS]
    which = torch.randint(0, N_TOKENS, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))
    return sources[which], targets[which]


def _train(model, optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        ids, labels = _batch(step)
        loss, _ = model.loss(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _eval_loss(model) -> float:
    with torch.no_grad():
        return sum(model.loss(*_batch(10_000 + i))[0].item() for i in range(3)) / 3


def test_adamw_8bit_learns_like_adamw(wide_folder):
    results = {}
    for name in ("adamw_torch", "adamw_8bit"):
        loaded = _model(wide_folder)
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, LR, 0.0, 0.9, 0.999, name=name)
        assert optimizer_name(opt) == name
        before = _eval_loss(loaded.model)
        _train(loaded.model, opt, range(STEPS))
        results[name] = (before, _eval_loss(loaded.model))
        if name == "adamw_8bit":
            kinds = {st["state1"].dtype for st in opt.state.values()}
            assert kinds == {torch.uint8, torch.float32}  # 8-bit moments, fp32 under 4096 elements
    (b32, a32), (b8, a8) = results["adamw_torch"], results["adamw_8bit"]
    print(f"\nheld-out loss after {STEPS} steps: AdamW {b32:.3f} -> {a32:.3f}, AdamW8bit {b8:.3f} -> {a8:.3f}")
    assert b32 == b8
    # measured: AdamW 5.570 -> 1.361, AdamW8bit 5.570 -> 1.362
    assert a32 < 0.5 * b32  # the mapping is being learned
    assert abs(a8 - a32) < 0.05 * (b32 - a32)  # 8-bit moments: within 5% of AdamW's loss drop


def _checkpoint(path: Path, loaded, opt, iteration: int) -> None:
    save_checkpoint(str(path), loaded.model, opt, LORA, TrainState(iteration=iteration), loaded.config, {})


def test_8bit_state_resumes_exactly(wide_folder, tmp_path: Path):
    n, k, name = 6, 3, "adamw_8bit"
    straight = _model(wide_folder)
    opt = make_optimizer([p for p in straight.model.parameters() if p.requires_grad], LR, 0.01, 0.9, 0.999,
                         name=name)
    losses_straight = _train(straight.model, opt, range(n))

    first = _model(wide_folder)
    opt1 = make_optimizer([p for p in first.model.parameters() if p.requires_grad], LR, 0.01, 0.9, 0.999, name=name)
    losses = _train(first.model, opt1, range(k))
    path = tmp_path / "chk.gguf"
    _checkpoint(path, first, opt1, k)

    ckpt = load_checkpoint(str(path))
    assert ckpt.optimizer_name == "adamw_8bit"
    assert not ckpt.moments and ckpt.optimizer_state
    resumed = _model(wide_folder)
    opt2 = make_optimizer([p for p in resumed.model.parameters() if p.requires_grad], LR, 0.01, 0.9, 0.999,
                          name=name)
    load_adapter_tensors(resumed.model, ckpt.tensors)
    restore_optimizer(opt2, resumed.model, ckpt)
    for p, q in zip(opt1.param_groups[0]["params"], opt2.param_groups[0]["params"]):
        assert opt1.state[p].keys() == opt2.state[q].keys()
        for key, value in opt1.state[p].items():
            assert torch.equal(value, opt2.state[q][key]) if torch.is_tensor(value) else value == opt2.state[q][key]
    losses += _train(resumed.model, opt2, range(k, n))
    assert losses == losses_straight
    for (na, a), (nb, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert na == nb and torch.equal(a, b), na


def test_optimizer_choice_and_errors(wide_folder, tmp_path: Path, monkeypatch):
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(64, 64))]
    assert type(make_optimizer(params, 1e-3, 0.0, 0.9, 0.999)) is torch.optim.AdamW  # the default
    assert type(make_optimizer(params, 1e-3, 0.0, 0.9, 0.999, name="adamw_8bit")) is bnb.optim.AdamW8bit
    # paged states live in CUDA unified memory; on the CPU the optimizer is the unpaged one
    assert type(make_optimizer(params, 1e-3, 0.0, 0.9, 0.999, name="paged_adamw_8bit")) is bnb.optim.AdamW8bit
    with pytest.raises(LoraforgeError, match="--optim must be one of adamw_torch, adamw_8bit, paged_adamw_8bit"):
        make_optimizer(params, 1e-3, 0.0, 0.9, 0.999, name="sgd")

    # a checkpoint of 8-bit state does not resume into torch's AdamW
    loaded = _model(wide_folder)
    opt8 = make_optimizer([p for p in loaded.model.parameters() if p.requires_grad], LR, 0.0, 0.9, 0.999,
                          name="adamw_8bit")
    _train(loaded.model, opt8, range(1))
    _checkpoint(tmp_path / "c.gguf", loaded, opt8, 1)
    opt32 = make_optimizer([p for p in loaded.model.parameters() if p.requires_grad], LR, 0.0, 0.9, 0.999)
    with pytest.raises(LoraforgeError, match="holds adamw_8bit optimizer state.*resume with --optim adamw_8bit"):
        restore_optimizer(opt32, loaded.model, load_checkpoint(str(tmp_path / "c.gguf")))

    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)  # as if bitsandbytes were not installed
    with pytest.raises(LoraforgeError, match=r"--optim adamw_8bit needs bitsandbytes .*pip install 'loraforge\[bnb\]'"):
        make_optimizer(params, 1e-3, 0.0, 0.9, 0.999, name="adamw_8bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_adamw_8bit_on_cuda():
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.randn(256, 256, device="cuda"))
    opt = make_optimizer([p], 1e-3, 0.0, 0.9, 0.999, name="paged_adamw_8bit")
    assert type(opt) is bnb.optim.PagedAdamW8bit and optimizer_name(opt) == "paged_adamw_8bit"
    before = p.detach().clone()
    p.square().sum().backward()
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8 and not torch.equal(before, p.detach())
