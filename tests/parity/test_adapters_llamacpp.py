"""Adapters proven by llama.cpp (llama-cpp-python) on an all-f32 tiny llama GGUF (f32 weights and
KV cache, so the bound is tight: llama.cpp and transformers agree to ~1e-6 on these logits).

- a LoRA made by peft itself (nonzero B; q/k/v/o/gate/up/down + embed_tokens + lm_head; a
  rank_pattern and an alpha_pattern), converted by `loraforge export`, gives peft's logits;
- a merged GGUF equals base + the same adapters at the same scales in llama.cpp;
- a tied model's adapter on the embeddings, merged (with a separate output.weight), gives our
  model's logits, and the llama.cpp limitation that makes such an adapter unloadable is real.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from adapter_models import LlamaCpp, make_tiny_llama, random_adapter, write_tiny_gguf
from loraforge import cli, lora
from loraforge.formats.adapters import load_adapter
from loraforge.formats.gguf_lora import write_gguf_adapter
from loraforge.formats.peft import write_peft

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")

TOKENS = [1, 504, 3458, 314, 253, 1345, 28, 4000, 12, 999, 48000, 77, 5, 31, 2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
TOL = 2e-5  # observed: ~4e-7 on logits of magnitude ~1; f32 everywhere


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    """(transformers model, f32 GGUF path, llama.cpp runner) of an untied tiny llama."""
    folder = tmp_path_factory.mktemp("tiny_lcpp")
    model = make_tiny_llama(seed=0)
    path = write_tiny_gguf(folder / "base.gguf", model, smollm2_path)
    return model, path, LlamaCpp(path)


@pytest.fixture(scope="module")
def peft_made(tiny, tmp_path_factory):
    """A LoRA made and saved by peft (random nonzero A and B), and peft's logits on TOKENS."""
    from peft import LoraConfig, get_peft_model

    model, _, _ = tiny
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                        rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 3.0})
    peft_model = get_peft_model(copy.deepcopy(model), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        logits = peft_model(torch.tensor([TOKENS])).logits[0].numpy()
    folder = tmp_path_factory.mktemp("peft_made") / "adapter"
    peft_model.save_pretrained(folder)
    return str(folder), logits


def run_cli(argv: list[str]) -> None:
    assert cli.main(argv) == 0, argv


def test_tiny_base_matches_transformers_in_llamacpp(tiny):
    model, _, lcpp = tiny
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(lcpp.logits(TOKENS) - ref).max() < TOL


def test_peft_adapter_converted_to_gguf_gives_peft_logits_in_llamacpp(tiny, peft_made, tmp_path):
    model, base, lcpp = tiny
    folder, peft_logits = peft_made
    with torch.no_grad():
        base_logits = model(torch.tensor([TOKENS])).logits[0].numpy()
    effect = np.abs(peft_logits - base_logits).max()
    assert effect > 0.3  # the adapter matters, so a wrong conversion shows
    out = tmp_path / "from_peft.gguf"
    run_cli(["export", "--in", folder, "--out", str(out), "--model-base", base])
    got = lcpp.logits(TOKENS, [(str(out), 1.0)])
    diff = np.abs(got - peft_logits).max()
    print(f"peft -> GGUF in llama.cpp: max |logit diff| {diff:.2e} (adapter effect {effect:.2f})")
    assert diff < TOL
    # the scale acts as peft's scaling multiplier: half the scale, half the low-rank delta
    half = lcpp.logits(TOKENS, [(str(out), 0.5)])
    assert np.abs(half - peft_logits).max() > 0.1 * effect
    # f16 / bf16 / q8_0 adapter tensors load too (q8_0 only where rows are whole 32-value blocks)
    for outtype, bound in (("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)):
        run_cli(["export", "--in", folder, "--out", str(tmp_path / f"{outtype}.gguf"), "--model-base", base,
                 "--outtype", outtype])
        typed = lcpp.logits(TOKENS, [(str(tmp_path / f"{outtype}.gguf"), 1.0)])
        print(f"{outtype} adapter: max |logit diff| {np.abs(typed - peft_logits).max():.2e}")
        assert np.abs(typed - peft_logits).max() < bound * effect
    # back to PEFT and again to GGUF: still the same adapter for llama.cpp
    run_cli(["export", "--in", str(out), "--out", str(tmp_path / "back"), "--model-base", base])
    run_cli(["export", "--in", str(tmp_path / "back"), "--out", str(tmp_path / "again.gguf"), "--model-base", base])
    assert np.abs(lcpp.logits(TOKENS, [(str(tmp_path / "again.gguf"), 1.0)]) - peft_logits).max() < TOL


def test_merged_gguf_equals_base_plus_adapters_in_llamacpp(tiny, peft_made, tmp_path):
    model, base, lcpp = tiny
    from loraforge.merge import base_config

    cfg, _ = base_config(base)
    ours = random_adapter(cfg, ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "lm_head"], rank=3,
                          seed=2, alpha=5.0, use_rslora=True, ranks={"model.layers.0.self_attn.k_proj": 6})
    write_gguf_adapter(tmp_path / "ours.gguf", ours, cfg, "llama")
    run_cli(["export", "--in", peft_made[0], "--out", str(tmp_path / "peft.gguf"), "--model-base", base])
    scales = [(str(tmp_path / "peft.gguf"), 0.7), (str(tmp_path / "ours.gguf"), -0.4)]
    reference = lcpp.logits(TOKENS, scales)
    assert np.abs(reference - lcpp.logits(TOKENS)).max() > 0.2
    # the PEFT folder itself is accepted too (any adapter format is)
    run_cli(["merge", "-m", base, "--lora-scaled", peft_made[0], "0.7", "--lora-scaled", str(tmp_path / "ours.gguf"),
             "-0.4", "-o", str(tmp_path / "merged.gguf"), "--outtype", "f32"])
    merged = LlamaCpp(str(tmp_path / "merged.gguf")).logits(TOKENS)
    diff = np.abs(merged - reference).max()
    print(f"merged f32 GGUF vs base + 2 adapters in llama.cpp: max |logit diff| {diff:.2e}")
    assert diff < TOL
    run_cli(["merge", "-m", base, "--lora-scaled", peft_made[0], "0.7", "--lora-scaled", str(tmp_path / "ours.gguf"),
             "-0.4", "-o", str(tmp_path / "merged_q8.gguf"), "--outtype", "q8_0"])
    q8 = LlamaCpp(str(tmp_path / "merged_q8.gguf")).logits(TOKENS)
    q8_diff = np.abs(q8 - reference).max()
    print(f"merged q8_0 GGUF vs base + 2 adapters: max |logit diff| {q8_diff:.2e}")
    assert q8_diff < 0.05 * np.abs(reference).max()


def test_tied_embedding_adapter_merges_with_own_output_layer(tmp_path, smollm2_path):
    from loraforge.loader import load_model

    model = make_tiny_llama(seed=3, tie=True)
    base = write_tiny_gguf(tmp_path / "tied.gguf", model, smollm2_path)
    loaded = load_model(base, base_dtype="f32")
    adapter = random_adapter(loaded.config, ["model.embed_tokens", "lm_head", "self_attn.v_proj"], seed=4, std=0.1)
    write_peft(tmp_path / "tied_peft", adapter, loaded.config)
    run_cli(["merge", "-m", base, "--lora", str(tmp_path / "tied_peft"), "-o", str(tmp_path / "m.gguf"),
             "--outtype", "f32"])
    lora.attach(loaded.model, load_adapter(tmp_path / "tied_peft", loaded.config), "a")
    with torch.no_grad():
        ours = loaded.model(torch.tensor([TOKENS]))[0].numpy()
    got = LlamaCpp(str(tmp_path / "m.gguf")).logits(TOKENS)
    diff = np.abs(got - ours).max()
    print(f"tied base + embed/lm_head adapter, merged, llama.cpp vs ours: max |logit diff| {diff:.2e}")
    assert diff < TOL


def test_llamacpp_cannot_run_token_embd_lora_on_tied_model(tmp_path, smollm2_path):
    """Why such adapters are refused: llama.cpp's output layer of a tied model is token_embd.weight,
    so the (transposed) token_embd pair is applied there too and the graph asserts."""
    import gguf

    model = make_tiny_llama(seed=5, tie=True)
    base = write_tiny_gguf(tmp_path / "tied.gguf", model, smollm2_path)
    w = gguf.GGUFWriter(str(tmp_path / "embd.gguf"), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 4.0)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight.lora_a", rng.normal(size=(49152, 4)).astype(np.float32))
    w.add_tensor("token_embd.weight.lora_b", rng.normal(size=(64, 4)).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    script = textwrap.dedent(f"""
        import ctypes, llama_cpp
        llm = llama_cpp.Llama(model_path={base!r}, n_ctx=32, logits_all=True, verbose=False)
        adapter = llama_cpp.llama_adapter_lora_init(llm._model.model, {str(tmp_path / 'embd.gguf')!r}.encode())
        assert adapter
        print("loaded", flush=True)
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                          (ctypes.c_float * 1)(1.0))
        llm.eval([1, 2, 3])
        print("ran", flush=True)
    """)
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # no gdb backtrace on the abort
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert "loaded" in proc.stdout
    assert proc.returncode != 0 and "ran" not in proc.stdout
