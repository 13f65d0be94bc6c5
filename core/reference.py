"""An independent NumPy reference convolution (no conv primitive), its VJP, and the DO-Conv forward.

In the spirit of ``jax._src.lax_reference``: pad, take a strided view of every window, contract.
Cross-correlation in NCHW, as every framework computes "convolution"::

    out[b, o, h, w] = bias[o] + sum_{c, i, j} xp[b, G(o)*C_in/g + c, h*sh + i*dh, w*sw + j*dw] * K[o, c, i, j]

with ``xp`` the padded input and ``G(o) = o // (C_out/g)`` the group of output channel ``o``.
The contraction is one batched matrix product per call (im2col), so a ResNet-18 layer at 56x56
takes a few tens of milliseconds.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .compose import DOConvParams, compose, depthwise_kernel, pointwise_kernel
from .config import (PADDING_MODES, DOConvConfig, Pads, check_pad_fits, same_pads, standardize_pair,
                     standardize_padding)

#: numpy.pad's names for the padding modes of torch.nn.Conv2d.
NUMPY_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def resolve_pads(padding, spatial: Tuple[int, int], kernel: Tuple[int, int], stride, dilation) -> Pads:
    """Per-side pads for any padding spec (see :func:`doconv.config.standardize_padding`)."""
    spec = standardize_padding(padding)
    if spec == "valid":
        return ((0, 0), (0, 0))
    if spec == "same":
        return tuple(same_pads(n, k, s, d) for n, k, s, d in zip(spatial, kernel, stride, dilation))  # type: ignore
    return spec  # type: ignore[return-value]


def pad(x: np.ndarray, pads: Pads, mode: str = "zeros") -> np.ndarray:
    """Pad the two trailing axes of ``x`` per side with a ``padding_mode`` of ``nn.Conv2d``."""
    if mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {set(PADDING_MODES)}, but got padding_mode={mode!r}")
    for size, pair, axis in zip(x.shape[-2:], pads, ("height", "width")):
        check_pad_fits(mode, size, tuple(pair), axis)
    widths = ((0, 0),) * (x.ndim - 2) + tuple(tuple(p) for p in pads)
    return np.pad(x, widths, mode=NUMPY_PAD_MODE[mode])


def pad_vjp(grad: np.ndarray, pads: Pads, mode: str, spatial: Tuple[int, int]) -> np.ndarray:
    """Adjoint of :func:`pad`: every padded pixel's gradient flows back to the pixel it copies."""
    out = grad
    for axis, ((lo, hi), size) in enumerate(zip(pads, spatial)):
        axis = out.ndim - 2 + axis
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


def _windows(xp: np.ndarray, kernel: Tuple[int, int], stride, dilation, out_hw) -> np.ndarray:
    """Strided view (B, C, H_out, W_out, M, N) of every receptive field of the padded input."""
    b, c = xp.shape[:2]
    sb, sc, sh, sw = xp.strides
    return as_strided(xp, shape=(b, c, *out_hw, *kernel),
                      strides=(sb, sc, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1]),
                      writeable=False)


def _geometry(x, kernel, stride, padding, dilation, groups):
    stride = standardize_pair(stride, "stride")
    dilation = standardize_pair(dilation, "dilation")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), but got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be 4-D (C_out, C_in/groups, M, N), but got shape {kernel.shape}")
    if x.shape[1] != kernel.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels but kernel {kernel.shape} with groups={groups} "
                         f"reads {kernel.shape[1] * groups}")
    if kernel.shape[0] % groups:
        raise ValueError(f"kernel's {kernel.shape[0]} output channels are not divisible by groups={groups}")
    ksize = kernel.shape[2:]
    pads = resolve_pads(padding, x.shape[2:], ksize, stride, dilation)
    out_hw = tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                   for n, (lo, hi), k, s, d in zip(x.shape[2:], pads, ksize, stride, dilation))
    if min(out_hw) < 1:
        raise ValueError(f"input {x.shape} padded by {pads} is smaller than the dilated kernel {ksize} "
                         f"(dilation={dilation})")
    return stride, dilation, pads, out_hw


