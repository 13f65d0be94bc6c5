"""The comparison protocol: the twin, identical training conditions, the metric, the reports and the command."""

import copy
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from doconv.torch import DOConv2d, layer_config
from doconv.experiments import ExperimentConfig, build_model, make_twin, markdown, run_experiment, summarize
from doconv.experiments.__main__ import main
from doconv.experiments.report import csv_text, write_reports
from doconv.experiments.train import final_metric, milestones


@pytest.mark.parametrize("arch,stages,d_mul", [("resnet_v1", (0, 1, 2, 3), "MN"), ("resnet_v2", (0, 2), "MN"),
                                               ("plain", (3,), "(M+2)(N+2)"), ("resnet_v2", (1,), "2M2N")])
def test_twin_starts_as_the_baseline(arch, stages, d_mul):
    torch.manual_seed(0)
    baseline = build_model(arch, 8, 10, width=4, in_channels=1)
    before = copy.deepcopy(baseline.state_dict())
    config = ExperimentConfig(model=arch, depth=8, width=4, stages=stages, d_mul=d_mul)
    twin, report = make_twin(baseline, config, seed=0)
    converted = {name for name, m in twin.named_modules() if isinstance(m, DOConv2d)}
    assert converted == {r.path for r in report if r.action == "converted"}
    assert converted and all(int(name[5]) in stages for name in converted)
    assert all(layer_config(twin.get_submodule(n)).D_mul == {"MN": 9, "(M+2)(N+2)": 25, "2M2N": 36}[d_mul]
               for n in converted)
    assert all(type(m) is nn.Conv2d for n, m in baseline.named_modules() if n in converted)  # a copy was converted
    assert all(torch.equal(before[k], v) for k, v in baseline.state_dict().items())
    x = torch.randn(8, 1, 8, 8)
    for mode in (False, True):  # eval (running stats) and train (batch stats) give the same outputs
        baseline.train(mode), twin.train(mode)
        torch.testing.assert_close(twin(x), baseline(x), rtol=0, atol=1e-6)


def test_random_d_init_changes_the_function():
    torch.manual_seed(0)
    baseline = build_model("resnet_v1", 8, 10, width=4, in_channels=1).eval()
    twin, _ = make_twin(baseline, ExperimentConfig(d_init="random", stages=(1,)), seed=0)
    again, _ = make_twin(baseline, ExperimentConfig(d_init="random", stages=(1,)), seed=0)
    x = torch.randn(4, 1, 8, 8)
    assert (twin.eval()(x) - baseline(x)).abs().max() > 1e-3
    torch.testing.assert_close(again.eval()(x), twin(x), rtol=0, atol=0)  # reproducible from the seed


def test_identical_conditions_give_identical_training(digits8, tiny_config):
    # lr = 0 leaves every weight as it is, so any difference between the arms would come from the protocol
    # (batches, augmentation, BN statistics, initial weights): there must be none.
    config = dataclasses.replace(tiny_config, lr=0.0, epochs=2, runs=1)
    result, _ = run_experiment(config, progress=False, data=digits8)
    run = result["runs"][0]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        np.testing.assert_allclose(run["doconv"][key], run["baseline"][key], rtol=1e-6, atol=1e-6)
    assert run["initial_max_abs_diff"] <= 1e-6


def test_tiny_run_end_to_end(digits8, tiny_config):
    result, twin = run_experiment(tiny_config, progress=False, data=digits8)
    assert result["data"] == {"name": "digits", "train": 96, "test": 48, "shape": [1, 8, 8], "classes": 10}
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for run in result["runs"]:
        for arm in ("baseline", "doconv"):
            assert len(run[arm]["val_acc"]) == 1 and run[f"{arm}_metric"] == run[arm]["val_acc"][-1]
        assert run["delta"] == run["doconv_metric"] - run["baseline_metric"]
    assert any(isinstance(m, DOConv2d) for m in twin.modules())
    # training moved D away from identity: the twin is no longer its baseline
    layer = next(m for m in twin.modules() if isinstance(m, DOConv2d))
    assert float(layer.D.detach().abs().max()) > 0
    json.dumps(result)  # JSON-ready
    # the same configuration reproduces the same numbers
    again, _ = run_experiment(tiny_config, progress=False, data=digits8)
    assert [r["delta"] for r in again["runs"]] == [r["delta"] for r in result["runs"]]


def test_metric_and_summary():
    history = {"val_acc": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]}
    assert final_metric(history) == 50.0  # mean of the last five epochs
    assert final_metric({"val_acc": [10.0, 30.0]}) == 20.0
    runs = [{"baseline_metric": 90.0, "doconv_metric": 91.0, "delta": 1.0},
            {"baseline_metric": 92.0, "doconv_metric": 92.5, "delta": 0.5},
            {"baseline_metric": 91.0, "doconv_metric": 92.5, "delta": 1.5}]
    s = summarize(runs)
    assert s["baseline"] == 91.0 and s["doconv"] == pytest.approx(92.0) and s["delta"] == pytest.approx(1.0)
    assert s["baseline_std"] == pytest.approx(1.0) and s["delta_std"] == pytest.approx(0.5)
    assert s["delta_exceeds_spread"] is True
    runs[2]["delta"] = -1.5
    assert summarize(runs)["delta_exceeds_spread"] is False
    assert summarize(runs[:1])["delta_exceeds_spread"] is False  # one run: no spread, no claim
    assert milestones(12) == [6, 9] and milestones(1) == [1]


def test_reports(tmp_path, digits8, tiny_config):
    result, _ = run_experiment(dataclasses.replace(tiny_config, runs=1), progress=False, data=digits8)
    paths = write_reports(result, str(tmp_path / "out"))
    text = open(paths["md"]).read()
    assert "| ResNet-v1-8 (width 2) | digits | 0,1,2,3 | identity | MN | 1 | 1 |" in text
    assert f"{result['summary']['delta']:+.2f}" in text and text == markdown(result)
    row = next(csv.DictReader(open(paths["csv"])))
    assert float(row["delta"]) == pytest.approx(result["summary"]["delta"]) and row == next(
        csv.DictReader(csv_text(result).splitlines()))
    assert json.load(open(paths["json"]))["summary"] == pytest.approx(result["summary"])


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["--model", "ResNet-v2", "--depth", "8", "--width", "2", "--epochs", "1", "--runs", "1",
                 "--image-size", "8", "--train-samples", "64", "--test-samples", "32", "--stages", "0,3",
                 "--d-mul", "(M+2)(N+2)", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| ResNet-v2-8 (width 2) | digits | 0,3 | identity | (M+2)(N+2) | 1 | 1 |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "heatmaps.png", "results.csv", "results.json",
                                                     "results.md"]
    assert json.load(open(out / "results.json"))["config"]["stages"] == [0, 3]


@pytest.mark.parametrize("argv,match", [
    (["--depth", "21"], "depth must be 6n"),
    (["--stages", "0,5"], "stages must be drawn from"),
    (["--stages", "a"], "--stages takes comma-separated"),
    (["--d-mul", "M**N"], "d_mul"),
    (["--dataset", "cifar10"], "needs --data-dir"),
    (["--epochs", "0"], "epochs must be a positive int"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_command_line_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv + ["--no-progress", "--out", "/nonexistent/never-written"])
    assert raised.value.code == 2 and match in capsys.readouterr().err
