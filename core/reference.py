"""An independent NumPy reference convolution (no conv primitive), its VJP, and the DO-Conv forward.

In the spirit of ``jax._src.lax_reference``: pad, take a strided view of every window, contract.
Cross-correlation channels first, as every framework computes "convolution"; in 2-D (NCHW)::

    out[b, o, h, w] = bias[o] + sum_{c, i, j} xp[b, G(o)*C_in/g + c, h*sh + i*dh, w*sw + j*dw] * K[o, c, i, j]

and the same sum over one (NCL) or three (NCDHW) spatial axes for 1-D and 3-D kernels.

with ``xp`` the padded input and ``G(o) = o // (C_out/g)`` the group of output channel ``o``.
The contraction is one batched matrix product per call (im2col), so a ResNet-18 layer at 56x56
takes a few tens of milliseconds.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .compose import DOConvParams, compose, depthwise_kernel, pointwise_kernel
from .config import (AXIS_NAMES, PADDING_MODES, RANKS, DOConvConfig, Pads, check_pad_fits, same_pads,
                     standardize_padding, standardize_tuple)

#: numpy.pad's names for the padding modes of torch.nn.Conv2d.
NUMPY_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def resolve_pads(padding, spatial: Tuple[int, ...], kernel: Tuple[int, ...], stride, dilation) -> Pads:
    """Per-side pads for any padding spec (see :func:`doconv.config.standardize_padding`); the rank is
    ``len(kernel)``."""
    spec = standardize_padding(padding, len(kernel))
    if spec == "valid":
        return ((0, 0),) * len(kernel)
    if spec == "causal":
        return ((dilation[0] * (kernel[0] - 1), 0),)
    if spec == "same":
        return tuple(same_pads(n, k, s, d) for n, k, s, d in zip(spatial, kernel, stride, dilation))  # type: ignore
    return spec  # type: ignore[return-value]


def pad(x: np.ndarray, pads: Pads, mode: str = "zeros") -> np.ndarray:
    """Pad the ``len(pads)`` trailing axes of ``x`` per side with a ``padding_mode`` of ``nn.Conv2d``."""
    if mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {set(PADDING_MODES)}, but got padding_mode={mode!r}")
    rank = len(pads)
    for size, pair, axis in zip(x.shape[-rank:], pads, AXIS_NAMES[rank]):
        check_pad_fits(mode, size, tuple(pair), axis)
    widths = ((0, 0),) * (x.ndim - rank) + tuple(tuple(p) for p in pads)
    return np.pad(x, widths, mode=NUMPY_PAD_MODE[mode])


def pad_vjp(grad: np.ndarray, pads: Pads, mode: str, spatial: Tuple[int, ...]) -> np.ndarray:
    """Adjoint of :func:`pad`: every padded pixel's gradient flows back to the pixel it copies."""
    out = grad
    for axis, ((lo, hi), size) in enumerate(zip(pads, spatial)):
        axis = out.ndim - len(pads) + axis
        # The source of each padded position along this axis; -1 (zeros mode) sources nothing.
        source = np.pad(np.arange(size), (lo, hi), mode=NUMPY_PAD_MODE[mode],
                        **({"constant_values": -1} if mode == "zeros" else {}))
        keep = source >= 0
        shape = list(out.shape)
        shape[axis] = size
        acc = np.zeros(shape, dtype=out.dtype)
        np.add.at(acc, (slice(None),) * axis + (source[keep],), np.compress(keep, out, axis=axis))
        out = acc
    return out


def _windows(xp: np.ndarray, kernel: Tuple[int, ...], stride, dilation, out_size) -> np.ndarray:
    """Strided view (B, C, *out_size, *kernel) of every receptive field of the padded input."""
    outer, spatial = xp.strides[:2], xp.strides[2:]
    return as_strided(xp, shape=(*xp.shape[:2], *out_size, *kernel),
                      strides=(*outer, *(st * s for st, s in zip(spatial, stride)),
                               *(st * d for st, d in zip(spatial, dilation))),
                      writeable=False)


