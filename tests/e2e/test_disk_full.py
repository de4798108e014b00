"""A disk that fills up during a save: one line naming the file (exit status 2 from the CLI), no
partial file under any final name, no temporary file left behind, the previous file byte for byte.

Without root a full disk is made with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): writes past
it fail with EFBIG, and numpy's `tofile` drops that error for small arrays exactly as it drops
ENOSPC, so the silent short write that once left a truncated checkpoint under its final name
happens here too. Where user namespaces allow, a real 64 KiB tmpfs is also filled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import loraforge
from loraforge.errors import LoraforgeError

resource = pytest.importorskip("resource")  # POSIX only
signal = pytest.importorskip("signal")
from gguf_damage import tiny_lora_model, tiny_model_config, write_tiny_adapter, write_tiny_checkpoint  # noqa: E402

if not hasattr(signal, "SIGXFSZ"):
    pytest.skip("no SIGXFSZ on this platform", allow_module_level=True)


@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """Writes that would make any file longer than `n_bytes` fail (EFBIG) inside the block."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_and_intact(error: LoraforgeError, path: Path, folder: Path, before: dict[str, bytes]) -> None:
    message = str(error)
    assert message.startswith(f"{path}: could not be written") and "\n" not in message, message
    assert snapshot(folder) == before  # nothing new, nothing changed, no temporary file


