"""Ollama Modelfiles proven by Go's text/template.

A small Go program fills each TEMPLATE the way Ollama does (template/template.go: `.System` is the
system messages joined by a blank line, `.Messages` every message with `.Role`/`.Content`,
consecutive same-role messages joined, `missingkey=zero`) for a system prompt and two turns; the
result must equal the model's own jinja chat template rendered by transformers'
`apply_chat_template` (without the leading BOS, which Ollama's tokenizer adds). Real templates of
the ChatML (Qwen2.5), Llama 3, Mistral v0.3, Gemma 3 and Phi-3.5 families are written into the test's
tokenizer_config.json; our training templates (alpaca, a user template file) are checked against
loraforge's own rendering of them. Go is needed (`apt-get install golang-go`); without it the Go
checks skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from chat_templates import GEMMA3_TEMPLATE, PHI35_TEMPLATE
from conftest import make_tiny_hf_model
from loraforge.cli import main
from loraforge.errors import LoraforgeError

GO_PROGRAM = r'''
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Template string              `json:"template"`
	Messages []map[string]string `json:"messages"`
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		var system []string
		var msgs []*Message
		for _, m := range c.Messages {
			if m["role"] == "system" {
				system = append(system, m["content"])
			}
			if len(msgs) > 0 && msgs[len(msgs)-1].Role == m["role"] {
				msgs[len(msgs)-1].Content += "\n\n" + m["content"]
			} else {
				msgs = append(msgs, &Message{Role: m["role"], Content: m["content"]})
			}
		}
		tmpl, err := template.New("").Option("missingkey=zero").Parse(c.Template)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": msgs, "Response": "", "Tools": nil}
		if err := tmpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(4)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
'''

CHATML_QWEN = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>"
          "\\n\\n' }}{% endif %}")
MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- for message in loop_messages | rejectattr("role", "equalto", "tool") | rejectattr("role", "equalto", "tool_results") | selectattr("tool_calls", "undefined") %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""
GEMMA3, PHI35 = GEMMA3_TEMPLATE, PHI35_TEMPLATE

# family -> (chat template, bos, eos, add_bos, the end-of-turn token that must be a stop)
FAMILIES = {
    "chatml": (CHATML_QWEN, "<|endoftext|>", "<|im_end|>", False, "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True, "<|eot_id|>"),
    "mistral": (MISTRAL_V03, "<s>", "</s>", True, "</s>"),
    "gemma": (GEMMA3, "<bos>", "<eos>", True, "<end_of_turn>"),
    "phi3": (PHI35, "<s>", "<|endoftext|>", True, "<|end|>"),
}
CONVERSATIONS = [
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Hello! 안녕?"},
     {"role": "assistant", "content": "Hi. 안녕하세요."}, {"role": "user", "content": "What is 中文 for China?"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another {{ one }} please"}],
]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(template, messages_list) -> [text] through Go's text/template, built once."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go)")
    folder = tmp_path_factory.mktemp("gotmpl")
    (folder / "main.go").write_text(GO_PROGRAM, encoding="utf-8")
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"), "GO111MODULE": "off",
           "GOFLAGS": "-mod=mod"}
    subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, env=env,
                   capture_output=True, timeout=300)

    def render(template: str, conversations: list[list[dict]]) -> list[str]:
        cases = [{"template": template, "messages": m} for m in conversations]
        done = subprocess.run([str(folder / "render")], input=json.dumps(cases), capture_output=True, text=True,
                              check=True, timeout=60)
        return json.loads(done.stdout)

    return render


def tokenizer_folder(root: Path, family: str) -> Path:
    """A tokenizer folder whose tokenizer_config.json carries the family's chat template and specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    template, bos, eos, add_bos, eot = FAMILIES[family]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(dict.fromkeys([bos, eos, eot])))
    folder = root / family
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": eos, "add_bos_token": add_bos, "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast"}), encoding="utf-8")
    return folder


