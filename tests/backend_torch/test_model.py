"""convert / fold on ResNet-18- and MobileNet-v2-shaped models, ONNX and torch.export of the folded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from doconv.torch import DOConv2d, convert, fold, fold_report


def _perturb(model, seed=1):
    """Move every DOConv2d away from identity init (D' and W), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d):
                m.D.add_(0.2 * torch.randn(m.D.shape, generator=g))
                m.W.add_(0.05 * torch.randn(m.W.shape, generator=g))
    return model


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_convert_keeps_outputs_and_fold_restores_the_model(zoo_model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = zoo_model(x)
    converted, report = convert(zoo_model, D_mul=None)
    spatial = [n for n, m in zoo_model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert [r.name for r in report if r.action == "converted"] == spatial
    assert all(r.reason.startswith("pointwise") for r in report if r.action == "skipped")
    assert isinstance(zoo_model.get_submodule(spatial[0]), nn.Conv2d)  # not in place by default
    assert "| module | action |" in str(report) and f"{len(spatial)} layer(s) converted" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), before, rtol=0, atol=1e-6)
    _perturb(converted)
    with torch.no_grad():
        trained = converted(x)
    folded = fold(converted)
    assert not any(isinstance(m, DOConv2d) for m in folded.modules())
    assert _count(folded) == _count(zoo_model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), trained, rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, DOConv2d) for m in converted.modules())  # fold copied too


def test_convert_trains_D(zoo_model):
    converted, _ = convert(zoo_model.train())
    loss = converted(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    layers = [m for m in converted.modules() if isinstance(m, DOConv2d)]
    assert all(m.D.grad is not None and m.D.grad.abs().sum() > 0 for m in layers)


def test_include_exclude_inplace_and_D_mul():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 5)))
    out, report = convert(model, include="1.*", exclude=["1.1"], D_mul=12, inplace=True)
    assert out is model
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1][1], nn.Conv2d)
    assert isinstance(model[1][0], DOConv2d) and model[1][0].D_mul == 12
    assert [(r.name, r.action, r.reason) for r in report if r.action == "skipped"] == \
        [("0", "skipped", "not included"), ("1.1", "skipped", "excluded")]
    assert [r.name for r in report if r.action == "converted"] == ["1.0"]
    _, report = convert(model, include=lambda name, m: m.kernel_size == (5, 5))
    assert [r.name for r in report if r.action == "converted"] == ["1.1"]
    with pytest.raises(ValueError, match="D_mul must be >= M\\*N = 25"):
        convert(model, D_mul=12)
    with pytest.raises(TypeError, match="include"):
        convert(model, include=[3])
    with pytest.raises(TypeError, match="model"):
        convert("resnet")


def test_convert_skips_conv_subclasses_and_keeps_padding_forms():
    class Custom(nn.Conv2d):
        pass

    model = nn.Sequential(Custom(3, 3, 3), nn.Conv2d(3, 3, 4, padding="same", padding_mode="reflect"),
                          nn.Conv2d(3, 3, 3, padding="valid", dtype=torch.float64).float())
    converted, report = convert(model)
    assert [r.action for r in report] == ["skipped", "converted", "converted"]
    x = torch.randn(1, 3, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-6)


def test_random_d_init_changes_outputs_but_keeps_W():
    conv = nn.Conv2d(3, 4, 3)
    converted, _ = convert(nn.Sequential(conv), d_init="random")
    layer = converted[0]
    torch.testing.assert_close(layer.W.reshape(4, 3, 3, 3), conv.weight)
    assert layer.D.abs().sum() > 0


def test_fold_report_and_per_side_padding():
    model = nn.Sequential(DOConv2d(3, 4, 3, padding=((0, 2), (1, 0)), padding_mode="reflect"),
                          DOConv2d(4, 4, 3, stride=2, padding="same"))
    _perturb(model)
    folded, report = fold_report(model)
    assert [r.action for r in report] == ["folded", "folded"] and "2 layer(s) folded" in str(report)
    x = torch.randn(1, 3, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


def _folded_example():
    torch.manual_seed(0)
    model = nn.Sequential(DOConv2d(3, 8, 3, padding=1), nn.ReLU(), DOConv2d(8, 8, 3, groups=4, padding="same"),
                          nn.ReLU(), DOConv2d(8, 4, 3, padding=((1, 0), (0, 1)), padding_mode="reflect"))
    _perturb(model)
    return model.eval(), torch.randn(2, 3, 10, 11)


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
def test_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path, folded):
    ort = pytest.importorskip("onnxruntime")
    model, x = _folded_example()
    with torch.no_grad():
        expected = model(x).numpy()
    path = tmp_path / "model.onnx"
    torch.onnx.export(fold(model) if folded else model, (x,), str(path), input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_torch_export_of_folded_and_unfolded_models():
    model, x = _folded_example()
    with torch.no_grad():
        expected = model(x)
    for candidate in (fold(model), model):
        program = torch.export.export(candidate, (x,))
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_trace_records_the_composition_and_saves(tmp_path, mode):
    """A trace is a graph of W and D (no cached constant, no Python call), survives save/load, and
    follows later updates of W, D in place, as a traced nn.Conv2d follows its weight."""
    model, x = _folded_example()
    model = model.train(mode == "train")
    with torch.no_grad():
        model(x)  # an eval cache filled before tracing must not become a constant of the trace
    traced = torch.jit.trace(model, x)
    path = tmp_path / "traced.pt"
    torch.jit.save(traced, str(path))
    x2 = torch.randn(3, 3, 10, 11)
    torch.testing.assert_close(torch.jit.load(str(path))(x2), model(x2), rtol=1e-5, atol=1e-5)
    _perturb(model, seed=2)
    torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_jit_script_says_to_fold_first():
    model, _ = _folded_example()
    with pytest.raises(NotImplementedError, match=r"fold the model first"):
        torch.jit.script(model)
    with pytest.raises(NotImplementedError, match=r"FoldedConv2d \(padding=\(\(1, 0\), \(0, 1\)\)"):
        torch.jit.script(fold(model))
    scripted = torch.jit.script(fold(model[:3]))  # plain nn.Conv2d's script as usual
    x = torch.randn(2, 3, 10, 11)
    torch.testing.assert_close(scripted(x), model[:3](x), rtol=1e-5, atol=1e-5)
