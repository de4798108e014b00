"""kill -9 at random moments (while loading, training, saving and pruning): every re-run of the same command
resumes, the finished run equals an uninterrupted one bit for bit, and no temporary file survives."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


def command(folder: str, text: Path) -> list[str]:
    return [sys.executable, "-m", "loraforge", "finetune", "--model-base", folder, "--train-data", str(text),
            "--ctx", "32", "--batch", "2", "--threads", "1", "--seed", "5", "--lr", "5e-3", "--warmup", "1",
            "--lora-dropout", "0.1", "--max-steps", "24", "--save-every", "1", "--save-total-limit", "2",
            "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--no-plot-loss"]


def losses(folder: Path) -> dict[int, float]:
    """iteration -> loss from the metrics file (a line torn by a kill is skipped, as finetune does)."""
    from loraforge.train.report import read_metrics

    return {r["iter"]: r["loss"] for r in read_metrics(str(folder / "lora-metrics.jsonl")) if "loss" in r}


def kill_when(proc: subprocess.Popen, folder: Path, moment: str, value: float, deadline: float = 300) -> bool:
    """SIGKILL `proc` at `moment`: "load" `value` seconds after the start (while importing and loading),
    "train" once the metrics hold iteration `value` or later, "temp" as soon as a temporary file appears
    (inside a save). Returns False when the run finished first."""
    end = time.time() + deadline
    started = time.time()
    metrics = folder / "lora-metrics.jsonl"
    while time.time() < end:
        if proc.poll() is not None:
            return False
        if moment == "load" and time.time() - started >= value:
            break
        if moment == "temp" and list(folder.glob(".*.tmp")):
            break
        if moment == "train" and metrics.exists() and losses(metrics.parent) and max(losses(metrics.parent)) >= value:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_random_kills_resume_exactly(tmp_path: Path, tiny_llama_folder: str, shakespeare_text: str) -> None:
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_text[:5000], encoding="utf-8")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    cmd = command(tiny_llama_folder, text)
    done = subprocess.run(cmd, cwd=straight, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    rng = random.Random(1234)
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(cmd, cwd=killed, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        moment = ("load", "train", "temp")[attempt % 3]
        resumed = max(losses(killed)) if (killed / "lora-metrics.jsonl").exists() and losses(killed) else 0
        value = rng.uniform(0.3, 1.5) if moment == "load" else resumed + rng.randint(1, 4)
        if kill_when(proc, killed, moment, value):
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read()
            break
    final = subprocess.run(cmd, cwd=killed, env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert kills >= 3
    assert not list(killed.glob(".*.tmp")), "a temporary file survived the next start"
    assert (killed / "lora-LATEST.gguf").read_bytes() == (straight / "lora-LATEST.gguf").read_bytes()
    assert losses(killed) == losses(straight)
