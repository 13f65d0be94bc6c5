"""DO-Conv: Depthwise Over-parameterized Convolution (Cao et al.) -- the framework-neutral specification.

A DO-Conv layer trains a depthwise kernel ``D`` and a conventional kernel ``W`` whose composition
is one ordinary convolution kernel (paper Eq. 3)::

    O = (D, W) * P = W * (D o P)        feature composition (Fig. 3-a)
                   = (D^T o W) * P      kernel composition  (Fig. 3-b)
    W'[o, c, m] = sum_s D[(o // (C_out/g)) * (C_in/g) + c, m, s] * W[o, c, s]

After training, W' is folded into a plain convolution: inference costs exactly what a conventional
layer costs. This package is NumPy only and imports no deep-learning framework; read it in order:

- :mod:`doconv.config`      -- ``DOConvConfig``: arguments, validation, shapes, padding arithmetic
- :mod:`doconv.compose`     -- ``DOConvParams``, init, channel pairing, compose / its VJP, fold
- :mod:`doconv.reference`   -- a reference convolution in 1-3 dimensions (pad, strided view, contraction), its
  VJP, forward
- :mod:`doconv.cost`        -- MACC / memory of kernel vs feature composition, ``'auto'``
- :mod:`doconv.layouts`     -- framework layouts and the official code's checkpoints
- :mod:`doconv.interchange` -- the canonical safetensors file for whole models
- :mod:`doconv.selection`   -- ``convert``'s include / exclude glob patterns, shared by every backend
- :mod:`doconv.contract`    -- what every backend promises: choices, ``LayerSpec``, the conversion report,
  ``convert``'s planning, the ``Backend`` protocol
- :mod:`doconv.cases`       -- the shared test-case table; :mod:`doconv.tolerance` -- per-dtype tolerances

Framework layers live in ``doconv.torch``, ``doconv.tf`` and ``doconv.mxnet``.
"""

from .compose import (COMPOSE_EINSUM, PAIRINGS, DOConvParams, compose, compose_vjp, depthwise_kernel, fold,
                      identity_D, identity_fill, init_params, pairing_index, params_for_kernel, pointwise_kernel)
from .config import (PADDING_MODES, RANKS, DOConvConfig, same_pads, standardize_flag, standardize_pair, standardize_padding,
                     standardize_tuple)
from .cost import CompositionCost, choose_composition, composition_cost
from . import contract, selection
from .interchange import ROOT_NAME, load, load_matching, save
from .reference import conv, conv2d, conv2d_vjp, conv_vjp, forward, pad
from .tolerance import TOLERANCES, assert_close, max_error, tolerance

__version__ = "0.1.0"

__all__ = [
    "COMPOSE_EINSUM", "PAIRINGS", "PADDING_MODES", "RANKS", "ROOT_NAME", "TOLERANCES", "CompositionCost", "DOConvConfig",
    "DOConvParams",
    "assert_close", "choose_composition", "compose", "compose_vjp", "composition_cost", "conv", "conv2d", "conv2d_vjp",
    "conv_vjp",
    "depthwise_kernel", "fold", "forward", "identity_D", "identity_fill", "init_params", "load", "load_matching", "max_error", "pad",
    "pairing_index", "params_for_kernel", "pointwise_kernel", "same_pads", "save", "standardize_flag", "standardize_pair",
    "standardize_padding", "standardize_tuple", "tolerance",
]
