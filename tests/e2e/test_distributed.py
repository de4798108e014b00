"""`finetune` under torchrun on CPUs (gloo), 2 processes, the tiny random HF llama.

What is shown against the single-process run with the same global batch (the reference):
- data parallel: per-step losses within 1e-5 (measured: at most ~1e-6) and final adapters within
  5e-5 absolute (measured: at most ~4e-6; float32 sums taken in another order, through AdamW);
- FSDP2 (--fsdp): the same figures, and each process holds half of the base's bytes and half of the
  LoRA weights' (from the sharded parameters' local shards, checked against the bytes of the
  safetensors file and of the adapter); embedding and output adapters (the root's group) too;
- resume on 2 processes with dropout: 4 steps straight == 2 + resume + 2, bit for bit; under FSDP
  too, through every save path (checkpoints, BEST on eval, PEFT), the gathered AdamW moments equal;
- a process killed with SIGKILL: the other stops with one line, LATEST loads and resumes (on one
  process, which says what changes);
- instruction data (packed, and length-grouped batches) with gradient accumulation and eval: equal
  to the single process;
- a check failing before loading (what FSDP cannot shard): one line from rank 0, nothing from rank 1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loraforge.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
LOSS_TOL = 1e-5
ADAPTER_TOL = 5e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(args: list[str], log_dir: Path | None = None) -> list[str]:
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir is not None else []
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(free_port()), *logs, "-m", "loraforge", "finetune", *args]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(torchrun_cmd(args, None), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def single(args: list[str], cwd: Path, monkeypatch) -> None:
    monkeypatch.chdir(cwd)
    assert main(["finetune", *args]) == 0


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "lora-metrics.jsonl").read_text().splitlines()]


def losses(folder: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["iter"], r[key]) for r in records(folder) if key in r]


def assert_close_losses(a: Path, b: Path, key: str = "loss") -> float:
    la, lb = losses(a, key), losses(b, key)
    assert [i for i, _ in la] == [i for i, _ in lb] and la
    worst = max(abs(x - y) for (_, x), (_, y) in zip(la, lb))
    assert worst < LOSS_TOL, (la, lb)
    print(f"max {key} difference over {len(la)} steps: {worst:.2e}")
    return worst


def assert_close_adapters(a: Path, b: Path, model_folder: str) -> float:
    from loraforge.formats.adapters import load_adapter
    from loraforge.formats.hf import read_config

    cfg = read_config(model_folder)
    ta = load_adapter(str(a / "lora-LATEST.gguf"), cfg).tensors
    tb = load_adapter(str(b / "lora-LATEST.gguf"), cfg).tensors
    assert set(ta) == set(tb) and ta
    worst = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    assert worst < ADAPTER_TOL
    print(f"max adapter difference: {worst:.2e}")
    # the adapters did move away from their zero-initialised B, so the comparison means something
    assert max(float(v.abs().max()) for k, v in ta.items() if k.endswith("lora_B")) > 100 * ADAPTER_TOL
    return worst


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shakespeare_text: str) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(shakespeare_text[:6000], encoding="utf-8")
    return path


def flags(folder: str, text: Path) -> list[str]:
    return ["--model-base", folder, "--train-data", str(text), "--ctx", "32", "--batch", "4", "--threads", "1",
            "--seed", "3", "--lr", "5e-3", "--warmup", "1", "--no-plot-loss", "--save-every", "0",
            "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_folder: str, text_file: Path) -> Path:
    """The single-process run, global batch 4, 4 iterations."""
    folder = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as mp:
        single(flags(tiny_llama_folder, text_file) + ["--adam-iter", "4"], folder, mp)
    return folder


def test_data_parallel_matches_one_process(tmp_path: Path, tiny_llama_folder: str, text_file: Path,
                                           reference: Path) -> None:
    done = torchrun(flags(tiny_llama_folder, text_file) + ["--adam-iter", "4"], tmp_path)
    assert_close_losses(reference, tmp_path)
    assert_close_adapters(reference, tmp_path, tiny_llama_folder)
    # one writer and one voice: every iteration logged and printed once
    assert [r["iter"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3, 4]
    assert done.stdout.count("train_opt_callback: iter=     1 ") == 1
    assert done.stdout.count("finetune: done:") == 1


def test_fsdp_shards_the_base_and_matches_one_process(tmp_path: Path, tiny_llama_folder: str, text_file: Path,
                                                      reference: Path) -> None:
    from safetensors import safe_open

    from loraforge.formats.adapters import load_adapter
    from loraforge.formats.hf import read_config

    done = torchrun(flags(tiny_llama_folder, text_file) + ["--adam-iter", "4", "--fsdp"], tmp_path)
    assert_close_losses(reference, tmp_path)
    assert_close_adapters(reference, tmp_path, tiny_llama_folder)
    held = {}
    for what in ("the base's", "the LoRA weights'"):
        line = next(x for x in done.stdout.splitlines() if x.startswith(f"finetune: FSDP: {what} "))
        total = int(line.split(f"{what} ")[1].split(" bytes")[0])
        shares = [int(x) for x in line.split("which hold ")[1].split(" bytes")[0].split(", ")]
        assert total == sum(shares) and all(0.4 < share / total < 0.6 for share in shares), (what, shares)
        held[what] = total, shares
    with safe_open(os.path.join(tiny_llama_folder, "model.safetensors"), "pt") as f:
        file_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())  # all float32
    adapter_bytes = sum(t.numel() * 4 for t in load_adapter(str(tmp_path / "lora-LATEST.gguf"),
                                                            read_config(tiny_llama_folder)).tensors.values())
    assert held["the base's"][0] == file_bytes and held["the LoRA weights'"][0] == adapter_bytes
    base_shares, lora_shares = held["the base's"][1], held["the LoRA weights'"][1]
    print(f"FSDP: the base's {file_bytes} bytes held {base_shares}, the LoRA weights' {adapter_bytes} bytes held "
          f"{lora_shares} by the two processes")


def straight_and_resumed(args: list[str], tmp_path: Path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """4 iterations in one go (folder `straight`), and 2 then a resumed 2 (folder `split`, and the resumed
    run's output)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    torchrun(args + ["--max-steps", "4"], straight)
    torchrun(args + ["--max-steps", "2"], split)
    resumed = torchrun(args + ["--max-steps", "4"], split)
    assert "resuming from chk-LATEST.gguf at iteration 2" in resumed.stdout
    return straight, split, resumed


def test_fsdp_with_embedding_and_output_adapters_matches_one_process(tmp_path: Path, tiny_llama_folder: str,
                                                                     text_file: Path, monkeypatch) -> None:
    """LoRA on token_embd and output (held by the root's FSDP group, which keeps its weights gathered after an
    eval forward), saved after every iteration and eval: the same losses and adapters as one process."""
    args = flags(tiny_llama_folder, text_file) + ["--rank-tok-embd", "2", "--rank-out", "2", "--eval-split", "0.1",
                                                  "--eval-every", "1", "--save-every", "1", "--adam-iter", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single(args, one, monkeypatch)
    torchrun(args + ["--fsdp"], two)
    assert_close_losses(one, two)
    assert_close_losses(one, two, key="eval_loss")
    assert_close_adapters(one, two, tiny_llama_folder)
    from loraforge.formats.gguf_lora import read_gguf_adapter
    from loraforge.formats.hf import read_config

    names = read_gguf_adapter(two / "lora-LATEST.gguf", read_config(tiny_llama_folder)).tensors
    assert {"model.embed_tokens.lora_A", "lm_head.lora_B"} <= set(names)


def test_fsdp_resume_saves_and_best_are_exact(tmp_path: Path, tiny_llama_folder: str, text_file: Path) -> None:
    """Sharded LoRA weights and optimizer state through every save path (checkpoints every iteration, the
    BEST adapter on eval, the PEFT folder at the end), with dropout and gradient accumulation: 4 iterations
    straight equal 2 + resume + 2 (the resume loads whole tensors and shards them again)."""
    args = flags(tiny_llama_folder, text_file) + ["--fsdp", "--lora-dropout", "0.1", "--grad-acc", "2",
                                                  "--save-every", "1", "--eval-split", "0.1", "--eval-every", "2",
                                                  "--load-best-at-end", "--peft-out", "peft"]
    straight, split, resumed = straight_and_resumed(args, tmp_path)
    assert losses(straight) == losses(split) and len(losses(straight)) == 4
    assert losses(straight, "eval_loss") == losses(split, "eval_loss")
    for name in ("lora-LATEST.gguf", "lora-3.gguf"):
        assert (straight / name).read_bytes() == (split / name).read_bytes(), name
    from loraforge.train.checkpoint import load_checkpoint

    a, b = (load_checkpoint(str(folder / "chk-LATEST.gguf")) for folder in (straight, split))
    assert a.state.iteration == b.state.iteration == 4 and a.adam_step == b.adam_step == 4
    assert set(a.moments) == set(a.tensors) == set(b.moments) and a.moments
    for key in a.tensors:  # the whole weights and AdamW moments, gathered from the shards
        assert torch.equal(a.tensors[key], b.tensors[key]), key
        assert all(torch.equal(x, y) for x, y in zip(a.moments[key], b.moments[key])), key
    assert (straight / "lora-BEST.gguf").is_file() and (straight / "peft" / "adapter_model.safetensors").is_file()


def test_resume_on_two_processes_is_exact(tmp_path: Path, tiny_llama_folder: str, text_file: Path) -> None:
    """With dropout, so every process's random stream must come back from the checkpoint."""
    args = flags(tiny_llama_folder, text_file) + ["--lora-dropout", "0.1"]
    straight, split, resumed = straight_and_resumed(args, tmp_path)
    assert "the checkpoint was written by" not in resumed.stdout  # same number of processes
    assert losses(straight) == losses(split) and len(losses(straight)) == 4
    assert (straight / "lora-LATEST.gguf").read_bytes() == (split / "lora-LATEST.gguf").read_bytes()


def rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (Linux /proc)."""
    pids = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x)
            if "RANK" in env:
                pids[int(env["RANK"])] = int(pid)
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_killed_process_stops_the_other_and_latest_resumes(tmp_path: Path, tiny_llama_folder: str,
                                                           text_file: Path, monkeypatch, capsys) -> None:
    timeout_s = 60
    args = flags(tiny_llama_folder, text_file) + ["--save-every", "1", "--max-steps", "100000",
                                                  "--dist-timeout", str(timeout_s)]
    logs = tmp_path / "logs"
    proc = subprocess.Popen(torchrun_cmd(args, logs), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        # iteration 4's loss line comes after iteration 3's save (the line of 3 itself comes before it)
        while not ((tmp_path / "lora-metrics.jsonl").exists() and len(losses(tmp_path)) >= 4):
            assert proc.poll() is None and time.time() < deadline, "the run did not reach iteration 4"
            time.sleep(0.2)
        pids = rank_pids(proc.pid)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.time()
        proc.communicate(timeout=timeout_s + 30)
        took = time.time() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and took < timeout_s
    (rank0_err,) = logs.glob("*/attempt_0/0/stderr.log")
    (line,) = rank0_err.read_text().strip().splitlines()
    assert line.startswith("loraforge finetune: error: rank 0: ") and "run the same command to resume" in line
    assert ("another process of this run ended or stopped answering" in line
            or "stopped by the launcher" in line), line
    with capsys.disabled():
        print(f"\nrank 1 killed: the run ended {took:.1f} s later (timeout {timeout_s} s); rank 0: {line}")
    from loraforge.train.checkpoint import load_checkpoint

    saved = load_checkpoint(str(tmp_path / "chk-LATEST.gguf")).state.iteration
    assert saved >= 3
    # on one process: the same data order and schedule, and it says what changes
    capsys.readouterr()
    single(flags(tiny_llama_folder, text_file) + ["--adam-iter", "1"], tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert f"resuming from chk-LATEST.gguf at iteration {saved}" in out
    assert "the checkpoint was written by 2 process(es), this run has 1" in out
    assert losses(tmp_path)[-1][0] == saved + 1


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "length-grouped"])
def test_instruction_data_matches_one_process(tmp_path: Path, tiny_llama_folder: str, monkeypatch, capsys,
                                              packing: bool) -> None:
    """Packed rows, and length-grouped padded batches (an item is a whole batch; its rows are split)."""
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ("tea", "toast", "tent", "test", "tilt", "tart", "text", "trot", "taut", "tot", "tip", "top")]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    args = ["--model-base", tiny_llama_folder, "--train-data", str(data), "--template", "chatml", "--threads", "1",
            "--batch", "2", "--max-seq-length", "256", "--grad-acc", "2", "--eval-split", "2",
            "--eval-every", "2", "--lr", "1e-2", "--warmup", "1", "--save-every", "0", "--seed", "5",
            "--adam-iter", "4", "--no-plot-loss", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--checkpoint-in", "chk-LATEST.gguf"]
    args += ["--packing"] if packing else []
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single(args, one, monkeypatch)
    layout = "4 items per epoch (packed rows)" if packing else "5 items per epoch (length-grouped padded batches)"
    assert f"finetune: {layout}, 10 samples" in capsys.readouterr().out  # several samples to a row / batch
    torchrun(args, two)
    assert_close_losses(one, two)
    assert_close_losses(one, two, key="eval_loss")
    assert_close_adapters(one, two, tiny_llama_folder)


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "nf4"], "--fsdp shards dense bases (f32/f16/bf16) only; a quantized base (--quantize nf4) trains "
                            "on several processes without --fsdp (each holds the whole quantized base)"),
    (["--optim", "adamw_8bit"], "--fsdp shards the optimizer state of --optim adamw_torch only; --optim adamw_8bit "
                                "(bitsandbytes' 8-bit state) trains without --fsdp"),
], ids=["quantized-base", "8-bit-optimizer"])
def test_what_fsdp_cannot_shard_is_one_line(tmp_path: Path, tiny_llama_folder: str, text_file: Path,
                                            extra: list[str], message: str) -> None:
    """A check that fails stops every process; rank 0 alone says why, in one line, before loading."""
    logs = tmp_path / "logs"
    done = subprocess.run(torchrun_cmd(flags(tiny_llama_folder, text_file) + ["--fsdp", *extra], logs),
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    (err0,), (err1,) = logs.glob("*/attempt_0/0/stderr.log"), logs.glob("*/attempt_0/1/stderr.log")
    assert err0.read_text().splitlines() == ["loraforge finetune: error: " + message]
    assert err1.read_text() == ""
    (out0,) = logs.glob("*/attempt_0/0/stdout.log")
    assert "model base" not in out0.read_text()  # refused before loading


def test_rows_split_a_global_batch() -> None:
    """Each process takes its contiguous rows; one left without rows gets a row with nothing to learn."""
    from loraforge.data.batch import Batch
    from loraforge.train.distributed import Ranks

    ids = torch.arange(24).view(4, 6)
    batch = Batch(ids, ids + 100, torch.zeros_like(ids))
    parts = [Ranks(rank=r, world=2).rows(batch) for r in (0, 1)]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), ids)
    assert torch.equal(torch.cat([p.labels for p in parts]), ids + 100)
    assert [p.doc_ids.shape[0] for p in parts] == [2, 2]
    short = Batch(ids[:1], ids[:1] + 100)
    assert torch.equal(Ranks(rank=0, world=2).rows(short).labels, ids[:1] + 100)
    empty = Ranks(rank=1, world=2).rows(short)
    assert empty.input_ids.shape == (1, 6) and empty.n_labelled == 0
