"""Framework layouts and the official code's checkpoints (exact composed kernels via the index maps)."""

import numpy as np
import pytest

import doconv
from doconv import DOConvConfig, layouts
from doconv.cases import CASES
from doconv.compose import identity_fill
from doconv.selfcheck import official_tf_kernel


def official_torch_kernel(W, D_delta, config):
    """The official PyTorch arithmetic, from its description: D = D' + d_diag; W reshaped to
    (C_out/g, C_in, S); einsum 'ims,ois->oim'; reshaped to (C_out, C_in/g, M, N)."""
    D = D_delta + identity_fill(config.MN, config.S)[None]
    Wr = W.reshape(config.out_per_group, config.in_channels, config.S)
    return np.einsum("ims,ois->oim", D, Wr).reshape(config.kernel_shape)


def official_gluon_kernel(weight, D_delta, config):
    """The official GluonCV arithmetic: the conv weight (C_out, C_in/g, M, N) moved to (M, N, C_in/g, C_out)
    is W of shape (MN, C_in, C_out/g); then as TensorFlow."""
    kernel = weight.transpose(2, 3, 1, 0).reshape(config.MN, config.in_per_group, config.out_channels)
    return official_tf_kernel(kernel, D_delta, config)


def official_arrays(config, flavour, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s) for k, s in layouts.official_shapes(config, flavour).items() if k != "d_diag"}


def expressible_in_paper_pairing(config, flavour):
    return flavour != "torch" or config.groups == 1 or config.out_per_group == 1


@pytest.mark.parametrize("case", [c for c in CASES if c.config.has_D and c.rank == 2], ids=lambda c: c.id)
@pytest.mark.parametrize("flavour", ["torch", "tf", "gluon"])
def test_official_import_reproduces_the_official_kernel(case, flavour):
    c = case.config
    if flavour == "gluon" and c.S != c.MN:
        with pytest.raises(ValueError, match="only D_mul = M\\*N"):
            layouts.official_shapes(c, "gluon")
        return
    a = official_arrays(c, flavour)
    expected = {"torch": lambda: official_torch_kernel(a["W"], a["D"], c),
                "tf": lambda: official_tf_kernel(a["kernel"], a["D"], c),
                "gluon": lambda: official_gluon_kernel(a["weight"], a["D"], c)}[flavour]()
    if expressible_in_paper_pairing(c, flavour):
        params = layouts.from_official(a, c, flavour)
        np.testing.assert_allclose(doconv.compose(params, c), expected, rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="refold=True"):
            layouts.from_official(a, c, flavour)
        if c.S < c.MN:  # refolding writes the official W' into W: a rank-S layer cannot hold it
            with pytest.raises(ValueError, match="cannot hold an arbitrary kernel"):
                layouts.from_official(a, c, flavour, refold=True)
            return
    params = layouts.from_official(a, c, flavour, refold=True)
    np.testing.assert_allclose(doconv.compose(params, c), expected, rtol=1e-12, atol=1e-12)
    if c.bias:
        np.testing.assert_array_equal(params.bias, a["bias"])


def test_refold_is_needed_exactly_for_official_torch_grouped_with_several_outputs_per_group():
    a_grouped = DOConvConfig(4, 6, 3, groups=2)
    assert not expressible_in_paper_pairing(a_grouped, "torch")
    arrays = official_arrays(a_grouped, "torch", seed=1)
    with pytest.raises(ValueError, match="cannot be expressed in the paper's pairing"):
        layouts.from_official(arrays, a_grouped, "torch")
    one_per_group = DOConvConfig(4, 2, 3, groups=2)
    params = layouts.from_official(official_arrays(one_per_group, "torch"), one_per_group, "torch")
    assert params.D.shape == one_per_group.D_shape


def test_official_torch_d_diag_is_used_when_present():
    c = DOConvConfig(3, 4, 3, D_mul=12)
    a = official_arrays(c, "torch")
    a["d_diag"] = np.broadcast_to(identity_fill(9, 12), (3, 9, 12)).copy()
    np.testing.assert_allclose(doconv.compose(layouts.from_official(a, c, "torch"), c),
                               official_torch_kernel(a["W"], a["D"], c), rtol=1e-12)


