"""`loraforge inspect` on a GGUF model, HF folders, a GGUF LoRA adapter and a PEFT adapter made by
peft itself; figures checked against the loaded models and transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loraforge.cli import main


def inspect_json(capsys, path) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def inspect_text(capsys, path) -> str:
    """Text output with runs of spaces squeezed (the label column's width depends on the labels)."""
    assert main(["inspect", str(path)]) == 0
    return "\n".join(" ".join(line.split()) for line in capsys.readouterr().out.splitlines())


def test_smollm2_gguf(capsys, smollm2_path, smollm2_f32):
    info = inspect_json(capsys, smollm2_path)
    assert info["kind"] == "gguf-model" and info["architecture"] == "llama" and info["format"] == "GGUF v3"
    s = info["sizes"]
    assert (s["layers"], s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["ff"], s["vocab"], s["context"]) == \
        (30, 576, 9, 3, 64, 1536, 49152, 8192)
    assert s["tied_embeddings"] is True
    assert info["rope"] == {"base": 100000.0, "scaling": None}
    loaded_params = sum(p.numel() for p in smollm2_f32.model.parameters())  # tied head counted once
    assert info["parameters"] == loaded_params
    assert info["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1} and info["tensor_count"] == 272
    assert info["file_type"] == "Q4_1"
    tok = info["tokenizer"]
    assert (tok["model"], tok["pre"], tok["vocab_size"]) == ("gpt2", "smollm", 49152)
    assert tok["bos"] == {"id": 1, "text": "<|im_start|>"} and tok["eos"] == {"id": 2, "text": "<|im_end|>"}
    assert info["chat_template"] == smollm2_f32.tokenizer.chat_template
    text = inspect_text(capsys, smollm2_path)
    for line in ("architecture llama", "heads 9 (key/value heads 3, head dim 64)",
                 "tensors 272: Q4_1 210, F32 61, Q8_0 1", "tokenizer gpt2 (pre smollm), 49152 tokens",
                 "chat template 6 lines:", "| {% for message in messages %}"):
        assert line in text, line


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_hf_folder(capsys, tiny_hf_factory, shard):
    model, folder = tiny_hf_factory("qwen2", tie_word_embeddings=True, max_shard_size=shard)
    info = inspect_json(capsys, folder)
    assert info["kind"] == "hf-model" and info["architecture"] == "qwen2"
    assert info["parameters"] == model.num_parameters()
    assert info["sizes"]["tied_embeddings"] is True and info["sizes"]["attention_bias"] is True
    assert info["tensor_types"] == {"F32": len(model.state_dict()) - 1}  # the tied head is not stored
    assert info["tokenizer"]["vocab_size"] == 260 and info["tokenizer"]["model"] == "BPE"
    assert info["tokenizer"]["bos"] == {"id": 257, "text": "<s>"}
    assert ("1 file(s)" if shard is None else "file(s)") in info["format"]
    assert "tokenizer BPE" in inspect_text(capsys, folder)


def test_tiny_gguf_counts_parameters_like_transformers(capsys, tiny_gguf_path, tiny_hf_factory):
    model, _ = tiny_hf_factory("llama")
    info = inspect_json(capsys, tiny_gguf_path)
    assert info["parameters"] == model.num_parameters()
    assert info["tensor_types"] == {"F32": len(model.state_dict())}


def test_gguf_lora_adapter(capsys, tmp_path):
    """A llama.cpp-layout adapter: lora_a (r, in), lora_b (out, r), alpha in adapter.lora.alpha."""
    import gguf

    path = tmp_path / "lora.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    rng = np.random.default_rng(0)
    for layer in range(2):
        w.add_tensor(f"blk.{layer}.attn_q.weight.lora_a", rng.standard_normal((8, 64), dtype=np.float32))
        w.add_tensor(f"blk.{layer}.attn_q.weight.lora_b", rng.standard_normal((64, 8), dtype=np.float32))
        w.add_tensor(f"blk.{layer}.ffn_down.weight.lora_a", rng.standard_normal((4, 96), dtype=np.float32))
        w.add_tensor(f"blk.{layer}.ffn_down.weight.lora_b", rng.standard_normal((64, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = inspect_json(capsys, path)
    assert info["kind"] == "gguf-lora" and info["architecture"] == "llama" and info["adapter_type"] == "lora"
    assert info["alpha"] == 16.0 and info["ranks"] == [4, 8] and info["adapted_tensors"] == 4
    assert info["modules"] == {"attn_q.weight": [8], "ffn_down.weight": [4]}
    assert info["scale_at_rank"] == {"4": 4.0, "8": 2.0}
    assert info["tensors"]["blk.1.ffn_down.weight"] == {"rank": 4, "lora_a": [4, 96], "lora_b": [64, 4]}
    text = inspect_text(capsys, path)
    assert "ranks 4, 8" in text and "attn_q.weight rank 8" in text


def test_peft_adapter_folder(capsys, tmp_path, tiny_hf_factory):
    peft = pytest.importorskip("peft")
    model, _ = tiny_hf_factory("llama", seed=3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    try:
        peft_model.save_pretrained(tmp_path)
    finally:
        peft_model.unload()  # the shared tiny model goes back to plain Linear layers
    info = inspect_json(capsys, tmp_path)
    assert info["kind"] == "peft-lora" and info["peft_type"] == "LORA"
    assert info["r"] == 4 and info["alpha"] == 8 and info["ranks"] == [4]
    assert sorted(info["target_modules"]) == ["q_proj", "v_proj"]
    assert info["adapted_tensors"] == 2 * 3
    assert info["tensors"]["model.layers.2.self_attn.v_proj"]["lora_B"] == [32, 4]
