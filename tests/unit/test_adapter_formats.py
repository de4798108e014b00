"""Adapter formats: GGUF LoRA layout (checked with the gguf package), PEFT folders, round trips
between them, import of the old llama.cpp finetune `ggla` .bin (a file built here byte by byte
from the format description), and one-line errors for bad input with no output left behind."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from loraforge import cli
from loraforge.config import ModelConfig
from loraforge.errors import LoraforgeError
from loraforge.formats.adapters import load_adapter, parse_lora_args
from loraforge.formats.ggla import read_ggla
from loraforge.formats.gguf_lora import read_gguf_adapter, write_gguf_adapter
from loraforge.formats.peft import read_peft, write_peft
from loraforge.lora import Adapter
from loraforge.config_sources import config_from_hf_folder

CFG = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, name="tiny")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def dims(module: str, cfg: ModelConfig = CFG) -> tuple[int, int]:
    """(out, in) of an HF weight."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    if module in ("model.embed_tokens", "lm_head"):
        return cfg.vocab_size, h
    short = module.split(".", 3)[-1]
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f)}[short]


def random_adapter(seed: int = 0, rank: int = 4, ranks: dict[str, int] | None = None, alpha: float = 8.0,
                   alpha_pattern: dict[str, float] | None = None, use_rslora: bool = False,
                   extra: tuple[str, ...] = ("model.embed_tokens", "lm_head"), cfg: ModelConfig = CFG) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    modules = [f"model.layers.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in LINEARS] + list(extra)
    for module in modules:
        r = (ranks or {}).get(module, rank)
        out_f, in_f = dims(module, cfg)
        if module == "model.embed_tokens":
            a_shape, b_shape = (r, out_f), (in_f, r)
        else:
            a_shape, b_shape = (r, in_f), (out_f, r)
        tensors[module + ".lora_A"] = torch.randn(a_shape, generator=g) * 0.1
        tensors[module + ".lora_B"] = torch.randn(b_shape, generator=g) * 0.1
    return Adapter(tensors=tensors, alpha=alpha, use_rslora=use_rslora, alpha_pattern=dict(alpha_pattern or {}))


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp order, as convert_hf_to_gguf.py writes them."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def assert_same_adapter(x: Adapter, y: Adapter, exact: bool = True) -> None:
    assert x.modules() == y.modules()
    for m in x.modules():
        assert x.rank(m) == y.rank(m), m
        assert x.scaling(m) == pytest.approx(y.scaling(m), rel=1e-6), m
        if exact:
            assert torch.equal(x.tensors[m + ".lora_A"], y.tensors[m + ".lora_A"]), m
            assert torch.equal(x.tensors[m + ".lora_B"], y.tensors[m + ".lora_B"]), m
        torch.testing.assert_close(x.delta(m), y.delta(m), rtol=1e-6, atol=1e-7)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith("."))


# -- GGUF LoRA layout --------------------------------------------------------------------------------

def test_gguf_adapter_layout_is_what_llamacpp_reads(tmp_path):
    import gguf

    adapter = random_adapter(ranks={"model.layers.0.self_attn.q_proj": 8})
    path = tmp_path / "a.gguf"
    write_gguf_adapter(path, adapter, CFG, "llama")
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields[gguf.Keys.General.TYPE] == gguf.GGUFType.ADAPTER == "adapter"
    assert fields[gguf.Keys.General.ARCHITECTURE] == "llama"
    assert fields[gguf.Keys.Adapter.TYPE] == "lora"
    assert reader.fields[gguf.Keys.Adapter.LORA_ALPHA].types == [gguf.GGUFValueType.FLOAT32]
    assert fields[gguf.Keys.Adapter.LORA_ALPHA] == 8.0
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert len(tensors) == 2 * len(adapter.modules())
    for module in adapter.modules():
        a, b = adapter.tensors[module + ".lora_A"].numpy(), adapter.tensors[module + ".lora_B"].numpy()
        if module == "model.embed_tokens":
            # token_embd: lora_a transposed (vocab, r), lora_b (hidden, r)
            np.testing.assert_array_equal(tensors["token_embd.weight.lora_a"], a.T)
            np.testing.assert_array_equal(tensors["token_embd.weight.lora_b"], b)
            continue
        if module == "lm_head":
            base = "output.weight"
        else:
            layer, rest = module.split(".")[2], module.split(".", 3)[3]
            base = f"blk.{layer}.{GGUF_NAMES[rest]}.weight"
        np.testing.assert_array_equal(tensors[base + ".lora_a"], a)  # (r, in)
        heads = {"q_proj": CFG.num_attention_heads, "k_proj": CFG.num_key_value_heads}.get(module[-6:])
        np.testing.assert_array_equal(tensors[base + ".lora_b"], llama_permute(b, heads) if heads else b)
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (8, 64)


