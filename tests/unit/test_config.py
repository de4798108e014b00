"""ModelConfig from config.json (transformers 4 and 5 layouts) and GGUF metadata, checked against
transformers' own config classes and rope initialisation; validation errors are one-liners."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.config import ModelConfig, rope_inv_freq
from loraforge.errors import LoraforgeError
from loraforge.config_sources import config_from_gguf_metadata, config_from_hf_dict, config_to_hf_dict

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def hf_config(kind: str, **kw):
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[kind]
    return cls(**{**SMALL, **kw})


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_from_transformers_config(kind):
    hf = hf_config(kind, tie_word_embeddings=(kind == "qwen2"))
    cfg = config_from_hf_dict(hf.to_dict())
    assert cfg.arch == kind
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert cfg.head_dim == 16
    assert cfg.attention_bias == (kind == "qwen2")
    assert cfg.rope_scaling is None


def test_transformers4_and_5_rope_layouts_agree():
    """transformers 4 wrote rope_theta + rope_scaling; 5 writes rope_parameters holding both."""
    v5 = hf_config("llama", rope_theta=500000.0, rope_scaling=dict(LLAMA3)).to_dict()
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling={**LLAMA3, "type": "llama3"})
    mixed = {**v5, "rope_theta": 500000.0}  # both keys present: the scaling must not be lost
    configs = [config_from_hf_dict(d) for d in (v5, v4, mixed)]
    for cfg in configs:
        assert cfg.rope_theta == 500000.0
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert all(torch.equal(rope_inv_freq(c), rope_inv_freq(configs[0])) for c in configs)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3,
                                     {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 256}])
def test_rope_inverse_frequencies_match_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = hf_config("llama", rope_theta=500000.0, head_dim=64, hidden_size=256,
                   **({"rope_scaling": dict(scaling)} if scaling else {}))
    ours = rope_inv_freq(config_from_hf_dict(hf.to_dict()))
    if scaling is None:
        expected = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    else:
        expected, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
        assert attention_factor == 1.0
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)


def test_round_trip_through_config_json_builds_the_same_transformers_model():
    cfg = ModelConfig(arch="llama", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                      rope_scaling=dict(LLAMA3), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    d = json.loads(json.dumps(config_to_hf_dict(cfg)))
    assert config_from_hf_dict(d) == cfg
    hf = transformers.LlamaConfig.from_dict(d)
    model = transformers.LlamaForCausalLM(hf)
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    from loraforge.model import build_on_meta

    ours = {n: tuple(p.shape) for n, p in build_on_meta(cfg).named_parameters()}
    assert ours == names
    linear = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert cfg.n_matmul_params() == linear + cfg.vocab_size * cfg.hidden_size


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_round_trip(kind):
    cfg = ModelConfig(arch=kind, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                      attention_bias=kind == "qwen2")
    again = config_from_hf_dict(json.loads(json.dumps(config_to_hf_dict(cfg))))
    assert [again.layer_window(i) for i in range(3)] == [16, 16, 16]
    if kind == "qwen2":
        hf = transformers.Qwen2Config.from_dict(config_to_hf_dict(cfg))
        assert hf.layer_types == ["sliding_attention"] * 3


def test_qwen2_window_off_unless_used():
    """Old Qwen2 configs carry sliding_window with use_sliding_window false: no window."""
    d = hf_config("qwen2").to_dict()
    d.update(sliding_window=32768, use_sliding_window=False)
    d.pop("layer_types", None)
    assert config_from_hf_dict(d).sliding_window is None
    d.update(use_sliding_window=True, max_window_layers=2)
    cfg = config_from_hf_dict(d)
    assert [cfg.layer_window(i) for i in range(3)] == [None, None, 32768]


def test_llama_attention_bias_includes_output_projection():
    cfg = config_from_hf_dict(hf_config("llama", attention_bias=True).to_dict())
    assert cfg.attention_bias and cfg.o_proj_bias


def test_from_smollm2_gguf_metadata_matches_transformers(smollm2_path, smollm2_transformers):
    from loraforge.formats.gguf import read_model

    cfg = read_model(smollm2_path).config
    hf = smollm2_transformers.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert (cfg.arch, cfg.head_dim, cfg.rope_scaling, cfg.bos_token_id, cfg.eos_token_id) == ("llama", 64, None, 1, 2)


@pytest.mark.parametrize("changes, message", [
    (dict(num_key_value_heads=3), "not a multiple"),
    (dict(hidden_size=0), "hidden_size must be positive"),
    (dict(sliding_window=0), "sliding_window must be positive"),
    (dict(sliding_window=8, layer_types=["full_attention"]), "layer_types"),
])
def test_invalid_numbers_raise(changes, message):
    base = dict(arch="llama", vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(LoraforgeError, match=message):
        ModelConfig(**{**base, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(mlp_bias=True), "mlp_bias is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None), "rope scaling type 'yarn'"),
    (dict(num_attention_heads="many"), "bad value"),
])
def test_unsupported_config_json_names_the_file(changes, message):
    d = {**hf_config("llama").to_dict(), **changes}
    with pytest.raises(LoraforgeError, match=message) as e:
        config_from_hf_dict(d, source="/models/x/config.json")
    assert str(e.value).startswith("/models/x/config.json: ")
    assert "\n" not in str(e.value)


def test_missing_key_names_the_file():
    d = hf_config("llama").to_dict()
    del d["hidden_size"]
    with pytest.raises(LoraforgeError, match=r"^cfg\.json: missing key 'hidden_size'$"):
        config_from_hf_dict(d, source="cfg.json")


def test_gguf_metadata_errors():
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.feed_forward_length": 96, "llama.vocab_size": 10}
    with pytest.raises(LoraforgeError, match=r"^m\.gguf: GGUF metadata lacks llama\.block_count$"):
        config_from_gguf_metadata(meta, "m.gguf")
    meta["llama.block_count"] = 2
    assert config_from_gguf_metadata(meta, "m.gguf").num_key_value_heads == 4
    with pytest.raises(LoraforgeError, match="rope scaling type 'yarn'"):
        config_from_gguf_metadata({**meta, "llama.rope.scaling.type": "yarn"}, "m.gguf")
    linear = config_from_gguf_metadata({**meta, "llama.rope.scaling.type": "linear",
                                             "llama.rope.scaling.factor": 4.0}, "m.gguf")
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 4.0}
