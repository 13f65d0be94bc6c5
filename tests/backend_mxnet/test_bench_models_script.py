"""Smoke test of bench/mxnet_models.py in its tiniest form: it runs, and prints every table it promises.

A subprocess, as a user runs it: the script's argument handling, model building through GluonCV, convert / fold
/ cached and the memory children under ``/usr/bin/time`` all have to work for it to exit 0.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "mxnet_models.py")

pytest.importorskip("gluoncv")


def run(*args):
    return subprocess.run([sys.executable, "-W", "ignore", SCRIPT, *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_tiny_run_prints_every_table():
    proc = run("--tiny", "--models", "cifar_resnet20_v1", "--reps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for title in ("SGD training step", "Eval inference, training batch", "Training-step peak memory"):
        assert title in out, out
    assert "| model | batch, input | DO layers | arm | median ms | ratio to plain |" in out
    assert "| model | batch, input | arm | peak MiB | peak ratio |" in out
    for arm in ("| plain |", "| DO-Conv twin |", "| DO-Conv default |", "| DO-Conv in cached() |",
                "| DO-Conv folded |", "| DO-Conv twin, converted after a call |"):
        assert arm in out, (arm, out)
    # CIFAR ResNet-20: 19 non-pointwise convs become DO-Conv layers (the 1x1 shortcuts stay Conv2D)
    assert "| cifar_resnet20_v1 | 2, 16x16 | 19 |" in out
    assert "load average" in out


def test_unknown_model_names_the_flag_and_value():
    proc = run("--tiny", "--models", "resnet999")
    assert proc.returncode == 2
    assert "--models" in proc.stderr and "resnet999" in proc.stderr


def test_tiny_run_of_the_1d_and_3d_networks():
    """The TCN (1-D) and C3D (3-D) networks: every Conv1D / Conv3D of their tiny forms becomes a DO-Conv layer
    (stem + 2 blocks of 2 in the TCN, 3 in the C3D) and a training step runs for the plain net and the twin."""
    proc = run("--tiny", "--models", "tcn,c3d", "--scenarios", "train", "--reps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| tcn | 2, 32 | 5 | DO-Conv twin |" in out and "| c3d | 1, 4x16x16 | 3 | DO-Conv twin |" in out, out
