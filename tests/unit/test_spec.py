"""The run spec: config files, flag overrides, --print-config, and one-line errors naming the key."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.train.spec import build_spec, flatten_config, read_config_file, spec_fields, to_yaml

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "loraforge"


def _spec_from(argv: list[str]):
    from loraforge.cli import command_parser
    from loraforge.commands.finetune import spec_from_args

    args = command_parser("finetune").parse_args(argv)
    return spec_from_args(args)


def test_every_flag_has_a_config_key_and_back() -> None:
    """Each spec field is one flag (plus aliases) and one config key, in both directions."""
    from loraforge.cli import command_parser

    parser = command_parser("finetune")
    dests = {a.dest for a in parser._actions if a.option_strings} - {"help", "config", "print_config"}
    assert dests == set(spec_fields())


def test_config_file_sections_flat_keys_and_flag_overrides(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  seed: 7\nlora:\n  lora_r: 8\n  target_modules: [q_proj, v_proj]\nlr: 2.0e-4\n"
                   "batch: 2\n", encoding="utf-8")
    spec = _spec_from(["--config", str(cfg), "--batch", "3"])
    assert spec.model.seed == 7 and spec.lora.lora_r == 8 and spec.optimizer.lr == 2e-4
    assert spec.lora.target_modules == "q_proj,v_proj"
    assert spec.data.batch == 3  # the flag wins over the file
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"optimizer": {"lr": 0.01}, "loop": {"grad_acc": 2}}), encoding="utf-8")
    spec = _spec_from(["--config", str(js)])
    assert spec.optimizer.lr == 0.01 and spec.loop.grad_acc == 2


def test_print_config_round_trips(tmp_path: pathlib.Path, capsys) -> None:
    argv = ["--lora-r", "8", "--rank-w1", "2", "--seed", "3", "--lr-scheduler", "cosine", "--warmup-ratio", "0.1",
            "--no-checkpointing", "--train-on-inputs", "--report-to", "tensorboard"]
    assert main(["finetune", *argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "spec.yaml").write_text(text, encoding="utf-8")
    again = _spec_from(["--config", str(tmp_path / "spec.yaml")])
    assert again.to_dict() == _spec_from(argv).to_dict()
    assert again.lora.rank_ffn_gate == 2 and again.model.checkpointing is False
    assert to_yaml(again).splitlines()[2:] == text.splitlines()[2:]


@pytest.mark.parametrize("body,expected", [
    ("lora:\n  lora_rr: 4\n", "{f}: unknown config key 'lora.lora_rr' (did you mean lora_r?)"),
    ("lora_r: four\n", "lora_r in {f}: lora_r: expected a whole number, got 'four'"),
    ("lr: .nan\n", "lr in {f}: must be a finite number, got nan"),
    ("optimizer:\n  lr: -1\n", "optimizer.lr in {f}: must be positive, got -1.0"),
    ("data:\n  lora_r: 4\n", "{f}: data.lora_r belongs in section 'lora'"),
    ("lr_scheduler: wsd\n", "lr_scheduler in {f}: must be one of llama, linear, cosine, constant, got 'wsd'"),
    ("model: 3\n", "{f}: section 'model' must be a mapping of keys to values"),
    ("- a\n- b\n", "{f}: a config file must be a mapping of keys to values"),
    ("lora: {lora_r: 4\n", "{f}: not valid YAML"),
    ("use_rslora: 1\n", "use_rslora in {f}: use_rslora: expected true or false, got 1"),
])
def test_bad_config_is_one_line_naming_key_and_file(tmp_path: pathlib.Path, body: str, expected: str) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(body, encoding="utf-8")
    with pytest.raises(LoraforgeError) as e:
        _spec_from(["--config", str(cfg)])
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(expected.format(f=cfg)), message


def test_bad_config_through_the_cli_is_one_line_exit_2(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora:\n  lora_alpha: .nan\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "loraforge", "finetune", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"loraforge finetune: error: lora.lora_alpha in {cfg}: must be a finite "
                                   "number, got nan")


@pytest.mark.parametrize("argv,expected", [
    (["--lora-alpha", "nan"], "--lora-alpha: must be a finite number, got nan"),
    (["--lr", "nan"], "--adam-alpha: must be a finite number, got nan"),
    (["--lr", "inf"], "--adam-alpha: must be a finite number, got inf"),
    (["--lora-dropout", "1.5"], "--lora-dropout: must be in [0, 1), got 1.5"),
    (["--eval-every", "5"], "--eval-every: needs held-out data (--eval-data or --eval-split)"),
    (["--report-to", "comet"], "--report-to: unknown tracker 'comet'"),
    (["--adam-iter", "3", "--max-steps", "5"], "--max-steps: give one of --adam-iter, --max-steps, --epochs"),
])
def test_bad_flags_name_the_flag(argv: list[str], expected: str) -> None:
    with pytest.raises(LoraforgeError) as e:
        _spec_from(argv)
    assert str(e.value).startswith(expected), str(e.value)


def test_config_file_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(LoraforgeError, match="no such config file"):
        read_config_file(str(tmp_path / "missing.yaml"))
    with pytest.raises(LoraforgeError, match="is given twice"):
        flatten_config({"lora_r": 4, "lora": {"lora_r": 5}}, "x.yaml")
    assert build_spec().lora.lora_r == 4


def test_no_argparse_or_commands_below_commands() -> None:
    """train/, data/, formats/ take typed values: none imports argparse or loraforge.commands."""
    offenders = []
    for folder in ("train", "data", "formats"):
        for path in (SRC / folder).glob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for name in names:
                    if name == "argparse" or name.startswith("loraforge.commands") or name == "loraforge.cli":
                        offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, offenders
