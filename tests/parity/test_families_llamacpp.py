"""Qwen3, Gemma 2/3, Phi-3 (LongRoPE, partial rotary), Mistral with an explicit head_dim and
Baichuan 2 (RoPE 7B layout, ALiBi 13B layout) as GGUF files, against llama.cpp (llama-cpp-python).

The files are written here from the tiny reference models the way llama.cpp's converter lays each
family out (`write_gguf`: Gemma norms + 1, Baichuan's W_pack split and q/k permuted, Phi-3's fused
attn_qkv and gate+up ffn_up, LongRoPE factor tensors, soft-capping and window keys). With float32
weights llama.cpp runs its matmuls in float32, so the logits agree to rounding - except Gemma's:
ggml computes GELU from a table indexed by the float16-rounded input (GGML_GELU_FP16 in
ggml-cpu/vec.h), which moves its logits by ~1e-4 here. The same rounding applied to our GELU
removes most of the gap; what is left comes from inputs that float32 summation order puts on the
other side of a float16 rounding boundary (the table makes GELU jump there), so it cannot go to 0.

Also: greedy tokens equal llama.cpp's greedy loop; resident-quantized Q8_0 bases give the
dequantized model's logits for every new tensor kind; and a GGUF LoRA on every projection
(stacked ones included) moves llama.cpp's logits exactly as it moves ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from adapter_models import LlamaCpp, random_adapter  # noqa: E402
from convert_models import ggml_gelu  # noqa: E402
from family_cases import BAICHUAN_CASES  # noqa: E402
from loraforge import lora  # noqa: E402
from loraforge.formats.adapters import load_adapter  # noqa: E402
from loraforge.formats.gguf_lora import write_gguf_adapter  # noqa: E402
from loraforge.generate import Sampler, generate_tokens  # noqa: E402
from loraforge.loader import load_model  # noqa: E402

pytestmark = pytest.mark.llamacpp

CASES = ["qwen3", "gemma2-caps", "gemma3", "gemma3-scaled", "phi3", "phi3-longrope", "phi3-partial",
         "mistral-headdim", "baichuan-7b", "baichuan-13b-6heads"]
TOL = 1e-3  # the task's bound for float32 files; observed: ~3e-7 (Gemma ~3e-4, see the module docstring)
N_TOKENS = 48  # past the windows (7) and LongRoPE's original context (16)


def tolerance(model) -> float:
    """TOL, doubled for GELU models with adapters on (larger activations meet ggml's float16 GELU table)."""
    return TOL if model.config.hidden_act == "silu" else 2 * TOL


def token_ids(n: int = N_TOKENS, seed: int = 11) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def our_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


@pytest.fixture(scope="module")
def runs(family_gguf, family_factory):
    """case -> (GGUF path, our model from the GGUF, reference model), made once per case."""
    made = {}

    def get(case: str):
        if case not in made:
            path = family_gguf(case)
            made[case] = path, load_model(path, base_dtype="f32").model, family_factory(case)[0]
        return made[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_f32_gguf_logits_match_llamacpp(case, runs):
    path, ours, reference = runs(case)
    ids = token_ids()
    cpp = LlamaCpp(path)
    try:
        theirs = cpp.logits(ids)
    finally:
        cpp.llm.close()
    mine = our_logits(ours, ids)
    with torch.no_grad():
        ref = reference(torch.tensor([ids]))
    ref = (ref if isinstance(ref, torch.Tensor) else ref.logits)[0].numpy()
    gap = float(np.abs(mine - theirs).max())
    print(f"\n{case}: max |logit diff| vs llama.cpp {gap:.2e}, vs the reference {np.abs(mine - ref).max():.2e}")
    assert float(np.abs(mine - ref).max()) < 1e-5  # the GGUF reads back as the model it was written from
    assert gap < TOL
    if ours.config.hidden_act == "gelu_pytorch_tanh":  # the gap is ggml's float16 GELU table, nothing else
        acts = [layer.mlp for layer in ours.model.layers]
        try:
            for mlp in acts:
                mlp.act = ggml_gelu
            emulated = float(np.abs(our_logits(ours, ids) - theirs).max())
        finally:
            for mlp in acts:
                mlp.act = lambda x: torch.nn.functional.gelu(x, approximate="tanh")
        print(f"{case}: with ggml's float16 GELU: {emulated:.2e}")
        assert emulated < gap / 2


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_llamacpp(case, runs):
    path, ours, _ = runs(case)
    prompt = token_ids(12, seed=5)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=2, logits_all=True, type_k=0, type_v=0,
                          flash_attn=False, verbose=False)
    try:
        llm.eval(prompt)
        theirs = []
        for _ in range(16):
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([theirs[-1]])
    finally:
        llm.close()
    mine = list(generate_tokens(ours, prompt, 16, Sampler(temp=0.0), stop_ids=()))
    assert mine == theirs


@pytest.mark.parametrize("case", ["qwen3", "gemma3", "phi3", "baichuan-7b"])
def test_resident_q8_0_equals_dequantized(case, family_gguf):
    """--base-dtype quantized keeps q_norm's neighbours, qkv_proj, gate_up_proj ... as Q8_0 blocks."""
    import gguf

    from loraforge.quant.linear import QuantLinear

    path = family_gguf(case, qtype=gguf.GGMLQuantizationType.Q8_0)
    quantized = load_model(path, base_dtype="quantized").model
    dense = load_model(path, base_dtype="f32").model
    kinds = {name.rsplit(".", 1)[-1] for name, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    expected = {"phi3": {"qkv_proj", "gate_up_proj"}}.get(case, {"q_proj", "k_proj", "v_proj"})
    assert expected <= kinds
    ids = token_ids(24)
    assert float(np.abs(our_logits(quantized, ids) - our_logits(dense, ids)).max()) < 1e-5


LORA_MODULES = {
    "qwen3": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "phi3-partial": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "baichuan-7b": ["self_attn.W_pack", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}
LORA_MODULES["gemma3"] = LORA_MODULES["qwen3"]
LORA_MODULES["phi3"] = LORA_MODULES["phi3-partial"]


@pytest.mark.parametrize("case", list(LORA_MODULES))
def test_gguf_lora_moves_llamacpp_as_it_moves_ours(case, runs, family_factory, tmp_path):
    """An adapter on every projection of the HF model (W_pack, qkv_proj, gate_up_proj as they are),
    written as a GGUF LoRA with llama.cpp's names, gives llama.cpp's GGUF model our logits; read back
    into the GGUF-based model (Baichuan: attn_q/k/v) it gives the same logits again."""
    path, gguf_model, _ = runs(case)
    hf = load_model(family_factory(case)[1], base_dtype="f32")
    std = 0.1 if hf.config.hidden_act == "gelu_pytorch_tanh" else 0.3  # (ggml's GELU table: see above)
    adapter = random_adapter(hf.config, LORA_MODULES[case], rank=4, seed=3, std=std, alpha=8.0)
    arch = gguf_model.config.arch
    write_gguf_adapter(tmp_path / "a.gguf", adapter, hf.config, arch)
    ids = token_ids(32)
    cpp = LlamaCpp(path)
    try:
        base, adapted = cpp.logits(ids), cpp.logits(ids, [(str(tmp_path / "a.gguf"), 1.0)])
    finally:
        cpp.llm.close()
    lora.attach(hf.model, adapter, "a")
    mine = our_logits(hf.model, ids)
    back = load_adapter(tmp_path / "a.gguf", gguf_model.config)
    if case in BAICHUAN_CASES:  # llama.cpp's layout: the stacked adapter came back split
        assert not any("W_pack" in m for m in back.modules()) and back.rank("model.layers.0.self_attn.q_proj") == 4
    lora.attach(gguf_model, back, "back")
    try:
        again = our_logits(gguf_model, ids)
    finally:
        lora.set_scale(gguf_model, "back", 0.0, back)
    effect = float(np.abs(adapted - base).max())
    print(f"\n{case}: adapter effect {effect:.3f}, ours vs llama.cpp {np.abs(mine - adapted).max():.2e}")
    assert effect > 50 * TOL
    assert float(np.abs(mine - adapted).max()) < tolerance(hf.model)
    assert float(np.abs(again - adapted).max()) < tolerance(hf.model)


@pytest.mark.parametrize("case", ["gemma3", "phi3-partial", "baichuan-7b"])
def test_merged_gguf_equals_base_with_adapter(case, runs, family_factory, tmp_path):
    """`merge_to_gguf` writes base + adapter into the family's own tensors (Phi-3's attn_qkv and ffn_up,
    Baichuan's split and permuted attn_q/k/v, Gemma's + 1 norms copied as they are): llama.cpp on the
    merged file gives our logits of the base with the adapter attached."""
    from loraforge.merge import merge_to_gguf

    path, gguf_model, _ = runs(case)
    hf_cfg = load_model(family_factory(case)[1], base_dtype="f32").config
    adapter = random_adapter(hf_cfg, LORA_MODULES[case], rank=4, seed=9, std=0.1, alpha=8.0)
    write_gguf_adapter(tmp_path / "a.gguf", adapter, hf_cfg, gguf_model.config.arch)
    on_base = load_adapter(tmp_path / "a.gguf", gguf_model.config)
    merge_to_gguf(path, [(on_base, 1.0)], str(tmp_path / "merged.gguf"), outtype="f32", log=lambda _: None)
    ids = token_ids(32)
    lora.attach(gguf_model, on_base, "merge")
    try:
        mine = our_logits(gguf_model, ids)
    finally:
        lora.set_scale(gguf_model, "merge", 0.0, on_base)
    cpp = LlamaCpp(str(tmp_path / "merged.gguf"))
    try:
        theirs = cpp.logits(ids)
    finally:
        cpp.llm.close()
    assert float(np.abs(our_logits(gguf_model, ids) - mine).max()) > 50 * TOL  # the adapter matters
    assert float(np.abs(theirs - mine).max()) < tolerance(gguf_model)
