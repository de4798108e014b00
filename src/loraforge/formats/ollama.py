"""Ollama Modelfiles: FROM the GGUF (or FROM the base + ADAPTER), a TEMPLATE in Go's text/template
that renders prompts exactly as the model was trained, its stop tokens, and SYSTEM.

How Ollama fills a template (ollama template/template.go, `Execute` with `.Messages` in the
template): consecutive messages of one role are joined by a blank line; `.System` is every
system message's text joined by a blank line; `.Messages` holds all messages (system ones too)
with `.Role` and `.Content`; `.Response` is empty. Ollama's tokenizer then adds BOS when the GGUF
says so (`tokenizer.ggml.add_bos_token`), so a BOS the chat template writes first is left out.

Each template family below is a Go template plus a Python rendering of what that Go template
renders (`render(system, messages)`, same rules). A model's jinja chat template is matched by
rendering probe conversations both ways: only a family that reproduces the jinja template's own
text on every probe is used, so a Modelfile never gets a silently different prompt format. A
template no family reproduces is a one-line error naming the way out (`--ollama-template FILE`).
Known gaps: jinja `| trim` on message contents has no Go equivalent (probes have no surrounding
whitespace), and tool calls are not translated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from loraforge.errors import LoraforgeError, file_error

Message = dict[str, str]


@dataclass
class OllamaTemplate:
    family: str
    template: str  # Go text/template
    stops: list[str] = field(default_factory=list)
    system_supported: bool = True


@dataclass
class _Family:
    name: str
    template: str
    render: Callable[[str, list[Message]], str]
    stops: list[str]


def collate(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    """(.System, .Messages) as Ollama builds them from a conversation."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    out: list[Message] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return "\n\n".join(system), out


def go_literal(text: str) -> str:
    """`text` as literal output of a Go template (a Go string action when it holds "{{" or "}}")."""
    if "{{" not in text and "}}" not in text:
        return text
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


# -- families ----------------------------------------------------------------------------------------

def _role_wrapped(name: str, head: Callable[[str], str], tail: str, gen: str, stops: list[str],
                  go_head: str) -> _Family:
    """Each message as head(role) + content + tail, then the generation prompt (ChatML, Llama 3, Phi-3)."""
    def render(system: str, messages: list[Message]) -> str:
        return "".join(head(m["role"]) + m["content"] + tail for m in messages) + gen

    template = "{{- range .Messages }}" + go_head + "{{ .Content }}" + go_literal(tail) + "{{ end }}" + go_literal(gen)
    return _Family(name, template, render, stops)


def _chatml() -> _Family:
    return _role_wrapped("chatml", lambda r: f"<|im_start|>{r}\n", "<|im_end|>\n", "<|im_start|>assistant\n",
                         ["<|im_start|>", "<|im_end|>"], "<|im_start|>{{ .Role }}\n")


def _llama3() -> _Family:
    return _role_wrapped("llama3", lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>",
                         "<|start_header_id|>assistant<|end_header_id|>\n\n",
                         ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                         "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n")