def test_gguf_adapter_qwen2_keeps_qk_order(tmp_path):
    import gguf

    cfg = CFG.replace(arch="qwen2")
    adapter = random_adapter(extra=(), cfg=cfg)
    write_gguf_adapter(tmp_path / "q.gguf", adapter, cfg, "qwen2")
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    b = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight.lora_b")
    np.testing.assert_array_equal(np.asarray(b.data), adapter.tensors["model.layers.1.self_attn.k_proj.lora_B"])
    assert_same_adapter(read_gguf_adapter(tmp_path / "q.gguf", cfg), adapter)


@pytest.mark.parametrize("outtype,tol", [("f32", 0.0), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)])
def test_gguf_adapter_outtypes(tmp_path, outtype, tol):
    adapter = random_adapter(seed=1)
    write_gguf_adapter(tmp_path / "a.gguf", adapter, CFG, "llama", outtype)
    back = read_gguf_adapter(tmp_path / "a.gguf", CFG)
    for m in adapter.modules():
        err = (back.delta(m) - adapter.delta(m)).abs().max().item()
        scale = adapter.delta(m).abs().max().item()
        assert err <= tol * scale, (m, err)


def test_gguf_alpha_folds_rslora_and_alpha_pattern(tmp_path):
    import gguf

    adapter = random_adapter(ranks={"model.layers.1.mlp.up_proj": 2, "lm_head": 16}, alpha=6.0, use_rslora=True,
                             alpha_pattern={"model.layers.0.self_attn.v_proj": 1.5})
    write_gguf_adapter(tmp_path / "a.gguf", adapter, CFG, "llama")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert alpha == pytest.approx(6.0 * 2.0)  # rank 4 is the common one: alpha * sqrt(r)
    # What llama.cpp computes for each pair, B (GGUF layout) @ A * alpha / r, is the adapter's delta.
    data = {t.name: np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}
    for module, base in (("model.layers.1.mlp.up_proj", "blk.1.ffn_up.weight"), ("lm_head", "output.weight"),
                         ("model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight"),
                         ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")):
        a, b = data[base + ".lora_a"], data[base + ".lora_b"]
        got = b @ a * (alpha / b.shape[1])
        np.testing.assert_allclose(got, adapter.delta(module).numpy(), rtol=1e-5, atol=1e-7)
    # and our reader restores the original description
    back = read_gguf_adapter(tmp_path / "a.gguf", CFG)
    assert back.use_rslora and back.alpha == 6.0 and back.alpha_pattern == adapter.alpha_pattern
    assert_same_adapter(back, adapter, exact=False)


def test_foreign_gguf_adapter_without_alpha_means_scale_one(tmp_path):
    import gguf

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 64)).astype(np.float32)
    b = rng.normal(size=(64, 4)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_tensor("blk.0.attn_output.weight.lora_a", a)
    w.add_tensor("blk.0.attn_output.weight.lora_b", b)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))  # ignored, as llama.cpp does
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    adapter = read_gguf_adapter(tmp_path / "f.gguf", CFG)
    np.testing.assert_allclose(adapter.delta("model.layers.0.self_attn.o_proj").numpy(), b @ a, rtol=1e-6)


# -- PEFT folders ------------------------------------------------------------------------------------

