"""Fine-tunes of a Hugging Face base, proven by llama.cpp and peft.

- A LoRA made by peft on a tiny untied HF llama (q/k/v/o/gate/up/down + embed_tokens + lm_head),
  exported with `loraforge export --to gguf -m HF_FOLDER` and loaded by llama.cpp on the base
  converted by `loraforge convert`: its effect on the logits equals peft's (f32, <= 1e-3).
- The same adapter merged with `loraforge merge -m HF_FOLDER --lora PEFT -o x.gguf`: llama.cpp's logits
  of the merged GGUF vs loraforge's own model on the same (dequantized) weights, and vs peft.
- Mistral: the adapter is written as architecture "llama" (what llama.cpp's converter labels Mistral),
  llama.cpp loads it on the converted Mistral base, and older "mistral"-labelled adapters still pair
  with llama-arch bases in `merge` and `export` both ways.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from adapter_models import LlamaCpp
from conftest import make_tiny_hf_model
from convert_models import cycle_tokens, train_on_cycle
from loraforge.cli import main

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
TOKENS = [5, 70, 100, 3, 44, 200, 17, 9, 257, 31, 128, 64, 250, 2, 90, 11]
MERGE_OUTTYPES = ["f32", "q8_0", "q4_k_m"]


def make_peft(model, folder, targets, seed: int = 1):
    """A peft LoRA with random nonzero A/B saved in `folder`; returns peft's logits on TOKENS."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.05,
                        rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 3.0})
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()  # eval: no dropout
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        logits = peft_model(torch.tensor([TOKENS])).logits[0].numpy()
    peft_model.save_pretrained(folder)
    return logits


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    """(HF folder, converted f32 base GGUF, peft folder, peft logits, base logits) for an untied llama."""
    root = tmp_path_factory.mktemp("hf_adapter")
    folder = root / "base"
    model = make_tiny_hf_model(folder, "llama", seed=4)
    train_on_cycle(model, steps=15)
    model.save_pretrained(folder)
    with torch.no_grad():
        base_logits = model(torch.tensor([TOKENS])).logits[0].numpy()
    peft_logits = make_peft(model, root / "peft", TARGETS)
    base_gguf = root / "base-f32.gguf"
    assert main(["convert", str(folder), "-o", str(base_gguf), "--outtype", "f32"]) == 0
    return folder, base_gguf, root / "peft", peft_logits, base_logits, model


def test_exported_adapter_in_llama_cpp_equals_peft(llama_case, tmp_path):
    folder, base_gguf, peft_dir, peft_logits, base_logits, _ = llama_case
    out = tmp_path / "adapter.gguf"
    assert main(["export", "--in", str(peft_dir), "--to", "gguf", "-m", str(folder), "--out", str(out)]) == 0
    lcpp = LlamaCpp(str(base_gguf), n_ctx=32)
    base = lcpp.logits(TOKENS)
    adapted = lcpp.logits(TOKENS, [(str(out), 1.0)])
    assert np.abs(base - base_logits).max() <= 1e-3  # the converted base itself
    effect, expected = adapted - base, peft_logits - base_logits
    assert np.abs(expected).max() > 0.05  # the adapter (incl. embeddings and lm_head) really changes the logits
    assert np.abs(effect - expected).max() <= 1e-3


