"""Runs driven by the run spec on a tiny HF llama: the same run from flags, a config file and the
--print-config output gives bit-identical adapters; trackers' own readers see the logged scalars; the loss
plot is a real plot; --save-total-limit, the BEST adapter and early stopping; a kill during cleanup."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loraforge.cli import main

ROOT = Path(__file__).resolve().parents[2]


def base_flags(folder: str, text: Path) -> list[str]:
    return ["--model-base", folder, "--train-data", str(text), "--ctx", "32", "--batch", "2", "--threads", "1",
            "--seed", "11", "--lr", "5e-3", "--warmup", "1", "--lora-r", "4", "--lora-dropout", "0.1",
            "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf"]


def wandb_log_records(path: Path) -> list[bytes]:
    """Records of a .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-style log
    blocks of 32 KiB holding records with a (crc32, length, type) header; types 1 full, 2 first, 3 middle,
    4 last. Only the framing is read here; the records are wandb's protobuf messages."""
    import struct

    raw = path.read_bytes()
    assert raw[:7] == b":W&B\xe1\xbe\x00", raw[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(raw):
        room = 32768 - pos % 32768
        if room < 7:  # the block's tail is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack_from("<IHB", raw, pos)
        if kind == 0:
            break
        chunk = raw[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    return records


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "lora-metrics.jsonl").read_text().splitlines()]