def _geometry(x, kernel, stride, padding, dilation, groups):
    rank = kernel.ndim - 2
    if rank not in RANKS:
        raise ValueError(f"kernel must be 3-D (C_out, C_in/groups, K), 4-D (.., M, N) or 5-D (.., T, M, N), "
                         f"but got shape {kernel.shape}")
    if x.ndim != rank + 2:
        raise ValueError(f"x must be {rank + 2}-D (N, C, *spatial) for a {rank}-D kernel {kernel.shape}, "
                         f"but got shape {x.shape}")
    stride = standardize_tuple(stride, "stride", rank)
    dilation = standardize_tuple(dilation, "dilation", rank)
    if x.shape[1] != kernel.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels but kernel {kernel.shape} with groups={groups} "
                         f"reads {kernel.shape[1] * groups}")
    if kernel.shape[0] % groups:
        raise ValueError(f"kernel's {kernel.shape[0]} output channels are not divisible by groups={groups}")
    ksize = kernel.shape[2:]
    pads = resolve_pads(padding, x.shape[2:], ksize, stride, dilation)
    out_size = tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                     for n, (lo, hi), k, s, d in zip(x.shape[2:], pads, ksize, stride, dilation))
    if min(out_size) < 1:
        raise ValueError(f"input {x.shape} padded by {pads} is smaller than the dilated kernel {ksize} "
                         f"(dilation={dilation})")
    return stride, dilation, pads, out_size


