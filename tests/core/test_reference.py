"""The reference convolution against a loop-per-pixel formula; feature == kernel composition; VJPs."""

import numpy as np
import pytest

import doconv
import doconv.testing
from doconv.cases import CASES
from doconv.selfcheck import check_vjp

from doconv.testing import naive_conv


def test_conv_matches_the_definition_on_every_case(case):
    c = case.config
    x = case.input(1)
    kernel = np.random.default_rng(2).normal(size=c.kernel_shape)
    bias = np.random.default_rng(3).normal(size=c.out_channels) if c.bias else None
    ours = doconv.conv(x, kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                         groups=c.groups, padding_mode=c.padding_mode)
    expected = naive_conv(x, kernel, bias, c.stride, c.pads(*x.shape[2:]), c.dilation, c.groups, c.padding_mode)
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_kernel_and_feature_composition_agree(case):
    c, p, x = case.config, case.params(4), case.input(4)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        k = doconv.forward(x.astype(dtype), p.astype(dtype), c, composition="kernel")
        f = doconv.forward(x.astype(dtype), p.astype(dtype), c, composition="feature")
        assert doconv.max_error(f, k) <= tol


def test_conv2d_is_conv_for_2d_only():
    case = CASES[2]
    c, x = case.config, case.input(0)
    kernel = np.random.default_rng(1).normal(size=c.kernel_shape)
    geometry = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
    np.testing.assert_array_equal(doconv.conv2d(x, kernel, **geometry), doconv.conv(x, kernel, **geometry))
    with pytest.raises(ValueError, match=r"conv2d takes a 4-D x .* doconv.conv takes any rank"):
        doconv.conv2d(x[..., 0], kernel[..., 0])


def test_causal_padding_sees_no_future_sample():
    """padding='causal': the output at t is unchanged by inputs after t, and the output is as long as the input."""
    c = doconv.DOConvConfig(2, 3, 3, dilation=2, padding="causal", rank=1)
    p = doconv.testing.random_params(c, 0)
    x = np.random.default_rng(1).normal(size=(1, 2, 12))
    y = doconv.forward(x, p, c)
    assert y.shape == (1, 3, 12)
    later = x.copy()
    later[..., 7:] += 5.0
    np.testing.assert_array_equal(doconv.forward(later, p, c)[..., :7], y[..., :7])
    assert np.abs(doconv.forward(later, p, c)[..., 7:] - y[..., 7:]).min() > 0


def test_auto_composition_runs_the_cheaper(monkeypatch):
    c = doconv.DOConvConfig(4, 4, 3, padding=1)
    p, x = doconv.init_params(c, rng=0, dtype=np.float64), np.ones((1, 4, 5, 5))
    seen = []
    import doconv.reference as reference
    real = reference.conv
    monkeypatch.setattr(reference, "conv", lambda *a, **k: seen.append(k.get("groups")) or real(*a, **k))
    doconv.forward(x, p, c, composition="auto")
    expected = doconv.choose_composition(c, x.shape)
    assert seen == ([1] if expected == "kernel" else [4, 1])
    with pytest.raises(ValueError, match="composition must be one of"):
        doconv.forward(x, p, c, composition="fused")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer_vjp_matches_finite_differences(case):
    assert check_vjp(case) <= 1e-6


@pytest.mark.parametrize("mode", doconv.PADDING_MODES)
def test_pad_vjp_is_the_adjoint_of_pad(mode):
    """<pad(x), y> == <x, pad_vjp(y)> for random x, y: the defining property of an adjoint."""
    from doconv.reference import pad, pad_vjp
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 5, 6))
    pads = ((2, 1), (0, 3))
    y = rng.normal(size=pad(x, pads, mode).shape)
    assert np.isclose(np.sum(pad(x, pads, mode) * y), np.sum(x * pad_vjp(y, pads, mode, (5, 6))), rtol=1e-12)


def test_conv2d_rejects_bad_input_clearly():
    x, k = np.zeros((1, 4, 5, 5)), np.zeros((6, 2, 3, 3))
    with pytest.raises(ValueError, match="x has 4 channels but kernel"):
        doconv.conv2d(x, k, groups=1)
    with pytest.raises(ValueError, match="4-D"):
        doconv.conv2d(x[0], k, groups=2)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        doconv.conv2d(x, k, groups=2, dilation=3)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        doconv.conv2d(x, k, groups=2, padding=1, padding_mode="mirror")
    with pytest.raises(ValueError, match="divisible by groups=4"):
        doconv.conv2d(np.zeros((1, 4, 5, 5)), np.zeros((6, 1, 3, 3)), groups=4)


def test_misshapen_params_are_refused_not_computed():
    config = doconv.DOConvConfig(4, 6, 3, groups=2)
    p = doconv.init_params(config, rng=0, d_init="random")
    x = np.zeros((1, 4, 5, 5))
    for bad, name in ((doconv.DOConvParams(p.W.reshape(6, 9, 2), p.D, p.bias), "W"),
                      (doconv.DOConvParams(p.W, None, p.bias), "D"),
                      (doconv.DOConvParams(p.W, p.D, np.zeros((6, 1))), "bias")):
        calls = [lambda: doconv.forward(x, bad, config), lambda: doconv.fold(bad, config)]
        if name != "bias":  # compose reads W and D only
            calls.append(lambda: doconv.compose(bad, config))
        for call in calls:
            with pytest.raises(ValueError, match=rf"{name} has shape"):
                call()


def test_empty_batch_and_pads_torch_refuses():
    config = doconv.DOConvConfig(4, 6, 3, groups=2)
    p = doconv.init_params(config, rng=0, d_init="random")
    for composition in ("kernel", "feature", "auto"):
        assert doconv.forward(np.zeros((0, 4, 5, 5)), p, config, composition=composition).shape == (0, 6, 3, 3)
    with pytest.raises(ValueError,
                       match=r"padding_mode='reflect' needs each pad < the input height 2, but got pads \(3, 3\)"):
        doconv.conv2d(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)), padding=3, padding_mode="reflect")
    with pytest.raises(ValueError,
                       match=r"padding_mode='circular' needs each pad <= the input height 2 .*pads \(3, 3\)"):
        doconv.conv2d(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)), padding=3, padding_mode="circular")


def test_small_argument_checks():
    assert doconv.max_error(np.zeros(3), 1j * np.ones(3)) == 1.0  # the imaginary part counts
    with pytest.raises(ValueError, match=r"margin must be in \[0, 1\), but got margin='0.1'"):
        doconv.choose_composition(doconv.DOConvConfig(4, 4, 3), (1, 4, 5, 5), margin="0.1")
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype, but got dtype=int32"):
        doconv.init_params(doconv.DOConvConfig(4, 4, 3), dtype=np.int32)
