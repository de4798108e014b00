"""`python -m loraforge generate` / `chat` as users run them, on the embedded SmolLM2 model.

The CLI's greedy text is checked against transformers' greedy generation on the same GGUF
(transformers dequantizes it with the gguf package), and its stdout must be UTF-8 even when
the locale says ASCII.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, stdin: str | None = None, ascii_locale: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if ascii_locale:  # a console that cannot print Korean: output must still be UTF-8 bytes
        env.update(LC_ALL="C", LANG="C", PYTHONIOENCODING="ascii", PYTHONUTF8="0")
    return subprocess.run([sys.executable, "-m", "loraforge", *args], input=stdin.encode() if stdin else None,
                          capture_output=True, timeout=600, env=env)


def test_generate_greedy_prints_text_and_timings(smollm2_path: str, smollm2_transformers) -> None:
    import torch

    prompt = "The capital of France is"
    proc = run_cli("generate", "-p", prompt, "-n", "8", "--temp", "0", "--threads", "2")
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 0, err
    out = proc.stdout.decode("utf-8")
    assert out.startswith(prompt)
    generated = out[len(prompt):].rstrip("\n")
    assert generated.strip()
    assert "prompt eval time" in err and "eval time" in err and err.count("tokens per second") == 2
    from loraforge.formats.gguf import open_reader
    from loraforge.formats.gguf_meta import metadata_dict
    from loraforge.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(metadata_dict(open_reader(smollm2_path)))
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref = smollm2_transformers.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                            pad_token_id=tok.eos_id)[0, len(ids):].tolist()
    assert generated == tok.decode([t for t in ref if t not in tok.eot_ids], skip_special=True)


def test_chat_messages_file_with_ascii_locale(tmp_path: Path, smollm2_path: str) -> None:
    messages = tmp_path / "chat.jsonl"
    messages.write_text("\n".join(json.dumps(m, ensure_ascii=False) for m in [
        {"role": "user", "content": "안녕하세요! Say hello in Korean."},
        {"role": "assistant", "content": "안녕하세요!"},
        {"role": "user", "content": "Now say it in Chinese: 你好"},
    ]) + "\n", encoding="utf-8")
    proc = run_cli("chat", "--messages", str(messages), "--system", "Be brief.", "-n", "12", "--temp", "0",
                   ascii_locale=True)
    err = proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode == 0, err
    out = proc.stdout.decode("utf-8")  # strict: the bytes are UTF-8 whatever the locale
    assert out.strip() and out.endswith("\n")
    assert "tokens per second" in err
