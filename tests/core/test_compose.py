"""Composition, pairing, initialisation and fold against independent formulas, with D randomised."""

import numpy as np
import pytest

import doconv
from doconv import DOConvConfig, DOConvParams
from doconv.compose import identity_fill, init_params, pairing_index

from doconv.testing import naive_compose, random_params


def test_compose_matches_the_papers_formula_on_every_case(case):
    config, params = case.config, case.params(seed=7)
    np.testing.assert_allclose(doconv.compose(params, config), naive_compose(params, config), rtol=1e-12, atol=1e-12)


def test_grouped_pairing_is_pinned():
    """STYLE.md example: C_in=6, C_out=9, g=3: output 3 reads input channel 2 (paper); official torch 0, TF 1."""
    c = DOConvConfig(6, 9, 3, groups=3)
    assert pairing_index(c)[3, 0] == 2
    assert pairing_index(c, "official-torch")[3, 0] == 0
    assert pairing_index(c, "official-tf")[3, 0] == 1
    # a composed row changes only with the D slice it is paired with
    p = random_params(c, seed=1)
    before = doconv.compose(p, c)
    p.D[2] += 1.0
    after = doconv.compose(p, c)
    changed = np.argwhere(np.abs(after - before).sum(axis=(2, 3)) > 0)
    assert {tuple(x) for x in changed} == {(3, 0), (4, 0), (5, 0)}


@pytest.mark.parametrize("pairing", ["official-torch", "official-tf"])
def test_pairings_agree_at_identity_and_differ_once_D_trains(pairing):
    c = DOConvConfig(4, 6, 3, groups=2)
    p = init_params(c, rng=0, dtype=np.float64)
    np.testing.assert_array_equal(doconv.compose(p, c), doconv.compose(p, c, pairing=pairing))
    q = random_params(c, seed=2)
    assert np.abs(doconv.compose(q, c) - doconv.compose(q, c, pairing=pairing)).max() > 1e-2


def test_pairings_coincide_where_the_issue_says():
    dense, depthwise, multiplier = DOConvConfig(4, 6, 3), DOConvConfig(4, 4, 3, groups=4), DOConvConfig(4, 8, 3, groups=4)
    for c in (dense, depthwise):
        for name in ("official-torch", "official-tf"):
            np.testing.assert_array_equal(pairing_index(c), pairing_index(c, name))
    np.testing.assert_array_equal(pairing_index(multiplier), pairing_index(multiplier, "official-tf"))
    assert not np.array_equal(pairing_index(multiplier), pairing_index(multiplier, "official-torch"))
    with pytest.raises(ValueError, match="pairing must be one of"):
        pairing_index(dense, "official-jax")


@pytest.mark.parametrize("mn, s", [(4, 4), (9, 12), (4, 8), (9, 4)])
def test_identity_fill(mn, s):
    fill = identity_fill(mn, s)
    for start in range(0, s - mn + 1, mn):
        np.testing.assert_array_equal(fill[:, start:start + mn], np.eye(mn))
    whole = (s // mn) * mn
    if s >= mn:
        assert not fill[:, whole:].any()            # the remainder is zero (paper Section 4)
    else:
        np.testing.assert_array_equal(fill, np.eye(mn, s))


@pytest.mark.parametrize("kwargs", [dict(), dict(groups=2), dict(groups=4, out_channels=8), dict(kernel_size=(3, 1))])
def test_identity_init_gives_W_prime_equal_W(kwargs):
    c = DOConvConfig(**{"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kwargs})
    p = init_params(c, rng=3)
    np.testing.assert_array_equal(doconv.compose(p, c).reshape(c.W_shape), p.W)


def test_identity_init_with_larger_D_mul_sums_the_tiles():
    c = DOConvConfig(2, 3, 2, D_mul=9)       # MN = 4: two whole identities, one zero column
    p = init_params(c, rng=4, dtype=np.float64)
    expected = p.W[..., :4] + p.W[..., 4:8]
    np.testing.assert_allclose(doconv.compose(p, c).reshape(3, 2, 4), expected, rtol=1e-14)


def test_init_distributions_and_errors():
    c = DOConvConfig(16, 32, 3, D_mul=12)
    p = init_params(c, rng=0)
    bound = 1 / np.sqrt(16 * 9)
    assert p.W.dtype == np.float32 and np.abs(p.W).max() <= bound and np.abs(p.W).max() > 0.9 * bound
    assert np.abs(p.bias).max() <= bound
    r = init_params(c, d_init="random", rng=0, dtype=np.float64)
    assert abs(r.D.std() - np.sqrt(2 / 9)) < 0.02          # He init with fan-in MN (Table 7)
    with pytest.raises(ValueError, match="d_init must be one of"):
        init_params(c, d_init="orthogonal")


def test_compose_vjp_matches_finite_differences(case):
    c, p = case.config, case.params(seed=8)
    rng = np.random.default_rng(9)
    g = rng.normal(size=c.kernel_shape)
    dW, dD = doconv.compose_vjp(g, p, c)
    for name, grad in (("W", dW), ("D", dD)):
        if grad is None:
            assert p.D is None
            continue
        v = rng.normal(size=grad.shape)
        shifted = lambda t: DOConvParams(**{**vars(p), name: getattr(p, name) + t * v})  # noqa: E731
        numeric = (np.sum(g * doconv.compose(shifted(1e-6), c)) - np.sum(g * doconv.compose(shifted(-1e-6), c))) / 2e-6
        assert abs(numeric - np.sum(grad * v)) <= 1e-6 * max(1, abs(numeric))


def test_fold_and_params_for_kernel():
    c = DOConvConfig(4, 6, 3, groups=2, D_mul=13)
    p = random_params(c, seed=10)
    kernel, bias = doconv.fold(p, c)
    np.testing.assert_array_equal(bias, p.bias)
    back = doconv.params_for_kernel(kernel, c, bias)
    np.testing.assert_allclose(doconv.compose(back, c), kernel, rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel has shape"):
        doconv.params_for_kernel(kernel[:, :, :2], c)


def test_params_check_names_the_array():
    c = DOConvConfig(4, 6, 3)
    p = init_params(c)
    p.check(c)
    with pytest.raises(ValueError, match=r"D has shape \(4, 9, 10\)"):
        DOConvParams(p.W, np.zeros((4, 9, 10)), p.bias).check(c)
    with pytest.raises(ValueError, match="bias has shape None"):
        DOConvParams(p.W, p.D, None).check(c)