def test_peft_folder_layout_and_round_trip(tmp_path):
    from safetensors import safe_open

    adapter = random_adapter(ranks={"model.layers.0.self_attn.q_proj": 8, "model.embed_tokens": 2},
                             alpha_pattern={"model.layers.1.mlp.down_proj": 3.0})
    write_peft(tmp_path / "p", adapter, CFG, base_name="tiny-base")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["use_rslora"] is False
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 8, "model.embed_tokens": 2}
    assert config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 3.0}
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj", "embed_tokens", "lm_head"])
    assert config["base_model_name_or_path"] == "tiny-base"
    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q_b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.lm_head.lora_A.weight" in keys
    # HF layout: q/k are not permuted in PEFT files
    assert torch.equal(q_b, adapter.tensors["model.layers.0.self_attn.q_proj.lora_B"])
    assert_same_adapter(read_peft(tmp_path / "p", CFG), adapter)


def test_round_trip_ours_peft_gguf_peft_is_lossless_in_f32(tmp_path):
    adapter = random_adapter(seed=3, ranks={"model.layers.1.self_attn.k_proj": 6, "lm_head": 2},
                             alpha_pattern={"model.layers.0.mlp.gate_proj": 4.0})
    write_peft(tmp_path / "p1", adapter, CFG)
    a1 = load_adapter(tmp_path / "p1", CFG)
    write_gguf_adapter(tmp_path / "a.gguf", a1, CFG, "llama")
    a2 = load_adapter(tmp_path / "a.gguf", CFG)
    write_peft(tmp_path / "p2", a2, CFG)
    a3 = load_adapter(tmp_path / "p2", CFG)
    for got in (a1, a2, a3):
        assert_same_adapter(got, adapter, exact=True)
    # the folded case (rsLoRA with mixed ranks needs per-module factors in lora_b) stays within rounding
    rs = random_adapter(seed=4, ranks={"lm_head": 16}, use_rslora=True)
    write_gguf_adapter(tmp_path / "rs.gguf", rs, CFG, "llama")
    write_peft(tmp_path / "rs", load_adapter(tmp_path / "rs.gguf", CFG), CFG)
    assert_same_adapter(load_adapter(tmp_path / "rs", CFG), rs, exact=False)


def test_cli_export_round_trip(tmp_path, capsys, tiny_llama_folder):
    cfg = config_from_hf_folder(tiny_llama_folder)
    adapter = random_adapter(seed=5, cfg=cfg)
    write_peft(tmp_path / "in", adapter, cfg)
    rc, out, err = run_cli(["export", "--in", str(tmp_path / "in"), "--out", str(tmp_path / "a.gguf"),
                            "--model-base", tiny_llama_folder], capsys)
    assert rc == 0, err
    assert "GGUF LoRA" in out
    rc, out, err = run_cli(["export", "--in", str(tmp_path / "a.gguf"), "--out", str(tmp_path / "back"),
                            "--model-base", tiny_llama_folder, "--outtype", "f16"], capsys)
    assert rc == 0, err
    back = load_adapter(tmp_path / "back", cfg)
    assert back.tensors["lm_head.lora_A"].dtype == torch.float32
    for m in adapter.modules():
        torch.testing.assert_close(back.delta(m), adapter.delta(m), rtol=2e-3, atol=2e-4)


# -- old llama.cpp finetune .bin ("ggla") ------------------------------------------------------------

def write_ggla(path: Path, r: int, alpha: int, tensors: list[tuple[str, np.ndarray, int]]) -> None:
    """The format of finetune.cpp's save_as_llama_lora: each (name, ggml-order array, n_dims) with
    ne[0] first; name then zero padding to 32 bytes from the file start, then f32 data."""
    with open(path, "wb") as f:
        f.write(struct.pack("<4I", 0x67676C61, 1, r, alpha))
        for name, arr, n_dims in tensors:
            ne = list(reversed(arr.shape))[:n_dims] if n_dims else []
            raw = name.encode()
            f.write(struct.pack("<3I", n_dims, len(raw), 0))
            f.write(struct.pack(f"<{len(ne)}I", *ne))
            f.write(raw)
            f.write(b"\0" * ((-f.tell()) % 32))
            f.write(np.ascontiguousarray(arr, dtype=np.float32).tobytes())


