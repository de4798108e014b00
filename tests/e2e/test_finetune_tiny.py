"""`finetune` paths on a tiny random HF llama (fast): QLoRA NF4 base, instruction data with packing
and gradient accumulation resumed exactly, eval loss, PEFT output loaded by peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.cli import main


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def chat_data(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("tea", "toast", "tent", "test", "tilt", "tart", "text", "trot", "taut", "tot")]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def common(folder: str, data: Path) -> list[str]:
    return ["finetune", "--model-base", folder, "--train-data", str(data), "--template", "chatml",
            "--threads", "1", "--batch", "2", "--max-seq-length", "128", "--lr", "1e-2", "--warmup", "1",
            "--save-every", "0", "--seed", "5", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--checkpoint-in", "chk-LATEST.gguf"]


def test_instruction_run_resumes_exactly(tmp_path: Path, tiny_llama_folder: str, chat_data: Path,
                                         monkeypatch) -> None:
    """Packed chat data with grad-acc 2 and an eval split: 6 steps straight == 3 + resume + 3."""
    args = common(tiny_llama_folder, chat_data) + ["--packing", "--grad-acc", "2", "--eval-split", "2",
                                                    "--eval-every", "3", "--lora-dropout", "0.1"]
    straight, split = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), split.mkdir()
    monkeypatch.chdir(straight)
    assert main(args + ["--adam-iter", "6"]) == 0
    monkeypatch.chdir(split)
    assert main(args + ["--adam-iter", "3"]) == 0
    assert main(args + ["--adam-iter", "3"]) == 0
    a = [(m["iter"], m["loss"]) for m in metrics(straight / "lora-metrics.jsonl") if "loss" in m]
    b = [(m["iter"], m["loss"]) for m in metrics(split / "lora-metrics.jsonl") if "loss" in m]
    assert [i for i, _ in a] == [1, 2, 3, 4, 5, 6] and a == b
    evals = [m for m in metrics(straight / "lora-metrics.jsonl") if "eval_loss" in m]
    assert [m["iter"] for m in evals] == [3, 6] and evals[1]["eval_loss"] < evals[0]["eval_loss"] + 1.0
    assert (straight / "lora-LATEST.gguf").read_bytes() == (split / "lora-LATEST.gguf").read_bytes()


def test_qlora_nf4_base_trains_and_writes_peft(tmp_path: Path, tiny_llama_folder: str, chat_data: Path,
                                               monkeypatch, capsys) -> None:
    """--quantize nf4 keeps the decoder linears in NF4, the loss falls, and the PEFT output loads in peft."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from loraforge.formats.peft import read_peft
    from loraforge.loader import load_model
    from loraforge.lora import attach

    monkeypatch.chdir(tmp_path)
    rc = main(common(tiny_llama_folder, chat_data) + ["--quantize", "nf4", "--adam-iter", "12",
                                                      "--peft-out", "peft-adapter"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "base kept as nf4" in out
    losses = [m["loss"] for m in metrics(tmp_path / "lora-metrics.jsonl") if "loss" in m]
    assert losses[-1] < losses[0]
    # peft applies the adapter to the dense base the same way we do
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_folder, torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft-adapter")).eval()
    ours = load_model(tiny_llama_folder, "f32")
    attach(ours.model, read_peft(tmp_path / "peft-adapter", ours.config), "qlora")
    ids = torch.tensor([[3, 70, 101, 116, 257, 60, 200]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = ours.model(ids)
    assert (got - expected).abs().max().item() < 1e-4
