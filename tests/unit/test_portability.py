"""Windows users: the CLI never needs POSIX-only modules, and writes UTF-8 whatever the console's code page."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NO_RESOURCE = ("import sys; sys.modules['resource'] = None\n"
               "from loraforge.cli import main\n"
               "sys.exit(main(sys.argv[1:]))\n")


def run_cli(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}
    return subprocess.run([sys.executable, "-c", NO_RESOURCE, *argv], cwd=cwd, env=environ, capture_output=True,
                          timeout=900)


def test_resource_is_not_needed(tmp_path: Path, tiny_llama_folder: str, shakespeare_text: str) -> None:
    """finetune, eval and generate with `import resource` failing, as on Windows."""
    with pytest.raises(ImportError):
        exec(compile("import sys; sys.modules['resource'] = None; import resource", "x", "exec"), {})
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_text[:3000], encoding="utf-8")
    proc = run_cli(["finetune", "-m", tiny_llama_folder, "--train-data", str(text), "--ctx", "32", "--batch", "2",
                    "--adam-iter", "2", "--save-every", "0", "--threads", "1", "--seed", "1",
                    "--lora-out", "lora-ITERATION.gguf", "--checkpoint-out", "chk-ITERATION.gguf"], tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "peak RSS" in out and "train_opt_callback: iter=     2" in out
    peak = int(out.split("peak RSS ")[1].split()[0])
    assert peak > 50  # MiB: a real reading, not a zero
    proc = run_cli(["eval", "-m", tiny_llama_folder, "--lora", "lora-LATEST.gguf", "--data", str(text),
                    "--ctx", "32", "--threads", "1"], tmp_path)
    assert proc.returncode == 0 and b"perplexity" in proc.stdout, proc.stderr.decode()
    proc = run_cli(["generate", "-m", tiny_llama_folder, "--lora", "lora-LATEST.gguf", "-p", "To be",
                    "-n", "4", "--temp", "0", "-t", "1"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(b"To be"), proc.stderr.decode()


@pytest.mark.parametrize("code_page", ["cp949", "cp1252", "ascii"])
def test_output_is_utf8_whatever_the_code_page(tmp_path: Path, code_page: str) -> None:
    """An error message quoting a Korean/Chinese file name reaches the console as UTF-8, no traceback."""
    name = "훈련-数据.txt"
    proc = run_cli(["finetune", "--train-data", str(tmp_path / name)], tmp_path, PYTHONIOENCODING=code_page)
    assert proc.returncode == 2
    assert name.encode("utf-8") in proc.stderr and b"Traceback" not in proc.stderr
