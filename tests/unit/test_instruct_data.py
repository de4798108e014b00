"""Instruction data: formats, templates, loss masks, length limits, bad rows, Korean and Chinese.

Masks are checked against token ids computed independently with the real SmolLM2 tokenizer
(gpt2 BPE; its EOS is <|im_end|>): prompt tokens never trained, each response and its EOS trained.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from loraforge.data.datasets import BadRow, detect_format, load_records
from loraforge.data.instruct import (InstructionData, Sample, build_samples, prepare_instruction_data,
                                     tokenize_conversation, train_eval_split)
from loraforge.data.templates import (ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT, EOS, FileTemplate,
                                      default_template_name, get_template)
from loraforge.errors import LoraforgeError
from loraforge.model import IGNORE_INDEX

# The seed's Korean alpaca prompt (alpaca_prompt.format(instruction, input, output) + EOS_TOKEN).
KOREAN_ALPACA_PROMPT = (
    "아래는 작업을 설명하는 지시 사항과 추가적인 컨텍스트를 제공하는 입력이 있습니다. "
    "요청을 적절하게 완료하는 응답을 작성하세요.\n\n### instruction:\n{}\n\n### input:\n{}\n\n### output:\n{}"
)
KOREAN_ROWS = [
    {"instruction": "친구들과 여행을 가보신 적이 있나요?", "input": "",
     "output": "저는 인공 지능 모델이므로 여행을 간 적이 없습니다."},
    {"instruction": "다음 문장에 가장 적합한 부사를 찾으세요.", "input": "그녀는 일합니다",
     "output": "그녀는 열심히 일합니다."},
]
CHINESE_TEXT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from gguf import GGUFReader

    from loraforge.formats.gguf_meta import metadata_dict
    from loraforge.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(metadata_dict(GGUFReader(smollm2_path)), source=smollm2_path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def trained(labels: list[int]) -> list[int]:
    return [y for y in labels if y != IGNORE_INDEX]


# -- formats ----------------------------------------------------------------------------------

def test_formats_detected_and_normalised(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 2", "output": "4"},
                                  {"instruction": "Hi", "output": "Hello"}]), encoding="utf-8")
    recs = load_records(alpaca)
    assert recs.format == "alpaca" and recs.rows_read == 2 and not recs.bad_rows
    assert recs[0]["messages"] == [{"role": "user", "content": "Add\n\n2 2"},
                                   {"role": "assistant", "content": "4"}]
    assert recs[0]["fields"] == {"instruction": "Add", "input": "2 2", "output": "4"}
    assert recs[1]["fields"]["input"] == ""

    share = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"}]}])
    recs = load_records(share)
    assert recs.format == "sharegpt"
    assert [m["role"] for m in recs[0]["messages"]] == ["system", "user", "assistant"]

    pc = tmp_path / "p.csv"
    pc.write_text("prompt,completion\n\"Q: 1+1=\",\" 2\"\n", encoding="utf-8")
    recs = load_records(pc)
    assert recs.format == "prompt_completion"
    assert recs[0]["messages"][1] == {"role": "assistant", "content": " 2"}

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}])
    recs = load_records(text)
    assert recs.format == "text" and recs[0] == {"row": 1, "text": "plain words"}


def test_messages_parquet_and_csv_json_cells(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    pq.write_table(pa.Table.from_pylist([{"messages": msgs}, {"messages": msgs[:1]}]), tmp_path / "m.parquet")
    recs = load_records(tmp_path / "m.parquet")
    assert recs.format == "messages" and recs[0]["messages"] == msgs
    assert recs.bad_rows == [BadRow(2, "messages: no assistant message to train on")]

    csv_path = tmp_path / "m.csv"
    csv_path.write_text("messages\n" + '"' + json.dumps(msgs).replace('"', '""') + '"\n', encoding="utf-8")
    assert load_records(csv_path)[0]["messages"] == msgs


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LoraforgeError, match=r"x\.parquet: reading Parquet needs pyarrow"):
        load_records(path)


def test_format_override_and_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "answer": "Because.", "text": "x"}])
    assert load_records(path).format == "text"  # only "text" is recognisable as it stands
    recs = load_records(path, fmt="alpaca", columns={"instruction": "question", "output": "answer"})
    assert recs.format == "alpaca"
    assert recs[0]["fields"] == {"instruction": "Why?", "input": "", "output": "Because."}
    assert load_records(path, fmt="alpaca", columns="instruction=question, output=answer")[0] == recs[0]
    with pytest.raises(LoraforgeError, match="unknown field 'question'"):
        load_records(path, columns={"question": "instruction"})
    with pytest.raises(LoraforgeError, match="FIELD=COLUMN"):
        load_records(path, columns="instruction")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"q": 1}])
    with pytest.raises(LoraforgeError, match=r"odd\.jsonl: cannot tell the data format .*\(q\)"):
        load_records(odd)
    assert detect_format([{"text": "a"}, {"instruction": "b", "output": "c"},
                          {"instruction": "d", "output": "e"}]) == "alpaca"


# -- bad rows -----------------------------------------------------------------------------------

BAD_ROWS = [
    {"instruction": "ok", "input": "", "output": "fine"},  # 1
    {"instruction": "no output"},  # 2 missing field
    {"instruction": "number", "output": 42},  # 3 wrong type
    {"instruction": "empty", "output": "   "},  # 4 empty response
    "{not json",  # 5
    {"instruction": ["list"], "output": "x"},  # 6 wrong type
    {"instruction": "fine too", "output": "yes"},  # 7
]


def test_bad_rows_reported_with_row_numbers(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    recs = load_records(path)
    assert [r["row"] for r in recs] == [1, 7]
    assert recs.rows_read == 7
    reasons = {b.row: b.reason for b in recs.bad_rows}
    assert reasons[2] == "missing field 'output'"
    assert reasons[3] == "field 'output' is int, expected text"
    assert reasons[4] == "empty 'output'"
    assert reasons[5].startswith("not valid JSON")
    assert reasons[6] == "field 'instruction' is list, expected text"
    assert str(recs.bad_rows[0]) == "row 2: missing field 'output'"
    with pytest.raises(LoraforgeError, match=r"bad\.jsonl: row 2: missing field 'output'"):
        load_records(path, on_bad_row="error")


def test_bad_chat_rows(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "system", "content": "late"}]},
    ]
    recs = load_records(write_jsonl(tmp_path / "c.jsonl", rows))
    assert [r["row"] for r in recs] == [1]
    assert [str(b) for b in recs.bad_rows] == [
        "row 2: messages: message 2 has unknown role 'robot'",
        "row 3: messages: message 2 is an empty assistant response",
        "row 4: field 'messages' is text that is not a JSON list of messages",
        "row 5: messages: message 1 content is int, expected text",
        "row 6: messages: a system message must come first",
    ]


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", [{"instruction": "x"}, {"instruction": "y"}])
    with pytest.raises(LoraforgeError, match=r"all\.jsonl: no usable rows in 2 .*row 1: missing field"):
        load_records(path, fmt="alpaca")


# -- label masks ----------------------------------------------------------------------------------

def test_alpaca_mask_prompt_ignored_response_and_eos_trained(tok):
    rec = {"row": 1, "messages": [], "fields": {"instruction": "Name a color.", "input": "",
                                                "output": "Blue is a color."}}
    rec["messages"] = [{"role": "user", "content": "Name a color."},
                       {"role": "assistant", "content": "Blue is a color."}]
    ids, labels = tokenize_conversation(get_template("alpaca").render(rec), tok)
    prompt = tok.encode(ALPACA_PREAMBLE + "### Instruction:\nName a color.\n\n### Response:\n", add_bos=False)
    response = tok.encode("Blue is a color.", add_bos=False) + [tok.eos_id]
    assert ids == prompt + response
    assert labels == [IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX]
    # train_on_inputs: every next token is a target
    ids2, labels2 = tokenize_conversation(get_template("alpaca").render(rec), tok, train_on_inputs=True)
    assert ids2 == ids and labels2 == ids[1:] + [IGNORE_INDEX]


def test_alpaca_with_input_uses_the_input_prompt(tok):
    rec = {"row": 1, "fields": {"instruction": "Add.", "input": "2 and 2", "output": "4"},
           "messages": [{"role": "user", "content": "Add.\n\n2 and 2"}, {"role": "assistant", "content": "4"}]}
    segs = get_template("alpaca").render(rec)
    assert segs[0] == (ALPACA_PREAMBLE_INPUT + "### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n",
                       False)
    assert segs[1:] == [("4", True), (EOS, True)]


@pytest.mark.parametrize("template", ["chatml", "model"])
def test_multi_turn_chat_trains_every_assistant_turn(tok, template):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit"},
                {"role": "assistant", "content": "An apple."}]
    ids, labels = tokenize_conversation(get_template(template, tok).render({"row": 1, "messages": messages}), tok)
    # the reference rendering: transformers-style ChatML text of the whole conversation
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages).rstrip("\n")
    assert ids == tok.encode(text, add_bos=False)
    im_end = tok.encode("<|im_end|>", add_bos=False)
    expected_targets = []
    for reply in ("Hello!", "An apple."):
        expected_targets += tok.encode(reply, add_bos=False) + im_end
    assert trained(labels) == expected_targets
    assert im_end == [tok.eos_id]  # <|im_end|> is the EOS: appended once, not twice
    # a target at t is only ever inside an assistant turn: the next token after a user/system
    # header is never learned
    starts = [t for t in range(len(ids) - 2) if tok.decode(ids[t:t + 2]) == "<|im_start|>user"]
    assert starts and all(labels[t - 1] == IGNORE_INDEX and labels[t] == IGNORE_INDEX for t in starts)


def test_sharegpt_and_prompt_completion_masks(tok, tmp_path):
    share = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
        {"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "6"}]}])
    samples, rep = prepare_instruction_data(share, tok, template="chatml")
    assert tok.decode(trained(samples[0].labels)) == "4<|im_end|>6<|im_end|>"
    assert rep.trainable_tokens == len(trained(samples[0].labels))

    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: capital of France?\nA:", "completion": " Paris"}])
    samples, rep = prepare_instruction_data(pc, tok, template="auto")
    assert rep.template == "raw"
    s = samples[0]
    prompt = tok.encode("Q: capital of France?\nA:", add_bos=False)
    assert s.input_ids == prompt + tok.encode(" Paris", add_bos=False) + [tok.eos_id]
    assert trained(s.labels) == tok.encode(" Paris", add_bos=False) + [tok.eos_id]
    assert s.labels[:len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)


def test_text_rows_train_everything_with_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The cat sat."}])
    samples, rep = prepare_instruction_data(path, tok)
    ids = tok.encode("The cat sat.", add_bos=False) + [tok.eos_id]
    assert samples[0].input_ids == ids and samples[0].labels == ids[1:] + [IGNORE_INDEX]
    assert rep.format == "text" and rep.tokens == len(ids) and rep.trainable_tokens == len(ids) - 1


class _SpmLikeTokenizer:
    """Characters as ids, a BOS added by default, EOS that is not writable as text."""

    bos_id, eos_id, eot_ids, chat_template = 1, 2, {2}, None

    def encode(self, text, add_bos=None, add_eos=False, parse_special=True):
        ids = [1] if add_bos in (None, True) else []
        return ids + [ord(c) + 10 for c in text] + ([2] if add_eos else [])

    def decode(self, ids, skip_special=False):
        return "".join(chr(i - 10) for i in ids if i > 9)


def test_bos_added_once_and_eos_inserted_as_id():
    tok = _SpmLikeTokenizer()
    rec = {"row": 1, "messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"},
                                  {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]}
    ids, labels = tokenize_conversation(get_template("raw").render(rec), tok)
    c = [ord(x) + 10 for x in "abcdef"]
    assert ids == [1, c[0], c[1], c[2], c[3], 2, c[4], c[5], 2]
    assert labels == [-100, -100, c[2], c[3], 2, -100, c[5], 2, -100]


# -- templates --------------------------------------------------------------------------------------

def test_user_template_file_korean_alpaca_like_the_seed(tok, tmp_path):
    template_path = tmp_path / "ko_alpaca.txt"
    template_path.write_text(KOREAN_ALPACA_PROMPT + "\n", encoding="utf-8")
    data = tmp_path / "ko.json"
    data.write_text(json.dumps(KOREAN_ROWS, ensure_ascii=False), encoding="utf-8")
    samples, rep = prepare_instruction_data(data, tok, template=str(template_path))
    assert rep.format == "alpaca" and rep.samples == 2 and not rep.skipped
    for s, row in zip(samples, KOREAN_ROWS):
        # exactly the seed's text: alpaca_prompt.format(instruction, input, output) + EOS_TOKEN
        text = KOREAN_ALPACA_PROMPT.format(row["instruction"], row["input"], row["output"]) + "<|im_end|>"
        assert tok.decode(s.input_ids) == text
        assert tok.decode(trained(s.labels)) == row["output"] + "<|im_end|>"
        assert "\ufffd" not in tok.decode(s.input_ids)


def test_named_template_file_and_errors(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("{system}|Q: {instruction} ({input}) {{literal}}\nA: {output}\n<end>\n", encoding="utf-8")
    t = FileTemplate(good)
    rec = {"row": 1, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                                  {"role": "assistant", "content": "a1"}]}
    assert t.render(rec) == [("S|Q: q1 () {literal}\nA: ", False), ("a1\n<end>", True), (EOS, True)]
    for body, message in [("no output {instruction}", "exactly one {output}"),
                          ("{instruction} {output} {input}", "after {output}"),
                          ("{instruction} {bogus} {output}", "unknown placeholder {bogus}"),
                          ("{} {instruction} {output}", "not a mix"),
                          ("{instruction} {output", "bad template")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(LoraforgeError, match=r"bad\.txt: .*" + message.replace("{", r"\{").replace(
                "}", r"\}").replace("(", r"\(")):
            FileTemplate(bad)
    with pytest.raises(LoraforgeError, match="neither a template name"):
        get_template("nonexistent-template")


def test_default_templates(tok):
    assert default_template_name("alpaca", tok) == "alpaca"
    assert default_template_name("messages", tok) == "model"
    assert default_template_name("sharegpt", None) == "chatml"
    assert default_template_name("prompt_completion", tok) == "raw"


def test_generation_prompt_matches_training_prompt(tok):
    messages = [{"role": "user", "content": "Hi"}]
    for name in ("chatml", "model", "alpaca"):
        template = get_template(name, tok)
        segs = template.render({"row": 1, "messages": messages + [{"role": "assistant", "content": "Yo"}]})
        assert template.prompt(messages) == segs[0][0]


def test_generation_prompt_ids_are_the_trained_prompt_ids(tok, tmp_path):
    """generate/chat --template: the prompt's token ids are exactly those training gave the prompt part,
    including BOS handling and the EOS id after an earlier reply (multi-turn)."""
    from loraforge.data.instruct import prompt_token_ids, tokenize_conversation

    korean = tmp_path / "ko.txt"
    korean.write_text("### 지시:\n{instruction}\n\n### 응답:\n{output}", encoding="utf-8")
    first = [{"role": "user", "content": "한국의 수도는?"}]
    for spec in ("alpaca", "chatml", "model", str(korean)):
        template = get_template(spec, tok)
        record = {"row": 1, "messages": first + [{"role": "assistant", "content": "서울"}]}
        ids, labels = tokenize_conversation(template.render(record), tok)
        prompt = prompt_token_ids(template, tok, first)
        n = labels.index(next(y for y in labels if y != IGNORE_INDEX)) + 1  # first trained position + 1
        assert ids[:n] == prompt, spec
        # a second turn: the prompt continues the trained first exchange token for token
        two = record["messages"] + [{"role": "user", "content": "일본은?"}]
        trained_two, _ = tokenize_conversation(template.render(
            {"row": 1, "messages": two + [{"role": "assistant", "content": "도쿄"}]}), tok)
        prompt_two = prompt_token_ids(template, tok, two)
        assert prompt_two[:len(ids)] == ids and trained_two[:len(prompt_two)] == prompt_two, spec


# -- Chinese text, lengths, splits ---------------------------------------------------------------------

def test_chinese_text_round_trips(tok, tmp_path):
    path = write_jsonl(tmp_path / "zh.jsonl", [{"text": CHINESE_TEXT}, {"text": "你好，世界！"}])
    samples, _ = prepare_instruction_data(path, tok)
    assert tok.decode(samples[0].input_ids) == CHINESE_TEXT + "<|im_end|>"
    assert tok.decode(samples[1].input_ids[:-1]) == "你好，世界！"


def test_truncate_and_drop_counted_with_rows(tok, tmp_path):
    rows = [{"instruction": "short", "output": "ok"},
            {"instruction": "long", "output": "word " * 200},
            {"instruction": "prompt " * 200, "output": "x"}]
    path = write_jsonl(tmp_path / "len.jsonl", rows)
    samples, rep = prepare_instruction_data(path, tok, max_seq_length=64, overflow="truncate")
    assert [s.row for s in samples] == [1, 2]
    assert rep.truncated == [2] and rep.dropped == [3]  # row 3 has nothing to learn once cut
    assert all(len(s) <= 64 for s in samples) and len(samples[1]) == 64
    assert samples[1].labels[-1] == IGNORE_INDEX and samples[1].n_targets > 0
    samples, rep = prepare_instruction_data(path, tok, max_seq_length=64, overflow="drop")
    assert [s.row for s in samples] == [1] and rep.dropped == [2, 3] and rep.truncated == []
    report = "\n".join(rep.lines())
    assert "dropped as longer than 64 tokens: 2 rows (2, 3)" in report
    with pytest.raises(LoraforgeError, match=r"len\.jsonl: row 2: \d+ tokens, longer than --max-seq-length 64"):
        prepare_instruction_data(path, tok, max_seq_length=64, overflow="drop", on_bad_row="error")


def test_report_lists_skipped_rows(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    samples, rep = prepare_instruction_data(path, tok)
    assert rep.rows_read == 7 and rep.samples == 2 and [b.row for b in rep.skipped] == [2, 3, 4, 5, 6]
    text = "\n".join(rep.lines())
    assert "skipped 5 bad rows:" in text and "row 3: field 'output' is int, expected text" in text
    assert rep.as_dict()["skipped"][0] == {"row": 2, "reason": "missing field 'output'"}


def test_train_eval_split():
    samples = [Sample([i, i], [i, IGNORE_INDEX], row=i) for i in range(20)]
    train, evals = train_eval_split(samples, 0.1, seed=3)
    assert len(evals) == 2 and len(train) == 18
    assert sorted(s.row for s in train + evals) == list(range(20))
    assert train_eval_split(samples, 0.1, seed=3)[1] == evals  # same seed, same split
    assert len(train_eval_split(samples, 5, seed=0)[1]) == 5
    with pytest.raises(LoraforgeError):
        train_eval_split(samples, 20)


def test_build_samples_checks_its_arguments(tok):
    with pytest.raises(LoraforgeError, match="--overflow"):
        build_samples([], get_template("raw"), tok, overflow="wrap")
    assert isinstance(InstructionData().lines(), list)


# -- Korean and Chinese train and generate ------------------------------------------------------------

def _memorise_and_generate(samples: list[Sample], tok, steps: int = 120) -> list[list[int]]:
    """Fit a tiny random model to the samples, then greedily generate each response from its prompt.

    The model's vocabulary is the tokens the samples use (mapped to compact ids), so it is small;
    its output is mapped back to the real token ids.
    """
    used = sorted({t for s in samples for t in s.input_ids})
    to_compact = {t: i for i, t in enumerate(used)}
    compact = [Sample([to_compact[t] for t in s.input_ids],
                      [to_compact[y] if y != IGNORE_INDEX else y for y in s.labels], s.row) for s in samples]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and immune to a busy machine
    try:
        return _fit_and_generate(compact, used, tok.eos_id, steps)
    finally:
        torch.set_num_threads(threads)


def _fit_and_generate(compact: list[Sample], used: list[int], eos_id: int, steps: int) -> list[list[int]]:
    from loraforge.config import ModelConfig
    from loraforge.data.instruct import padded_batches
    from loraforge.model import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(used), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = CausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = padded_batches(compact, len(compact), pad_id=0, seed=0)[0]
    for _ in range(steps):
        loss, _ = model.loss(batch.input_ids, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    eos = used.index(eos_id)
    outputs = []
    for s in compact:
        first = next(t for t, y in enumerate(s.labels) if y != IGNORE_INDEX)
        ids = s.input_ids[:first + 1]
        out: list[int] = []
        with torch.no_grad():
            for _ in range(len(s.input_ids)):
                nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
                if nxt == eos:
                    break
                out.append(nxt)
        outputs.append([used[t] for t in out])
    return outputs


def test_korean_alpaca_and_chinese_text_train_and_generate(tok, tmp_path):
    template_path = tmp_path / "ko_alpaca.txt"
    template_path.write_text(KOREAN_ALPACA_PROMPT, encoding="utf-8")
    data = tmp_path / "ko.jsonl"
    write_jsonl(data, KOREAN_ROWS)
    ko, _ = prepare_instruction_data(data, tok, template=str(template_path))
    zh_path = write_jsonl(tmp_path / "zh.jsonl", [{"prompt": "续写：", "completion": CHINESE_TEXT}])
    zh, _ = prepare_instruction_data(zh_path, tok)
    outputs = [tok.decode(ids) for ids in _memorise_and_generate(ko + zh, tok)]
    assert outputs == [KOREAN_ROWS[0]["output"], KOREAN_ROWS[1]["output"], CHINESE_TEXT]
