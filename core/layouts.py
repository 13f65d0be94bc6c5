"""Pure NumPy converters between the canonical layout and the frameworks' and official code's layouts.

Canonical (see :mod:`doconv.compose`): W ``(C_out, C_in/g, S)``, full D ``(C_in, MN, S)``, kernels
OIHW ``(C_out, C_in/g, M, N)``, inputs NCHW. The framework-layout converters take every rank (the table
shows 2-D; 1-D and 3-D drop or add a leading spatial axis); official checkpoints are 2-D only.

=====================  ====================================  =====================================
where                  kernel / input                        DO-Conv parameters
=====================  ====================================  =====================================
PyTorch, Gluon         OIHW, NCHW (canonical)                our backends: W, delta D' = D - I_fill
Keras Conv2D           HWIO ``(M, N, C_in/g, C_out)``, NHWC  (``channels_first`` is NCHW)
Keras DepthwiseConv2D  ``(M, N, C_in, mult)``                output channel ``c*mult + k``
official PyTorch       --                                    ``W (C_out, C_in/g, S)``, delta
                                                             ``D (C_in, MN, S)``, ``d_diag`` = I_fill
official TensorFlow    --                                    ``kernel (S, C_in/g, C_out)``, delta
                                                             ``D (MN, S, C_in)``
official GluonCV       --                                    conv ``weight (C_out, C_in/g, M, N)``
                                                             as W with S = MN, delta ``D (MN, MN, C_in)``
=====================  ====================================  =====================================

The official layers pair D channels with W rows differently from the paper when ``1 < groups``
(:func:`doconv.compose.pairing_index`). :func:`to_paper_pairing` moves their D slices to the
paper's pairing, which reproduces their composed kernel exactly whenever every paper channel is
served by a single official D slice: always for the TensorFlow/GluonCV pairing, and for the
PyTorch pairing when ``groups == 1`` or ``C_out/groups == 1``. Otherwise (official PyTorch
DO-GConv, and DO-DConv with a channel multiplier > 1) no D in the paper's pairing gives the same
layer; ``refold=True`` then imports the official composed kernel W' itself (W = W' padded with
zero columns, D = I_fill): identical outputs, but the split of W' into D and W is reset.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np

from .compose import DOConvParams, compose, identity_D, identity_fill, pairing_index, params_for_kernel
from .config import DOConvConfig
from .contract import LayerSpec

# ---- framework kernels and inputs ---------------------------------------------------------


def oihw_to_hwio(kernel: np.ndarray) -> np.ndarray:
    """Channels-first kernel -> Keras' channels-last kernel: OIHW -> HWIO in 2-D, (O, I, *k) -> (*k, I, O)
    in any rank (Conv1D's (K, I, O), Conv3D's (T, M, N, I, O))."""
    kernel = np.asarray(kernel)
    return np.ascontiguousarray(kernel.transpose(*range(2, kernel.ndim), 1, 0))


def hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    """Keras' channels-last kernel ``(*k, I, O)`` -> channels-first ``(O, I, *k)``, any rank."""
    kernel = np.asarray(kernel)
    return np.ascontiguousarray(kernel.transpose(kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2)))


def depthwise_hwcm_to_oihw(kernel: np.ndarray) -> np.ndarray:
    """Keras DepthwiseConv kernel ``(*k, C_in, mult)`` -> grouped ``(C_in*mult, 1, *k)``, any rank."""
    *k, cin, mult = np.shape(kernel)
    rank = len(k)
    return np.ascontiguousarray(np.asarray(kernel).transpose(rank, rank + 1, *range(rank))).reshape(cin * mult, 1, *k)


def oihw_to_depthwise_hwcm(kernel: np.ndarray, in_channels: int) -> np.ndarray:
    """Grouped ``(C_in*mult, 1, *k)`` -> Keras DepthwiseConv ``(*k, C_in, mult)``, any rank."""
    cout, _, *k = np.shape(kernel)
    rank = len(k)
    return np.ascontiguousarray(np.asarray(kernel).reshape(in_channels, cout // in_channels, *k)
                                .transpose(*range(2, rank + 2), 0, 1))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """Channels-first input -> channels-last, any rank (NCL -> NLC, NCDHW -> NDHWC); also a channels-first
    kernel (O, I, *k) -> (O, *k, I), the order of a channels-last Gluon convolution's weight."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    """Channels-last input -> channels-first, any rank; also a kernel (O, *k, I) -> (O, I, *k)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))


# ---- the trainable delta D' = D - I_fill ---------------------------------------------------

def D_to_delta(D: Optional[np.ndarray], config: DOConvConfig) -> Optional[np.ndarray]:
    """The trainable delta D' that backends store (zeros at identity init)."""
    return None if D is None else np.asarray(D) - identity_fill(config.MN, config.S, np.asarray(D).dtype)


def delta_to_D(delta: Optional[np.ndarray], config: DOConvConfig) -> Optional[np.ndarray]:
    """The full D from a stored delta D'."""
    return None if delta is None else np.asarray(delta) + identity_fill(config.MN, config.S, np.asarray(delta).dtype)


# ---- official checkpoints ----------------------------------------------------------------

OFFICIAL_FLAVOURS = ("torch", "tf", "gluon")