def test_official_checkpoint_errors_name_the_entry():
    c = DOConvConfig(4, 6, 3)
    a = official_arrays(c, "tf")
    with pytest.raises(ValueError, match="missing 'D'"):
        layouts.from_official({k: v for k, v in a.items() if k != "D"}, c, "tf")
    with pytest.raises(ValueError, match=r"'kernel' has shape \(9, 4, 7\), expected \(9, 4, 6\)"):
        layouts.from_official({**a, "kernel": np.zeros((9, 4, 7))}, c, "tf")
    with pytest.raises(ValueError, match="unexpected entries \\['extra'\\]"):
        layouts.from_official({**a, "extra": np.zeros(1)}, c, "tf")
    with pytest.raises(ValueError, match="flavour must be one of"):
        layouts.from_official(a, c, "caffe")
    for bad in (np.nan, np.inf, -np.inf):  # refused as interchange files refuse them, naming the entry
        damaged = a["D"].copy()
        damaged.flat[[3, 7]] = bad
        with pytest.raises(ValueError, match=r"'D' holds 2 NaN or infinite value\(s\) of 324"):
            layouts.from_official({**a, "D": damaged}, c, "tf")


def test_kernel_and_input_layouts_round_trip():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(6, 2, 3, 5))
    np.testing.assert_array_equal(layouts.hwio_to_oihw(layouts.oihw_to_hwio(k)), k)
    assert layouts.oihw_to_hwio(k)[1, 4, 0, 5] == k[5, 0, 1, 4]
    x = rng.normal(size=(2, 3, 4, 5))
    np.testing.assert_array_equal(layouts.nhwc_to_nchw(layouts.nchw_to_nhwc(x)), x)
    dw = rng.normal(size=(3, 3, 4, 2))                    # Keras DepthwiseConv2D (M, N, C_in, mult)
    oihw = layouts.depthwise_hwcm_to_oihw(dw)
    assert oihw.shape == (8, 1, 3, 3) and oihw[2 * 2 + 1, 0, 0, 2] == dw[0, 2, 2, 1]   # output c*mult + k
    np.testing.assert_array_equal(layouts.oihw_to_depthwise_hwcm(oihw, 4), dw)


def test_layouts_take_every_rank():
    rng = np.random.default_rng(1)
    k1, k3 = rng.normal(size=(6, 2, 5)), rng.normal(size=(6, 2, 3, 4, 5))   # (O, I, K), (O, I, T, M, N)
    assert layouts.oihw_to_hwio(k1)[4, 1, 3] == k1[3, 1, 4]                 # Keras Conv1D (K, I, O)
    assert layouts.oihw_to_hwio(k3)[2, 3, 4, 1, 5] == k3[5, 1, 2, 3, 4]     # Keras Conv3D (T, M, N, I, O)
    for k in (k1, k3):
        np.testing.assert_array_equal(layouts.hwio_to_oihw(layouts.oihw_to_hwio(k)), k)
    x = rng.normal(size=(2, 3, 4, 5, 6))
    assert layouts.nchw_to_nhwc(x)[1, 2, 3, 4, 0] == x[1, 0, 2, 3, 4]
    np.testing.assert_array_equal(layouts.nhwc_to_nchw(layouts.nchw_to_nhwc(x)), x)
    dw = rng.normal(size=(5, 4, 2))                                        # Keras DepthwiseConv1D (K, C_in, mult)
    grouped = layouts.depthwise_hwcm_to_oihw(dw)
    assert grouped.shape == (8, 1, 5) and grouped[2 * 2 + 1, 0, 3] == dw[3, 2, 1]
    np.testing.assert_array_equal(layouts.oihw_to_depthwise_hwcm(grouped, 4), dw)


def test_official_checkpoints_are_2d_only():
    for rank in (1, 3):
        c = DOConvConfig(4, 6, 3, rank=rank)
        with pytest.raises(ValueError, match=rf"^official DO-Conv checkpoints hold 2-D layers only .* rank={rank} "
                                             rf"\(DOConvConfig\(.*canonical file"):
            layouts.from_official(official_arrays(DOConvConfig(4, 6, 3), "tf"), c, "tf")
        # what the backends pass: a layer's spec (its C_in may be unknown yet) and the layer's name and class
        spec = doconv.contract.LayerSpec(6, 3, rank=rank)
        with pytest.raises(ValueError, match=rf"^layer 'conv' is a DOConv{rank}d: official DO-Conv checkpoints hold "
                                             rf"2-D layers only .* rank={rank} \(LayerSpec\("):
            layouts.check_official_rank(spec, where=f"layer 'conv' is a DOConv{rank}d")
    layouts.check_official_rank(DOConvConfig(4, 6, 3), where="layer 'conv' is a DOConv2d")
    layouts.check_official_rank(doconv.contract.LayerSpec(6, 3))


def test_delta_round_trip():
    c = DOConvConfig(2, 2, 3, D_mul=11)
    D = np.random.default_rng(0).normal(size=c.D_shape)
    np.testing.assert_allclose(layouts.delta_to_D(layouts.D_to_delta(D, c), c), D, rtol=0, atol=1e-15)
    assert not layouts.D_to_delta(doconv.identity_D(c), c).any()