def _phi3() -> _Family:
    return _role_wrapped("phi3", lambda r: f"<|{r}|>\n", "<|end|>\n", "<|assistant|>\n",
                         ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"], "<|{{ .Role }}|>\n")


def _mistral(eos: str, close: str, reply_space: str, system_at: str) -> _Family:
    """[INST] user [/INST] reply</s>; the system text goes before the last (Mistral v0.3 and later)
    or the first user message, followed by a blank line."""
    def render(system: str, messages: list[Message]) -> str:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        target = len(messages) - 1 if system_at == "last" else (users[0] if users else -1)
        out = []
        for i, m in enumerate(messages):
            if m["role"] == "user":
                prefix = system + "\n\n" if system and i == target else ""
                out.append("[INST] " + prefix + m["content"] + close)
            elif m["role"] == "assistant":
                out.append(reply_space + m["content"] + eos)
        return "".join(out)

    if system_at == "last":
        where = "(eq (len (slice $.Messages $i)) 1)"
        setup = ""
    else:
        where = "$first"
        setup = "{{- $first := true }}"
    template = (setup + "{{- range $i, $_ := .Messages }}"
                "{{- if eq .Role \"user\" }}[INST] {{ if and $.System " + where + " }}{{ $.System }}\n\n{{ end }}"
                + ("{{ $first = false }}" if system_at == "first" else "")
                + "{{ .Content }}" + go_literal(close)
                + "{{ else if eq .Role \"assistant\" }}" + go_literal(reply_space) + "{{ .Content }}"
                + go_literal(eos) + "{{ end }}{{ end }}")
    return _Family(f"mistral({system_at}, {close!r})", template, render, ["[INST]", "[/INST]", eos])


def _gemma() -> _Family:
    """<start_of_turn>user|model ...<end_of_turn>; system text leads the first user turn (Gemma 3)."""
    def render(system: str, messages: list[Message]) -> str:
        out, pending = [], system
        for m in messages:
            if m["role"] == "system":
                continue
            role = "model" if m["role"] == "assistant" else m["role"]
            prefix = ""
            if m["role"] == "user" and pending:
                prefix, pending = pending + "\n\n", ""
            out.append(f"<start_of_turn>{role}\n{prefix}{m['content']}<end_of_turn>\n")
        return "".join(out) + "<start_of_turn>model\n"

    template = ("{{- $system := .System }}{{- range .Messages }}{{- if ne .Role \"system\" }}<start_of_turn>"
                "{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
                "{{ if and (eq .Role \"user\") $system }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}"
                "{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n")
    return _Family("gemma", template, render, ["<start_of_turn>", "<end_of_turn>"])


def chat_families(eos: str) -> list[_Family]:
    fams = [_chatml(), _llama3(), _phi3(), _gemma()]
    for system_at in ("last", "first"):
        for close, space in (("[/INST]", " "), (" [/INST]", ""), (" [/INST]", " "), ("[/INST]", "")):
            fams.append(_mistral(eos, close, space, system_at))
    return fams


# -- training templates (data.templates): alpaca, chatml, user template files ------------------------

def _exchange_family(name: str, first_head: Callable[[str], str], head_go_first: str, later_head: str,
                     turn: tuple[str, str], reply_tail: str, stops: list[str]) -> _Family:
    """One prompt per user message (head + turn[0] + content + turn[1]) and reply + reply_tail."""
    def render(system: str, messages: list[Message]) -> str:
        out, first = [], True
        for m in messages:
            if m["role"] == "user":
                out.append((first_head(system) if first else later_head) + turn[0] + m["content"] + turn[1])
                first = False
            elif m["role"] == "assistant":
                out.append(m["content"] + reply_tail)
        return "".join(out)

    template = ("{{- $first := true }}{{- range .Messages }}{{- if eq .Role \"user\" }}{{ if $first }}"
                + head_go_first + "{{ $first = false }}{{ else }}" + go_literal(later_head) + "{{ end }}"
                + go_literal(turn[0]) + "{{ .Content }}" + go_literal(turn[1])
                + "{{ else if eq .Role \"assistant\" }}{{ .Content }}" + go_literal(reply_tail) + "{{ end }}{{ end }}")
    return _Family(name, template, render, stops)


def training_family(spec: str, eos: str) -> _Family:
    """The Go template of a `--template` used for training: alpaca, chatml or a template file."""
    from loraforge.data import templates as T

    if spec == "chatml":
        return _chatml()
    if spec == "alpaca":
        return _exchange_family(
            "alpaca", lambda s: s + "\n\n" if s else T.ALPACA_PREAMBLE,
            "{{ if $.System }}{{ $.System }}\n\n{{ else }}" + go_literal(T.ALPACA_PREAMBLE) + "{{ end }}",
            "\n\n", ("### Instruction:\n", "\n\n### Response:\n"), eos, [eos, "### Instruction:"])
    if spec in ("model", "raw"):
        raise LoraforgeError(f"--template {spec}: not a prompt format of its own; leave --template out to use "
                             "the model's chat template")
    tpl = T.get_template(spec)
    if not isinstance(tpl, T.FileTemplate):
        raise LoraforgeError(f"--template {spec!r}: no Ollama translation for this template")
    return _file_family(tpl, eos)


def _file_family(tpl: Any, eos: str) -> _Family:
    """A user template file: its prompt part per user message ({instruction} = the message, {input}
    empty, {system} = the system text), then reply + response part + EOS."""
    import string

    pieces = list(string.Formatter().parse(tpl.prompt_part))

    def render(system: str, messages: list[Message]) -> str:
        out = []
        for m in messages:
            if m["role"] == "user":
                out.append(tpl.prompt_part.format(instruction=m["content"], input="", system=system))
            elif m["role"] == "assistant":
                out.append(m["content"] + tpl.response_part + eos)
        return "".join(out)

    go = []
    for literal, fname, _, _ in pieces:
        go.append(go_literal(literal))
        if fname == "instruction":
            go.append("{{ .Content }}")
        elif fname == "system":
            go.append("{{ $.System }}")
    template = ("{{- range .Messages }}{{- if eq .Role \"user\" }}" + "".join(go)
                + "{{ else if eq .Role \"assistant\" }}{{ .Content }}" + go_literal(tpl.response_part + eos)
                + "{{ end }}{{ end }}")
    first_line = next((ln.strip() for ln in tpl.prompt_part.splitlines() if ln.strip().startswith("#")), None)
    stops = [eos] + ([first_line] if first_line else [])
    return _Family(os.path.basename(tpl.path), template, render, stops)


# -- matching a jinja chat template -------------------------------------------------------------------

PROBES: list[list[Message]] = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in Korean."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "안녕하세요!"}, {"role": "user", "content": "And 中文?"}],
    [{"role": "user", "content": "First question"}, {"role": "assistant", "content": "First answer"},
     {"role": "user", "content": "Second question"}],
]


