"""`loraforge finetune` end to end on the embedded SmolLM2 and the bundled Shakespeare text:
the seeds' command and files, learning, exact resume, a crash while saving, llama.cpp loading
the adapter, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loraforge.cli import main
from loraforge.formats.gguf import read_model

ROOT = Path(__file__).resolve().parents[2]
SEED_FLAGS = ["--threads", "2", "--batch", "2", "--ctx", "32", "--seed", "7"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if '"iter"' in line and "loss" in line]


@pytest.fixture(scope="module")
def heldout_split(tmp_path_factory, shakespeare_text: str) -> tuple[Path, str]:
    """First 90% of the text for training, the last 10% held out."""
    folder = tmp_path_factory.mktemp("split")
    cut = int(len(shakespeare_text) * 0.9)
    train = folder / "train.txt"
    train.write_text(shakespeare_text[:cut], encoding="utf-8")
    return train, shakespeare_text[cut:]


def test_seed_command_leaves_the_seed_files(tmp_path: Path, smollm2_path: str, capsys, monkeypatch) -> None:
    """The seeds' command (short) writes checkpoint and adapter per ITERATION plus LATEST, nothing else."""
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cli([
        "finetune", "--model-base", smollm2_path,
        "--checkpoint-in", "chk-lora-smollm2-shakespeare-LATEST.gguf",
        "--checkpoint-out", "chk-lora-smollm2-shakespeare-ITERATION.gguf",
        "--lora-out", "lora-smollm2-shakespeare-ITERATION.bin",
        "--train-data", str(ROOT / "src/loraforge/assets/shakespeare.txt"),
        "--save-every", "2", "--adam-iter", "4", "--use-checkpointing", *SEED_FLAGS], capsys)
    assert rc == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([
        "chk-lora-smollm2-shakespeare-2.gguf", "chk-lora-smollm2-shakespeare-4.gguf",
        "chk-lora-smollm2-shakespeare-LATEST.gguf",
        "lora-smollm2-shakespeare-2.bin", "lora-smollm2-shakespeare-4.bin", "lora-smollm2-shakespeare-LATEST.bin",
        "lora-smollm2-shakespeare-metrics.jsonl", "lora-smollm2-shakespeare-metrics.png"])
    assert (tmp_path / "lora-smollm2-shakespeare-4.bin").read_bytes() == \
        (tmp_path / "lora-smollm2-shakespeare-LATEST.bin").read_bytes()
    iter_lines = [line for line in out.splitlines() if line.startswith("train_opt_callback: iter=")]
    assert len(iter_lines) == 4
    for line in iter_lines:
        for field in ("sample=", "sched=", "loss=", "dt=", "eta="):
            assert field in line
    assert "tokens/s" in out and "peak RSS" in out
    assert "total number of samples" in out and "number of unique tokens" in out


def test_held_out_loss_falls(tmp_path: Path, smollm2_path: str, heldout_split, capsys, monkeypatch) -> None:
    """A short run lowers the loss on held-out Shakespeare (figures printed with -s)."""
    from loraforge.data.text import TextSampleOptions, TextSamples
    from loraforge.formats.gguf_lora import read_gguf_adapter
    from loraforge.loader import load_model
    from loraforge.lora import attach
    from loraforge.train.evaluate import evaluate_source

    train, heldout = heldout_split
    monkeypatch.chdir(tmp_path)
    rc, _, _ = run_cli(["finetune", "--model-base", smollm2_path, "--train-data", str(train),
                        "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf",
                        "--save-every", "0", "--adam-iter", "40", "--threads", "2", "--batch", "4", "--ctx", "64",
                        "--adam-alpha", "2e-3", "--warmup", "4", "--lora-r", "8", "--lora-alpha", "16",
                        "--seed", "3"], capsys)
    assert rc == 0
    loaded = load_model(smollm2_path, "f32")
    tok = loaded.tokenizer
    ids = tok.encode(heldout, add_bos=False, parse_special=False)
    samples = TextSamples(ids, 64, tok.bos_id, tok.eos_id, loaded.config.vocab_size, TextSampleOptions(),
                          batch_size=8)
    samples.begins, samples.sizes = samples.begins[::64][:24], samples.sizes[::64][:24]  # disjoint windows
    before, _ = evaluate_source(loaded.model, samples, "cpu")
    attach(loaded.model, read_gguf_adapter(tmp_path / "lora-LATEST.gguf", loaded.config), "trained")
    after, _ = evaluate_source(loaded.model, samples, "cpu")
    print(f"held-out loss: base {before:.4f} -> after 40 iterations {after:.4f}")
    assert after < before - 0.15