def _im2col(xp, kernel_shape, stride, dilation, out_size, groups):
    """(B, g, P, C_in/g*MN): each row one receptive field of one group (P output positions), flattened (c, *k)."""
    b, cin, rank = xp.shape[0], xp.shape[1], len(out_size)
    win = _windows(xp, kernel_shape[2:], stride, dilation, out_size)  # (B, C, *out, *k)
    win = win.reshape(b, groups, cin // groups, *out_size, *kernel_shape[2:])
    # (B, g, *out, C/g, *k): the channel axis moves behind the output positions
    order = (0, 1, *range(3, 3 + rank), 2, *range(3 + rank, 3 + 2 * rank))
    per_group = cin // groups * math.prod(kernel_shape[2:])  # explicit: -1 fails on an empty batch
    return win.transpose(order).reshape(b, groups, math.prod(out_size), per_group)


def conv(x: np.ndarray, kernel: np.ndarray, bias: Optional[np.ndarray] = None, *, stride=1, padding=0,
         dilation=1, groups: int = 1, padding_mode: str = "zeros") -> np.ndarray:
    """Reference cross-correlation in 1, 2 or 3 spatial dimensions (the kernel's rank), channels first:
    NCL / OIL, NCHW / OIHW, NCDHW / OIDHW, the semantics of ``torch.nn.functional.conv{1,2,3}d``.

    ``padding``: an int, one int per axis, per-side pairs (``((top, bottom), (left, right))`` in 2-D),
    ``'valid'``, ``'same'`` (TensorFlow's rule for any stride: the odd pixel goes at the end) or, in
    1-D, ``'causal'``. ``padding_mode``: zeros, reflect, replicate or circular, as ``nn.Conv2d``.
    """
    x, kernel = np.asarray(x), np.asarray(kernel)
    stride, dilation, pads, out_size = _geometry(x, kernel, stride, padding, dilation, groups)
    cols = _im2col(pad(x, pads, padding_mode), kernel.shape, stride, dilation, out_size, groups)
    cout = kernel.shape[0]
    k = kernel.reshape(groups, cout // groups, -1)                 # (g, O/g, C/g*MN)
    out = np.matmul(cols, k.transpose(0, 2, 1)[None])             # (B, g, P, O/g)
    out = out.transpose(0, 1, 3, 2).reshape(x.shape[0], cout, *out_size)
    if bias is not None:
        out = out + np.asarray(bias).reshape(1, cout, *(1,) * len(out_size))
    return out


def conv_vjp(grad_out: np.ndarray, x: np.ndarray, kernel: np.ndarray, *, stride=1, padding=0, dilation=1,
             groups: int = 1, padding_mode: str = "zeros") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vector-Jacobian product of :func:`conv`: ``(dL/dx, dL/dkernel, dL/dbias)`` from dL/dout."""
    x, kernel, grad_out = np.asarray(x), np.asarray(kernel), np.asarray(grad_out)
    stride, dilation, pads, out_size = _geometry(x, kernel, stride, padding, dilation, groups)
    rank, ksize = len(out_size), kernel.shape[2:]
    xp = pad(x, pads, padding_mode)
    cols = _im2col(xp, kernel.shape, stride, dilation, out_size, groups)   # (B, g, P, C/g*MN)
    b, cout = grad_out.shape[:2]
    gout = grad_out.reshape(b, groups, cout // groups, -1)               # (B, g, O/g, P)
    dkernel = np.matmul(gout, cols).sum(axis=0).reshape(kernel.shape)
    dcols = np.matmul(gout.transpose(0, 1, 3, 2), kernel.reshape(groups, cout // groups, -1)[None])
    dcols = dcols.reshape(b, groups, *out_size, x.shape[1] // groups, *ksize)
    # back to (B, C, *out, *k), the layout of the windows of xp
    order = (0, 1, 2 + rank, *range(2, 2 + rank), *range(3 + rank, 3 + 2 * rank))
    dcols = dcols.transpose(order).reshape(b, x.shape[1], *out_size, *ksize)
    dxp = np.zeros_like(xp)
    for tap in np.ndindex(*ksize):  # each tap's window is a strided slice of xp
        window = tuple(slice(t * d, t * d + (n - 1) * s + 1, s)
                       for t, d, n, s in zip(tap, dilation, out_size, stride))
        dxp[(slice(None), slice(None), *window)] += dcols[(Ellipsis, *tap)]
    dx = pad_vjp(dxp, pads, padding_mode, x.shape[2:])
    return dx, dkernel, grad_out.sum(axis=(0, *range(2, 2 + rank)))


def _rank2(x, kernel, name):
    if np.ndim(x) != 4 or np.ndim(kernel) != 4:
        raise ValueError(f"{name} takes a 4-D x (N, C, H, W) and kernel (C_out, C_in/groups, M, N), but got "
                         f"shapes {np.shape(x)} and {np.shape(kernel)}; doconv.conv takes any rank")


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: Optional[np.ndarray] = None, **geometry) -> np.ndarray:
    """:func:`conv` for 2-D (NCHW / OIHW) only, the semantics of ``torch.nn.functional.conv2d``."""
    _rank2(x, kernel, "conv2d")
    return conv(x, kernel, bias, **geometry)


def conv2d_vjp(grad_out: np.ndarray, x: np.ndarray, kernel: np.ndarray, **geometry):
    """:func:`conv_vjp` for 2-D only."""
    _rank2(x, kernel, "conv2d_vjp")
    return conv_vjp(grad_out, x, kernel, **geometry)


def forward(x: np.ndarray, params: DOConvParams, config: DOConvConfig, *, composition: str = "kernel") -> np.ndarray:
    """Output of a DO-Conv layer, O = (D, W) * P over every patch of ``x`` (Eq. 3 / Eq. 4).

    ``'kernel'`` (Fig. 3-b): compose W' = D^T o W once, then one conventional conv.
    ``'feature'`` (Fig. 3-a): a depthwise conv of ``x`` with D into C_in*S channels (the layer's
    stride, padding, padding mode and dilation), then a grouped 1x1 conv with W. The two agree to
    float rounding for every configuration. ``'auto'``: the cheaper by :func:`doconv.cost.composition_cost`.
    """
    x = np.asarray(x)
    config.output_shape(x.shape)  # validates the input against the config, naming the problem
    params.check(config)
    if composition == "auto":
        from .cost import choose_composition
        composition = choose_composition(config, x.shape)
    geometry = dict(stride=config.stride, padding=config.padding, dilation=config.dilation,
                    padding_mode=config.padding_mode)
    if composition == "kernel" or (composition == "feature" and params.D is None):
        return conv(x, compose(params, config), params.bias, groups=config.groups, **geometry)
    if composition == "feature":
        features = conv(x, depthwise_kernel(params.D, config), groups=config.in_channels, **geometry)
        return conv(features, pointwise_kernel(params.W, config), params.bias, groups=config.groups)
    raise ValueError(f"composition must be one of ('kernel', 'feature', 'auto'), "
                     f"but got composition={composition!r}")
