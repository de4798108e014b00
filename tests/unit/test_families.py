"""The family switches from config.json and GGUF metadata, unsupported architectures (one-line errors
that name the supported families), LoRA targets on stacked projections, and the exact conversion
of adapters between stacked (W_pack, qkv_proj, gate_up_proj) and separate projections."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError
from loraforge.formats.fused_adapters import match_layout
from loraforge.lora import Adapter, LoraConfig, inject
from loraforge.model import build_on_meta
from loraforge.config_sources import config_from_gguf_metadata, config_from_hf_dict, config_to_hf_dict

FAMILIES = "llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, baichuan"
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


# -- unsupported architectures -------------------------------------------------------------------

def test_unsupported_gguf_architecture_is_one_line_naming_the_families(tmp_path, capsys):
    import gguf

    from loraforge.cli import main

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["generate", "-m", str(path), "-p", "hi", "-n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{path}: architecture 'falcon' is not supported (supported: {FAMILIES})" in err


def test_unsupported_hf_model_type_is_one_line_naming_the_families(tmp_path):
    from loraforge.loader import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", **SMALL}))
    with pytest.raises(LoraforgeError) as e:
        load_model(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "model_type 'gpt_neox' is not supported" in message
    assert "qwen3" in message and "gemma3_text" in message and "phi3" in message and "baichuan" in message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": SMALL}))
    with pytest.raises(LoraforgeError, match="vision tower"):
        load_model(str(tmp_path))


# -- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Qwen3Config", "Gemma2Config", "Gemma3TextConfig", "Phi3Config"])
def test_config_json_round_trip_through_transformers(kind):
    """to_hf_dict -> transformers' config class -> from_hf_dict gives the same ModelConfig."""
    transformers = pytest.importorskip("transformers")
    extra = {"Phi3Config": dict(max_position_embeddings=256, original_max_position_embeddings=32, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [3.0] * 4}, partial_rotary_factor=0.5),
        "Gemma3TextConfig": dict(sliding_window=16, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        "Gemma2Config": dict(sliding_window=16)}.get(kind, {})
    head_dim = {} if kind == "Phi3Config" else {"head_dim": 32}  # (transformers' Phi-3 derives it)
    hf = getattr(transformers, kind)(**SMALL, **head_dim, **extra)
    cfg = config_from_hf_dict(hf.to_dict())
    again = config_from_hf_dict(getattr(transformers, kind).from_dict(config_to_hf_dict(cfg)).to_dict())
    assert again == cfg
    assert cfg.head_dim == head_dim.get("head_dim", 16)


def test_gguf_defaults_follow_llamacpp():
    """Keys a converter leaves out read as llama.cpp reads them (src/models/gemma2.cpp, gemma3.cpp, baichuan.cpp)."""
    def meta(arch, **keys):
        base = {"general.architecture": arch, f"{arch}.embedding_length": 64, f"{arch}.attention.head_count": 4,
                f"{arch}.feed_forward_length": 96, f"{arch}.vocab_size": 10, f"{arch}.block_count": 2}
        return {**base, **{f"{arch}.{k}": v for k, v in keys.items()}}

    g2 = config_from_gguf_metadata(meta("gemma2"), "m.gguf")
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.sliding_window) == (50.0, 30.0, 4096)
    assert g2.layer_types == ["sliding_attention", "full_attention"] and g2.tie_word_embeddings
    g3 = config_from_gguf_metadata(meta("gemma3", **{"attention.sliding_window": 512}), "m.gguf")
    assert (g3.final_logit_softcap, g3.rope_local_theta, g3.norm_offset) == (None, 10000.0, 1.0)
    assert config_from_gguf_metadata(meta("gemma3"), "m.gguf").sliding_window is None
    b40 = config_from_gguf_metadata({**meta("baichuan"), "baichuan.block_count": 40}, "m.gguf")
    assert b40.alibi and not config_from_gguf_metadata(meta("baichuan"), "m.gguf").alibi
    assert config_from_gguf_metadata(meta("phi3"), "m.gguf").fused_qkv == "qkv_proj"


# -- LoRA targets --------------------------------------------------------------------------------

def _model(**switches):
    model = build_on_meta(ModelConfig(arch="phi3", **SMALL, **switches)).to_empty(device="cpu")
    return model


def test_default_targets_cover_stacked_projections():
    model = _model(fused_qkv="qkv_proj", fused_gate_up=True)
    wrapped = inject(model, LoraConfig(r=4, rank_pattern={"v_proj": 8}))
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert model.model.layers[0].self_attn.qkv_proj.lora_A["default"].shape == (8, 64)  # the largest part's rank
    assert LoraConfig(r=4, target_modules=("o_proj",)).rank_for("model.layers.0.self_attn.qkv_proj") == 0
    assert LoraConfig(r=4, target_modules=("k_proj",)).rank_for("model.layers.0.self_attn.W_pack") == 4
    assert set(LoraConfig(target_modules="all-linear").target_modules) >= {"W_pack", "qkv_proj", "gate_up_proj"}


# -- stacked <-> separate adapters ----------------------------------------------------------------

def _delta(adapter: Adapter, module: str) -> torch.Tensor:
    return adapter.delta(module) if module + ".lora_A" in adapter.tensors else None


@pytest.mark.parametrize("rslora", [False, True])
def test_split_and_fuse_are_exact(rslora):
    cfg = ModelConfig(arch="baichuan", **{**SMALL, "num_key_value_heads": 4}, fused_qkv="W_pack")
    g = torch.Generator().manual_seed(0)
    p = "model.layers.1."
    separate = Adapter(tensors={
        p + "self_attn.q_proj.lora_A": torch.randn(4, 64, generator=g), p + "self_attn.q_proj.lora_B": torch.randn(64, 4, generator=g),
        p + "self_attn.v_proj.lora_A": torch.randn(2, 64, generator=g), p + "self_attn.v_proj.lora_B": torch.randn(64, 2, generator=g),
        p + "mlp.up_proj.lora_A": torch.randn(4, 64, generator=g), p + "mlp.up_proj.lora_B": torch.randn(96, 4, generator=g),
    }, alpha=8.0, use_rslora=rslora, alpha_pattern={p + "self_attn.v_proj": 3.0})
    fused = match_layout(separate, cfg)
    assert fused.modules() == [p + "mlp.up_proj", p + "self_attn.W_pack"] and fused.rank(p + "self_attn.W_pack") == 6
    stacked = _delta(fused, p + "self_attn.W_pack")
    expected = torch.cat([_delta(separate, p + "self_attn.q_proj"), torch.zeros(64, 64),
                          _delta(separate, p + "self_attn.v_proj")])
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-6)
    back = match_layout(fused, cfg, fused_qkv=None)
    assert back.modules() == sorted(separate.modules())
    for module in separate.modules():
        assert back.rank(module) == separate.rank(module)
        torch.testing.assert_close(_delta(back, module), _delta(separate, module), rtol=1e-5, atol=1e-6)
    assert match_layout(separate, cfg, fused_qkv=None) is separate  # nothing to do
