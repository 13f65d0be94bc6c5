"""Import of the official GluonCV DO-Conv layer's parameters: exact outputs for every expressible case.

The official layer (yangyanli/DO-Conv, do_conv_gluoncv.py) keeps the conv's own ``weight`` (C_out, C_in/g, M, N)
as W with D_mul = M*N and trains a delta ``D`` (MN, MN, C_in). Its arithmetic, re-implemented here from that
description: move the weight to (M, N, C_in/g, C_out), read it as (MN, C_in, C_out/g), compose
``W'[m, i, o] = sum_s (D + I)[m, s, i] * W[s, i, o]``, read that back as (M, N, C_in/g, C_out) and return to OIHW.
"""

import numpy as np
import pytest

import doconv
from doconv.mxnet import UNSUPPORTED_FEATURES, import_official, layer_from_config
from doconv.mxnet._mx import mx

CASES = [c for c in doconv.cases.select(UNSUPPORTED_FEATURES) if c.config.D_mul == c.config.MN]


def official_gluon_kernel(weight, D_delta, config):
    m, n = config.kernel_size
    mn = m * n
    w = weight.transpose(2, 3, 1, 0).reshape(mn, config.in_channels, -1)
    D = D_delta + np.eye(mn)[:, :, None]
    return np.einsum("msi,sio->mio", D, w).reshape(m, n, config.in_per_group, config.out_channels) \
        .transpose(3, 2, 0, 1)


@pytest.mark.parametrize("prefixed", [False, True], ids=["plain", "gluon-prefixed"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_official_gluon_parameters_give_the_official_outputs(case, prefixed):
    c = case.config
    rng = np.random.default_rng(21)
    arrays = {"weight": rng.normal(size=c.kernel_shape)}
    if c.has_D:
        arrays["D"] = rng.normal(0, 0.3, size=(c.MN, c.MN, c.in_channels))
    if c.bias:
        arrays["bias"] = rng.normal(size=c.out_channels)
    layer = layer_from_config(c, dtype="float64")
    import_official(layer, {("doconv2d0_" + k if prefixed else k): v for k, v in arrays.items()})
    kernel = official_gluon_kernel(arrays["weight"], arrays["D"], c) if c.has_D else arrays["weight"]
    x = case.input(21, np.float64)
    want = doconv.conv2d(x, kernel, arrays.get("bias"), stride=c.stride, padding=c.padding, dilation=c.dilation,
                         groups=c.groups)
    got = layer(mx.nd.array(x, dtype="float64")).asnumpy()
    doconv.assert_close(got, want, "float64", f"{case.id} official import")


def test_official_import_errors_name_the_problem():
    c = doconv.DOConvConfig(4, 6, 3, padding=1)
    layer = layer_from_config(c)
    with pytest.raises(ValueError, match="missing 'D'"):
        import_official(layer, {"weight": np.zeros(c.kernel_shape), "bias": np.zeros(6)})
    with pytest.raises(ValueError, match=r"'D' has shape \(9, 9, 3\), expected \(9, 9, 4\)"):
        import_official(layer, {"weight": np.zeros(c.kernel_shape), "D": np.zeros((9, 9, 3)), "bias": np.zeros(6)})
    wide = layer_from_config(doconv.DOConvConfig(4, 6, 3, padding=1, D_mul=12))
    with pytest.raises(ValueError, match="only D_mul = M\\*N"):
        import_official(wide, {"weight": np.zeros(c.kernel_shape)})
