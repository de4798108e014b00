"""Prompt templates: a record (see `data.datasets`) -> segments [(text, trainable)].

Prompt text is not trainable, responses are; `EOS` (a marker, not text) follows every assistant
response and becomes the tokenizer's end-of-sequence id (skipped when the response already
ends with an end-of-turn token such as ChatML's `<|im_end|>`). Plain-text records render as
one trainable segment plus EOS under every template.

Templates:
  alpaca   the Stanford Alpaca prompt, with and without an input section
  chatml   <|im_start|>role\\ncontent<|im_end|>\\n
  model    the tokenizer's own chat template (jinja2), split into turns by rendering the
           conversation one assistant turn at a time (the template must render a prefix of
           the conversation as a prefix of the whole)
  raw      prompt and response text as they are (prompt/completion data)
  <file>   a user template file, below

User template file: UTF-8 text with the placeholders {instruction}, {input} and {output}
(and optionally {system}); or, as in a Python `alpaca_prompt.format(instruction, input, output)`,
three positional {} in that order. Everything before {output} is the prompt; {output} and
any text after it are the response (trained), then EOS. Literal braces are written {{ and }}.
One newline at the very end of the file is ignored. Example (Korean alpaca prompt):

    아래는 작업을 설명하는 지시 사항과 추가적인 컨텍스트를 제공하는 입력이 있습니다. 요청을 적절하게 완료하는 응답을 작성하세요.

    ### instruction:
    {instruction}

    ### input:
    {input}

    ### output:
    {output}

Alpaca records fill the three fields as they are; chat records map each user message to
{instruction} (with {input} empty) and the assistant reply to {output}; a multi-turn
conversation repeats the template once per exchange.
"""

from __future__ import annotations

import os
import string
from typing import Any

from loraforge.errors import LoraforgeError, file_error


class Eos:
    """Marks where the end-of-sequence token goes in a segment list."""

    _instance: "Eos | None" = None

    def __new__(cls) -> "Eos":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "EOS"


EOS = Eos()
Segment = tuple[str | Eos, bool]
TEMPLATE_NAMES = ("alpaca", "chatml", "model", "raw")

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                         "provides further context. Write a response that appropriately completes "
                         "the request.\n\n")
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TURN_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _exchanges(record: dict) -> tuple[str | None, list[tuple[dict[str, str], str | None]]]:
    """(system text or None, [(fields {instruction, input}, assistant reply or None)]).

    Consecutive user messages are joined by a blank line; a reply with no user message before it
    gets an empty instruction. The last exchange has reply None when the conversation ends on a
    user message (a generation prompt).
    """
    if "fields" in record:
        f = record["fields"]
        reply = f["output"] if any(m["role"] == "assistant" for m in record["messages"]) else None
        return None, [({"instruction": f["instruction"], "input": f["input"]}, reply)]
    messages = record["messages"]
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out: list[tuple[dict[str, str], str | None]] = []
    pending: list[str] = []
    for m in messages:
        if m["role"] == "user":
            pending.append(m["content"])
        elif m["role"] == "assistant":
            out.append(({"instruction": "\n\n".join(pending), "input": ""}, m["content"]))
            pending = []
    if pending:
        out.append(({"instruction": "\n\n".join(pending), "input": ""}, None))
    return system, out


class Template:
    """Base: subclasses implement `_conversation(record) -> segments` for chat records."""

    name = "template"

    def render(self, record: dict) -> list[Segment]:
        """Segments of one record, EOS after every assistant response."""
        if "text" in record:
            return [(record["text"], True), (EOS, True)]
        return _merge(self._conversation(record))

    def prompt(self, messages: list[dict], system: str | None = None) -> str:
        """The text a model is given to answer the last user message (for generation)."""
        msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
        segments = self._conversation({"messages": msgs})
        return "".join(s for s, _ in segments if not isinstance(s, Eos))

    def _conversation(self, record: dict) -> list[Segment]:
        raise NotImplementedError


class AlpacaTemplate(Template):
    name = "alpaca"

    def _conversation(self, record: dict) -> list[Segment]:
        system, exchanges = _exchanges(record)
        segments: list[Segment] = []
        for i, (fields, reply) in enumerate(exchanges):
            has_input = bool(fields["input"].strip())
            if i == 0:
                head = system + "\n\n" if system else (ALPACA_PREAMBLE_INPUT if has_input else ALPACA_PREAMBLE)
            else:
                head = "\n\n"
            segments.append((head + (ALPACA_TURN_INPUT if has_input else ALPACA_TURN).format(**fields), False))
            if reply is not None:
                segments += [(reply, True), (EOS, True)]
        return segments


class ChatMLTemplate(Template):
    name = "chatml"

    def _conversation(self, record: dict) -> list[Segment]:
        segments: list[Segment] = []
        prompt = ""
        for m in record["messages"]:
            if m["role"] == "assistant":
                segments.append((prompt + "<|im_start|>assistant\n", False))
                segments += [(m["content"] + "<|im_end|>", True), (EOS, True)]
                prompt = "\n"
            else:
                prompt += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        if prompt.strip():  # ends on a user turn: generation prompt
            segments.append((prompt + "<|im_start|>assistant\n", False))
        return segments


class RawTemplate(Template):
    """Prompt and response text concatenated as they are (system text leads the first prompt)."""

    name = "raw"

    def _conversation(self, record: dict) -> list[Segment]:
        segments: list[Segment] = []
        for m in record["messages"]:
            if m["role"] == "assistant":
                segments += [(m["content"], True), (EOS, True)]
            else:
                segments.append((m["content"], False))
        return segments


