"""The benchmark scripts run end to end in their smallest forms: ``bench/gpu.py --tiny --device cpu`` (the GPU
script, on the CPU) and ``bench/torch_models.py --tiny``. No timing is asserted (they run on a shared machine);
what is asserted is that they finish, print every table, write the JSON they promise, and that the routes
the GPU script times compute the same correlation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the benchmarks need torch")

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "gpu.json"
    out = run("gpu.py", "--tiny", "--device", "cpu", "--reps", "1", "--json", str(path))
    return out, json.loads(path.read_text())


def test_gpu_script_prints_every_table(gpu_run):
    out, _ = gpu_run
    for header in ("Training step, batch 2, 32x32", "Training-step memory", "Inference, batch 1, 32x32",
                   "Route: layer training step", "Route: composition fwd+bwd", "Route: dD product",
                   "Which is faster on this device", "| network | arm | median ms | ratio | ratio p25-p75 |",
                   "| choice | CPU-tuned | other | ms (CPU-tuned) | ms (other) | ratio | faster here |"):
        assert header in out, header
    assert out.startswith("# doconv.torch on CPU")


def test_gpu_script_json(gpu_run):
    _, result = gpu_run
    assert set(result) == {"device", "torch", "config", "training", "memory", "inference", "routes", "route_choice",
                           "checks", "seconds"}
    assert result["config"]["tiny"] is True and result["config"]["amp"] == "bf16"
    for section, arms in (("training", {"plain", "DO-Conv c-major", "DO-Conv contiguous"}),
                          ("inference", {"plain", "DO-Conv default", "DO-Conv in cached()", "DO-Conv folded"})):
        assert set(result[section]) == {"resnet18", "resnet50"}
        for rows in result[section].values():
            assert set(rows) == arms
            assert rows["plain"]["ratio"] == 1.0
            assert all(r["median_ms"] > 0 for r in rows.values())
    # no allocator peak counter on CPU: the memory section says so instead of inventing numbers
    assert all(r["max_allocated_MiB"] is None for rows in result["memory"].values() for r in rows.values())
    assert set(result["routes"]) == {"8@8x8", "16@4x4"}
    for rows in result["routes"].values():
        assert set(rows) == {"layer training step", "composition fwd+bwd", "dD product"}
    assert set(result["route_choice"]) == {"W storage (layer training step)", "c-major training route", "dD product",
                                           "W storage (resnet18 training step)", "W storage (resnet50 training step)"}
    for choice in result["route_choice"].values():
        assert choice["faster"] in (choice["cpu_choice"], choice["other"])


def test_gpu_script_routes_agree(gpu_run):
    """The timed routes (c-major through conv_transpose2d, c-major and contiguous through compose + conv2d)
    are one correlation in fp32: a route that computed something else would be timed for nothing."""
    _, result = gpu_run
    for shape, errors in result["checks"].items():
        assert set(errors) == {"c-major, conv_transpose2d (default)", "c-major, compose + conv2d",
                               "contiguous, compose + conv2d"}
        assert max(errors.values()) < 1e-5, (shape, errors)


def test_whole_model_benchmark_quickest_form(tmp_path):
    path = tmp_path / "models.json"
    out = run("torch_models.py", "--tiny", "--models", "resnet20", "--reps", "1", "--json", str(path))
    for header in ("SGD training step:", "Eval inference (no_grad), training batch:",
                   "Training-step peak memory (max RSS",
                   "| model | batch, input | arm | median ms | ratio to plain | ratio p25-p75 | load |",
                   "| model | batch, input | arm | peak MiB | peak ratio | peak - built MiB | ratio |"):
        assert header in out, header
    result = json.loads(path.read_text())
    assert {"train", "eval", "memory", "load", "torch", "reps"} <= set(result)
    assert set(result["train"]["resnet20"]) == {"plain", "DO-Conv c-major", "DO-Conv contiguous"}
    assert set(result["eval"]["resnet20"]) == {"plain", "DO-Conv default", "DO-Conv in cached()", "DO-Conv folded"}
    memory = result["memory"]["resnet20"]
    assert set(memory) == {"plain", "DO-Conv c-major", "DO-Conv contiguous"}
    assert all(r["peak_MiB"] > r["built_MiB"] > 0 for r in memory.values())