def test_exact_resume(tmp_path: Path, smollm2_path: str, capsys, monkeypatch) -> None:
    """4 iterations straight == 2 iterations, stop, resume for 2 more: same losses, same adapter."""
    from loraforge.formats.gguf_lora import read_gguf_adapter

    common = ["finetune", "--model-base", smollm2_path, "--save-every", "0", "--adam-alpha", "1e-3",
              "--warmup", "2", "--lora-dropout", "0.1", *SEED_FLAGS]
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    monkeypatch.chdir(straight)
    assert run_cli(common + ["--adam-iter", "4", "--checkpoint-out", "chk-ITERATION.gguf",
                             "--lora-out", "lora-ITERATION.gguf"], capsys)[0] == 0
    monkeypatch.chdir(split)
    args = common + ["--adam-iter", "2", "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out",
                     "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf"]
    assert run_cli(args, capsys)[0] == 0
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "resuming from chk-LATEST.gguf at iteration 2" in out
    a = [(m["iter"], m["loss"]) for m in metrics(straight / "lora-metrics.jsonl")]
    b = [(m["iter"], m["loss"]) for m in metrics(split / "lora-metrics.jsonl")]
    assert [i for i, _ in a] == [1, 2, 3, 4] and a == b
    cfg = read_model(smollm2_path).config
    ad_a = read_gguf_adapter(straight / "lora-LATEST.gguf", cfg)
    ad_b = read_gguf_adapter(split / "lora-LATEST.gguf", cfg)
    assert ad_a.tensors.keys() == ad_b.tensors.keys()
    for key in ad_a.tensors:
        assert torch.equal(ad_a.tensors[key], ad_b.tensors[key]), key


