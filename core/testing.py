"""Independent formulas and random inputs for the test suites of the core, the backends and the parity harness.

Nothing here is used by the specification itself: these are deliberately naive re-statements of the
definitions (loops, no im2col, no einsum string shared with :mod:`doconv.compose`), so a test comparing
the two can fail.
"""

import numpy as np

from .compose import init_params
from .config import PADDING_MODES, DOConvConfig


def naive_conv2d(x, kernel, bias, stride, pads, dilation, groups, mode="zeros"):
    """Loop-per-output-pixel cross-correlation written straight from the definition (no im2col)."""
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]
    xp = np.pad(x, ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])), mode=mode)
    b, cin, hp, wp = xp.shape
    cout, cin_g, m, n = kernel.shape
    cout_g = cout // groups
    ho = (hp - dilation[0] * (m - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (n - 1) - 1) // stride[1] + 1
    out = np.zeros((b, cout, ho, wo))
    for o in range(cout):
        g = o // cout_g
        for h in range(ho):
            for w in range(wo):
                patch = xp[:, g * cin_g:(g + 1) * cin_g,
                           h * stride[0]:h * stride[0] + dilation[0] * (m - 1) + 1:dilation[0],
                           w * stride[1]:w * stride[1] + dilation[1] * (n - 1) + 1:dilation[1]]
                out[:, o, h, w] = np.tensordot(patch, kernel[o], axes=3)
    if bias is not None:
        out += np.asarray(bias)[None, :, None, None]
    return out


def naive_compose(params, config):
    """W'[o, c, m] = sum_s D[(o // (C_out/g))*(C_in/g) + c, m, s] W[o, c, s], with explicit loops."""
    if params.D is None:
        return params.W.reshape(config.kernel_shape)
    out = np.zeros((config.out_channels, config.in_per_group, config.MN))
    for o in range(config.out_channels):
        for c in range(config.in_per_group):
            k = (o // config.out_per_group) * config.in_per_group + c
            out[o, c] = params.D[k] @ params.W[o, c]
    return out.reshape(config.kernel_shape)


def config_strategy(max_channels_per_group=3):
    """A hypothesis strategy of random valid configs with an input shape that fits (needs hypothesis)."""
    from hypothesis import strategies as st

    @st.composite
    def configs(draw):
        """Random valid DO-Conv configs with an input shape that fits them."""
        m, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        groups = draw(st.integers(1, 3))
        cin = groups * draw(st.integers(1, max_channels_per_group))
        cout = groups * draw(st.integers(1, max_channels_per_group))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        mn = m * n
        D_mul = None if mn == 1 else draw(st.sampled_from([None, mn, mn + 1, mn + 3, 2 * mn]))
        mode = draw(st.sampled_from(PADDING_MODES))
        padding = draw(st.one_of(
            st.sampled_from(["same", "valid"]),
            st.integers(0, 2),
            st.tuples(st.integers(0, 2), st.integers(0, 2)),
            st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.tuples(st.integers(0, 2), st.integers(0, 2)))))
        config = DOConvConfig(cin, cout, (m, n), stride=stride, padding=padding, dilation=dilation,
                                     groups=groups, bias=draw(st.booleans()), padding_mode=mode, D_mul=D_mul)
        span = (dilation[0] * (m - 1) + 1, dilation[1] * (n - 1) + 1)
        h = draw(st.integers(max(span[0], 3), span[0] + 5))
        w = draw(st.integers(max(span[1], 3), span[1] + 5))
        return config, (draw(st.integers(1, 2)), cin, h, w)

    return configs()


def random_params(config, seed=0, dtype=np.float64):
    """Random W, bias and D = I_fill + noise (never the identity)."""
    rng = np.random.default_rng(seed)
    p = init_params(config, rng=rng, dtype=np.float64)
    if p.D is not None:
        p.D = p.D + rng.normal(0, 0.5, size=p.D.shape)
    if p.bias is not None:
        p.bias = rng.normal(size=p.bias.shape)
    return p.astype(dtype)