@pytest.mark.parametrize("outtype", MERGE_OUTTYPES)
def test_merged_hf_finetune_in_llama_cpp(llama_case, tmp_path, outtype, capsys):
    from loraforge.loader import load_model

    folder, _, peft_dir, peft_logits, _, model = llama_case
    out = tmp_path / f"merged-{outtype}.gguf"
    assert main(["merge", "-m", str(folder), "--lora", str(peft_dir), "-o", str(out), "--outtype", outtype]) == 0
    tokens = cycle_tokens(model.config.vocab_size, 128, start=3)
    lcpp = LlamaCpp(str(out), n_ctx=128).logits(tokens)
    ours_model = load_model(str(out), base_dtype="f32").model.eval()  # the same weights, dequantized
    with torch.no_grad():
        ours = ours_model(torch.tensor([tokens]))
        ours = (ours.logits if hasattr(ours, "logits") else ours)[0].float().numpy()
    diff = float(np.abs(lcpp - ours).max())
    top1 = float((lcpp.argmax(-1) == ours.argmax(-1)).mean())
    lcpp_short = LlamaCpp(str(out), n_ctx=32).logits(TOKENS)
    vs_peft = float(np.abs(lcpp_short - peft_logits).max())
    with capsys.disabled():
        print(f"\nmerged {outtype}: llama.cpp vs loraforge (same weights) max |diff| {diff:.2e}, top-1 {top1:.3f} "
              f"over {len(tokens)} positions; vs peft (f32) max |diff| {vs_peft:.2e}, logits up to "
              f"{np.abs(ours).max():.1f}")
    if outtype == "f32":
        assert diff <= 1e-3 and vs_peft <= 1e-3
    elif outtype == "q8_0":  # llama.cpp also rounds activations to 8 bits in q8_0 matmuls
        assert diff <= 0.02 * np.abs(ours).max() and top1 >= 0.99
    else:  # and to Q8_K for K-quant matmuls
        assert diff <= 0.05 * np.abs(ours).max() and top1 >= 0.95
        # the same mix as llama.cpp's own quantize of our f32 merge: per-tensor types and size
        import ctypes

        from loraforge.formats.gguf_file import read_gguf

        f32 = tmp_path / "merged-f32.gguf"
        assert main(["merge", "-m", str(folder), "--lora", str(peft_dir), "-o", str(f32), "--outtype", "f32"]) == 0
        theirs = tmp_path / "llama-q4_k_m.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
        ours_types = {t.name: t.qtype for t in read_gguf(out).tensors}
        assert ours_types == {t.name: t.qtype for t in read_gguf(theirs).tensors}
        size_ratio = out.stat().st_size / theirs.stat().st_size
        with capsys.disabled():
            print(f"merged q4_k_m: {out.stat().st_size} bytes, llama.cpp's quantize of the f32 merge "
                  f"{theirs.stat().st_size} bytes ({size_ratio:.4f}x)")
        assert abs(size_ratio - 1) <= 0.02


@pytest.fixture(scope="module")
def mistral_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral_adapter")
    folder = root / "base"
    model = make_tiny_hf_model(folder, "mistral", seed=6)
    with torch.no_grad():
        base_logits = model(torch.tensor([TOKENS])).logits[0].numpy()
    peft_logits = make_peft(model, root / "peft", ["q_proj", "k_proj", "v_proj", "o_proj"], seed=2)
    base_gguf = root / "base.gguf"
    assert main(["convert", str(folder), "-o", str(base_gguf), "--outtype", "f32"]) == 0
    return folder, base_gguf, root / "peft", peft_logits, base_logits


def test_mistral_adapter_is_llama_arch_and_loads(mistral_case, tmp_path):
    from loraforge.formats.gguf_file import read_gguf

    folder, base_gguf, peft_dir, peft_logits, base_logits = mistral_case
    out = tmp_path / "adapter.gguf"
    assert main(["export", "--in", str(peft_dir), "--to", "gguf", "-m", str(folder), "--out", str(out)]) == 0
    assert read_gguf(out).metadata["general.architecture"] == "llama"
    lcpp = LlamaCpp(str(base_gguf), n_ctx=32)
    effect = lcpp.logits(TOKENS, [(str(out), 1.0)]) - lcpp.logits(TOKENS)
    assert np.abs(effect - (peft_logits - base_logits)).max() <= 1e-3


def test_mistral_labelled_adapter_pairs_both_ways(mistral_case, tmp_path):
    """An adapter labelled "mistral" (as loraforge wrote them before) with the llama-arch GGUF base, and a
    "llama" adapter with the HF Mistral base: merge and export --to peft accept both pairings."""
    import gguf

    from loraforge.formats.gguf_file import read_gguf

    folder, base_gguf, peft_dir, peft_logits, _ = mistral_case
    llama_labelled = tmp_path / "llama.gguf"
    assert main(["export", "--in", str(peft_dir), "--to", "gguf", "-m", str(folder), "--out", str(llama_labelled)]) == 0
    gf = read_gguf(llama_labelled)
    mistral_labelled = tmp_path / "mistral.gguf"
    w = gguf.GGUFWriter(str(mistral_labelled), "mistral")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(gf.metadata["adapter.lora.alpha"]))
    for t in gf.tensors:
        w.add_tensor(t.name, np.array(gf.data(t)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for adapter, base in ((mistral_labelled, base_gguf), (llama_labelled, folder), (mistral_labelled, folder)):
        assert main(["merge", "-m", str(base), "--lora", str(adapter), "-o", str(tmp_path / "m.gguf"),
                     "--outtype", "f32"]) == 0, (adapter, base)
        assert main(["export", "--in", str(adapter), "--to", "peft", "-m", str(base),
                     "--out", str(tmp_path / f"peft-{adapter.stem}-{base.name}")]) == 0, (adapter, base)
    merged = LlamaCpp(str(tmp_path / "m.gguf"), n_ctx=32).logits(TOKENS)
    assert np.abs(merged - peft_logits).max() <= 1e-3
    config = json.loads((tmp_path / "peft-mistral-base.gguf" / "adapter_config.json").read_text())
    assert config["loraforge_base_gguf"] == "base.gguf"
