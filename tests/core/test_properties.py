"""Property-based tests (hypothesis) over random valid configs, D always randomised."""

import numpy as np
from hypothesis import given, settings

import doconv
from doconv import DOConvParams
from doconv.selfcheck import layer_vjp
from doconv.testing import config_strategy, naive_compose, naive_conv, random_params

SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(config_strategy())
def test_kernel_composition_equals_feature_composition(drawn):
    config, shape = drawn
    x = np.random.default_rng(0).normal(size=shape)
    p = random_params(config, 1)
    k = doconv.forward(x, p, config, composition="kernel")
    assert doconv.max_error(doconv.forward(x, p, config, composition="feature"), k) <= 1e-12


@SETTINGS
@given(config_strategy())
def test_fold_equals_unfolded_forward_and_the_naive_formulas(drawn):
    config, shape = drawn
    x = np.random.default_rng(2).normal(size=shape)
    p = random_params(config, 3)
    kernel, bias = doconv.fold(p, config)
    np.testing.assert_allclose(kernel, naive_compose(p, config), rtol=1e-12, atol=1e-12)
    folded = naive_conv(x, kernel, bias, config.stride, config.pads(*shape[2:]), config.dilation, config.groups,
                          config.padding_mode)
    assert doconv.max_error(doconv.forward(x, p, config), folded) <= 1e-12


@SETTINGS
@given(config_strategy())
def test_identity_init_keeps_W_when_S_is_MN(drawn):
    config, _ = drawn
    p = doconv.init_params(config, rng=4, dtype=np.float64)
    composed = doconv.compose(p, config).reshape(config.out_channels, config.in_per_group, config.MN)
    tiles = sum(p.W[..., s:s + config.MN] for s in range(0, config.S - config.MN + 1, config.MN))
    np.testing.assert_allclose(composed, tiles, rtol=1e-12, atol=1e-15)
    if config.S == config.MN:
        np.testing.assert_array_equal(composed, p.W)


@settings(max_examples=40, deadline=None)
@given(config_strategy())
def test_vjps_match_finite_differences(drawn):
    config, shape = drawn
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape)
    p = random_params(config, 6)
    u = rng.normal(size=config.output_shape(shape))
    grads = layer_vjp(u, x, p, config)
    for name, grad in grads.items():
        v = rng.normal(size=grad.shape)

        def f(t):
            q = DOConvParams(p.W, p.D, p.bias)
            if name != "x":
                setattr(q, name, getattr(p, name) + t * v)
            return np.sum(u * doconv.forward(x + t * v if name == "x" else x, q, config))

        numeric = (f(1e-6) - f(-1e-6)) / 2e-6
        assert abs(numeric - np.sum(grad * v)) <= 1e-6 * max(1.0, abs(numeric)), name
