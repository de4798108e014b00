"""Learning-rate schedules against transformers' own schedulers, and llama.cpp's warmup."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.train.optim import Schedule, warmup_steps_for


def _hf_multipliers(kind: str, warmup: int, total: int) -> list[float]:
    """The lr multiplier transformers applies at each optimizer step (scheduler stepped after it)."""
    transformers = pytest.importorskip("transformers")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup}
    if kind == "constant":
        sched = transformers.get_constant_schedule_with_warmup(opt, warmup)
    else:
        sched = make[kind](opt, warmup, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 5), (1, 5), (2, 5), (3, 10), (10, 10), (0, 1), (5, 60)])
def test_hf_schedules_equal_transformers(kind: str, warmup: int, total: int) -> None:
    ours = Schedule(kind=kind, warmup_steps=warmup, total_steps=total)
    expected = _hf_multipliers(kind, warmup, total)
    got = [ours(step) for step in range(1, total + 1)]
    assert got == pytest.approx(expected, abs=1e-12)
    if kind != "constant" and total > warmup:
        assert got[-1] > 0  # the last step does not run at lr 0 (transformers' doesn't either)


def test_warmup_ratio_rounds_up_as_transformers() -> None:
    assert warmup_steps_for(5, None, 0.03, "linear") == 1 == math.ceil(0.03 * 5)
    assert warmup_steps_for(100, None, 0.1, "cosine") == 10
    assert warmup_steps_for(100, 7, 0.5, "cosine") == 7  # explicit steps win
    assert warmup_steps_for(100, None, None, "llama") == 100
    assert warmup_steps_for(100, None, None, "linear") == 0


def test_llama_schedule_matches_the_seeds_log() -> None:
    """llama.cpp's finetune printed sched=0.01, 0.02, 0.03 for iterations 1..3 with its 100-step warmup."""
    s = Schedule(kind="llama", warmup_steps=100, total_steps=30)
    assert [round(s(i), 6) for i in (1, 2, 3)] == [0.01, 0.02, 0.03]


def test_warmup_longer_than_the_run_warns(capsys) -> None:
    from loraforge.train.finetune import make_schedule
    from loraforge.train.spec import build_spec

    spec = build_spec(flag_values={"adam_iter": (30, "--adam-iter")})
    make_schedule(spec, 30)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "longer than this run (30 iterations)" in err[0] and "--warmup 3" in err[0]
    spec = build_spec(flag_values={"warmup": (3, "--warmup")})
    make_schedule(spec, 30)
    assert capsys.readouterr().err == ""
