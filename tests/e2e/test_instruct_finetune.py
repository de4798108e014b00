"""Instruction tuning end to end on the embedded SmolLM2: a rule the base model does not know
is learned from a synthetic alpaca set, and Korean / Chinese data train and generate cleanly."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from loraforge.cli import main

WORDS = ("apple river stone cloud tiger candle forest silver garden window rocket pepper violin "
         "castle shadow meadow bridge falcon copper lantern island mirror ocean planet saddle "
         "thunder velvet walnut harbor jungle kettle ladder marble needle orchard parrot quartz "
         "ribbon summit tunnel valley wagon yarrow zebra anchor basket cactus dragon engine feather "
         "glacier hammer igloo jacket koala lemon magnet nectar oyster pillow rabbit sailor tomato "
         "umbrella vulture whistle").split()


def zorb_rows(words: list[str]) -> list[dict]:
    return [{"instruction": "Translate the word into Zorblish.", "input": w, "output": f"zorb {w} zorb"}
            for w in words]


def follows_rule(answer: str, word: str) -> bool:
    return re.match(rf"\s*zorb {re.escape(word)} zorb\b", answer) is not None


SHORT_TEMPLATE = "Q: {instruction} {input}\nA: {output}"


def greedy_answers(model, tokenizer, words: list[str], max_new: int = 8) -> list[str]:
    from loraforge.generate import Sampler, generate_tokens

    answers = []
    for w in words:
        prompt = SHORT_TEMPLATE.format(instruction="Translate the word into Zorblish.", input=w, output="")
        ids = tokenizer.encode(prompt, add_bos=None, parse_special=True)
        out = list(generate_tokens(model, ids, max_new, Sampler(temp=0.0), stop_ids=tokenizer.eot_ids))
        answers.append(tokenizer.decode(out, skip_special=True))
    return answers


def test_learns_a_rule_the_base_does_not_know(tmp_path: Path, smollm2_path: str, monkeypatch, capsys) -> None:
    """Held-out words: the base never answers 'zorb W zorb'; after a short CPU run it mostly does."""
    from loraforge.formats.gguf_lora import read_gguf_adapter
    from loraforge.loader import load_model
    from loraforge.lora import attach

    rng = random.Random(0)
    words = list(WORDS)
    rng.shuffle(words)
    held_out, train_words = words[:12], words[12:]
    data = tmp_path / "zorb.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in zorb_rows(train_words * 4)), encoding="utf-8")
    template = tmp_path / "short.txt"
    template.write_text(SHORT_TEMPLATE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    rc = main(["finetune", "--model-base", smollm2_path, "--train-data", str(data), "--template", str(template),
               "--lr", "3e-3", "--lr-scheduler", "cosine", "--warmup-steps", "2", "--max-steps", "14",
               "--batch", "4", "--lora-r", "8", "--lora-alpha", "16", "--packing", "--max-seq-length", "128",
               "--checkpoint-out", "chk-ITERATION.gguf", "--lora-out", "lora-ITERATION.gguf", "--save-every", "0",
               "--threads", "2", "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "responses only" in out
    loaded = load_model(smollm2_path, "f32")
    before = greedy_answers(loaded.model, loaded.tokenizer, held_out)
    attach(loaded.model, read_gguf_adapter(tmp_path / "lora-LATEST.gguf", loaded.config), "zorb")
    after = greedy_answers(loaded.model, loaded.tokenizer, held_out)
    base_hits = sum(follows_rule(a, w) for a, w in zip(before, held_out))
    tuned_hits = sum(follows_rule(a, w) for a, w in zip(after, held_out))
    print(f"held-out rule following: base {base_hits}/{len(held_out)}, tuned {tuned_hits}/{len(held_out)}; "
          f"e.g. {held_out[0]!r}: {before[0]!r} -> {after[0]!r}")
    assert base_hits <= 1
    assert tuned_hits >= 9


KOREAN_PROMPT = """아래는 작업을 설명하는 지시 사항과 추가적인 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. 요청을 적절하게 완료하는 응답을 작성하세요.

### 지시사항:
{instruction}

### 입력:
{input}

### 응답:
{output}"""


@pytest.mark.parametrize("kind", ["korean_alpaca", "chinese_text"])
def test_korean_and_chinese_train_and_generate(kind: str, tmp_path: Path, smollm2_path: str, monkeypatch,
                                               capsys) -> None:
    """The seeds' Korean alpaca prompt (user template file) and a Chinese text file: training runs,
    the adapter loads, generation streams valid UTF-8 text."""
    monkeypatch.chdir(tmp_path)
    args = ["finetune", "--model-base", smollm2_path, "--checkpoint-out", "chk-ITERATION.gguf",
            "--lora-out", "lora-ITERATION.gguf", "--save-every", "0", "--threads", "2", "--seed", "2",
            "--adam-iter", "3", "--batch", "2", "--warmup", "1"]
    if kind == "korean_alpaca":
        template = tmp_path / "ko_alpaca.txt"
        template.write_text(KOREAN_PROMPT, encoding="utf-8")
        rows = [{"instruction": "다음 문장을 요약하세요.", "input": "오늘은 날씨가 맑고 따뜻해서 공원에 사람이 많았다.",
                 "output": "맑은 날씨에 공원이 붐볐다."},
                {"instruction": "한국의 수도는 어디인가요?", "input": "", "output": "한국의 수도는 서울입니다."}] * 4
        data = tmp_path / "ko.json"
        data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        args += ["--train-data", str(data), "--template", str(template), "--max-seq-length", "512"]
        prompt = "### 지시사항:\n한국의 수도는 어디인가요?\n\n### 응답:\n"
    else:
        data = tmp_path / "zh.txt"
        data.write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 30, encoding="utf-8")
        args += ["--train-data", str(data), "--ctx", "32"]
        prompt = "床前明月光，"
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = main(["generate", "-m", smollm2_path, "--lora", "lora-LATEST.gguf", "-p", prompt, "-n", "24",
               "--temp", "0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    text = captured.out
    assert "\ufffd" not in text
    text.encode("utf-8")  # valid, encodable text
    assert len(text.strip()) > 0