def test_flags_config_and_print_config_give_identical_adapters(tmp_path: Path, tiny_llama_folder: str,
                                                                shakespeare_file: Path, monkeypatch, capsys) -> None:
    flags = base_flags(tiny_llama_folder, shakespeare_file) + ["--adam-iter", "4", "--save-every", "2",
                                                        "--lr-scheduler", "cosine", "--grad-acc", "2"]
    runs = {name: tmp_path / name for name in ("flags", "config", "printed")}
    for folder in runs.values():
        folder.mkdir()
    monkeypatch.chdir(runs["flags"])
    assert main(["finetune", *flags]) == 0
    # the same settings as a config file (sections), with the paths as keys
    config = {"model": {"model_base": tiny_llama_folder, "seed": 11, "threads": 1},
              "data": {"train_data": str(shakespeare_file), "ctx": 32, "batch": 2},
              "optimizer": {"lr": 5e-3, "warmup": 1, "lr_scheduler": "cosine"},
              "lora": {"lora_r": 4, "lora_dropout": 0.1},
              "loop": {"adam_iter": 4, "save_every": 2, "grad_acc": 2},
              "outputs": {"checkpoint_in": "chk-LATEST.gguf", "checkpoint_out": "chk-ITERATION.gguf",
                          "lora_out": "lora-ITERATION.gguf"}}
    (tmp_path / "run.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.chdir(runs["config"])
    assert main(["finetune", "--config", str(tmp_path / "run.json")]) == 0
    capsys.readouterr()
    assert main(["finetune", *flags, "--print-config", str(tmp_path / "printed.yaml")]) == 0
    monkeypatch.chdir(runs["printed"])
    assert main(["finetune", "--config", str(tmp_path / "printed.yaml")]) == 0
    reference = (runs["flags"] / "lora-LATEST.gguf").read_bytes()
    for name in ("config", "printed"):
        assert (runs[name] / "lora-LATEST.gguf").read_bytes() == reference, name
        assert (runs[name] / "lora-2.gguf").read_bytes() == (runs["flags"] / "lora-2.gguf").read_bytes()
    # the checkpoint carries the spec, and inspect shows it
    capsys.readouterr()
    assert main(["inspect", str(runs["printed"] / "chk-LATEST.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run_spec"]["optimizer"]["lr_scheduler"] == "cosine"
    assert info["run_spec"]["loop"]["grad_acc"] == 2


def test_trackers_plot_and_best(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path, monkeypatch) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main(["finetune", *base_flags(tiny_llama_folder, shakespeare_file), "--adam-iter", "6", "--save-every", "1",
                 "--eval-split", "0.2", "--eval-every", "2", "--load-best-at-end",
                 "--report-to", "tensorboard,wandb,mlflow", "--run-name", "spec-test"]) == 0
    records = metrics(tmp_path)
    train = {r["iter"]: r["loss"] for r in records if "loss" in r}
    evals = {r["iter"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and sorted(evals) == [2, 4, 6]
    runs = tmp_path / "lora-metrics-runs"

    # TensorBoard, read with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs / "tensorboard" / "spec-test"))
    acc.Reload()
    tb_train = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_train == pytest.approx(train, rel=1e-6)
    assert {e.step: e.value for e in acc.Scalars("eval/loss")} == pytest.approx(evals, rel=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_mib", "eval/perplexity"):
        assert tag in acc.Tags()["scalars"]

    # MLflow's local store, read with its client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="file:" + str(runs / "mlruns"))
    experiment = client.get_experiment_by_name("loraforge")
    (run,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert history == pytest.approx(train, rel=1e-6)
    assert run.data.params["optimizer.lr"] == "0.005"

    # W&B's offline run folder: its transaction log, records decoded with wandb's own protobuf classes
    from wandb.proto import wandb_internal_pb2

    (run_file,) = glob.glob(str(runs / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged: dict[int, float] = {}
    for data in wandb_log_records(Path(run_file)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            if "train/loss" in items:
                logged[int(json.loads(items["_step"]))] = json.loads(items["train/loss"])
    assert logged == pytest.approx(train, rel=1e-6)

    # the BEST adapter is the one saved at the iteration with the lowest eval loss
    best = min(evals, key=evals.get)
    assert (tmp_path / "lora-BEST.gguf").read_bytes() == (tmp_path / f"lora-{best}.gguf").read_bytes()

    # the loss plot is a picture of lines, not an empty file
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "lora-metrics.png").convert("RGB")).astype(int)
    assert image.shape[0] > 200 and image.shape[1] > 300
    c0 = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first line colour
    line_pixels = (np.abs(image - c0).sum(axis=2) < 60).sum()
    assert line_pixels > 200
    assert (image.sum(axis=2) < 600).mean() > 0.01  # axes, ticks and labels drawn


def test_plot_command_compares_runs(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for lr in ("1e-3", "2e-2"):
        assert main(["finetune", *base_flags(tiny_llama_folder, shakespeare_file), "--adam-iter", "3", "--save-every", "0",
                     "--lr", lr, "--metrics-out", f"m-{lr}.jsonl", "--no-plot-loss"]) == 0
        (tmp_path / "chk-LATEST.gguf").unlink()
    assert not list(tmp_path.glob("*.png"))
    assert main(["plot", "m-1e-3.jsonl", "m-2e-2.jsonl", "-o", "both.png"]) == 0
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "both.png").convert("RGB")).astype(int)
    for color in ([0x1F, 0x77, 0xB4], [0xFF, 0x7F, 0x0E]):  # one colour per run
        assert (np.abs(image - np.array(color)).sum(axis=2) < 60).sum() > 50
    assert main(["plot", "missing.jsonl"]) == 2


def test_save_total_limit_keeps_the_newest(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path,
                                           monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", *base_flags(tiny_llama_folder, shakespeare_file), "--adam-iter", "10", "--save-every", "1",
                 "--save-total-limit", "2", "--no-plot-loss"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chk-10.gguf", "chk-9.gguf", "chk-LATEST.gguf", "lora-10.gguf", "lora-9.gguf", "lora-LATEST.gguf",
        "lora-metrics.jsonl"]


def test_early_stopping(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path, monkeypatch, capsys) -> None:
    """A learning rate that only makes things worse: eval loss never improves after the first eval."""
    monkeypatch.chdir(tmp_path)
    rc = main(["finetune", *base_flags(tiny_llama_folder, shakespeare_file), "--adam-iter", "20", "--save-every", "0",
               "--lr", "3.0", "--eval-split", "0.2", "--eval-every", "1", "--early-stopping-patience", "2",
               "--no-plot-loss"])
    out = capsys.readouterr().out
    evals = [r["eval_loss"] for r in metrics(tmp_path) if "eval_loss" in r]
    assert rc == 0 and "stopped early" in out
    best = int(np.argmin(evals))
    assert len(evals) == best + 3 < 20  # stopped after two evaluations without improvement


KILL_DURING_PRUNE = """
import os, signal, sys
import loraforge.train.outputs as outputs
real = os.unlink
def unlink(path, *a, **k):
    real(path, *a, **k)
    if "chk-" in str(path) and str(path).endswith(".gguf"):
        os.kill(os.getpid(), signal.SIGKILL)
outputs.os.unlink = unlink
from loraforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_during_cleanup_leaves_a_resumable_state(tmp_path: Path, tiny_llama_folder: str,
                                                      shakespeare_file: Path) -> None:
    flags = base_flags(tiny_llama_folder, shakespeare_file) + ["--max-steps", "6", "--save-every", "1",
                                                        "--save-total-limit", "2", "--no-plot-loss"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "loraforge", "finetune", *flags], cwd=straight, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_PRUNE, "finetune", *flags], cwd=killed, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    # killed in the first cleanup (after iteration 3's save): LATEST is iteration 3 and loads
    proc = subprocess.run([sys.executable, "-m", "loraforge", "finetune", *flags], cwd=killed, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from chk-LATEST.gguf at iteration 3" in proc.stdout
    assert (killed / "lora-LATEST.gguf").read_bytes() == (straight / "lora-LATEST.gguf").read_bytes()
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("chk-")) == [
        "chk-5.gguf", "chk-6.gguf", "chk-LATEST.gguf"]