def test_adapter_changes_llamacpp_logits_like_ours(tmp_path: Path, smollm2_path: str, capsys, monkeypatch) -> None:
    """llama.cpp loads the --lora-out file; its logit change matches our model's change.

    Both sides run the same Q4_1 base; llama.cpp quantizes activations to Q8_1 for its Q4_1
    matmuls, so each side's logits carry their own ~1e-1 noise. The adapter's effect (adapter
    minus base logits) is compared: correlation > 0.98 and the mean absolute difference well
    below the mean effect.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    from loraforge.formats.gguf_lora import read_gguf_adapter
    from loraforge.loader import load_model
    from loraforge.lora import attach

    monkeypatch.chdir(tmp_path)
    rc, _, _ = run_cli(["finetune", "--model-base", smollm2_path, "--lora-out", "lora-ITERATION.gguf",
                        "--checkpoint-out", "chk-ITERATION.gguf", "--save-every", "0", "--adam-iter", "6",
                        "--adam-alpha", "1e-2", "--warmup", "1", "--lora-r", "4", "--lora-alpha", "8",
                        *SEED_FLAGS], capsys)
    assert rc == 0
    adapter_path = str(tmp_path / "lora-LATEST.gguf")
    prompt = "ROMEO: But soft, what light through yonder window breaks? It is the east, and"

    def llama_logits(lora: str | None) -> np.ndarray:
        llm = llama_cpp.Llama(model_path=smollm2_path, lora_path=lora, n_ctx=128, logits_all=True,
                              verbose=False, seed=0, n_threads=2)
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        llm.close()
        return ids, logits

    ids, base_cpp = llama_logits(None)
    _, lora_cpp = llama_logits(adapter_path)
    loaded = load_model(smollm2_path, "quantized")
    x = torch.tensor([ids])
    with torch.no_grad():
        base_ours = loaded.model(x)[0].numpy()
        attach(loaded.model, read_gguf_adapter(adapter_path, loaded.config), "trained")
        lora_ours = loaded.model(x)[0].numpy()
    d_cpp, d_ours = lora_cpp - base_cpp, lora_ours - base_ours
    corr = np.corrcoef(d_cpp.ravel(), d_ours.ravel())[0, 1]
    mad = np.abs(d_cpp - d_ours).mean()
    print(f"adapter effect: mean |ours| {np.abs(d_ours).mean():.4f}, corr {corr:.4f}, mean |diff| {mad:.4f}")
    assert np.abs(d_ours).mean() > 0.05  # the adapter does something
    assert corr > 0.98
    assert mad < 0.25 * np.abs(d_ours).mean()


def test_sigkill_while_saving_keeps_latest(tmp_path: Path, smollm2_path: str) -> None:
    """Kill -9 the moment a LATEST write is under way: the previous LATEST files still load and resume."""
    from loraforge.formats.gguf_lora import read_gguf_adapter
    from loraforge.train.checkpoint import load_checkpoint

    cmd = [sys.executable, "-m", "loraforge", "finetune", "--model-base", smollm2_path,
           "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
           "--lora-out", "lora-ITERATION.gguf", "--save-every", "1", "--adam-iter", "200", *SEED_FLAGS]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_during_write = False
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            have_latest = (tmp_path / "chk-LATEST.gguf").exists() and (tmp_path / "lora-LATEST.gguf").exists()
            writing = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            if have_latest and any("LATEST" in n for n in writing):
                proc.send_signal(signal.SIGKILL)
                killed_during_write = True
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_during_write, "never caught a LATEST write in progress"
    ckpt = load_checkpoint(str(tmp_path / "chk-LATEST.gguf"))
    assert ckpt.state.iteration >= 1
    adapter = read_gguf_adapter(tmp_path / "lora-LATEST.gguf", read_model(smollm2_path).config)
    assert adapter.tensors
    out = subprocess.run(cmd[:-len(SEED_FLAGS) - 2] + ["--adam-iter", "1", *SEED_FLAGS], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resuming from chk-LATEST.gguf at iteration {ckpt.state.iteration}" in out.stdout


@pytest.mark.parametrize("case", ["empty", "binary", "latin1", "ctx", "zero_batch", "negative_iter",
                                  "unwritable", "other_model_checkpoint", "missing_data"])
def test_bad_input_one_line_error(case: str, tmp_path: Path, smollm2_path: str, tiny_llama_folder: str,
                                  capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    args = ["finetune", "--model-base", smollm2_path, "--train-data", str(data), "--adam-iter", "1",
            "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf", *SEED_FLAGS]
    expect = ""
    if case == "empty":
        data.write_bytes(b"")
        expect = "data.txt: is empty"
    elif case == "binary":
        data.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00binary")
        expect = "data.txt: looks binary"
    elif case == "latin1":
        data.write_bytes("Roméo et Juliette\n".encode("latin-1"))
        expect = "data.txt: is not UTF-8: invalid byte(s) e9"
    elif case == "ctx":
        args += ["--ctx", "100000"]
        expect = "--ctx 100000 is above the model's context length 8192"
    elif case == "zero_batch":
        args += ["--batch", "0"]
        expect = "--batch: must be positive, got 0"
    elif case == "negative_iter":
        args[args.index("--adam-iter") + 1] = "-3"
        expect = "--adam-iter: must be >= 0, got -3"
    elif case == "unwritable":
        ro = tmp_path / "ro"
        ro.mkdir()
        args[args.index("--lora-out") + 1] = str(tmp_path / "missing-folder" / "lora-ITERATION.gguf")
        expect = "the output folder does not exist"
    elif case == "missing_data":
        args[args.index("--train-data") + 1] = str(tmp_path / "nope.txt")
        expect = "nope.txt: no such file"
    elif case == "other_model_checkpoint":
        # a checkpoint trained on the tiny model, offered to SmolLM2
        tiny = ["finetune", "--model-base", tiny_llama_folder, "--train-data", str(data), "--adam-iter", "1",
                "--checkpoint-out", "tiny-ITERATION.gguf", "--lora-out", "tinylora-ITERATION.gguf",
                "--threads", "1", "--batch", "1", "--ctx", "16", "--warmup", "1"]
        assert main(tiny) == 0
        capsys.readouterr()
        before = (tmp_path / "tiny-LATEST.gguf").read_bytes()
        args += ["--checkpoint-in", "tiny-LATEST.gguf"]
        expect = "tiny-LATEST.gguf: was made for another model"
    rc, _, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert rc == 2
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    if case == "other_model_checkpoint":
        assert (tmp_path / "tiny-LATEST.gguf").read_bytes() == before  # nothing lost
