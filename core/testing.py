"""Independent formulas and random inputs for the test suites of the core, the backends and the parity harness.

Nothing here is used by the specification itself: these are deliberately naive re-statements of the
definitions (loops, no im2col, no einsum string shared with :mod:`doconv.compose`), so a test comparing
the two can fail.
"""

import numpy as np

from .compose import init_params
from .config import PADDING_MODES, DOConvConfig


def naive_conv(x, kernel, bias, stride, pads, dilation, groups, mode="zeros"):
    """Loop-per-output-position cross-correlation in any rank, written straight from the definition (no im2col)."""
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]
    xp = np.pad(x, ((0, 0), (0, 0), *(tuple(p) for p in pads)), mode=mode)
    cout, cin_g, *ksize = kernel.shape
    cout_g = cout // groups
    out_size = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(xp.shape[2:], ksize, stride, dilation)]
    out = np.zeros((x.shape[0], cout, *out_size))
    for o in range(cout):
        g = o // cout_g
        for position in np.ndindex(*out_size):
            window = tuple(slice(q * s, q * s + d * (k - 1) + 1, d)
                           for q, s, d, k in zip(position, stride, dilation, ksize))
            patch = xp[(slice(None), slice(g * cin_g, (g + 1) * cin_g), *window)]
            out[(slice(None), o, *position)] = np.tensordot(patch, kernel[o], axes=kernel.ndim - 1)
    if bias is not None:
        out += np.asarray(bias).reshape(1, cout, *(1,) * len(ksize))
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


def config_strategy(max_channels_per_group=3, ranks=(1, 2, 3)):
    """A hypothesis strategy of random valid configs with an input shape that fits (needs hypothesis)."""
    from hypothesis import strategies as st

    @st.composite
    def configs(draw):
        """Random valid DO-Conv configs of rank 1, 2 or 3 with an input shape that fits them."""
        rank = draw(st.sampled_from(ranks))
        axes = lambda values: st.tuples(*[values] * rank)  # noqa: E731
        ksize = draw(axes(st.integers(1, 4 if rank < 3 else 3)))
        groups = draw(st.integers(1, 3))
        cin = groups * draw(st.integers(1, max_channels_per_group))
        cout = groups * draw(st.integers(1, max_channels_per_group))
        stride = draw(axes(st.integers(1, 2)))
        dilation = draw(axes(st.integers(1, 2)))
        mn = int(np.prod(ksize))
        D_mul = None if mn == 1 else draw(st.sampled_from([None, mn, mn + 1, mn + 3, 2 * mn]))
        mode = draw(st.sampled_from(PADDING_MODES))
        padding = draw(st.one_of(
            st.sampled_from(["same", "valid"] + (["causal"] if rank == 1 else [])),
            st.integers(0, 2),
            axes(st.integers(0, 2)),
            axes(st.tuples(st.integers(0, 2), st.integers(0, 2)))))
        config = DOConvConfig(cin, cout, ksize, stride=stride, padding=padding, dilation=dilation, groups=groups,
                              bias=draw(st.booleans()), padding_mode=mode, D_mul=D_mul, rank=rank)
        spans = [d * (k - 1) + 1 for k, d in zip(ksize, dilation)]
        spatial = [draw(st.integers(max(span, 3), span + (5 if rank < 3 else 2))) for span in spans]
        return config, (draw(st.integers(1, 2)), cin, *spatial)

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
