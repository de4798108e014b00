"""The command-line surface: help text and defaults for every flag, aliases shown once, unknown flags
answered with the subcommand's usage and the closest flag, `loraforge` alone lists the commands."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from loraforge import cli


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_flag_has_help_and_its_default(name: str) -> None:
    parser = cli.command_parser(name)
    formatter = cli.HelpFormatter(prog="x")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
            continue
        assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest} has no help"
        text = formatter._get_help_string(action)
        has_default = action.default not in (None, argparse.SUPPRESS, [], False) and action.nargs != 0
        if action.option_strings and has_default:
            assert "default" in text, f"{name}: {action.option_strings} does not show its default"


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_aliases_are_listed_once(name: str) -> None:
    text = cli.command_parser(name).format_help()
    for line in text.splitlines():
        flags = re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line.split("  ")[1] if line.startswith("  ") and
                           len(line.split("  ")) > 1 else "")
        assert len(flags) == len(set(flags)), f"{name}: a flag is listed twice in {line!r}"


def test_finetune_help_shows_defaults_and_config_keys() -> None:
    text = " ".join(cli.command_parser("finetune").format_help().split())
    assert re.search(r"--lora-r N default LoRA rank; scale = alpha / rank \(default: 4; config key lora_r\)", text)
    assert "--adam-alpha, --lr, --learning-rate X" in text
    assert "--rank-w1" not in text  # a hidden alias of --rank-ffn_gate


def test_unknown_flag_gets_the_subcommands_usage_and_a_suggestion(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--batchsize", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: loraforge finetune")
    assert "--batchsize (did you mean --batch?)" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--top_k", "5"])
    assert "did you mean --top-k?" in capsys.readouterr().err


def test_bare_command_lists_commands_with_one_line_each() -> None:
    proc = subprocess.run([sys.executable, "-m", "loraforge"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "LoRA and QLoRA fine-tuning" in proc.stdout
    for name, (_, help_text) in cli.COMMANDS.items():
        assert re.search(rf"^  {name}\s+{re.escape(help_text)}$", proc.stdout, re.M)
    proc = subprocess.run([sys.executable, "-m", "loraforge", "fintune"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean finetune?" in proc.stderr