def _im2col(xp, kernel_shape, stride, dilation, out_hw, groups):
    """(B, g, H_out*W_out, C_in/g*M*N): each row one receptive field of one group, flattened (c, i, j)."""
    b, cin = xp.shape[:2]
    win = _windows(xp, kernel_shape[2:], stride, dilation, out_hw)  # (B, C, Ho, Wo, M, N)
    win = win.reshape(b, groups, cin // groups, *out_hw, *kernel_shape[2:])
    per_group = cin // groups * kernel_shape[2] * kernel_shape[3]  # explicit: -1 fails on an empty batch
    return win.transpose(0, 1, 3, 4, 2, 5, 6).reshape(b, groups, out_hw[0] * out_hw[1], per_group)


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: Optional[np.ndarray] = None, *, stride=1, padding=0,
           dilation=1, groups: int = 1, padding_mode: str = "zeros") -> np.ndarray:
    """Reference 2-D cross-correlation, NCHW / OIHW, the semantics of ``torch.nn.functional.conv2d``.

    ``padding``: int, pair, per-side ``((top, bottom), (left, right))``, ``'valid'`` or ``'same'``
    (TensorFlow's rule for any stride: the odd pixel goes at the end). ``padding_mode``: zeros,
    reflect, replicate or circular, as ``nn.Conv2d``.
    """
    x, kernel = np.asarray(x), np.asarray(kernel)
    stride, dilation, pads, out_hw = _geometry(x, kernel, stride, padding, dilation, groups)
    cols = _im2col(pad(x, pads, padding_mode), kernel.shape, stride, dilation, out_hw, groups)
    cout = kernel.shape[0]
    k = kernel.reshape(groups, cout // groups, -1)                 # (g, O/g, C/g*M*N)
    out = np.matmul(cols, k.transpose(0, 2, 1)[None])             # (B, g, Ho*Wo, O/g)
    out = out.transpose(0, 1, 3, 2).reshape(x.shape[0], cout, *out_hw)
    if bias is not None:
        out = out + np.asarray(bias).reshape(1, cout, 1, 1)
    return out


def conv2d_vjp(grad_out: np.ndarray, x: np.ndarray, kernel: np.ndarray, *, stride=1, padding=0, dilation=1,
               groups: int = 1, padding_mode: str = "zeros") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vector-Jacobian product of :func:`conv2d`: ``(dL/dx, dL/dkernel, dL/dbias)`` from dL/dout."""
    x, kernel, grad_out = np.asarray(x), np.asarray(kernel), np.asarray(grad_out)
    stride, dilation, pads, out_hw = _geometry(x, kernel, stride, padding, dilation, groups)
    xp = pad(x, pads, padding_mode)
    cols = _im2col(xp, kernel.shape, stride, dilation, out_hw, groups)   # (B, g, P, C/g*M*N)
    b, cout = grad_out.shape[:2]
    gout = grad_out.reshape(b, groups, cout // groups, -1)               # (B, g, O/g, P)
    dkernel = np.matmul(gout, cols).sum(axis=0).reshape(kernel.shape)
    dcols = np.matmul(gout.transpose(0, 1, 3, 2), kernel.reshape(groups, cout // groups, -1)[None])
    m, n = kernel.shape[2:]
    dcols = dcols.reshape(b, groups, *out_hw, x.shape[1] // groups, m, n)
    dcols = dcols.transpose(0, 1, 4, 2, 3, 5, 6).reshape(b, x.shape[1], *out_hw, m, n)
    dxp = np.zeros_like(xp)
    for i in range(m):
        for j in range(n):
            r0, c0 = i * dilation[0], j * dilation[1]
            dxp[:, :, r0:r0 + (out_hw[0] - 1) * stride[0] + 1:stride[0],
                c0:c0 + (out_hw[1] - 1) * stride[1] + 1:stride[1]] += dcols[..., i, j]
    dx = pad_vjp(dxp, pads, padding_mode, x.shape[2:])
    return dx, dkernel, grad_out.sum(axis=(0, 2, 3))


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
        return conv2d(x, compose(params, config), params.bias, groups=config.groups, **geometry)
    if composition == "feature":
        features = conv2d(x, depthwise_kernel(params.D, config), groups=config.in_channels, **geometry)
        return conv2d(features, pointwise_kernel(params.W, config), params.bias, groups=config.groups)
    raise ValueError(f"composition must be one of ('kernel', 'feature', 'auto'), "
                     f"but got composition={composition!r}")
