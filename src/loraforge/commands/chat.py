"""`loraforge chat`: talk to a model through its chat template (from the GGUF file or
tokenizer_config.json), interactively on a terminal or from a file of messages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Iterator

from loraforge.commands.generate import (add_model_arguments, check_common_arguments, check_template_flag,
                                         context_size, load_for_generation, sampler_from_args,
                                         template_from_args)
from loraforge.errors import LoraforgeError, file_error

ROLES = ("system", "user", "assistant", "tool")
EXIT_COMMANDS = ("/exit", "/quit", "/bye")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--messages", metavar="FILE", default=None,
                        help="JSON list of {role, content} (or one per line, JSONL): run its turns "
                             "without a terminal, printing each assistant reply")
    parser.add_argument("--template", metavar="NAME|FILE", default=None,
                        help="render the conversation with a finetune template (alpaca, chatml, model, raw "
                             "or a template file) instead of the model's own chat template")
    add_model_arguments(parser)


def read_messages(path: str) -> list[dict[str, str]]:
    """Messages from a JSON list or JSONL file, checked: each {role, content} with a known role."""
    if not os.path.exists(path):
        raise file_error(path, "no such messages file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise file_error(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.strip()
    if not stripped:
        raise file_error(path, "is empty, expected chat messages")
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise file_error(path, f"not valid JSON (line {e.lineno}: {e.msg})") from None
        where = [f"item {i + 1}" for i in range(len(items))]
    else:
        items, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise file_error(path, f"line {n}: not valid JSON ({e.msg})") from None
            where.append(f"line {n}")
    messages = []
    for item, at in zip(items, where):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise file_error(path, f"{at}: expected an object with \"role\" and \"content\"")
        if item["role"] not in ROLES:
            raise file_error(path, f"{at}: unknown role {item['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(item["content"], str):
            raise file_error(path, f"{at}: \"content\" must be a string")
        messages.append({"role": item["role"], "content": item["content"]})
    if not any(m["role"] == "user" for m in messages):
        raise file_error(path, "has no user message to answer")
    return messages


class ChatSession:
    """A conversation held in one KV cache: each turn renders the whole chat with the template,
    runs only the tokens not yet cached, and streams the reply until an end-of-turn token."""

    def __init__(self, loaded: Any, settings: Any, n_predict: int, ctx_size: int,
                 write: Callable[[str], None], show_special: bool = False, template: Any = None) -> None:
        from loraforge.generate import GenerationStats, KVSession

        self.loaded, self.tokenizer = loaded, loaded.tokenizer
        self.settings, self.n_predict = settings, n_predict
        self.session = KVSession(loaded.model, ctx_size)
        self.generator = settings.make_generator()
        self.messages: list[dict[str, str]] = []
        self.write, self.show_special = write, show_special
        self.stats = GenerationStats()  # all turns
        self.last_turn = GenerationStats()
        self.template = template  # a data.templates.Template, or None for the model's chat template
        if template is None and self.tokenizer.chat_template is None:
            raise LoraforgeError(f"{loaded.source}: the model has no chat template "
                                 "(use --template, or `loraforge generate` for plain text)")

    def prompt_ids(self) -> list[int]:
        """Token ids of the conversation so far plus the assistant's opening."""
        tok = self.tokenizer
        if self.template is not None:
            from loraforge.data.instruct import prompt_token_ids

            return prompt_token_ids(self.template, tok, self.messages)
        text = tok.render_chat(self.messages, add_generation_prompt=True)
        bos_text = tok.decode([tok.bos_id]) if tok.bos_id is not None else None
        already_has_bos = bool(bos_text) and text.startswith(bos_text)
        return tok.encode(text, add_bos=None if not already_has_bos else False, parse_special=True)

    def reply(self) -> str:
        """Generate, stream and record the assistant's answer to the messages so far."""
        from loraforge.generate import (MAX_TOKENS_TO_FINISH_CHARACTER, GenerationStats, generate_tokens,
                                        stream_text)

        ids = self.prompt_ids()
        if len(ids) >= self.session.ctx_size:
            raise LoraforgeError(f"the conversation is {len(ids)} tokens and no longer fits the context "
                                 f"({self.session.ctx_size} tokens; raise --ctx-size)")
        turn = GenerationStats()
        produced: list[int] = []

        limit = self.n_predict if self.n_predict >= 0 else None
        n_predict = self.n_predict + MAX_TOKENS_TO_FINISH_CHARACTER if limit is not None else -1

        def tokens() -> Iterator[int]:
            for t in generate_tokens(self.loaded.model, ids, n_predict, self.settings,
                                     self.tokenizer.eot_ids, generator=self.generator, stats=turn,
                                     session=self.session):
                produced.append(t)
                yield t

        for chunk in stream_text(self.tokenizer, tokens(), skip_special=not self.show_special, limit=limit):
            self.write(chunk)
        self.write("\n")
        self.stats.add(turn)
        self.last_turn = turn
        text = self.tokenizer.decode(produced, skip_special=True)
        self.messages.append({"role": "assistant", "content": text})
        return text