def finetune_tensors(cfg: ModelConfig, r: int, rank_wq: int, rng) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random (A, B) per finetune tensor in numpy order: ggml ne (rank, n) is numpy (n, rank)."""
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_size
    shapes = {"token_embd.weight": (h, cfg.vocab_size, r), "output_norm.weight": (h, 1, 1),
              "output.weight": (h, cfg.vocab_size, r)}
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (h, 1, 1), f"blk.{i}.attn_q.weight": (h, h, rank_wq),
                       f"blk.{i}.attn_k.weight": (h, kv, r), f"blk.{i}.attn_v.weight": (h, kv, r),
                       f"blk.{i}.attn_output.weight": (h, h, r), f"blk.{i}.ffn_norm.weight": (h, 1, 1),
                       f"blk.{i}.ffn_gate.weight": (h, f, r), f"blk.{i}.ffn_down.weight": (f, h, r),
                       f"blk.{i}.ffn_up.weight": (h, f, r)})
    return {name: (rng.normal(0, 0.1, (n_a, k)).astype(np.float32), rng.normal(0, 0.1, (n_b, k)).astype(np.float32))
            for name, (n_a, n_b, k) in shapes.items()}


def test_ggla_import_shapes_and_values(tmp_path):
    cfg = CFG.replace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(7)
    r, alpha, rank_wq = 4, 8, 2
    pairs = finetune_tensors(cfg, r, rank_wq, rng)
    records = []
    for name, (a, b) in pairs.items():
        # newer finetune builds wrote n_dims via ggml_n_dims: a (rank, 1) lora_b of a norm is 1-D
        records.append((name + ".loraA", a, 2))
        records.append((name + ".loraB", b, 1 if b.shape[0] == 1 else 2))
    write_ggla(tmp_path / "lora-LATEST.bin", r, alpha, records)
    adapter = read_ggla(tmp_path / "lora-LATEST.bin", cfg)
    assert load_adapter(tmp_path / "lora-LATEST.bin", cfg).modules() == adapter.modules()
    scale = alpha / r  # llama.cpp applied the header's alpha / r to every tensor

    def ggml_delta(name: str) -> np.ndarray:
        a, b = pairs[name]  # mul_mat(a, b) with ne (rank, n) each = numpy B @ A.T
        return (b @ a.T) * scale

    q = adapter.delta("model.layers.1.self_attn.q_proj").numpy()
    assert adapter.rank("model.layers.1.self_attn.q_proj") == rank_wq
    assert adapter.tensors["model.layers.1.self_attn.q_proj.lora_A"].shape == (rank_wq, cfg.hidden_size)
    np.testing.assert_allclose(llama_permute(q, cfg.num_attention_heads), ggml_delta("blk.1.attn_q.weight"),
                               rtol=1e-5, atol=1e-7)
    k = adapter.delta("model.layers.0.self_attn.k_proj").numpy()
    np.testing.assert_allclose(llama_permute(k, cfg.num_key_value_heads), ggml_delta("blk.0.attn_k.weight"),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(adapter.delta("model.layers.0.mlp.down_proj").numpy(),
                               ggml_delta("blk.0.ffn_down.weight"), rtol=1e-5, atol=1e-7)
    emb = adapter.delta("model.embed_tokens").numpy()
    assert emb.shape == (cfg.vocab_size, cfg.hidden_size)
    np.testing.assert_allclose(emb, ggml_delta("token_embd.weight"), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(adapter.delta("lm_head").numpy(), ggml_delta("output.weight"), rtol=1e-5, atol=1e-7)
    norms = adapter.metadata["norm_deltas"]
    np.testing.assert_allclose(norms["model.layers.1.post_attention_layernorm.weight"].numpy(),
                               ggml_delta("blk.1.ffn_norm.weight").reshape(-1), rtol=1e-5, atol=1e-7)
    assert set(norms) == {"model.norm.weight"} | {f"model.layers.{i}.{n}" for i in range(2)
                                                  for n in ("input_layernorm.weight",
                                                            "post_attention_layernorm.weight")}


def test_ggla_export_to_gguf_and_peft(tmp_path, capsys, tiny_llama_folder):
    cfg = config_from_hf_folder(tiny_llama_folder)
    rng = np.random.default_rng(8)
    pairs = finetune_tensors(cfg, 4, 4, rng)
    write_ggla(tmp_path / "old.bin", 4, 4, [(n + s, x, 2) for n, (a, b) in pairs.items()
                                            for s, x in ((".loraA", a), (".loraB", b))])
    rc, out, err = run_cli(["export", "--in", str(tmp_path / "old.bin"), "--out", str(tmp_path / "new.bin"),
                            "--model-base", tiny_llama_folder], capsys)
    assert rc == 0, err
    assert "GGUF format" in err and "RMSNorm" in err
    assert (tmp_path / "new.bin").read_bytes()[:4] == b"GGUF"
    rc, _, err = run_cli(["export", "--in", str(tmp_path / "old.bin"), "--out", str(tmp_path / "peft"),
                          "--model-base", tiny_llama_folder], capsys)
    assert rc == 0, err
    ref = read_ggla(tmp_path / "old.bin", cfg)
    for other in (load_adapter(tmp_path / "new.bin", cfg), load_adapter(tmp_path / "peft", cfg)):
        for m in ref.modules():
            torch.testing.assert_close(other.delta(m), ref.delta(m), rtol=1e-6, atol=1e-7)


# -- bad input -----------------------------------------------------------------------------------------

def test_adapter_for_another_model_is_refused(tmp_path):
    other = CFG.replace(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    write_peft(tmp_path / "p", random_adapter(cfg=other), other)
    with pytest.raises(LoraforgeError, match="do not fit the base model") as e:
        load_adapter(tmp_path / "p", CFG)
    assert "\n" not in str(e.value) and str(tmp_path / "p") in str(e.value)
    write_gguf_adapter(tmp_path / "q.gguf", random_adapter(extra=(), cfg=CFG.replace(arch="qwen2")),
                       CFG.replace(arch="qwen2"), "qwen2")
    with pytest.raises(LoraforgeError, match="architecture 'qwen2'.*'llama'"):
        load_adapter(tmp_path / "q.gguf", CFG)
    deeper = CFG.replace(num_hidden_layers=3)
    write_gguf_adapter(tmp_path / "deep.gguf", random_adapter(extra=(), cfg=deeper), deeper, "llama")
    with pytest.raises(LoraforgeError, match="beyond the base model's 2 layers"):
        load_adapter(tmp_path / "deep.gguf", CFG)


def test_bad_peft_folders(tmp_path):
    write_peft(tmp_path / "p", random_adapter(), CFG)
    os.remove(tmp_path / "p" / "adapter_config.json")
    with pytest.raises(LoraforgeError, match="without adapter_config.json"):
        load_adapter(tmp_path / "p", CFG)
    with pytest.raises(LoraforgeError, match="no adapter_config.json"):
        read_peft(tmp_path / "p", CFG)

    from safetensors.torch import save_file

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["c_attn"]}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 64)},
              str(gpt2 / "adapter_model.safetensors"))
    with pytest.raises(LoraforgeError, match="unknown target module.*c_attn"):
        load_adapter(gpt2, CFG)
    (gpt2 / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"]}))
    with pytest.raises(LoraforgeError, match="unknown target module 'transformer.h.0.attn.c_attn'"):
        load_adapter(gpt2, CFG)
    with pytest.raises(LoraforgeError, match="is a folder but not a PEFT adapter"):
        load_adapter(tmp_path, CFG)


def test_lora_scale_must_be_a_number(tmp_path, capsys, tiny_llama_folder):
    (tmp_path / "x.gguf").write_bytes(b"")
    assert parse_lora_args([str(tmp_path / "x.gguf")], [[str(tmp_path / "x.gguf"), "-0.5"]]) == [
        (str(tmp_path / "x.gguf"), 1.0), (str(tmp_path / "x.gguf"), -0.5)]
    with pytest.raises(LoraforgeError, match="scale 'abc' is not a number"):
        parse_lora_args([], [[str(tmp_path / "x.gguf"), "abc"]])
    with pytest.raises(LoraforgeError, match="not a finite number"):
        parse_lora_args([], [[str(tmp_path / "x.gguf"), "nan"]])
    out = tmp_path / "merged"
    rc, _, err = run_cli(["merge", "-m", tiny_llama_folder, "--lora-scaled", str(tmp_path / "x.gguf"), "0.5x",
                          "-o", str(out)], capsys)
    assert rc == 2 and "'0.5x' is not a number" in err and err.count("\n") == 1
    assert not out.exists()


def test_failed_export_and_merge_leave_no_output(tmp_path, capsys, tiny_llama_folder):
    other = CFG.replace(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    write_peft(tmp_path / "wrong", random_adapter(cfg=other), other)
    for argv, target in (
            (["export", "--in", str(tmp_path / "wrong"), "--out", str(tmp_path / "o.gguf")], "o.gguf"),
            (["export", "--in", str(tmp_path / "wrong"), "--out", str(tmp_path / "o_peft")], "o_peft"),
            (["merge", "--lora", str(tmp_path / "wrong"), "-o", str(tmp_path / "m_hf")], "m_hf"),
            (["merge", "--lora", str(tmp_path / "wrong"), "-o", str(tmp_path / "m.gguf")], "m.gguf")):
        rc, out, err = run_cli(argv + ["--model-base", tiny_llama_folder] if argv[0] == "export"
                               else argv + ["-m", tiny_llama_folder], capsys)
        assert rc == 2, err
        assert err.startswith(f"loraforge {argv[0]}: error: ") and err.count("\n") == 1, err
        assert not (tmp_path / target).exists()
        assert leftovers(tmp_path) == []
    # an adapter made for a tied base cannot become a llama.cpp GGUF LoRA (output = token_embd there)
    tied = CFG.replace(tie_word_embeddings=True)
    with pytest.raises(LoraforgeError, match="ties its output layer"):
        write_gguf_adapter(tmp_path / "t.gguf", random_adapter(), tied, "llama")
    assert not (tmp_path / "t.gguf").exists() and leftovers(tmp_path) == []


def test_bad_adapter_files(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(LoraforgeError, match="not an adapter"):
        load_adapter(tmp_path / "junk.bin", CFG)
    write_ggla(tmp_path / "cut.bin", 4, 4, [("blk.0.attn_q.weight.loraA", np.ones((64, 4), np.float32), 2)])
    data = (tmp_path / "cut.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-10])
    with pytest.raises(LoraforgeError, match="truncated"):
        load_adapter(tmp_path / "cut.bin", CFG)
    write_ggla(tmp_path / "half.bin", 4, 4, [("blk.0.attn_q.weight.loraA", np.ones((64, 4), np.float32), 2)])
    with pytest.raises(LoraforgeError, match="only one of loraA / loraB"):
        load_adapter(tmp_path / "half.bin", CFG)
    with pytest.raises(LoraforgeError, match="no such file"):
        load_adapter(tmp_path / "missing.gguf", CFG)


# -- merge ---------------------------------------------------------------------------------------------

def write_plain_gguf(path: Path, cfg: ModelConfig, rng, f16: bool = False) -> dict[str, np.ndarray]:
    """A random llama GGUF without tokenizer (merge does not need one); returns its tensors (GGUF layout)."""
    import gguf

    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_size
    shapes = {"token_embd.weight": (cfg.vocab_size, h), "output_norm.weight": (h,),
              "output.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.attn_q.weight": (h, h),
                       f"blk.{i}.attn_k.weight": (kv, h), f"blk.{i}.attn_v.weight": (kv, h),
                       f"blk.{i}.attn_output.weight": (h, h), f"blk.{i}.ffn_norm.weight": (h,),
                       f"blk.{i}.ffn_gate.weight": (f, h), f"blk.{i}.ffn_down.weight": (h, f),
                       f"blk.{i}.ffn_up.weight": (f, h)})
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 128), ("embedding_length", h), ("block_count", cfg.num_hidden_layers),
                       ("feed_forward_length", f), ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    tensors = {}
    for name, shape in shapes.items():
        x = rng.normal(0, 0.05, shape).astype(np.float32)
        if f16 and len(shape) == 2:
            x = x.astype(np.float16)
        tensors[name] = x
        w.add_tensor(name, x)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return tensors


@pytest.mark.parametrize("outtype", ["f32", "same"])
def test_merge_ggla_into_gguf_matches_ggml_formula(tmp_path, outtype):
    """Merging an old finetune adapter: every merged tensor (GGUF layout, read back by the gguf
    package) is base + user_scale * alpha / r * mul_mat(loraA, loraB), norms included, q/k rows
    included (the adapter's GGUF layout survives our HF-layout round trip)."""
    import gguf

    from loraforge.merge import merge_to_gguf

    cfg = CFG
    rng = np.random.default_rng(11)
    base = write_plain_gguf(tmp_path / "base.gguf", cfg, rng, f16=(outtype == "same"))
    pairs = finetune_tensors(cfg, 4, 2, rng)
    write_ggla(tmp_path / "old.bin", 4, 12, [(n + s, x, 2) for n, (a, b) in pairs.items()
                                             for s, x in ((".loraA", a), (".loraB", b))])
    adapter = load_adapter(tmp_path / "old.bin", cfg)
    summary = merge_to_gguf(str(tmp_path / "base.gguf"), [(adapter, 0.5)], str(tmp_path / "m.gguf"), outtype)
    assert summary["changed"] == len(pairs)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    merged = {t.name: (t, np.asarray(t.data)) for t in reader.tensors}
    assert set(merged) == set(base)
    for name, (a, b) in pairs.items():
        t, data = merged[name]
        expected = base[name].astype(np.float32) + 0.5 * (12 / 4) * (b @ a.T).reshape(base[name].shape)
        if outtype == "same" and base[name].ndim == 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_allclose(data.astype(np.float32), expected, rtol=1e-3, atol=1e-4)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-6)