def _fits(family: _Family, expected: Callable[[list[Message]], str | None]) -> tuple[bool, bool]:
    """(every probe matched, the system probes could be rendered by the model's template)."""
    system_ok = True
    for probe in PROBES:
        want = expected(probe)
        if want is None:  # the model's template refuses this conversation (e.g. a system message)
            if any(m["role"] == "system" for m in probe):
                system_ok = False
                continue
            return False, system_ok
        system, messages = collate(probe)
        if family.render(system, messages) != want:
            return False, system_ok
    return True, system_ok


def translate_chat_template(chat_template: str, bos: str | None, eos: str | None, add_bos: bool,
                            source: str = "chat template") -> OllamaTemplate:
    """The Ollama TEMPLATE reproducing a jinja chat template, or a one-line error."""
    from loraforge.tokenizer import render_chat_template

    variables = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}

    def expected(messages: list[Message]) -> str | None:
        try:
            text = render_chat_template(chat_template, messages, add_generation_prompt=True, **variables)
        except LoraforgeError:
            return None
        if add_bos and bos and text.startswith(bos):
            text = text[len(bos):]  # Ollama's tokenizer adds BOS itself
        return text

    for family in chat_families(eos or "</s>"):
        ok, system_ok = _fits(family, expected)
        if ok:
            stops = list(dict.fromkeys(family.stops + ([eos] if eos else [])))
            return OllamaTemplate(family.name, family.template, stops, system_supported=system_ok)
    raise LoraforgeError(f"{source}: the chat template is not one loraforge can translate to an Ollama TEMPLATE "
                         "(known: ChatML, Llama 3, Mistral [INST], Gemma, Phi-3); write the Go template yourself "
                         "and pass it with --ollama-template FILE")


# -- the Modelfile ------------------------------------------------------------------------------------

def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text or text.endswith('"'):
        raise LoraforgeError(f'{what} contains """ or ends with a quote, which a Modelfile cannot hold')
    return '"""' + text + '"""'