def _run_messages(chat: ChatSession, messages: list[dict[str, str]]) -> None:
    """Feed the file's messages in order; answer each user message that no assistant message
    in the file answers already."""
    for i, message in enumerate(messages):
        chat.messages.append(message)
        answered = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        if message["role"] == "user" and not answered:
            chat.reply()


def _input_lines(interactive: bool) -> Iterator[str]:
    """User messages: lines typed on a terminal (a trailing backslash continues the message) or
    read from piped stdin as UTF-8, until EOF or /exit."""
    if not interactive:
        binary = getattr(sys.stdin, "buffer", None)
        first = True
        while True:
            raw = binary.readline() if binary is not None else sys.stdin.readline()
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
            line = (line.lstrip("\ufeff") if first else line).rstrip("\r\n")
            first = False
            if line.strip() in EXIT_COMMANDS:
                return
            if line.strip():
                yield line
    parts: list[str] = []
    while True:
        try:
            line = input("> " if not parts else "")
        except EOFError:
            return
        if not parts and line.strip() in EXIT_COMMANDS:
            return
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        message = "\n".join(parts)
        parts = []
        if message.strip():
            yield message


def run(args: argparse.Namespace) -> int:
    from loraforge.generate import write_utf8

    adapters = check_common_arguments(args)
    check_template_flag(args)
    file_messages = read_messages(args.messages) if args.messages else None
    if file_messages and args.system is not None and file_messages[0]["role"] == "system":
        raise file_error(args.messages, "starts with a system message and --system was also given")
    settings = sampler_from_args(args)
    loaded, summary = load_for_generation(args, adapters)
    chat = ChatSession(loaded, settings, args.n_predict, context_size(args, loaded),
                       lambda text: write_utf8(sys.stdout, text), show_special=args.special,
                       template=template_from_args(args, loaded.tokenizer))
    print(summary, file=sys.stderr)
    if args.system is not None:
        chat.messages.append({"role": "system", "content": args.system})
    if file_messages is not None:
        _run_messages(chat, file_messages)
    else:
        interactive = sys.stdin.isatty()
        if interactive:
            print("chat: type a message and press Enter (end a line with \\ to continue it; "
                  "/exit or Ctrl-D to leave)", file=sys.stderr)
        for message in _input_lines(interactive):
            chat.messages.append({"role": "user", "content": message})
            try:
                chat.reply()
            except KeyboardInterrupt:
                if not interactive:
                    raise
                chat.messages.pop()  # Ctrl-C stops this reply; the chat goes on without the turn
                chat.write("\n")
                print("(reply interrupted)", file=sys.stderr)
    if chat.stats.prompt_tokens or chat.stats.generated_tokens:
        print(chat.stats.report(), file=sys.stderr)
    return 0