def check_official_rank(config: Union[DOConvConfig, LayerSpec], *, where: Optional[str] = None) -> None:
    """The official code (yangyanli/DO-Conv) has 2-D layers only: a checkpoint of it never fits another rank.

    ``config`` may be a :class:`~doconv.contract.LayerSpec`, so a layer whose input channels are not known yet
    is refused for its rank rather than for being unbuilt. ``where`` names the layer that holds ``config`` and
    opens the message (the backends pass ``"layer 'conv' is a DOConv3d"``), so an error about one layer of a
    model says which.
    """
    if config.rank != 2:
        subject = "" if where is None else f"{where}: "
        raise ValueError(f"{subject}official DO-Conv checkpoints hold 2-D layers only (the official code has no 1-D "
                         f"or 3-D layer), but got rank={config.rank} ({config!r}); load 1-D / 3-D weights from a "
                         f"canonical file instead (doconv.load, or the backend's import_canonical)")


def official_shapes(config: DOConvConfig, flavour: str) -> dict:
    """Shapes of the official layer's arrays for this config (keys as in its checkpoints)."""
    check_official_rank(config)
    mn, s, cin, cin_g, cout = config.MN, config.S, config.in_channels, config.in_per_group, config.out_channels
    if flavour == "torch":
        shapes = {"W": (cout, cin_g, s), "D": (cin, mn, s), "d_diag": (cin, mn, s)}
    elif flavour == "tf":
        shapes = {"kernel": (s, cin_g, cout), "D": (mn, s, cin)}
    elif flavour == "gluon":
        if s != mn:
            raise ValueError(f"the official GluonCV layer supports only D_mul = M*N = {mn}, but got D_mul={s}")
        shapes = {"weight": config.kernel_shape, "D": (mn, mn, cin)}
    else:
        raise ValueError(f"flavour must be one of {OFFICIAL_FLAVOURS}, but got flavour={flavour!r}")
    if not config.has_D:
        shapes.pop("D"), shapes.pop("d_diag", None)
    if config.bias:
        shapes["bias"] = (cout,)
    return shapes


def _checked(arrays: Mapping[str, np.ndarray], shapes: dict, flavour: str) -> dict:
    optional = {"d_diag"}
    out = {}
    for key, shape in shapes.items():
        if key not in arrays:
            if key in optional:
                continue
            raise ValueError(f"official {flavour} checkpoint is missing {key!r} (expected shape {shape}); "
                             f"it has {sorted(arrays)}")
        value = np.asarray(arrays[key])
        if value.shape != tuple(shape):
            raise ValueError(f"official {flavour} checkpoint: {key!r} has shape {value.shape}, expected {shape}")
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():  # as interchange files refuse
            raise ValueError(f"official {flavour} checkpoint: {key!r} holds {np.size(value) - np.isfinite(value).sum()}"
                             f" NaN or infinite value(s) of {np.size(value)} (a damaged or diverged checkpoint)")
        out[key] = value
    extra = sorted(set(arrays) - set(shapes))
    if extra:
        raise ValueError(f"official {flavour} checkpoint has unexpected entries {extra} for this config "
                         f"(expected {sorted(shapes)})")
    return out


def official_params(arrays: Mapping[str, np.ndarray], config: DOConvConfig, flavour: str) -> DOConvParams:
    """The official arrays in canonical layout, *still in the official pairing* (see :func:`to_paper_pairing`)."""
    a = _checked(arrays, official_shapes(config, flavour), flavour)
    bias = a.get("bias")
    if flavour == "torch":
        W = a["W"]
        D = None if not config.has_D else a["D"] + (a["d_diag"] if "d_diag" in a else identity_D(config, a["D"].dtype))
    elif flavour == "tf":
        W = np.ascontiguousarray(a["kernel"].transpose(2, 1, 0))
        D = None if not config.has_D else delta_to_D(a["D"].transpose(2, 0, 1), config)
    else:
        W = a["weight"].reshape(config.W_shape)
        D = None if not config.has_D else delta_to_D(a["D"].transpose(2, 0, 1), config)
    return DOConvParams(W, None if D is None else np.ascontiguousarray(D), bias)


def to_paper_pairing(params: DOConvParams, config: DOConvConfig, pairing, *, refold: bool = False) -> DOConvParams:
    """Re-express parameters composed in another ``pairing`` in the paper's, with the same W'.

    Paper channel ``q`` must take the D slice of the official channel that serves every row
    ``(o, c)`` with paper index ``q``; if two rows with the same ``q`` use different official
    slices, no paper-pairing D exists and this raises, unless ``refold=True`` (see module doc).
    """
    if params.D is None:
        return params
    paper = pairing_index(config, "paper").ravel()
    theirs = pairing_index(config, pairing).ravel()
    source = np.empty(config.in_channels, dtype=np.int64)
    source[paper] = theirs  # the last write wins; checked below
    if np.array_equal(source[paper], theirs):
        return DOConvParams(params.W, np.ascontiguousarray(params.D[source]), params.bias)
    if refold:
        return params_for_kernel(compose(params, config, pairing=pairing), config, params.bias)
    raise ValueError(
        f"pairing={pairing!r} cannot be expressed in the paper's pairing for {config!r}: rows of W that read the "
        f"same input channel use different D slices there. Pass refold=True to import the composed kernel W' "
        f"exactly (W = W', D = identity: same outputs, the D/W split is reset).")


def from_official(arrays: Mapping[str, np.ndarray], config: DOConvConfig, flavour: str, *,
                  refold: bool = False) -> DOConvParams:
    """Import an official layer's arrays (``flavour`` in torch/tf/gluon) with the exact same composed kernel."""
    pairing = {"torch": "official-torch", "tf": "official-tf", "gluon": "official-gluon"}[flavour] \
        if flavour in OFFICIAL_FLAVOURS else flavour
    return to_paper_pairing(official_params(arrays, config, flavour), config, pairing, refold=refold)