def modelfile_text(model: str, template: OllamaTemplate, adapter: str | None = None, system: str | None = None
                   ) -> str:
    """The Modelfile's text (paths as given, relative to the Modelfile's folder)."""
    lines = [f"FROM {model}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append("TEMPLATE " + _triple_quoted(template.template, "the template"))
    for stop in template.stops:
        if '"' in stop or "\n" in stop:
            raise LoraforgeError(f"stop token {stop!r} cannot be written as a Modelfile PARAMETER")
        lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines.append("SYSTEM " + _triple_quoted(system, "the system prompt"))
    return "\n".join(lines) + "\n"


def _tokenizer(source: str):
    """loraforge Tokenizer of an HF folder or GGUF model file (for bos/eos, add_bos and the chat template)."""
    from loraforge.tokenizer import Tokenizer

    if os.path.isdir(source):
        from loraforge.formats.gguf_tokenizer import hf_folder_tokenizer

        return hf_folder_tokenizer(source)
    from loraforge.formats.gguf_file import read_gguf

    return Tokenizer.from_gguf_metadata(read_gguf(source).metadata, source=source)


def resolve_template(tokenizer_source: str, template_spec: str | None, ollama_template: str | None
                     ) -> OllamaTemplate:
    """The TEMPLATE for a model: a given Go template file, a training template, or the model's chat template."""
    tok = _tokenizer(tokenizer_source)

    def piece(i: int | None) -> str | None:
        return None if i is None else tok.backend.id_to_token(i)

    bos, eos = piece(tok.bos_id), piece(tok.eos_id)
    if ollama_template:
        try:
            with open(ollama_template, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise file_error(ollama_template, f"cannot read the Ollama template ({e.strerror})") from None
        stops = [piece(i) for i in sorted(tok.eot_ids)]
        return OllamaTemplate("file", text, [s for s in stops if s])
    if template_spec:
        fam = training_family(template_spec, eos or "")
        return OllamaTemplate(fam.name, fam.template, [s for s in dict.fromkeys(fam.stops) if s])
    if not tok.chat_template:
        raise LoraforgeError(f"{tokenizer_source}: the model has no chat template; pass --template (alpaca, chatml "
                             "or the template file it was trained with) or --ollama-template FILE")
    return translate_chat_template(tok.chat_template, bos, eos, tok.add_bos, source=tokenizer_source)


def modelfile_for_model(gguf_path: str, tokenizer_source: str, template_spec: str | None = None,
                        ollama_template: str | None = None, system: str | None = None,
                        modelfile_path: str | None = None, adapter_path: str | None = None,
                        base_gguf: str | None = None) -> Callable[[], str]:
    """Check everything now; return a function that writes the Modelfile (after the GGUF exists).

    gguf_path: the model to run (`FROM`); with `adapter_path`, `base_gguf` is FROM and the adapter ADAPTER.
    """
    from loraforge.atomic import atomic_path, check_writable

    template = resolve_template(tokenizer_source, template_spec, ollama_template)
    if system and not template.system_supported:
        raise LoraforgeError("--system: the model's chat template refuses system messages")
    path = modelfile_path or os.path.join(os.path.dirname(os.path.abspath(gguf_path)), "Modelfile")
    check_writable(path)
    folder = os.path.dirname(os.path.abspath(path))

    def rel(p: str) -> str:
        r = os.path.relpath(os.path.abspath(p), folder)
        return r if r.startswith("..") or os.path.isabs(r) else "./" + r

    model = rel(base_gguf) if adapter_path else rel(gguf_path)
    text = modelfile_text(model, template, adapter=rel(adapter_path) if adapter_path else None, system=system)

    def write() -> str:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path} (Ollama Modelfile, template {template.family}; `ollama create NAME -f {path}`)")
        return path

    return write


# -- reading a Modelfile back (for `inspect`) ----------------------------------------------------------

def is_modelfile(path: str) -> bool:
    """A text file whose first instruction is FROM (Ollama's Modelfile), not a GGUF."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if head.startswith(b"GGUF"):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    return first.upper().startswith("FROM ")


def describe_modelfile(path: str) -> dict[str, Any]:
    """FROM / ADAPTER (and whether those files exist), TEMPLATE, stops and SYSTEM of a Modelfile."""
    text = open(path, encoding="utf-8").read()
    info: dict[str, Any] = {"path": path, "kind": "ollama-modelfile", "from": None, "adapters": [], "stops": [],
                            "template": None, "system": None, "parameters": {}}
    folder = os.path.dirname(os.path.abspath(path))
    rest = text
    while rest.strip():
        rest = rest.lstrip()
        line, _, after = rest.partition("\n")
        if line.startswith("#"):
            rest = after
            continue
        name, _, value = line.partition(" ")
        value = value.strip()
        if value.startswith('"""'):
            body, sep, after = rest.split('"""', 1)[1].partition('"""')
            value = body
            after = after.partition("\n")[2]
        elif value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = value[1:-1]
        rest = after
        key = name.upper()
        if key == "FROM":
            info["from"] = value
        elif key == "ADAPTER":
            info["adapters"].append(value)
        elif key == "TEMPLATE":
            info["template"] = value
        elif key == "SYSTEM":
            info["system"] = value
        elif key == "PARAMETER":
            pname, _, pvalue = value.partition(" ")
            pvalue = pvalue.strip().strip('"')
            if pname == "stop":
                info["stops"].append(pvalue)
            else:
                info["parameters"][pname] = pvalue
    missing = [p for p in [info["from"], *info["adapters"]] if p and (p.startswith(("./", "../", "/")) or
               p.endswith(".gguf")) and not os.path.exists(os.path.join(folder, p))]
    info["missing_files"] = missing
    return info


def format_modelfile_info(info: dict[str, Any]) -> str:
    rows = [("path", info["path"]), ("kind", info["kind"]), ("from", str(info["from"]))]
    rows += [("adapter", a) for a in info["adapters"]]
    rows.append(("stop tokens", ", ".join(repr(s) for s in info["stops"]) or "none"))
    rows += [(f"parameter {k}", v) for k, v in info["parameters"].items()]
    if info["system"]:
        rows.append(("system", info["system"]))
    if info["missing_files"]:
        rows.append(("missing", ", ".join(info["missing_files"]) + " (not found next to the Modelfile)"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    template = (info["template"] or "").splitlines()
    lines.append(f"{'template':<{width}}  {len(template)} lines:" if template else f"{'template':<{width}}  none")
    lines += [f"{'':<{width}}  | {line}" for line in template[:12]]
    return "\n".join(lines)