def modelfile_template(path: Path) -> tuple[str, list[str], str | None]:
    text = path.read_text(encoding="utf-8")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    stops = [line.split(" ", 2)[2].strip('"') for line in text.splitlines() if line.startswith("PARAMETER stop ")]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in text else None
    return template, stops, system


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modelfile_template_renders_like_the_chat_template(tmp_path, family, go_render):
    from loraforge.formats.ollama import modelfile_for_model
    from transformers import AutoTokenizer

    folder = tokenizer_folder(tmp_path, family)
    _, bos, _, add_bos, eot = FAMILIES[family]
    write = modelfile_for_model(gguf_path=str(tmp_path / "model.gguf"), tokenizer_source=str(folder),
                                system="Be brief.")
    write()
    modelfile = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./model.gguf\n")
    template, stops, system = modelfile_template(tmp_path / "Modelfile")
    assert eot in stops and system == "Be brief."
    reference = AutoTokenizer.from_pretrained(folder)
    expected = []
    for messages in CONVERSATIONS:
        text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected.append(text[len(bos):] if add_bos and text.startswith(bos) else text)
    assert go_render(template, CONVERSATIONS) == expected


@pytest.mark.parametrize("spec", ["alpaca", "file"])
def test_training_template_modelfile(tmp_path, spec, go_render):
    """A model trained with --template alpaca or a template file gets that prompt format (EOS after replies)."""
    from loraforge.data.templates import get_template, render_text
    from loraforge.formats.ollama import modelfile_for_model

    folder = tokenizer_folder(tmp_path, "mistral")
    if spec == "file":
        spec = str(tmp_path / "ko_alpaca.txt")
        Path(spec).write_text("{system}\n아래는 작업을 설명하는 지시 사항입니다. {{braces}} stay.\n\n### instruction:\n"
                              "{instruction}\n\n### output:\n{output}\n", encoding="utf-8")
    modelfile_for_model(gguf_path=str(tmp_path / "m.gguf"), tokenizer_source=str(folder), template_spec=spec)()
    template, stops, _ = modelfile_template(tmp_path / "Modelfile")
    assert "</s>" in stops
    ours = get_template(spec)
    expected = [render_text(ours.render({"messages": m}), eos_text="</s>") for m in CONVERSATIONS]
    assert go_render(template, CONVERSATIONS) == expected


def test_unknown_template_is_a_clear_error(tmp_path):
    from loraforge.formats.ollama import translate_chat_template

    odd = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    with pytest.raises(LoraforgeError, match="--ollama-template FILE"):
        translate_chat_template(odd, "<s>", "</s>", True)
    # the template rendered differently in one detail (no newline after the role) is not taken for ChatML
    near_chatml = CHATML_QWEN.replace("message.role + '\\n'", "message.role")
    with pytest.raises(LoraforgeError, match="not one loraforge can translate"):
        translate_chat_template(near_chatml, None, "<|im_end|>", False)


def test_convert_with_ollama_writes_both(tmp_path, go_render, capsys):
    """`loraforge convert --ollama`: the GGUF and a Modelfile FROM it, template from the folder's chat template."""
    folder = tmp_path / "model"
    make_tiny_hf_model(folder, "llama")
    shutil.copy(tokenizer_folder(tmp_path, "chatml") / "tokenizer_config.json", folder / "tokenizer_config.json")
    out = tmp_path / "out" / "tiny.gguf"
    out.parent.mkdir()
    assert main(["convert", str(folder), "-o", str(out), "--outtype", "f32", "--ollama"]) == 0
    assert out.is_file()
    template, stops, _ = modelfile_template(out.parent / "Modelfile")
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./tiny.gguf\n")
    assert go_render(template, CONVERSATIONS[:1])[0].startswith("<|im_start|>system\nYou are a terse assistant.")
    # inspect reports both files
    capsys.readouterr()
    assert main(["inspect", str(out.parent / "Modelfile")]) == 0
    text = capsys.readouterr().out
    assert "ollama-modelfile" in text and "./tiny.gguf" in text and "'<|im_end|>'" in text and "missing" not in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gguf-model" in text and "gpt2 (pre gpt-2)" in text and "architecture" in text
    # a folder whose template is unknown: refused before anything is written
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    other = tmp_path / "other.gguf"
    assert main(["convert", str(folder), "-o", str(other), "--ollama"]) == 2
    assert not other.exists()
