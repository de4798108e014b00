"""PEFT adapters for Qwen3, Gemma 2/3, Phi-3, Mistral (explicit head_dim) and Baichuan 2, proven by peft.

An adapter on every projection of our model (Phi-3's qkv_proj / gate_up_proj and Baichuan's W_pack
as they are; Gemma 3's scaled token embeddings too) is written with `write_peft` and loaded by
`PeftModel.from_pretrained` on the reference model: transformers' for the families it has, the
in-test Baichuan 2 reference (built from the published modeling equations; peft only needs its
module names) for Baichuan. peft's logits equal ours with the same adapter read back.
Baichuan read from GGUF has llama.cpp's attn_q/k/v: its adapter is written for HF's W_pack.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from adapter_models import random_adapter  # noqa: E402
from loraforge import lora  # noqa: E402
from loraforge.formats.adapters import load_adapter  # noqa: E402
from loraforge.formats.peft import write_peft  # noqa: E402
from loraforge.loader import load_model  # noqa: E402

pytestmark = pytest.mark.transformers

TOL = 1e-4
SEPARATE = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"]
PEFT_CASES = {
    "qwen3": SEPARATE,
    "gemma2-caps": SEPARATE,
    "gemma3": SEPARATE + ["model.embed_tokens"],
    "phi3-partial": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "mistral-headdim": SEPARATE,
    "baichuan-7b": ["self_attn.W_pack", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}


def logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(ids)
    return (out if isinstance(out, torch.Tensor) else out.logits)[0].float().numpy()


def peft_logits(reference, folder, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(base, adapted) logits of peft on a private copy of the reference model."""
    from peft import PeftModel

    base_model = copy.deepcopy(reference)
    base = logits(base_model, ids)
    return base, logits(PeftModel.from_pretrained(base_model, str(folder)).eval(), ids)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_our_peft_adapter_in_peft_gives_our_logits(case, family_factory, tmp_path):
    reference, folder = family_factory(case)
    ours = load_model(folder, base_dtype="f32")
    adapter = random_adapter(ours.config, PEFT_CASES[case], rank=4, seed=5, std=0.2, alpha=8.0,
                             ranks={"model.layers.1.mlp.down_proj": 2}, alpha_pattern={"model.layers.0.self_attn.o_proj": 2.0})
    write_peft(tmp_path / "peft", adapter, ours.config)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    base, theirs = peft_logits(reference, tmp_path / "peft", ids)
    lora.attach(ours.model, load_adapter(tmp_path / "peft", ours.config), "peft")
    mine = logits(ours.model, ids)
    effect, diff = float(np.abs(theirs - base).max()), float(np.abs(theirs - mine).max())
    print(f"\n{case}: PEFT adapter effect {effect:.3f}, peft vs ours {diff:.2e}")
    assert effect > 100 * TOL
    assert diff < TOL


def test_baichuan_gguf_adapter_goes_to_peft_as_w_pack(family_factory, family_gguf, tmp_path):
    """Baichuan from GGUF (llama.cpp's attn_q/k/v): its q/k/v adapter is written as one W_pack adapter
    (block-diagonal, exact), which peft applies to HF's layout with our logits; read back it splits
    into the original ranks again."""
    reference, _ = family_factory("baichuan-7b")
    ours = load_model(family_gguf("baichuan-7b"), base_dtype="f32")
    assert ours.config.fused_qkv is None
    adapter = random_adapter(ours.config, ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"], rank=4, seed=6,
                             std=0.2, alpha=8.0, ranks={"model.layers.2.self_attn.v_proj": 2})
    write_peft(tmp_path / "peft", adapter, ours.config)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["W_pack", "up_proj"]
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(7))
    base, theirs = peft_logits(reference, tmp_path / "peft", ids)
    back = load_adapter(tmp_path / "peft", ours.config)
    assert back.rank("model.layers.2.self_attn.v_proj") == 2 and "model.layers.2.self_attn.k_proj.lora_A" not in back.tensors
    lora.attach(ours.model, back, "peft")
    mine = logits(ours.model, ids)
    assert float(np.abs(theirs - base).max()) > 100 * TOL
    assert float(np.abs(theirs - mine).max()) < TOL


@pytest.mark.parametrize("case", ["gemma3", "phi3-longrope", "baichuan-7b"])
def test_gguf_merges_to_a_working_hf_folder(case, family_factory, family_gguf, tmp_path):
    """`loraforge merge --to hf` from each family's GGUF: Gemma's norms lose the converter's + 1, Phi-3
    keeps LongRoPE, Baichuan's attn_q/k/v are stacked back into W_pack; transformers (Baichuan: the
    reference) loads the folder and gives the GGUF model's logits."""
    from safetensors import safe_open

    from loraforge.cli import main

    reference, _ = family_factory(case)
    out = tmp_path / "hf"
    assert main(["merge", "-m", family_gguf(case), "--to", "hf", "-o", str(out), "--outtype", "f32"]) == 0
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(8))
    ours = logits(load_model(family_gguf(case), base_dtype="f32").model, ids)
    if case.startswith("baichuan"):
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        assert "model.layers.0.self_attn.W_pack.weight" in state and json.loads((out / "config.json").read_text()
                                                                                )["model_type"] == "baichuan"
        model = copy.deepcopy(reference)
        model.load_state_dict(state)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    assert float(np.abs(logits(model, ids) - ours).max()) < 1e-5
    assert float(np.abs(logits(load_model(str(out), base_dtype="f32").model, ids) - ours).max()) < 1e-5