def test_merge_hf_base_to_hf_folder(tmp_path, tiny_llama_folder):
    from safetensors.torch import load_file

    from loraforge.merge import merge_to_hf

    cfg = config_from_hf_folder(tiny_llama_folder)
    adapter = random_adapter(seed=12, cfg=cfg, extra=("lm_head",))
    merge_to_hf(tiny_llama_folder, [(adapter, -2.0)], str(tmp_path / "out"), "f32", max_shard_bytes=200_000)
    base = load_file(os.path.join(tiny_llama_folder, "model.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    merged = {}
    for shard in set(index["weight_map"].values()):
        merged.update(load_file(str(tmp_path / "out" / shard)))
    assert set(merged) == set(base)
    for name, value in base.items():
        module = name[: -len(".weight")]
        expected = value + (-2.0 * adapter.delta(module) if module in adapter.modules() else 0)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == Path(tiny_llama_folder, name).read_bytes()


def test_training_checkpoint_is_accepted_as_adapter(tmp_path, capsys, tiny_llama_folder):
    from loraforge import lora
    from loraforge.model import CausalLM
    from loraforge.train.checkpoint import TrainState, save_checkpoint

    cfg = config_from_hf_folder(tiny_llama_folder)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    lora_cfg = lora.LoraConfig(r=4, alpha=6.0, target_modules=("q_proj", "v_proj", "down_proj"),
                               rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3.0})
    lora.inject(model, lora_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(str(tmp_path / "chk-LATEST.gguf"), model, optimizer, lora_cfg, TrainState(), cfg, {})
    expected = lora.to_adapter(model, lora_cfg)
    assert_same_adapter(load_adapter(tmp_path / "chk-LATEST.gguf", cfg), expected)
    rc, _, err = run_cli(["export", "--in", str(tmp_path / "chk-LATEST.gguf"), "--out", str(tmp_path / "p"),
                          "--model-base", tiny_llama_folder], capsys)
    assert rc == 0, err
    assert_same_adapter(load_adapter(tmp_path / "p", cfg), expected)
