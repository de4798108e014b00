"""Nothing lost: a second run on the same outputs is refused, Ctrl-C saves and resumes exactly, a
non-finite loss stops before anything is saved over LATEST, and every input and output is checked before
the model loads or the first step runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loraforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def flags(folder: str, text: Path) -> list[str]:
    return ["--model-base", folder, "--train-data", str(text), "--ctx", "32", "--batch", "2", "--threads", "1",
            "--seed", "3", "--lr", "5e-3", "--warmup", "1", "--no-plot-loss",
            "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf",
            # the long runs below would compile under --compile auto while their short references stay
            # eager: compiled and eager layers round differently, and these tests compare bytes
            "--compile", "off"]


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loraforge", "finetune", *argv], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_iterations(folder: Path, count: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    metrics = folder / "lora-metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()}")
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    raise AssertionError("the run did not reach the expected iteration in time")


def test_second_writer_is_refused(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path) -> None:
    first = start(flags(tiny_llama_folder, shakespeare_file) + ["--adam-iter", "3000", "--save-every", "1000"], tmp_path)
    try:
        wait_for_iterations(tmp_path, 2, first)
        second = subprocess.run([sys.executable, "-m", "loraforge", "finetune", *flags(tiny_llama_folder, shakespeare_file),
                                 "--adam-iter", "2", "--seed", "99"], cwd=tmp_path, env=ENV, capture_output=True,
                                text=True, timeout=300)
        assert first.poll() is None, "the first run finished before the second started; the test proves nothing"
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        assert "another run is writing these outputs" in line and f'"pid": {first.pid}' in line
        assert "model base" not in second.stdout  # refused before loading anything
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=600)
    assert first.returncode == 130, err
    from loraforge.formats.adapters import load_adapter
    from loraforge.formats.hf import read_config

    adapter = load_adapter(str(tmp_path / "lora-LATEST.gguf"), read_config(tiny_llama_folder))
    assert adapter.modules()
    records = [json.loads(x) for x in (tmp_path / "lora-metrics.jsonl").read_text().splitlines()]
    assert all(r.get("summary") or r["iter"] == i + 1 for i, r in enumerate(records))  # one writer only
    assert not list(tmp_path.glob(".*.lock"))  # the lock files go with the run


def test_ctrl_c_saves_and_resumes_exactly(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path,
                                          monkeypatch) -> None:
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    interrupted.mkdir(), straight.mkdir()
    run_flags = flags(tiny_llama_folder, shakespeare_file) + ["--save-every", "0", "--lora-dropout", "0.1"]
    proc = start(run_flags + ["--max-steps", "100000"], interrupted)
    wait_for_iterations(interrupted, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    stopped = int(out.split("interrupted at iteration ")[1].split(";")[0])
    assert "saving a checkpoint" in err and stopped >= 3
    # resume to stopped + 3 and compare with a straight run to the same iteration
    target = ["--max-steps", str(stopped + 3)]
    resumed = subprocess.run([sys.executable, "-m", "loraforge", "finetune", *run_flags, *target], cwd=interrupted,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from chk-LATEST.gguf at iteration {stopped}" in resumed.stdout
    monkeypatch.chdir(straight)
    assert main(["finetune", *run_flags, *target]) == 0
    assert (interrupted / "lora-LATEST.gguf").read_bytes() == (straight / "lora-LATEST.gguf").read_bytes()


def test_non_finite_loss_stops_before_saving(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path,
                                             monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", *flags(tiny_llama_folder, shakespeare_file), "--adam-iter", "2", "--save-every", "1"]) == 0
    good = (tmp_path / "lora-LATEST.gguf").read_bytes()
    capsys.readouterr()
    rc = main(["finetune", *flags(tiny_llama_folder, shakespeare_file), "--adam-iter", "8", "--save-every", "1",
               "--lr", "1e30", "--adam-gclip", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "became" in err[0] and "training stopped before applying it" in err[0]
    bad_iteration = int(err[0].split("iteration ")[1].split(":")[0])
    latest = bad_iteration - 1  # the last finished (and saved) iteration
    assert (tmp_path / "lora-LATEST.gguf").read_bytes() == (tmp_path / f"lora-{latest}.gguf").read_bytes()
    from loraforge.formats.adapters import load_adapter
    from loraforge.formats.hf import read_config

    import torch

    adapter = load_adapter(str(tmp_path / "lora-LATEST.gguf"), read_config(tiny_llama_folder))
    assert all(bool(torch.isfinite(t).all()) for t in adapter.tensors.values())
    assert good == (tmp_path / "lora-2.gguf").read_bytes()


def test_inputs_and_outputs_checked_before_loading(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path,
                                                   monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    base = flags(tiny_llama_folder, shakespeare_file)
    cases = [
        (["--train-data", str(tmp_path / "missing.txt")], "missing.txt: no such file (--train-data)"),
        (["--eval-data", str(tmp_path)], "is a folder, expected a text or dataset file (--eval-data)"),
        (["--template", "nosuch"], "--template: 'nosuch' is neither a template name"),
        (["--lora-out", str(tmp_path / "no" / "lora-ITERATION.gguf")], "the output folder does not exist (--lora-out)"),
        (["--report-to", "tensorboard", "--checkpoint-out", "lora-ITERATION.gguf"],
         "--lora-out and --checkpoint-out name the same file"),
    ]
    for extra, expected in cases:
        rc = main(["finetune", *base, "--adam-iter", "2", *extra])
        out, err = capsys.readouterr()
        assert rc == 2 and expected in err, (extra, err)
        assert "model base" not in out, extra  # nothing loaded
    # a file the run will write at iteration 4 is a folder: refused before the first step
    (tmp_path / "chk-4.gguf").mkdir()
    rc = main(["finetune", *base, "--adam-iter", "4", "--save-every", "2"])
    out, err = capsys.readouterr()
    assert rc == 2 and "chk-4.gguf: is a folder, expected a file name (--checkpoint-out)" in err
    assert "train_opt_callback" not in out


def test_tied_model_token_embedding_adapter_refused_before_training(tmp_path: Path, tiny_hf_factory,
                                                                   shakespeare_file: Path, monkeypatch, capsys) -> None:
    _, folder = tiny_hf_factory("llama", tie_word_embeddings=True)
    monkeypatch.chdir(tmp_path)
    rc = main(["finetune", *flags(folder, shakespeare_file), "--adam-iter", "2", "--rank-tok-embd", "4"])
    out, err = capsys.readouterr()
    assert rc == 2 and "--rank-tok-embd 4: this model ties its output layer" in err
    assert "train_opt_callback" not in out and not list(tmp_path.glob("*.gguf"))


def test_stale_temps_removed_and_lagging_adapter_rewritten(tmp_path: Path, tiny_llama_folder: str,
                                                           shakespeare_file: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    run = flags(tiny_llama_folder, shakespeare_file) + ["--save-every", "1"]
    assert main(["finetune", *run, "--adam-iter", "3"]) == 0
    # as a kill between the two LATEST writes leaves them: the adapter one save behind, temp files about
    (tmp_path / "lora-LATEST.gguf").write_bytes((tmp_path / "lora-2.gguf").read_bytes())
    for name in (".chk-4.gguf.k2j3.tmp", ".lora-LATEST.gguf.a8x.tmp", ".lora-metrics.jsonl.zz.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / ".other-file.gguf.x.tmp").write_bytes(b"not ours")
    capsys.readouterr()
    assert main(["finetune", *run, "--adam-iter", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 3 temporary file(s)" in out
    assert "lora-LATEST.gguf did not match the checkpoint (an interrupted save); re-written from iteration 3" in out
    assert (tmp_path / "lora-LATEST.gguf").read_bytes() == (tmp_path / "lora-3.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [".other-file.gguf.x.tmp"]


def test_a_failed_adapter_write_takes_its_checkpoint_back(tmp_path: Path, tiny_llama_folder: str,
                                                          shakespeare_file: Path, monkeypatch, capsys) -> None:
    """A save writes checkpoint-N, then adapter-N: when the adapter fails, checkpoint-N goes again, so no
    iteration has half a pair, and LATEST stays at the previous save."""
    from loraforge.errors import LoraforgeError
    from loraforge.train.saver import Saver

    monkeypatch.chdir(tmp_path)
    run = flags(tiny_llama_folder, shakespeare_file) + ["--save-every", "1"]
    assert main(["finetune", *run, "--max-steps", "1"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.gguf")}
    calls = {"n": 0}
    real = Saver.write_adapter

    def failing(self, path, adapter):
        calls["n"] += 1
        raise LoraforgeError(f"{path}: could not be written (a test failure)")

    monkeypatch.setattr(Saver, "write_adapter", failing)
    assert main(["finetune", *run, "--max-steps", "2"]) == 2
    assert calls["n"] == 1 and "could not be written" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.gguf")} == before  # no chk-2.gguf left
    monkeypatch.setattr(Saver, "write_adapter", real)
    assert main(["finetune", *run, "--max-steps", "2"]) == 0
    assert (tmp_path / "chk-2.gguf").exists() and (tmp_path / "lora-2.gguf").exists()


def test_compile_is_decided_on_the_whole_run(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path,
                                             monkeypatch) -> None:
    """--compile auto looks at the run's total iterations, not those left after a resume, so re-running the
    same command after a stop trains the rest in the mode the run began in."""
    from loraforge import compiled

    asked: list[tuple[str, int]] = []
    monkeypatch.setattr(compiled, "wanted", lambda mode, device, n_steps, distributed=False:
                        asked.append((mode, n_steps)) or False)
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", *flags(tiny_llama_folder, shakespeare_file), "--max-steps", "3"]) == 0
    assert main(["finetune", *flags(tiny_llama_folder, shakespeare_file), "--max-steps", "7"]) == 0
    assert asked == [("off", 3), ("off", 7)]
