"""kill -9 at random moments (while loading, training, saving and pruning): every re-run of the same command
resumes, the finished run equals an uninterrupted one bit for bit, and no temporary file survives."""

from __future__ import annotations

import json
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
            "--lora-dropout", "0.1", "--max-steps", "12", "--save-every", "1", "--save-total-limit", "2",
            "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--no-plot-loss"]


def losses(folder: Path) -> dict[int, float]:
    out = {}
    for line in (folder / "lora-metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["iter"]] = record["loss"]
    return out


def kill_when(proc: subprocess.Popen, folder: Path, moment: str, delay: float, deadline: float = 300) -> bool:
    """SIGKILL `proc` at `moment`: "temp" as soon as a temporary file appears (inside a save), otherwise
    after `delay` seconds. Returns False when the run finished first."""
    end = time.time() + deadline
    started = time.time()
    while time.time() < end:
        if proc.poll() is not None:
            return False
        if moment == "temp" and list(folder.glob(".*.tmp")):
            break
        if moment == "time" and time.time() - started >= delay:
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
        moment = "temp" if attempt % 2 else "time"
        if kill_when(proc, killed, moment, delay=rng.uniform(1.0, 6.0)):
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
