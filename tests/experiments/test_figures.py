"""Fig. 6 heat maps (H = sum over (C_out, C_in/g) of |W' - W|) and Fig. 5 curves."""

import numpy as np
import pytest
import torch
from torch import nn

import doconv
from doconv.cases import select
from doconv.torch import DOConv2d, UNSUPPORTED_FEATURES, get_params, layer_from_config, set_params
from doconv.experiments import (kernel_difference, layer_difference, model_differences, plot_curves, plot_heatmaps,
                                plot_model_heatmaps)

PNG = b"\x89PNG\r\n\x1a\n"
CASES_WITH_D = [c for c in select(UNSUPPORTED_FEATURES) if c.config.has_D]


def test_h_of_a_constructed_layer():
    # D = I + e at one entry (channel k, tap m0, depth s0): W' - W = e * W[o, k, s0] at tap m0 for every
    # output o, and zero elsewhere, so H[m0] = |e| * sum_o |W[o, k, s0]| and every other tap of H is 0.
    config = doconv.DOConvConfig(3, 4, 3, padding=1)
    rng = np.random.default_rng(0)
    W = rng.normal(size=config.W_shape)
    D = doconv.identity_D(config)
    k, m0, s0, e = 1, 5, 2, -0.7
    D[k, m0, s0] += e
    layer = layer_from_config(config, dtype="float64")
    set_params(layer, doconv.DOConvParams(W, D, np.zeros(4)))
    want = np.zeros(9)
    want[m0] = abs(e) * np.abs(W[:, k, s0]).sum()
    np.testing.assert_allclose(layer_difference(layer), want.reshape(3, 3), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernel_difference(doconv.DOConvParams(W, D), config), want.reshape(3, 3),
                               rtol=1e-12, atol=1e-12)


def test_h_is_zero_at_identity_init():
    layer = DOConv2d(4, 6, 3, D_mul=18)  # D_mul = 2MN: W' = W[..., :9] + W[..., 9:], W[..., 9:] = 0 after convert
    with torch.no_grad():
        layer.W[..., 9:] = 0
    assert np.abs(layer_difference(layer)).max() == 0


@pytest.mark.parametrize("case", CASES_WITH_D, ids=str)
def test_h_matches_the_layers_own_kernel(case):
    # the shared case table with D randomised; W' comes from the layer (torch), not from doconv.compose
    config = case.config
    layer = layer_from_config(config, dtype="float64")
    set_params(layer, case.params(seed=3))
    if config.S < config.MN:
        with pytest.raises(ValueError, match="depthwise-separable layer"):
            layer_difference(layer)
        return
    composed = layer.weight.detach().numpy()
    W = get_params(layer).W[..., :config.MN].reshape(config.kernel_shape)
    np.testing.assert_allclose(layer_difference(layer), np.abs(composed - W).sum(axis=(0, 1)), rtol=1e-10)
    assert layer_difference(layer).shape == config.kernel_size


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(DOConv2d(1, 2, 3)),
                         nn.Sequential(DOConv2d(2, 2, 3, D_mul=25), nn.Conv2d(2, 2, 3), DOConv2d(2, 2, (1, 5)),
                                       DOConv2d(2, 2, 1)))


def test_model_differences_groups_by_stage():
    model = _model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DOConv2d) and m.D is not None:
                m.D.normal_()
    groups = model_differences(model)
    assert list(groups) == ["0", "1"]
    assert [n for n, _ in groups["1"]] == ["1.0", "1.2"]  # plain conv and 1x1 DO-Conv have no map
    assert groups["1"][1][1].shape == (1, 5)
    np.testing.assert_array_equal(groups["0"][0][1], layer_difference(model[0][0]))
    assert all(h.max() > 0 for layers in groups.values() for _, h in layers)


def test_heatmap_and_curve_files(tmp_path):
    path = plot_model_heatmaps(_model(), str(tmp_path / "h.png"), title="t")
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG
    plot_heatmaps({"stage1": [("a", np.arange(9.0).reshape(3, 3))]}, str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no DO-Conv layer"):
        plot_heatmaps({}, str(tmp_path / "none.png"))
    history = {k: [1.0, 0.5] for k in ("train_loss", "val_loss")} | {k: [50.0, 100.0] for k in ("train_acc", "val_acc")}
    runs = [{"baseline": history, "doconv": history}] * 2
    plot_curves(runs, str(tmp_path / "curves.png"), title="c")
    with open(tmp_path / "curves.png", "rb") as handle:
        assert handle.read(8) == PNG
    with pytest.raises(ValueError, match="runs is empty"):
        plot_curves([], str(tmp_path / "x.png"))
