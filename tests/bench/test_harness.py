"""The run set-up every whole-model script shares (``bench/harness.py``, framework-free): which networks,
scenarios and how many rounds a command line asks for, and the usage errors for what it cannot mean."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import harness  # noqa: E402

MODELS, SCENARIOS = ("resnet20", "resnet50"), ("train", "eval", "memory")


def plan(*argv: str, **options):
    parser = argparse.ArgumentParser(prog="bench")
    harness.add_run_arguments(parser, MODELS, SCENARIOS, quick="q", tiny="t")
    return harness.plan(parser, parser.parse_args(argv), MODELS, SCENARIOS, "resnet20", **options)


@pytest.mark.parametrize("argv, expected", [
    ((), (list(MODELS), list(SCENARIOS), 9, 2)),
    (("--quick",), (["resnet20"], list(SCENARIOS), 5, 2)),
    (("--quick", "--models", "resnet50"), (["resnet50"], list(SCENARIOS), 5, 2)),
    (("--tiny", "--scenarios", "eval"), (list(MODELS), ["eval"], 2, 1)),
    (("--reps", "3", "--warmup", "0"), (list(MODELS), list(SCENARIOS), 3, 0)),
])
def test_plan_reads_the_flags(argv, expected):
    assert plan(*argv) == expected


@pytest.mark.parametrize("argv, message", [
    (("--reps", "0"), "--reps must be >= 1, but got --reps=0"),
    (("--reps", "-2"), "--reps must be >= 1, but got --reps=-2"),
    (("--models", "resnet21"), "resnet21"),
    (("--scenarios", "train,fly"), "fly"),
    (("--scenarios", ""), "--scenarios"),
])
def test_plan_refuses_what_it_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit):
        plan(*argv)
    assert message in capsys.readouterr().err


def test_empty_scenarios_run_none_where_allowed():
    assert plan("--scenarios", "", empty_scenarios=True)[1] == []
