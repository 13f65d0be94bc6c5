"""Parameters, initialisation and the composition W' = D^T o W (paper Eq. 3 and 4).

Each function is small and pure (the ``dbb_transforms`` style): arrays in, arrays out, no state.

Canonical layout (NCHW world; ``MN = M*N``, ``S = D_mul``, ``g = groups``)::

    W  (C_out, C_in/g, S)   the conventional kernel over the D_mul "depth" axis
    D  (C_in,  MN,     S)   one MN x S matrix per input channel (the *full* D, identity included)
    W' (C_out, C_in/g, M, N)  the composed (folded) kernel, m = i*N + j

Every function here is the same for 1-D and 3-D layers: ``MN`` is then the patch length (K, or
T*M*N), and W' is ``(C_out, C_in/g, K)`` or ``(C_out, C_in/g, T, M, N)``, the patch flattened in C order
(:mod:`doconv.config`). Only the reshape of the last axis of W' differs.

Channel pairing (the heart of DO-GConv / DO-DConv). Row ``(o, c)`` of W is the kernel that output
channel ``o`` applies to the ``c``-th input channel of its group, that is to input channel
``(o // (C_out/g)) * (C_in/g) + c``. The depthwise kernel D acts on input channels, so that row
is composed with the D slice *of the channel it reads* (paper Section 3, DO-DConv/DO-GConv)::

    W'[o, c, m] = sum_s D[(o // (C_out/g)) * (C_in/g) + c, m, s] * W[o, c, s]

In einsum form, with D viewed as ``(g, C_in/g, MN, S)`` and W as ``(g, C_out/g, C_in/g, S)``,
this is :data:`COMPOSE_EINSUM` = ``"gcms,gjcs->gjcm"``: PyTorch and MXNet use this string, Keras the
same contraction with its operands' axes in Keras' order (``doconv.tf.KERAS_COMPOSE_EINSUM``).

The official code (yangyanli/DO-Conv) pairs differently when ``1 < groups``: its PyTorch layer
uses D channel ``(o mod g)*(C_in/g) + c`` and its TensorFlow/GluonCV layers ``c*g + o // (C_out/g)``.
All three coincide for ``groups=1`` (PyTorch's also for plain depthwise, TF/Gluon's for any
depthwise) and, since every D slice starts as the same identity, agree at identity init; once D
trains they are different layers. :func:`pairing_index` exposes all of them as index maps so the
backends can import official checkpoints (:mod:`doconv.layouts`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Tuple, Union

import numpy as np

from .config import DOConvConfig, kaiming_bound

#: The composition of Eq. 3 (kernel composition) in einsum form, grouped:
#: D (g, C_in/g, MN, S) x W (g, C_out/g, C_in/g, S) -> W' (g, C_out/g, C_in/g, MN).
COMPOSE_EINSUM = "gcms,gjcs->gjcm"

Pairing = Union[Literal["paper", "official-torch", "official-tf", "official-gluon"], np.ndarray]
PAIRINGS = ("paper", "official-torch", "official-tf", "official-gluon")


@dataclasses.dataclass
class DOConvParams:
    """The trainable arrays of one layer in canonical layout.

    ``D`` is the full D = I_fill + D' (the identity included); backends store and train only the
    delta D' (paper Section 4: "we optimize D' = D - I", so L2 decay pulls D towards identity).
    ``D`` is None for 1x1 kernels and ``bias`` is None without bias.
    """

    W: np.ndarray
    D: Optional[np.ndarray]
    bias: Optional[np.ndarray] = None

    def check(self, config: DOConvConfig, where: str = "params", arrays=("W", "D", "bias")) -> "DOConvParams":
        """Raise ValueError naming the array unless the shapes of ``arrays`` match ``config``; returns self."""
        wants = {"W": config.W_shape, "D": config.D_shape, "bias": config.bias_shape}
        for name, want in ((name, wants[name]) for name in arrays):
            got = getattr(self, name)
            have = None if got is None else tuple(np.shape(got))
            if have != (None if want is None else tuple(want)):
                raise ValueError(f"{where}: {name} has shape {have} but {config!r} needs {want}")
        return self

    def astype(self, dtype) -> "DOConvParams":
        cast = lambda a: None if a is None else np.asarray(a, dtype=dtype)  # noqa: E731
        return DOConvParams(cast(self.W), cast(self.D), cast(self.bias))


# ---- initialisation (paper Section 4, Tables 7 and 8) ---------------------------------------

def identity_fill(MN: int, S: int, dtype=np.float64) -> np.ndarray:
    """The fixed part I_fill (MN, S) of D: MN x MN identities tiled along S as far as whole blocks fit.

    Paper Section 4, "What if D_mul > M x N?": "filling (MxN) x (MxN) identity matrices as much as
    possible, while the remaining elements are initialized to zeros". With S == MN this is I, so
    ``W' = W`` at init; with S = 2*MN, ``W' = W[..., :MN] + W[..., MN:]``. In the opt-in
    depthwise-separable mode (S < MN) no whole block fits and I_fill is ``eye(MN, S)``.

    >>> identity_fill(2, 5).astype(int).tolist()
    [[1, 0, 1, 0, 0], [0, 1, 0, 1, 0]]
    """
    if S < MN:
        return np.eye(MN, S, dtype=dtype)
    out = np.zeros((MN, S), dtype=dtype)
    for start in range(0, S - MN + 1, MN):
        out[:, start:start + MN] = np.eye(MN, dtype=dtype)
    return out


def identity_D(config: DOConvConfig, dtype=np.float64) -> Optional[np.ndarray]:
    """I_fill broadcast to every input channel: the D at identity init, shape (C_in, MN, S)."""
    if not config.has_D:
        return None
    return np.broadcast_to(identity_fill(config.MN, config.S, dtype), config.D_shape).copy()


def init_params(config: DOConvConfig, *, d_init: str = "identity", rng=None,
                dtype=np.float32) -> DOConvParams:
    """Fresh parameters: W and bias as PyTorch inits a conv with the same W', D per ``d_init``.

    - W ~ U(+-1/sqrt(fan_in)) and bias ~ U(+-1/sqrt(fan_in)) with ``fan_in = C_in/g * M * N``,
      the fan-in of W' (:func:`doconv.config.kaiming_bound`). At identity init W' sums the columns
      of W that share a tap (:func:`identity_fill`, whole blocks only): for M*N <= D_mul < 2*M*N,
      W' = W[..., :MN] exactly (the remaining columns start unused), so W' has exactly the
      distribution of a freshly initialised ``nn.Conv2d`` kernel; each further whole multiple of M*N
      adds one more uniform term per tap (D_mul = 2*M*N doubles the variance).
    - ``dtype`` must be a floating dtype (an integer W would round every draw to zero).
    - ``d_init='identity'``: D = I_fill (D' = 0), the paper's default (Section 4).
    - ``d_init='random'``: D ~ N(0, 2/MN), He init of a depthwise kernel with fan-in MN (Table 7).
    """
    if d_init not in ("identity", "random"):
        raise ValueError(f"d_init must be one of ('identity', 'random'), but got d_init={d_init!r}")
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise TypeError(f"dtype must be a floating dtype, but got dtype={np.dtype(dtype)}")
    rng = np.random.default_rng(rng)
    bound = kaiming_bound(config.fan_in())
    W = rng.uniform(-bound, bound, size=config.W_shape).astype(dtype)
    bias = rng.uniform(-bound, bound, size=config.bias_shape).astype(dtype) if config.bias else None
    if not config.has_D:
        D = None
    elif d_init == "identity":
        D = identity_D(config, dtype)
    else:
        D = rng.normal(0.0, np.sqrt(2.0 / config.MN), size=config.D_shape).astype(dtype)
    return DOConvParams(W, D, bias)


# ---- channel pairing ------------------------------------------------------------------------

def pairing_index(config: DOConvConfig, pairing: Pairing = "paper") -> np.ndarray:
    """Index map P of shape (C_out, C_in/g): row (o, c) of W is composed with D[P[o, c]].

    ``'paper'``: ``(o // (C_out/g))*(C_in/g) + c`` (the input channel the row reads).
    ``'official-torch'``: ``(o mod g)*(C_in/g) + c``. ``'official-tf'``/``'official-gluon'``:
    ``c*g + o // (C_out/g)``. An explicit integer array of that shape is returned as is.
    """
    o = np.arange(config.out_channels)[:, None]
    c = np.arange(config.in_per_group)[None, :]
    g, cin_g, cout_g = config.groups, config.in_per_group, config.out_per_group
    if isinstance(pairing, np.ndarray):
        index = pairing
    elif pairing == "paper":
        index = (o // cout_g) * cin_g + c
    elif pairing == "official-torch":
        index = (o % g) * cin_g + c
    elif pairing in ("official-tf", "official-gluon"):
        index = c * g + o // cout_g
    else:
        raise ValueError(f"pairing must be one of {PAIRINGS} or an index array, but got pairing={pairing!r}")
    index = np.broadcast_to(index, (config.out_channels, cin_g))
    if index.dtype.kind not in "iu" or index.min() < 0 or index.max() >= config.in_channels:
        raise ValueError(f"pairing index must hold ints in [0, {config.in_channels}), got {index!r}")
    return index


# ---- kernel composition (Eq. 3 / Fig. 3-b, Eq. 4 / Fig. 4-b) -------------------------------

def compose(params: DOConvParams, config: DOConvConfig, *, pairing: Pairing = "paper") -> np.ndarray:
    """Kernel composition W' = D^T o W (Eq. 3, Fig. 3-b; Eq. 4 for DO-DConv), shape (C_out, C_in/g, M, N).

    ``W'[o, c, m] = sum_s D[P[o, c], m, s] * W[o, c, s]`` with P from :func:`pairing_index`
    (the paper's pairing unless told otherwise). Without D (1x1 kernels) W' is W.

    >>> cfg = DOConvConfig(2, 4, 3, groups=2)
    >>> p = init_params(cfg, rng=0)              # identity D
    >>> np.allclose(compose(p, cfg).reshape(4, 1, 9), p.W)
    True
    """
    params.check(config, arrays=("W", "D"))  # the bias plays no part
    if params.D is None:
        return np.asarray(params.W).reshape(config.kernel_shape)
    W, D = np.asarray(params.W), np.asarray(params.D)
    if isinstance(pairing, str) and pairing == "paper":
        g, cin_g, cout_g = config.groups, config.in_per_group, config.out_per_group
        out = np.einsum(COMPOSE_EINSUM, D.reshape(g, cin_g, config.MN, config.S),
                        W.reshape(g, cout_g, cin_g, config.S), optimize=True)
    else:
        out = np.einsum("ocms,ocs->ocm", D[pairing_index(config, pairing)], W, optimize=True)
    return out.reshape(config.kernel_shape)


def compose_vjp(grad_kernel: np.ndarray, params: DOConvParams,
                config: DOConvConfig) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Vector-Jacobian product of :func:`compose`: (dL/dW, dL/dD) from dL/dW' (paper pairing).

    ``dW[o, c, s] = sum_m dW'[o, c, m] D[P[o, c], m, s]`` and
    ``dD[k, m, s] = sum_{(o, c): P[o, c] = k} dW'[o, c, m] W[o, c, s]`` -- for the paper's pairing the
    second sum runs over the C_out/g output channels of the group.
    """
    params.check(config, arrays=("W", "D"))
    if np.shape(grad_kernel) != config.kernel_shape:
        raise ValueError(f"grad_kernel has shape {np.shape(grad_kernel)} but {config!r} needs {config.kernel_shape}")
    if params.D is None:
        return np.asarray(grad_kernel).reshape(config.W_shape), None
    g, cin_g, cout_g, mn, s = config.groups, config.in_per_group, config.out_per_group, config.MN, config.S
    G = np.asarray(grad_kernel).reshape(g, cout_g, cin_g, mn)
    D = np.asarray(params.D).reshape(g, cin_g, mn, s)
    W = np.asarray(params.W).reshape(g, cout_g, cin_g, s)
    dW = np.einsum("gjcm,gcms->gjcs", G, D, optimize=True).reshape(config.W_shape)
    dD = np.einsum("gjcm,gjcs->gcms", G, W, optimize=True).reshape(config.D_shape)
    return dW, dD


def fold(params: DOConvParams, config: DOConvConfig) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Fold a trained layer into a plain convolution (paper Section 3, "Training and inference").

    Returns ``(kernel, bias)``: kernel W' in OIHW ``(C_out, C_in/g, M, N)`` and the bias unchanged,
    for a conventional conv with the layer's stride, padding, padding mode, dilation and groups.
    """
    params.check(config)
    return compose(params, config), (None if params.bias is None else np.asarray(params.bias))


def params_for_kernel(kernel: np.ndarray, config: DOConvConfig, bias=None) -> DOConvParams:
    """The identity-init parameters whose composed kernel is exactly ``kernel`` (OIHW).

    ``W[..., :MN] = kernel``, the remaining S - MN columns zero, D = I_fill: then W' = kernel with
    no arithmetic at all, so converting a trained conventional layer changes nothing (the paper's
    protocol, Section 4). Needs S >= MN.
    """
    kernel = np.asarray(kernel)
    if kernel.shape != config.kernel_shape:
        raise ValueError(f"kernel has shape {kernel.shape} but {config!r} needs {config.kernel_shape}")
    if config.S < config.MN:
        raise ValueError(f"a D_mul={config.S} < M*N={config.MN} layer cannot hold an arbitrary kernel")
    W = np.zeros(config.W_shape, dtype=kernel.dtype)
    W[..., :config.MN] = kernel.reshape(config.out_channels, config.in_per_group, config.MN)
    return DOConvParams(W, identity_D(config, kernel.dtype), None if bias is None else np.asarray(bias))


# ---- feature composition (Fig. 3-a / 4-a) --------------------------------------------------

def depthwise_kernel(D: np.ndarray, config: DOConvConfig) -> np.ndarray:
    """D as the kernel of the depthwise conv of feature composition: (C_in*S, 1, *kernel_size).

    Intermediate channel ``k*S + s`` holds ``sum_m D[k, m, s] * patch_k[m]`` (paper Eq. 2), so each
    input channel's S features are contiguous and a group's block is contiguous too.
    """
    return np.ascontiguousarray(np.asarray(D).transpose(0, 2, 1)).reshape(
        config.in_channels * config.S, 1, *config.kernel_size)


def pointwise_kernel(W: np.ndarray, config: DOConvConfig) -> np.ndarray:
    """W as the kernel of the grouped 1x1 conv of feature composition: (C_out, C_in/g * S, 1, ..., 1)."""
    return np.asarray(W).reshape(config.out_channels, config.in_per_group * config.S, *(1,) * config.rank)