def limits_for(size: int) -> list[int]:
    """A few limits cutting a `size`-byte write in the header, early in the data and near the end."""
    return [300, size // 3, size - 100]


def assert_every_cut_refused(path: Path, folder: Path, rewrite) -> dict:
    """rewrite() over the existing file `path` with the disk full at each of `limits_for`: refused each
    time with `path` and the rest of `folder` intact. Returns the folder's snapshot from before."""
    before = snapshot(folder)
    for limit in limits_for(path.stat().st_size):
        with pytest.raises(LoraforgeError) as e, file_size_limit(limit):
            rewrite()
        assert_refused_and_intact(e.value, path, folder, before)
    return before


def test_gguf_adapter_write(tmp_path):
    path = Path(write_tiny_adapter(tmp_path / "lora.gguf"))
    before = assert_every_cut_refused(path, tmp_path, lambda: write_tiny_adapter(path, seed=1))
    write_tiny_adapter(path, seed=1)  # and with room it is written
    assert path.read_bytes() != before["lora.gguf"]


def test_checkpoint_write(tmp_path):
    from loraforge.train.checkpoint import load_checkpoint

    path = Path(write_tiny_checkpoint(tmp_path / "chk-LATEST.gguf"))
    assert_every_cut_refused(path, tmp_path, lambda: write_tiny_checkpoint(path, seed=1))
    assert load_checkpoint(str(path)).state.iteration == 1  # the previous checkpoint still resumes


def test_first_write_leaves_nothing(tmp_path):
    with pytest.raises(LoraforgeError) as e, file_size_limit(5000):
        write_tiny_checkpoint(tmp_path / "chk-2.gguf")
    assert "no file was left behind" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_peft_write(tmp_path):
    from loraforge import lora
    from loraforge.formats.peft import write_peft

    model, _, lora_cfg = tiny_lora_model(0)
    folder = tmp_path / "peft"
    write_peft(folder, lora.to_adapter(model, lora_cfg), tiny_model_config())
    model, _, lora_cfg = tiny_lora_model(1)
    assert_every_cut_refused(folder / "adapter_model.safetensors", tmp_path,
                             lambda: write_peft(folder, lora.to_adapter(model, lora_cfg), tiny_model_config()))


def test_merge_write(tmp_path, tiny_gguf_path):
    from loraforge.formats.adapters import load_adapter
    from loraforge.merge import base_config, merge_to_gguf

    adapter = load_adapter(write_tiny_adapter(tmp_path / "lora.gguf"), base_config(tiny_gguf_path)[0])
    out = tmp_path / "merged.gguf"
    merge_to_gguf(tiny_gguf_path, [(adapter, 1.0)], str(out), outtype="f32", log=lambda s: None)
    assert_every_cut_refused(out, tmp_path, lambda: merge_to_gguf(tiny_gguf_path, [(adapter, 0.5)], str(out),
                                                                   outtype="f32", log=lambda s: None))


def test_free_space_checked_before_writing(tmp_path, monkeypatch):
    """Where the size is known, too little free space is refused before a byte is written."""
    from loraforge import atomic

    path = Path(write_tiny_adapter(tmp_path / "lora.gguf"))
    before = snapshot(tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(LoraforgeError, match=r"needs about .* but only 1000 bytes is free") as e:
        write_tiny_adapter(path, seed=1)
    assert str(e.value).startswith(f"{path}: not written")
    assert snapshot(tmp_path) == before


# --- through the command line ------------------------------------------------------------------------

CLI_SCRIPT = """
import resource, signal, sys
from loraforge.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
for args in sys.argv[2:]:
    print(main(args.split("|")), flush=True)
"""


def test_export_and_merge_cli_under_a_size_limit(tmp_path, tiny_gguf_path):
    """`loraforge export` (GGUF and PEFT) and `merge` (GGUF and HF) over previous outputs, in a process
    whose files may not grow past 4 KiB: exit 2, one line each, every previous output unchanged."""
    from loraforge.cli import main

    lora = write_tiny_adapter(tmp_path / "lora.gguf")
    outs = {"export-gguf": ["export", "--in", lora, "--out", str(tmp_path / "out.gguf"), "-m", tiny_gguf_path],
            "export-peft": ["export", "--in", lora, "--out", str(tmp_path / "peft"), "-m", tiny_gguf_path],
            "merge-gguf": ["merge", "-m", tiny_gguf_path, "--lora", lora, "-o", str(tmp_path / "m.gguf"),
                           "--outtype", "f32"],
            "merge-hf": ["merge", "-m", tiny_gguf_path, "--lora", lora, "-o", str(tmp_path / "hf"), "--to", "hf"]}
    for args in outs.values():
        assert main(args) == 0
    lora2 = write_tiny_adapter(tmp_path / "lora2.gguf", seed=1)
    before = snapshot(tmp_path)
    src = os.path.dirname(os.path.dirname(loraforge.__file__))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1"}
    runs = ["|".join(a if a != lora else lora2 for a in args) for args in outs.values()]
    proc = subprocess.run([sys.executable, "-c", CLI_SCRIPT, "4096", *runs], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.stdout.split() == ["2"] * len(runs), proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == len(runs) and "Traceback" not in proc.stderr, proc.stderr
    for line, name in zip(lines, ("out.gguf", "peft", "m.gguf", "hf")):
        assert line.startswith("loraforge ") and ": error: " in line and str(tmp_path / name) in line, line
        assert "could not be written" in line, line
    assert snapshot(tmp_path) == before


def test_real_full_disk_on_tmpfs(tmp_path, tiny_gguf_path):
    """A 64 KiB tmpfs (mounted in a user namespace where allowed) holding a previous adapter and a filler:
    `loraforge export` onto it fails with one line and leaves the previous adapter as it was."""
    unshare = shutil.which("unshare")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    probe = subprocess.run([unshare or "unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount_point}"],
                           capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs unprivileged user namespaces)")
    previous = write_tiny_adapter(tmp_path / "previous.gguf")
    lora = write_tiny_adapter(tmp_path / "lora.gguf", seed=1)
    src = os.path.dirname(os.path.dirname(loraforge.__file__))
    out = mount_point / "out.gguf"
    script = (f"mount -t tmpfs -o size=64k tmpfs {mount_point} && cp {previous} {out} && "
              f"(dd if=/dev/zero of={mount_point}/filler bs=1024 count=64 2>/dev/null; true) && "
              f"rm -f {mount_point}/filler && dd if=/dev/zero of={mount_point}/filler bs=1024 "
              f"count=$(( 64 - 28 )) 2>/dev/null; "
              f"PYTHONPATH={src} PYTHONDONTWRITEBYTECODE=1 {sys.executable} -m loraforge export --in {lora} "
              f"--out {out} -m {tiny_gguf_path}; echo rc=$?; cmp {previous} {out} && echo same; ls -a {mount_point}")
    proc = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    assert "same" in proc.stdout, proc.stdout
    assert sorted(proc.stdout.split()[proc.stdout.split().index("same") + 1:]) == [".", "..", "filler", "out.gguf"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(out) in lines[0] and "Traceback" not in proc.stderr, proc.stderr


FINETUNE_UNDER_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from loraforge.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_finetune_save_on_a_full_disk(tmp_path: Path, tiny_llama_folder: str, shakespeare_file: Path) -> None:
    """A finetune whose save hits the limit: one line, exit 2, the previous LATEST files byte for byte,
    nothing partial under a final name; the same command without the limit then resumes and finishes."""
    env = {**os.environ, "PYTHONPATH": str(Path(loraforge.__file__).parents[1])}
    argv = ["finetune", "--model-base", tiny_llama_folder, "--train-data", str(shakespeare_file), "--ctx", "32",
            "--batch", "2", "--threads", "1", "--seed", "2", "--warmup", "1", "--save-every", "1", "--no-plot-loss",
            "--checkpoint-in", "chk-LATEST.gguf", "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf"]
    first = subprocess.run([sys.executable, "-m", "loraforge", *argv, "--max-steps", "2"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path)
    # an adapter would fit, the checkpoint (written first) does not
    limit = ((tmp_path / "lora-LATEST.gguf").stat().st_size + (tmp_path / "chk-LATEST.gguf").stat().st_size) // 2
    full = subprocess.run([sys.executable, "-c", FINETUNE_UNDER_LIMIT, str(limit), *argv, "--max-steps", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 2, full.stderr
    (line,) = full.stderr.strip().splitlines()
    assert "could not be written" in line and "Traceback" not in full.stderr
    after = snapshot(tmp_path)
    for name in ("chk-LATEST.gguf", "lora-LATEST.gguf", "chk-2.gguf", "lora-2.gguf"):
        assert after[name] == before[name], name
    assert not [n for n in after if n.endswith(".tmp")]
    assert set(after) - set(before) <= {"lora-metrics.jsonl"}  # no new checkpoint or adapter file at all
    done = subprocess.run([sys.executable, "-m", "loraforge", *argv, "--max-steps", "4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming from chk-LATEST.gguf at iteration 2" in done.stdout
    assert (tmp_path / "lora-4.gguf").read_bytes() == (tmp_path / "lora-LATEST.gguf").read_bytes()
