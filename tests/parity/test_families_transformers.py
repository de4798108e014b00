"""Qwen3, Gemma 2, Gemma 3 (text), Phi-3 (incl. LongRoPE and partial rotary), Mistral with an
explicit head_dim, and Baichuan 2: our decoder loaded from HF folders against the reference.

- Tiny random transformers models (`make_tiny_hf_model`, eager attention: the implementation
  that soft-caps Gemma 2's attention scores) saved with safetensors: our logits equal theirs.
- Baichuan 2 has no transformers class (its modeling code is remote code): the reference is
  `baichuan_reference.BaichuanReference`, written in the test tree from the published
  modeling_baichuan.py equations (W_pack, RoPE 7B / ALiBi 13B, NormHead).
- KV-cache decoding and packed rows (doc_ids) against plain full forwards.
- Each switch matters: turning it off in our config moves the logits far past the tolerance.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from family_cases import BAICHUAN_CASES, FAMILY_CASES, packed_documents  # noqa: E402
from loraforge.loader import load_model  # noqa: E402
from loraforge.model import CausalLM, KVCache  # noqa: E402

pytestmark = pytest.mark.transformers

TOL = 1e-5  # float32 both sides, same weights: summation-order rounding only
def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def reference_and_ours(case: str, family_factory):
    """(reference model, our model loaded from its folder in float32)."""
    reference, folder = family_factory(case)
    return reference, load_model(folder, base_dtype="f32").model


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", list(FAMILY_CASES) + list(BAICHUAN_CASES))
def test_logits_match_reference(case, family_factory):
    reference, ours = reference_and_ours(case, family_factory)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))  # past windows, rope limits
    with torch.no_grad():
        mine = ours(ids)
    diff = _diff(mine, reference_logits(reference, ids))
    assert diff < TOL, f"{case}: max |logit diff| {diff:.3g}"


def test_configs_read_as_the_families_are_built(family_factory):
    cfg = reference_and_ours("gemma3-scaled", family_factory)[1].config
    assert (cfg.qk_norm, cfg.norm_offset, cfg.post_norms, cfg.scale_embeddings) == (True, 1.0, True, True)
    assert [cfg.layer_rope(i) for i in range(7)] == ["local"] * 5 + ["global", "local"]
    assert cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6 and cfg.rope_scaling["factor"] == 8.0
    cfg = reference_and_ours("gemma2", family_factory)[1].config
    assert [cfg.layer_window(i) for i in range(3)] == [7, None, 7]
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_pre_attn_scalar) == (50.0, 30.0, 24)
    cfg = reference_and_ours("phi3-partial", family_factory)[1].config
    assert (cfg.fused_qkv, cfg.fused_gate_up, cfg.rotary_dim, cfg.head_dim) == ("qkv_proj", True, 8, 16)
    cfg = reference_and_ours("phi3-longrope", family_factory)[1].config
    assert cfg.rope_scaling["rope_type"] == "longrope"
    assert cfg.rope_scaling["attention_factor"] == pytest.approx((1 + torch.log(torch.tensor(8.0)).item()
                                                                 / torch.log(torch.tensor(16.0)).item()) ** 0.5)
    for case, alibi in (("baichuan-7b", False), ("baichuan-13b", True)):
        cfg = reference_and_ours(case, family_factory)[1].config
        assert (cfg.fused_qkv, cfg.alibi, cfg.norm_head) == ("W_pack", alibi, True)


SWITCHES = {  # case: config changes that must move the logits (proof that each switch is exercised)
    "gemma2-caps": [dict(attn_logit_softcap=None), dict(final_logit_softcap=None), dict(norm_offset=0.0),
                    dict(scale_embeddings=False)],
    "gemma2": [dict(query_pre_attn_scalar=None)],
    "gemma3": [dict(rope_local_theta=None), dict(sliding_window=None, layer_types=None), dict(qk_norm=False),
               dict(post_norms=False)],
    "phi3-longrope": [dict(rope_scaling=None)],
    "phi3-partial": [dict(rotary_dim=16)],
    "baichuan-13b": [dict(alibi=False)],
}


@pytest.mark.parametrize("case", list(SWITCHES))
def test_each_switch_changes_the_logits(case, family_factory):
    _, ours = reference_and_ours(case, family_factory)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = ours(ids)
    state = ours.state_dict()
    for change in SWITCHES[case]:
        cfg = ours.config.replace(**change)
        other = CausalLM(cfg)
        missing, unexpected = other.load_state_dict(state, strict=False)
        assert not [m for m in missing + unexpected if not m.endswith("norm.weight")]
        with torch.no_grad():
            moved = _diff(other(ids), base)
        assert moved > 100 * TOL, f"{case}: {change} moves the logits by only {moved:.3g}"


KV_CASES = ["qwen3", "gemma2-caps", "gemma3", "phi3-partial", "phi3-window", "baichuan-13b"]


@pytest.mark.parametrize("case", KV_CASES)
def test_kv_cache_decoding_equals_full_forward(case, family_factory):
    reference, model = reference_and_ours(case, family_factory)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch=2, max_len=32, device="cpu", dtype=torch.float32)
        steps = [model(ids[:, :11], cache=cache, start_pos=0), model(ids[:, 11:15], cache=cache, start_pos=11)]
        for p in range(15, ids.shape[1]):
            steps.append(model(ids[:, p:p + 1], cache=cache, start_pos=p))
    assert _diff(torch.cat(steps, dim=1), full) < TOL
    assert _diff(full, reference_logits(reference, ids)) < TOL


@pytest.mark.parametrize("case", KV_CASES)
def test_packed_doc_ids_equal_separate_forwards(case, family_factory):
    reference, model = reference_and_ours(case, family_factory)
    docs, ids, doc_ids = packed_documents(256)
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        for b, row in enumerate(docs):
            start = 0
            for d in row:
                alone = reference_logits(reference, d[None])
                assert _diff(packed[b:b + 1, start:start + len(d)], alone) < TOL
                start += len(d)
