"""Torch arithmetic of DO-Conv: the composition W' = D^T o W (paper Eq. 3) and both convolution routes.

Pure functions over tensors (no module state), so the layers of every rank, :func:`doconv.torch.parametrize`,
the fold and the benchmark share one implementation. Shapes are the core's canonical layout
(:mod:`doconv.compose`): W ``(C_out, C_in/g, S)``, full D ``(C_in, MN, S)``, kernel ``(C_out, C_in/g, *k)``
("OIHW" below, whatever the rank), MN = prod(kernel_size). Nothing here depends on the number of spatial
axes except the choice of ``F.conv1d/2d/3d`` (and their transposes), made by ``config.rank``.

The composition is the core's :data:`doconv.COMPOSE_EINSUM` (``"gcms,gjcs->gjcm"``, the paper's
channel pairing). :class:`ComposeKernel` evaluates the same einsum with an explicit backward: the
forward is one batched product over the C_in input channels ``(C_out/g, S) x (S, MN)``; the
backward computes dW as the mirror product and dD as one product whose reduction runs over the
C_out/g output channels of each group, instead of letting autograd transpose the einsum.

The fast layout (groups=1, what the layers (:class:`~doconv.torch.DOConv2d` ...) allocate): W keeps its canonical
*shape* (C_out, C_in, S) but is stored c-major, ``X = W.permute(1, 2, 0)`` a contiguous (C_in, S, C_out).
Then every product has C_out, the long side, as its contiguous output dimension, the one shape MKL's
batched GEMM runs fast here (an output 9 floats wide runs 3-5x slower, bench/torch_results.md), and
dW comes out in the parameter's own strides. Training at stride 1 (from :data:`MIN_TRANSPOSED_IN_CHANNELS`
input channels on) convolves with ``conv_transpose{1,2,3}d``, whose weight (C_in, C_out, *k) takes the product
per input channel with one small transpose instead of the two (C_in, MN, C_out) -> OIHW needs.

A training call composes through :class:`ComposeTrain`: from the trainable delta D' and the fixed I_fill, the
add (and the reversal of D's taps) inside one autograd node, whose ``apply`` avoids ``autograd.Function``'s
per-call ``inspect.signature``. The composition's cost per layer and step is mostly such fixed costs (op
launches, autograd nodes, Python), whatever the batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from doconv import COMPOSE_EINSUM, DOConvConfig

#: torch.nn.functional.pad's names for nn.Conv2d's padding modes.
TORCH_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def compose_einsum(W: torch.Tensor, D: Optional[torch.Tensor], config: DOConvConfig) -> torch.Tensor:
    """Kernel composition W' = D^T o W (Eq. 3/4) through ``torch.einsum(COMPOSE_EINSUM)``, autograd's VJP.

    ``W'[o, c, m] = sum_s D[(o // (C_out/g)) * (C_in/g) + c, m, s] * W[o, c, s]``; D is the *full* D.
    """
    if D is None:
        return W.reshape(config.kernel_shape)
    g, cin_g, cout_g, mn, s = config.groups, config.in_per_group, config.out_per_group, config.MN, config.S
    out = torch.einsum(COMPOSE_EINSUM, D.reshape(g, cin_g, mn, s), W.reshape(g, cout_g, cin_g, s))
    return out.reshape(config.kernel_shape)


def _per_channel(t: torch.Tensor, g: int, rows: int, cin_g: int) -> torch.Tensor:
    """(C_out, C_in/g, k) -> (C_in, C_out/g, k): the rows of W (or W') that read each input channel."""
    return t.reshape(g, rows, cin_g, -1).transpose(1, 2).reshape(g * cin_g, rows, -1)


def _per_row(t: torch.Tensor, g: int, cin_g: int) -> torch.Tensor:
    """Inverse of :func:`_per_channel`: (C_in, C_out/g, k) -> (C_out, C_in/g, k)."""
    rows = t.shape[1]
    # contiguous: for groups=1 the reshape is a view, and a transposed kernel makes F.conv2d (oneDNN)
    # reorder it on every call (measured: 512-channel batch-1 eval conv 9 ms instead of 1.7 ms)
    return t.reshape(g, cin_g, rows, -1).transpose(1, 2).reshape(g * rows, cin_g, -1).contiguous()


def _bilinear_jvp(forward, saved, tW, tD, option):
    """Forward-mode derivative of a composition, bilinear in (W, D): f(tW, D) + f(W, tD)."""
    W, D = saved
    out = None if tW is None else forward(tW, D, option)
    if tD is not None:
        along_D = forward(W, tD, option)
        out = along_D if out is None else out + along_D
    return out


def autocast_enabled(t: torch.Tensor) -> bool:
    """``torch.is_autocast_enabled`` for ``t``'s device type; False for a device type autocast does not know,
    for which torch's call raises: 'meta' (tensors of shapes only, where shape inference and model sizing run
    layers, as they run ``nn.ConvNd``), 'lazy'."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:
        return False


def _no_autocast(fn, W: torch.Tensor, *args) -> torch.Tensor:
    """``fn(W, *args)`` with autocast off (W' in the parameters' precision; the convolution casts it); the
    context is entered only when autocast is on, a measurable part of a small layer's call otherwise."""
    if autocast_enabled(W):
        with torch.autocast(W.device.type, enabled=False):
            return fn(W, *args)
    return fn(W, *args)


def _rows_forward(W: torch.Tensor, D: torch.Tensor, groups: int) -> torch.Tensor:
    """:class:`ComposeKernel`'s forward: W' (C_out, C_in/g, MN) from any layout of W and the full D."""
    cout, cin_g, _ = W.shape
    rows = _per_channel(W, groups, cout // groups, cin_g)          # (C_in, C_out/g, S)
    return _per_row(torch.bmm(rows, D.transpose(1, 2)), groups, cin_g)   # (C_out, C_in/g, MN)


def _rows_backward(W: torch.Tensor, D: torch.Tensor, grad: torch.Tensor, groups: int, needs_W: bool,
                   needs_D: bool):
    """:class:`ComposeKernel`'s (dW, dD) for the full D (None where not needed)."""
    g, cin_g = groups, W.shape[1]
    rows = W.shape[0] // g
    grad_rows = _per_channel(grad, g, rows, cin_g)                     # (C_in, C_out/g, MN)
    dW = _per_row(torch.bmm(grad_rows, D), g, cin_g) if needs_W else None
    dD = None
    if needs_D:
        # one row per input channel (depthwise): dD_k is an outer product, which a broadcast multiply computes
        # several times faster than a batched GEMM with a reduction of length 1
        product = torch.mul if rows == 1 else torch.bmm
        dD = product(grad_rows.transpose(1, 2), _per_channel(W, g, rows, cin_g))
    return dW, dD


class ComposeKernel(torch.autograd.Function):
    """W' = D^T o W with a hand-written backward (same values as :func:`compose_einsum`).

    Per input channel k (group ``k // (C_out/g)``), with ``R_k`` the (C_out/g, S) rows of W reading k::

        forward   W'_k = R_k  @ D_k^T     (C_out/g, S) x (S, MN)
        backward  dR_k = dW'_k @ D_k      (C_out/g, MN) x (MN, S)
                  dD_k = dW'_k^T @ R_k    (MN, C_out/g) x (C_out/g, S)   reduction over C_out/g
    """

    generate_vmap_rule = True  # torch.func.vmap of a model batches the input, not W and D

    @staticmethod
    def forward(W: torch.Tensor, D: torch.Tensor, groups: int) -> torch.Tensor:  # type: ignore[override]
        return _no_autocast(_rows_forward, W, D, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        W, D, groups = inputs
        ctx.save_for_backward(W, D)
        ctx.groups = groups

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        W, D = (t.conj() for t in ctx.saved_tensors)  # complex: the VJP takes conjugates (a no-op when real)
        return (*_rows_backward(W, D, grad.to(W.dtype), ctx.groups, *ctx.needs_input_grad[:2]), None)


def c_major(W: torch.Tensor, groups: int) -> bool:
    """Whether W (C_out, C_in, S) is stored c-major (the fast layout, groups=1 only)."""
    return groups == 1 and W.permute(1, 2, 0).is_contiguous()


def c_major_empty(shape, **factory) -> torch.Tensor:
    """An uninitialised W of canonical shape (C_out, C_in, S) stored c-major."""
    cout, cin, s = shape
    return torch.empty((cin, s, cout), **factory).permute(2, 0, 1)


def to_c_major(W: torch.Tensor) -> torch.Tensor:
    """A c-major copy of W (C_out, C_in, S), same values, dtype and device (no autograd history)."""
    with torch.no_grad():
        return c_major_empty(W.shape, dtype=W.dtype, device=W.device).copy_(W)


#: C_in * C_out from which the per-input-channel products of a c-major W take the layout-changing routes that pay
#: only on large kernels: dD through a grouped ``conv1d`` (multi-threaded CPU float32), and OIHW through two
#: copies instead of one permuted copy. Below, the batched GEMM and one copy are faster
#: (bench/torch_models_results.md).
LARGE_KERNEL_CHANNELS = 128 * 128


def _per_channel_products(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``bmm(X, G)``: (C_in, S, C_out) x (C_in, C_out, MN) -> (C_in, S, MN), a reduction over C_out.

    From :data:`LARGE_KERNEL_CHANNELS` on, on CPU in float32 with more than one thread, as a grouped ``conv1d``
    (C_in groups of C_out input channels, S outputs, MN positions): oneDNN runs it up to 2.5x faster than MKL's
    batched GEMM, whose 9x9 outputs waste it. Single-threaded (torch's slow grouped path) or on smaller kernels
    the batched GEMM is faster.
    """
    cin, s, cout = X.shape
    if X.dtype != torch.float32 or X.device.type != "cpu" or cin * cout < LARGE_KERNEL_CHANNELS \
            or torch.get_num_threads() < 2:
        return torch.bmm(X, G)
    return F.conv1d(G.reshape(1, cin * cout, -1), X.reshape(cin * s, cout, 1), groups=cin).view(cin, s, -1)


def _cmajor_forward(W: torch.Tensor, D: torch.Tensor, transposed: bool) -> torch.Tensor:
    """:class:`ComposeCMajor`'s forward for a D whose taps are already reversed when ``transposed``."""
    Y = torch.bmm(D, W.permute(1, 2, 0))                                  # (C_in, MN, C_out)
    if transposed:
        return Y.transpose(1, 2).contiguous()                            # (C_in, C_out, MN)
    if Y.shape[0] * Y.shape[2] < LARGE_KERNEL_CHANNELS:
        return Y.permute(2, 0, 1).contiguous()                           # one copy: (C_out, C_in, MN)
    return Y.transpose(1, 2).contiguous().transpose(0, 1).contiguous()  # two copies, faster on large kernels


def _cmajor_backward(W: torch.Tensor, D: torch.Tensor, grad: torch.Tensor, transposed: bool, needs_W: bool,
                     needs_D: bool):
    """:class:`ComposeCMajor`'s (dW, dD) for a D whose taps are already reversed when ``transposed``
    (dD then in D's own tap order)."""
    G = grad if transposed else grad.transpose(0, 1).contiguous()   # (C_in, C_out, MN), per input channel
    dW = torch.bmm(D.transpose(1, 2), G.transpose(1, 2)).permute(2, 0, 1) if needs_W else None  # W's strides
    dD = None
    if needs_D:
        dD = _per_channel_products(W.permute(1, 2, 0), G).transpose(1, 2)   # (C_in, MN, S)
        dD = dD.flip(1) if transposed else dD
    return dW, dD


class ComposeCMajor(torch.autograd.Function):
    """W' = D^T o W for a c-major W (groups=1), with X = W.permute(1, 2, 0) (C_in, S, C_out)::

        forward   Y_k  = D_k  @ X_k         (MN, S) x (S, C_out), then Y -> the requested layout
        backward  dX_k = D_k^T @ dY_k       (S, MN) x (MN, C_out)
                  dD_k = dY_k @ X_k^T       (MN, C_out) x (C_out, S)   reduction over C_out

    ``transposed=False`` returns OIHW (C_out, C_in, MN) for the convolution; ``True`` returns the taps
    reversed in (C_in, C_out, MN), i.e. the transposed convolution's weight for the same correlation at
    stride 1 (reversing the flattened tap index reverses every spatial axis at once, in any rank).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(W: torch.Tensor, D: torch.Tensor, transposed: bool) -> torch.Tensor:  # type: ignore[override]
        return _no_autocast(_cmajor_forward, W, D.flip(1) if transposed else D, transposed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        W, D, ctx.transposed = inputs
        ctx.save_for_backward(W, D)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        W, D = (t.conj() for t in ctx.saved_tensors)  # complex: the VJP takes conjugates (a no-op when real)
        D = D.flip(1) if ctx.transposed else D
        return (*_cmajor_backward(W, D, grad.to(W.dtype), ctx.transposed, *ctx.needs_input_grad[:2]), None)


class ComposeTrain(torch.autograd.Function):
    """The composition of a training call, from the trainable delta D' and the fixed I_fill: W' of
    ``D = D' + I_fill`` by :class:`ComposeCMajor` (``transposed`` True/False) or :class:`ComposeKernel`
    (``transposed`` None, ``groups``), same values and gradients (dD' = dD).

    One autograd node instead of three (the add, the Function, the reversal of D's taps): the full D is
    formed inside, and saved already reversed for the backward. A fixed per-layer cost of every training
    step. Without ``setup_context`` on purpose, so ``apply`` skips ``inspect.signature`` (``autograd.Function``
    binds default arguments through it when ``setup_context`` is defined), the largest Python cost of a call;
    :func:`_apply` uses it only when no torch.func transform or forward-mode AD can be active, which need
    ``setup_context`` (they get ComposeCMajor / ComposeKernel).
    """

    @staticmethod
    def forward(ctx, W, delta, identity, transposed, groups):  # type: ignore[override]
        D = delta + identity
        if transposed is None:
            ctx.save_for_backward(W, D)
            kernel = _no_autocast(_rows_forward, W, D, groups)
        else:
            D = D.flip(1) if transposed else D
            ctx.save_for_backward(W, D)
            kernel = _no_autocast(_cmajor_forward, W, D, transposed)
        ctx.transposed, ctx.groups = transposed, groups
        return kernel

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        W, D = (t.conj() for t in ctx.saved_tensors)  # complex: the VJP takes conjugates (a no-op when real)
        grad, needs = grad.to(W.dtype), ctx.needs_input_grad[:2]
        if ctx.transposed is None:
            dW, dD = _rows_backward(W, D, grad, ctx.groups, *needs)
        else:
            dW, dD = _cmajor_backward(W, D, grad, ctx.transposed, *needs)
        return dW, dD, None, None, None


def _with_forward_ad(base, option: str):
    """``base`` plus its forward-mode rule, as a subclass used only when forward AD may be asked for:
    Dynamo refuses an ``autograd.Function`` with a custom ``jvp``, so ``torch.compile`` keeps ``base``."""
    def setup_context(ctx, inputs, output):
        base.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:2])

    def jvp(ctx, tW, tD, _):
        return _bilinear_jvp(base.forward, ctx.saved_tensors, tW, tD, getattr(ctx, option))
    return type(base.__name__ + "Fwd", (base,), {"__doc__": _with_forward_ad.__doc__, "__module__": __name__,
                                                 "setup_context": staticmethod(setup_context),
                                                 "jvp": staticmethod(jvp)})


ComposeKernelFwd = _with_forward_ad(ComposeKernel, "groups")
ComposeCMajorFwd = _with_forward_ad(ComposeCMajor, "transposed")


def _forward_ad_possible() -> bool:
    """Whether forward-mode AD may be asked for: a torch.func transform is active or a dual level is open."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def _apply(function, *args) -> torch.Tensor:
    """``function.apply(*args)``, through its forward-AD variant when forward-mode AD may be asked for; its
    bare ``forward`` when no derivative can be asked for at all (inference), which skips the
    autograd.Function machinery, most of a small layer's cost."""
    if _forward_ad_possible():
        return {ComposeKernel: ComposeKernelFwd, ComposeCMajor: ComposeCMajorFwd}[function].apply(*args)
    W, D = args[:2]
    if not (torch.is_grad_enabled() and (W.requires_grad or D.requires_grad)):
        return function.forward(*args)
    return function.apply(*args)


def _compose(W: torch.Tensor, D: torch.Tensor, config: DOConvConfig, transposed: bool,
             identity: Optional[torch.Tensor]) -> torch.Tensor:
    """W' as (C_out, C_in/g, MN) (``transposed``: reversed taps as (C_in, C_out, MN), c-major W only).

    ``identity`` None: D is the full D. Else D is the delta D' and the product uses D' + identity: in a
    training call (plain autograd) through :class:`ComposeTrain`, one autograd node.
    """
    cmajor = c_major(W, config.groups)
    if identity is not None:
        if (torch.is_grad_enabled() and (W.requires_grad or D.requires_grad) and not _forward_ad_possible()
                and not torch.jit.is_tracing()):
            return ComposeTrain.apply(W, D, identity, transposed if cmajor else None, config.groups)
        D = full_D(D, identity)
    if torch.jit.is_tracing():
        return compose_einsum(W, D, config)
    if cmajor:
        return _apply(ComposeCMajor, W, D, transposed)
    return _apply(ComposeKernel, W, D, config.groups)


def compose_kernel(W: torch.Tensor, D: Optional[torch.Tensor], config: DOConvConfig,
                   identity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kernel composition (Eq. 3/4), OIHW ``(C_out, C_in/g, *kernel_size)``; D is the full D, or the
    delta D' with ``identity`` the I_fill it is added to.

    Through :class:`ComposeCMajor` when W is stored c-major, else :class:`ComposeKernel` (any layout), one
    node with the identity's add in training (:class:`ComposeTrain`); under ``torch.jit.trace`` through
    :func:`compose_einsum`, because a custom Function would be recorded as a Python call that
    ``torch.jit.save`` cannot serialise.
    """
    if D is None:
        return W.reshape(config.kernel_shape)
    return _compose(W, D, config, False, identity).reshape(config.kernel_shape)


def depthwise_kernel(D: torch.Tensor, config: DOConvConfig) -> torch.Tensor:
    """D as the (C_in*S, 1, *kernel_size) kernel of feature composition (core: :func:`doconv.depthwise_kernel`)."""
    return D.transpose(1, 2).reshape(config.in_channels * config.S, 1, *config.kernel_size)


def pointwise_kernel(W: torch.Tensor, config: DOConvConfig) -> torch.Tensor:
    """W as the grouped 1x1 kernel (C_out, C_in/g * S, 1, ..., 1) of feature composition."""
    return W.reshape(config.out_channels, config.in_per_group * config.S, *(1,) * config.rank)


def conv_nd(rank: int):
    """``F.conv1d`` / ``F.conv2d`` / ``F.conv3d`` for ``rank`` spatial axes (looked up at each call)."""
    return (F.conv1d, F.conv2d, F.conv3d)[rank - 1]


def conv_transpose_nd(rank: int):
    """``F.conv_transpose1d`` / ``2d`` / ``3d`` for ``rank`` spatial axes (looked up at each call)."""
    return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]


def conv_padding(config: DOConvConfig, spatial):
    """``(pre_pad, conv_padding)`` for an input of spatial size ``spatial``: F.pad's per-side tuple (or None)
    and the padding to give the convolution.

    Zero padding that is symmetric per axis goes to the convolution itself (no copy of the input), and all-zero
    pads nowhere; everything else (other padding modes, per-side pads, 'same' with stride > 1, 'causal') is
    padded first. So are the 'same' pads of a traced or symbolic size (``torch.jit.trace``, ``torch.export``),
    whatever their values at the example: a branch on them would keep the example's route for every size.
    F.pad takes the last axis first: ``(left, right, top, bottom, front, back)`` in 3-D.
    """
    pads = config.pads(*spatial)
    static = config.padding != "same" or all(type(lo) is int for lo, _ in pads)
    if static and config.padding_mode == "zeros" and all(lo == hi for lo, hi in pads):
        return None, tuple(lo for lo, _ in pads)
    pre = tuple(p for pair in reversed(pads) for p in pair)
    return (pre if not static or any(pre) else None), (0,) * config.rank


def conv(x: torch.Tensor, kernel: torch.Tensor, bias: Optional[torch.Tensor], config: DOConvConfig, *,
         groups: Optional[int] = None, geometry: bool = True) -> torch.Tensor:
    """The layer's convolution (F.conv1d/2d/3d by ``config.rank``) with its stride, padding, padding mode and
    dilation (``geometry=False``: a plain 1x1)."""
    groups = config.groups if groups is None else groups
    if not geometry:
        return conv_nd(config.rank)(x, kernel, bias, groups=groups)
    pre, padding = conv_padding(config, x.shape[-config.rank:])
    if pre is not None:
        x = F.pad(x, pre, mode=TORCH_PAD_MODE[config.padding_mode])
    return conv_nd(config.rank)(x, kernel, bias, config.stride, padding, config.dilation, groups)


#: The fewest input channels for which a c-major W trains through :func:`transposed_forward`; below, it composes
#: and convolves. What the transposed route saves is two transposes of kernel-sized tensors (C_in * C_out * MN
#: elements), nothing for a 3- or 4-channel stem, while the transposed convolution of a layer with so few input
#: channels runs well below the convolution, forward and backward, in 1-D, 2-D and 3-D alike
#: (bench/torch_models_results.md).
MIN_TRANSPOSED_IN_CHANNELS = 8


def transposed_padding(config: DOConvConfig, spatial):
    """``(pre_pad, padding)`` for :func:`transposed_forward`, or None where it does not apply.

    At stride 1, ``conv(x, K, padding=p)`` equals ``conv_transpose(x, K', padding=d*(k-1) - p)`` per axis,
    with ``K'[c, o] = K[o, c]`` spatially reversed; that needs groups=1 and ``p <= d*(k-1)``. Layers with
    fewer than :data:`MIN_TRANSPOSED_IN_CHANNELS` input channels do not take it (None).
    """
    if config.groups != 1 or any(s != 1 for s in config.stride) or config.in_channels < MIN_TRANSPOSED_IN_CHANNELS:
        return None
    pre, padding = conv_padding(config, spatial)
    q = tuple(d * (k - 1) - p for d, k, p in zip(config.dilation, config.kernel_size, padding))
    return None if min(q) < 0 else (pre, q)


def transposed_forward(x: torch.Tensor, W: torch.Tensor, D: torch.Tensor, bias: Optional[torch.Tensor],
                       config: DOConvConfig, pads, identity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's convolution at stride 1 with a c-major W: ``conv_transpose{1,2,3}d`` of the reversed taps.

    Same values as ``conv(x, compose_kernel(W, D, config, identity), bias, config)``, one transpose cheaper in
    the forward and two in the backward (``pads`` from :func:`transposed_padding`).
    """
    pre, q = pads
    if pre is not None:
        x = F.pad(x, pre, mode=TORCH_PAD_MODE[config.padding_mode])
    kernel = _compose(W, D, config, True, identity).reshape(config.in_channels, config.out_channels,
                                                              *config.kernel_size)
    return conv_transpose_nd(config.rank)(x, kernel, bias, 1, q, 0, 1, config.dilation)


def feature_forward(x: torch.Tensor, W: torch.Tensor, D: torch.Tensor, bias: Optional[torch.Tensor],
                    config: DOConvConfig) -> torch.Tensor:
    """Feature composition (Fig. 3-a): depthwise conv of x with D into C_in*S channels, then W as a 1x1 conv."""
    features = conv(x, depthwise_kernel(D, config), None, config, groups=config.in_channels)
    if c_major(W, config.groups):  # W^T is a contiguous (C_in*S, C_out): the transposed conv's 1x1 weight
        return conv_transpose_nd(config.rank)(
            features, W.permute(1, 2, 0).reshape(-1, config.out_channels, *(1,) * config.rank), bias)
    return conv(features, pointwise_kernel(W, config), bias, config, geometry=False)


def full_D(delta: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """D = I_fill + D' (the trainable delta), broadcast over the C_in slices."""
    return delta + identity


def training_forward(x: torch.Tensor, W: torch.Tensor, D: torch.Tensor, bias: Optional[torch.Tensor],
                     config: DOConvConfig, composition: str, identity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A call that records the composition for autograd, by ``composition`` 'kernel' or 'feature'; D is the
    full D, or the delta D' with ``identity`` the I_fill it is added to (one autograd node fewer).

    The storage decides the route, the values are the same: a c-major W at stride 1 convolves with
    :func:`transposed_forward`, anything else composes the OIHW kernel and convolves.
    """
    if composition == "feature":
        return feature_forward(x, W, D if identity is None else full_D(D, identity), bias, config)
    if c_major(W, config.groups):
        pads = transposed_padding(config, x.shape[-config.rank:])
        if pads is not None:
            return transposed_forward(x, W, D, bias, config, pads, identity)
    return conv(x, compose_kernel(W, D, config, identity), bias, config)


def ntuple_of_one(value, rank: int):
    """``(v,) * rank`` for a one-element tuple or list: ``nn.Conv2d`` / ``nn.Conv3d`` take ``stride=(2,)``, their
    convolution broadcasting it; anything else unchanged (the config checks it)."""
    return (value[0],) * rank if isinstance(value, (tuple, list)) and len(value) == 1 else value
