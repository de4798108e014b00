"""Adapters proven by peft + transformers on the real SmolLM2 (135M, 30 layers, tied embeddings):

- the base, converted to an HF folder by `loraforge merge` (no adapters, f32), loads in
  transformers and gives our logits;
- a PEFT folder we write (rank_pattern, alpha_pattern, rsLoRA, embed_tokens and lm_head on a tied
  model) loaded with `PeftModel.from_pretrained` gives our logits with the same adapter;
- a merged HF folder (two adapters in two formats, scales 1 and -0.5, untied output) loaded by
  transformers equals our model with those adapters, and its tokenizer files work in transformers.
All float32; bounds are stated next to each comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapter_models import random_adapter
from loraforge import cli, lora
from loraforge.formats.adapters import load_adapter
from loraforge.formats.gguf_lora import write_gguf_adapter
from loraforge.formats.peft import write_peft

pytestmark = pytest.mark.transformers
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPT = [{"role": "user", "content": "Write one line about the sea, please."}]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
TOL = 2e-3  # float32, 30 layers, logits of magnitude ~20: observed ~1e-4


@pytest.fixture(scope="module")
def ours(smollm2_path):
    """Our SmolLM2 in float32 (a private copy: adapters get attached to it)."""
    from loraforge.loader import load_model

    return load_model(smollm2_path, base_dtype="f32")


@pytest.fixture(scope="module")
def tokens(ours):
    text = ours.tokenizer.render_chat(PROMPT, add_generation_prompt=True)
    return ours.tokenizer.encode(text)


@pytest.fixture(scope="module")
def hf_base(smollm2_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol_hf") / "base"
    assert cli.main(["merge", "-m", smollm2_path, "-o", str(folder), "--to", "hf", "--outtype", "f32"]) == 0
    return str(folder)


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def our_logits(loaded, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return loaded.model(torch.tensor([tokens]))[0].numpy()


def with_adapters(loaded, adapters, tag: str):
    """Attach [(Adapter, scale)] under fresh names; returns a function that switches them off again."""
    names = []
    for i, (adapter, scale) in enumerate(adapters):
        lora.attach(loaded.model, adapter, f"{tag}{i}", scale)
        names.append((f"{tag}{i}", adapter))
    return lambda: [lora.set_scale(loaded.model, n, 0.0, a) for n, a in names]


def test_merged_hf_base_matches_ours(hf_base, ours, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32).eval()
    diff = np.abs(hf_logits(model, tokens) - our_logits(ours, tokens)).max()
    print(f"SmolLM2 HF folder (our merge) in transformers vs ours: max |logit diff| {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("variant", ["patterns", "rslora"])
def test_our_peft_adapter_in_peft_gives_our_logits(variant, hf_base, ours, tokens, tmp_path):
    from peft import PeftModel

    modules = LINEARS + ["model.embed_tokens", "lm_head"]
    if variant == "patterns":
        adapter = random_adapter(ours.config, modules, rank=4, seed=10, std=0.04, alpha=8.0,
                                 ranks={"model.layers.3.self_attn.q_proj": 8, "lm_head": 2, "model.embed_tokens": 6},
                                 alpha_pattern={"model.layers.5.mlp.down_proj": 2.0, "lm_head": 16.0})
    else:
        adapter = random_adapter(ours.config, modules, rank=8, seed=11, std=0.04, alpha=4.0, use_rslora=True)
    write_peft(tmp_path / "adapter", adapter, ours.config)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32).eval()
    base = hf_logits(base_model, tokens)
    model = PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval()
    theirs = hf_logits(model, tokens)
    off = with_adapters(ours, [(load_adapter(tmp_path / "adapter", ours.config), 1.0)], f"peft_{variant}")
    try:
        mine = our_logits(ours, tokens)
    finally:
        off()
    effect = np.abs(theirs - base).max()
    diff = np.abs(theirs - mine).max()
    print(f"PEFT adapter ({variant}) in peft vs ours: max |logit diff| {diff:.2e} (adapter effect {effect:.2f})")
    assert effect > 1.0
    assert diff < TOL


def test_merged_tiny_hf_folder_in_transformers_equals_ours(smollm2_path, tmp_path):
    """The same on a tiny tied llama GGUF (fast): untied output, tokenizer files, chat template."""
    from adapter_models import make_tiny_llama, write_tiny_gguf
    from loraforge.loader import load_model

    base = write_tiny_gguf(tmp_path / "tiny.gguf", make_tiny_llama(seed=7, tie=True), smollm2_path)
    loaded = load_model(base, base_dtype="f32")
    cfg = loaded.config
    first = random_adapter(cfg, LINEARS + ["model.embed_tokens", "lm_head"], rank=4, seed=22, std=0.1,
                           ranks={"model.layers.0.mlp.up_proj": 2}, use_rslora=True)
    second = random_adapter(cfg, ["self_attn.q_proj", "self_attn.k_proj"], rank=8, seed=23, std=0.1, alpha=16.0)
    write_peft(tmp_path / "first", first, cfg)
    write_gguf_adapter(tmp_path / "second.gguf", second, cfg, "llama")
    out = tmp_path / "merged"
    assert cli.main(["merge", "-m", base, "--lora-scaled", str(tmp_path / "first"), "1.5", "--lora-scaled",
                     str(tmp_path / "second.gguf"), "-0.5", "-o", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings is False
    tokens = loaded.tokenizer.encode(loaded.tokenizer.render_chat(PROMPT, add_generation_prompt=True))
    base_logits = our_logits(loaded, tokens)
    with_adapters(loaded, [(load_adapter(tmp_path / "first", cfg), 1.5),
                           (load_adapter(tmp_path / "second.gguf", cfg), -0.5)], "m")
    mine, theirs = our_logits(loaded, tokens), hf_logits(model, tokens)
    diff = np.abs(theirs - mine).max()
    print(f"tiny merged HF folder in transformers vs ours: max |logit diff| {diff:.2e} "
          f"(effect {np.abs(mine - base_logits).max():.2f})")
    assert np.abs(mine - base_logits).max() > 0.3
    assert diff < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = loaded.tokenizer.render_chat(PROMPT, add_generation_prompt=True)
    assert tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == text
    assert tok(text)["input_ids"] == tokens


@pytest.mark.slow
def test_merged_hf_folder_in_transformers_equals_ours_with_adapters(smollm2_path, ours, tokens, tmp_path):
    cfg = ours.config
    first = random_adapter(cfg, LINEARS + ["model.embed_tokens", "lm_head"], rank=4, seed=20, std=0.04,
                           ranks={"model.layers.0.mlp.up_proj": 2})
    second = random_adapter(cfg, ["self_attn.q_proj", "self_attn.v_proj"], rank=8, seed=21, std=0.05, alpha=16.0)
    write_peft(tmp_path / "first", first, cfg)
    write_gguf_adapter(tmp_path / "second.gguf", second, cfg, "llama")
    out = tmp_path / "merged"
    assert cli.main(["merge", "-m", smollm2_path, "--lora", str(tmp_path / "first"), "--lora-scaled",
                     str(tmp_path / "second.gguf"), "-0.5", "-o", str(out), "--outtype", "f32"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings is False  # the adapted output layer is its own matrix
    theirs = hf_logits(model, tokens)
    off = with_adapters(ours, [(load_adapter(tmp_path / "first", cfg), 1.0),
                               (load_adapter(tmp_path / "second.gguf", cfg), -0.5)], "merged")
    try:
        mine = our_logits(ours, tokens)
    finally:
        off()
    diff = np.abs(theirs - mine).max()
    print(f"merged HF folder (2 adapters) in transformers vs ours: max |logit diff| {diff:.2e}")
    assert diff < TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = ours.tokenizer.render_chat(PROMPT, add_generation_prompt=True)
    assert tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == text
    assert tok(text, add_special_tokens=True)["input_ids"] == tokens
    assert tok.eos_token == "<|im_end|>"
