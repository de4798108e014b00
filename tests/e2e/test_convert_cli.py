"""`convert` / `export` / `merge` from HF bases: the user defects, bad input, memory.

- PEFT output of a fine-tune records the trained lora_dropout and a base a PEFT user can resolve
  (not a GGUF file name; that goes into our own `loraforge_base_gguf` field), and peft loads it.
- `export --in PEFT --to gguf` without -m never silently uses the embedded model: the adapter's
  base_model_name_or_path is used when it is a local path, else a one-line error asks for -m.
- Bad input to `convert` is a one-line error (exit 2) and leaves no output file.
- Peak RSS of a streamed convert (measured in a subprocess) stays well below the f32 model size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import make_tiny_hf_model
from loraforge.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


def test_finetune_peft_output_records_dropout_and_resolvable_base(tmp_path, tiny_gguf_path, tiny_llama_folder,
                                                                  monkeypatch, capsys):
    data = tmp_path / "train.txt"
    data.write_text("the tiny model learns a little text. " * 40, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    common = ["finetune", "--train-data", str(data), "--ctx", "16", "--batch", "2", "--adam-iter", "1",
              "--threads", "1", "--lora-dropout", "0.05", "--save-every", "0", "--checkpoint-out", "chk-ITERATION.gguf",
              "--checkpoint-in", "chk-LATEST.gguf", "--lora-out", "lora-ITERATION.gguf"]
    assert main(common + ["--model-base", tiny_gguf_path, "--peft-out", "from-gguf"]) == 0
    config = json.loads((tmp_path / "from-gguf" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.05
    assert not str(config["base_model_name_or_path"] or "").endswith(".gguf")
    assert config["loraforge_base_gguf"] == os.path.basename(tiny_gguf_path)
    (tmp_path / "chk-LATEST.gguf").unlink()
    assert main(common + ["--model-base", tiny_llama_folder, "--peft-out", "from-hf"]) == 0
    config = json.loads((tmp_path / "from-hf" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_llama_folder)
    assert config["lora_dropout"] == 0.05 and "loraforge_base_gguf" not in config
    peft = pytest.importorskip("peft")
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path / "from-hf"))
    assert loaded.lora_dropout == 0.05 and loaded.base_model_name_or_path == os.path.abspath(tiny_llama_folder)


def test_export_peft_without_base_uses_its_base_or_asks(tmp_path, tiny_hf_factory, capsys):
    model, folder = tiny_hf_factory("llama")
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(model.__class__(model.config),
                                     peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/not-here-model"
    config_path.write_text(json.dumps(config))
    rc, err = run_cli(["export", "--in", str(adapter), "--to", "gguf", "--out", str(tmp_path / "a.gguf")], capsys)
    assert rc == 2 and "needs its base model" in err and "-m" in err and "someone/not-here-model" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a.gguf").exists()
    config["base_model_name_or_path"] = folder
    config_path.write_text(json.dumps(config))
    assert main(["export", "--in", str(adapter), "--to", "gguf", "--out", str(tmp_path / "a.gguf")]) == 0


def test_convert_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_hf_factory, capsys):
    import shutil

    _, folder = tiny_hf_factory("llama")
    out = tmp_path / "x.gguf"
    rc, err = run_cli(["convert", str(tmp_path / "missing"), "-o", str(out)], capsys)
    assert rc == 2 and "no such folder" in err
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    rc, err = run_cli(["convert", str(broken), "-o", str(out)], capsys)
    assert rc == 2 and "model.layers.1.mlp.up_proj.weight" in err and len(err.strip().splitlines()) == 1
    (broken / "tokenizer.json").unlink()
    rc, err = run_cli(["convert", str(broken), "-o", str(out)], capsys)
    assert rc == 2 and "tokenizer" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.gguf")]


MEASURE = textwrap.dedent("""
    import sys
    import torch, numpy, gguf, safetensors, tokenizers  # what the converter imports
    import loraforge.formats.convert as convert, loraforge.merge, loraforge.formats.gguf_tokenizer
    from loraforge.formats.adapters import load_adapters

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    base = status("VmRSS")
    adapters = load_adapters([(sys.argv[4], 1.0)], convert.convertible_config(sys.argv[1]))
    summary = convert.convert_hf_to_gguf(sys.argv[1], sys.argv[2], sys.argv[3], adapters=adapters, log=lambda s: None)
    print(summary["changed"], base, status("VmHWM"))
""")


@pytest.mark.slow
def test_streamed_merge_peak_memory(tmp_path, capsys):
    """A 48-layer model of ~200 MiB f32 merged with a PEFT adapter on every projection into a Q8_0 GGUF
    (what `loraforge merge -m HF_FOLDER --lora PEFT -o out.gguf` runs): peak RSS grows far less than the
    model's size."""
    import peft

    folder = tmp_path / "big"
    model = make_tiny_hf_model(folder, "llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=48,
                               num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
    size = sum(p.numel() for p in model.parameters()) * 4
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    del model, lora
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset and read the peak resident size")
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(tmp_path / "big.gguf"), "q8_0",
                           str(tmp_path / "adapter")], capture_output=True, text=True, env=env, check=True, timeout=600)
    changed, base_kib, peak_kib = map(int, done.stdout.split()[-3:])
    grown = (peak_kib - base_kib) * 1024
    written = (tmp_path / "big.gguf").stat().st_size
    with capsys.disabled():
        print(f"\nstreamed merge to q8_0: f32 model {size / 2**20:.0f} MiB, {changed} tensors changed by the adapter, "
              f"peak RSS {peak_kib / 1024:.0f} MiB ({base_kib / 1024:.0f} MiB before, +{grown / 2**20:.0f} MiB "
              f"while merging), output {written / 2**20:.0f} MiB")
    assert changed == 48 * 7
    assert written > size * 0.25
    assert grown < size / 4


def test_export_to_ollama_from_hf_base(tmp_path, capsys):
    """--to ollama with an HF base: the base converted to GGUF, the adapter as GGUF LoRA, a Modelfile
    FROM the base with the ADAPTER line; without --base-gguf a one-line error before any work."""
    peft = pytest.importorskip("peft")
    folder = tmp_path / "base"
    model = make_tiny_hf_model(folder, "mistral")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                         "{% endif %}"}), encoding="utf-8")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "peft")
    out = tmp_path / "ollama" / "adapter.gguf"
    out.parent.mkdir()
    args = ["export", "--in", str(tmp_path / "peft"), "--to", "ollama", "-m", str(folder), "--out", str(out)]
    rc, err = run_cli(args, capsys)
    assert rc == 2 and "--base-gguf" in err and not out.exists()
    assert main(args + ["--base-gguf", str(out.parent / "base.gguf"), "--system", "Be brief."]) == 0
    text = (out.parent / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """Be brief."""' in text
    assert (out.parent / "base.gguf").is_file() and out.is_file()