class ModelTemplate(Template):
    """The tokenizer's chat template; prompts are the template's text between responses."""

    name = "model"

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if not template:
            raise LoraforgeError("the model has no chat template; use --template chatml, alpaca, raw "
                                 "or a template file")
        self.tokenizer, self.chat_template = tokenizer, template

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                          template=self.chat_template)

    def _conversation(self, record: dict) -> list[Segment]:
        messages = record["messages"]
        segments: list[Segment] = []
        done = ""  # text already turned into segments
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            after = self._render(messages[:i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise LoraforgeError(
                    f"row {record.get('row', '?')}: the model's chat template does not render the "
                    "conversation turn by turn (an earlier part changes when a later message is "
                    "added), so responses cannot be located; use --template chatml or a template file")
            response = after[len(before):]
            body = response.rstrip()  # the whitespace after the end-of-turn token belongs to the next prompt
            segments += [(before[len(done):], False), (body, True), (EOS, True)]
            done = before + body
        if messages and messages[-1]["role"] != "assistant":
            full = self._render(messages, add_generation_prompt=True)
            segments.append((full[len(done):] if full.startswith(done) else full, False))
        return segments

    def prompt(self, messages: list[dict], system: str | None = None) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
        return self._render(msgs, add_generation_prompt=True)


class FileTemplate(Template):
    """A user template file (see the module docstring)."""

    FIELD_NAMES = ("instruction", "input", "output", "system")
    POSITIONAL = ("instruction", "input", "output")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.name = self.path
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise file_error(self.path, f"template is not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise file_error(self.path, f"cannot read the template ({e.strerror})") from None
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        self.prompt_part, self.response_part = self._parse(text)

    def _parse(self, text: str) -> tuple[str, str]:
        """Split at {output}; return both halves with named fields ({instruction} ...)."""
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as e:
            raise file_error(self.path, f"bad template ({e}); write literal braces as {{{{ and }}}}") from None
        fields = [p[1] for p in parts if p[1] is not None]
        n_positional = fields.count("")
        if n_positional and (n_positional != 3 or len(fields) != 3):
            raise file_error(self.path, "use three positional {} ({instruction}, {input}, {output} in "
                                        "that order) or named placeholders, not a mix")
        out: list[str] = []
        n_pos = 0
        names = []
        for literal, field, spec, conv in parts:
            out.append(literal.replace("{", "{{").replace("}", "}}"))
            if field is None:
                continue
            if spec or conv:
                raise file_error(self.path, f"placeholder {{{field}}} has a format spec; not supported")
            if field == "":
                field = self.POSITIONAL[n_pos]
                n_pos += 1
            elif field not in self.FIELD_NAMES:
                raise file_error(self.path, f"unknown placeholder {{{field}}} (use {{instruction}}, "
                                            "{input}, {output}, {system})")
            names.append(field)
            out.append("\x00" + field + "\x00")
        if names.count("output") != 1:
            raise file_error(self.path, "the template needs exactly one {output} placeholder")
        if "instruction" not in names:
            raise file_error(self.path, "the template has no {instruction} placeholder")
        joined = "".join(out)
        before, after = joined.split("\x00output\x00")
        if "\x00" in after:
            raise file_error(self.path, "placeholders after {output} are not supported")

        def named(s: str) -> str:
            return s.replace("\x00instruction\x00", "{instruction}").replace(
                "\x00input\x00", "{input}").replace("\x00system\x00", "{system}")

        return named(before), named(after).replace("{{", "{").replace("}}", "}")

    def _conversation(self, record: dict) -> list[Segment]:
        system, exchanges = _exchanges(record)
        segments: list[Segment] = []
        for fields, reply in exchanges:
            prompt = self.prompt_part.format(system=system or "", **fields)
            segments.append((prompt, False))
            if reply is not None:
                segments += [(reply + self.response_part, True), (EOS, True)]
        return segments


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours with the same trainability and drop empty text (EOS kept apart)."""
    out: list[Segment] = []
    for text, trainable in segments:
        if isinstance(text, str) and not text:
            continue
        if out and isinstance(text, str) and isinstance(out[-1][0], str) and out[-1][1] == trainable:
            out[-1] = (out[-1][0] + text, trainable)
        else:
            out.append((text, trainable))
    return out


def get_template(spec: str, tokenizer: Any = None) -> Template:
    """A template by name (alpaca, chatml, model, raw) or path of a template file."""
    if spec == "alpaca":
        return AlpacaTemplate()
    if spec == "chatml":
        return ChatMLTemplate()
    if spec == "raw":
        return RawTemplate()
    if spec == "model":
        if tokenizer is None:
            raise LoraforgeError("--template model needs the model's tokenizer")
        return ModelTemplate(tokenizer)
    if os.path.isfile(spec):
        return FileTemplate(spec)
    raise LoraforgeError(f"--template: {spec!r} is neither a template name ({', '.join(TEMPLATE_NAMES)}) "
                         "nor an existing file")


def default_template_name(fmt: str, tokenizer: Any = None) -> str:
    """alpaca data -> alpaca; prompt/completion -> raw; chats -> the model's template if it has one,
    else chatml; plain text needs no template (raw)."""
    if fmt == "alpaca":
        return "alpaca"
    if fmt in ("prompt_completion", "text"):
        return "raw"
    return "model" if getattr(tokenizer, "chat_template", None) else "chatml"


def render_text(segments: list[Segment], eos_text: str = "</s>") -> str:
    """The segments as one string, EOS shown as eos_text (for previews)."""
    return "".join(eos_text if isinstance(s, Eos) else s for s, _ in segments)
