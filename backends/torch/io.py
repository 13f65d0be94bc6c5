"""Parameters in and out of ``DOConv2d``: the backend contract, the canonical file, official checkpoints.

All conversions go through the core (:mod:`doconv.layouts`, :mod:`doconv.interchange`); this module
only moves arrays between NumPy (canonical layout, *full* D) and the layer's tensors (W, delta D', bias).
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np
import torch
from torch import nn

from doconv import ROOT_NAME, DOConvConfig, DOConvParams, load_matching, save
from doconv.layouts import D_to_delta, delta_to_D, from_official

from .layer import DOConv2d


def layer_from_config(config: DOConvConfig, *, dtype="float32", composition: str = "auto", **kwargs) -> DOConv2d:
    """A ready ``DOConv2d`` for ``config`` (``kwargs``: ``device``, ``d_init``)."""
    if not isinstance(config, DOConvConfig):
        raise TypeError(f"config must be a doconv.DOConvConfig, but got {type(config).__name__}")
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, but got dtype={dtype!r}")
    return DOConv2d(config.in_channels, config.out_channels, config.kernel_size, config.stride, config.padding,
                    config.dilation, config.groups, config.bias, config.padding_mode, dtype=torch_dtype,
                    D_mul=config.D_mul, composition=composition, depthwise_separable=config.depthwise_separable,
                    **kwargs)


def _check_layer(layer) -> DOConv2d:
    if not isinstance(layer, DOConv2d):
        raise TypeError(f"layer must be a doconv.torch.DOConv2d, but got {type(layer).__name__}")
    return layer


def layer_config(layer: DOConv2d) -> DOConvConfig:
    return _check_layer(layer).config


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16,) else t).numpy().copy()


def get_params(layer: DOConv2d) -> DOConvParams:
    """Canonical NumPy parameters (full D = I_fill + D'), in the layer's dtype (bfloat16 as float32)."""
    c = _check_layer(layer).config
    bias = None if layer.bias is None else _numpy(layer.bias)
    if layer.deployed:  # only W' is left: the identity-init parameters that compose to it
        from doconv import params_for_kernel
        return params_for_kernel(_numpy(layer.compose()), c, bias)
    D = None if layer.D is None else delta_to_D(_numpy(layer.D), c)
    return DOConvParams(_numpy(layer.W), D, bias)


def set_params(layer: DOConv2d, params: DOConvParams, *, name: str = None) -> None:
    """Load canonical parameters (full D); a shape mismatch raises ValueError naming layer, array and shapes."""
    _check_params(layer, params, name)
    _write_params(layer, params)


def _check_params(layer: DOConv2d, params: DOConvParams, name) -> None:
    c = _check_layer(layer).config
    if not isinstance(params, DOConvParams):
        raise TypeError(f"params must be a doconv.DOConvParams, but got {type(params).__name__}")
    if layer.deployed:
        raise ValueError(f"layer {name or type(layer).__name__} is deployed (folded): it holds only W'")
    params.check(c, where=f"layer {name or repr(c)}")


def _write_params(layer: DOConv2d, params: DOConvParams) -> None:
    c = layer.config
    with torch.no_grad():
        layer.W.copy_(torch.as_tensor(np.asarray(params.W)))
        if layer.D is not None:
            layer.D.copy_(torch.as_tensor(D_to_delta(np.asarray(params.D, dtype=np.float64), c)))
        if layer.bias is not None:
            layer.bias.copy_(torch.as_tensor(np.asarray(params.bias)))


def doconv_layers(model: nn.Module) -> Dict[str, DOConv2d]:
    """Every ``DOConv2d`` of ``model`` by module path (a bare layer is named ``'self'``)."""
    return {name or ROOT_NAME: m for name, m in model.named_modules() if isinstance(m, DOConv2d)}


def export_canonical(model: nn.Module, path) -> None:
    """Write every ``DOConv2d`` of ``model`` to the core's canonical safetensors file, named by module path."""
    layers = doconv_layers(model)
    if not layers:
        raise ValueError(f"model has no DOConv2d layer to export ({type(model).__name__})")
    save(path, {name: (m.config, get_params(m)) for name, m in layers.items()})


def import_canonical(model: nn.Module, path) -> None:
    """Load a canonical file into ``model``: every ``DOConv2d`` must be in the file and vice versa.

    Matching is the core's :func:`doconv.load_matching` (``strict=True``): configs are compared
    resolved, so a file whose 'same' padding was written explicitly (Keras/Gluon, or ``padding=1``)
    loads into a ``padding='same'`` layer. Nothing is written unless every layer matches.
    """
    layers = doconv_layers(model)
    params = load_matching(path, {name: m.config for name, m in layers.items()}, strict=True,
                           bare=isinstance(model, DOConv2d))
    for name, m in layers.items():  # every layer checked before any is written
        _check_params(m, params[name], repr(name))
    for name, m in layers.items():
        _write_params(m, params[name])


def import_official(layer: DOConv2d, arrays: Mapping[str, np.ndarray], *, refold: bool = False) -> None:
    """Load a state_dict of the official PyTorch DO-Conv layer (keys W, D = delta, d_diag, bias).

    The official layer pairs W rows with D slices as ``(o mod g)*(C_in/g) + c``; the core
    (:func:`doconv.layouts.from_official`) permutes D into the paper's pairing, which reproduces the
    official composed kernel exactly when ``groups == 1`` or ``C_out/groups == 1``. Otherwise (official
    DO-GConv, DO-DConv with a channel multiplier) no paper-pairing D exists and a ValueError says so;
    ``refold=True`` then imports the composed kernel itself (W = W', D = I_fill): identical outputs,
    the D/W split reset.
    """
    c = _check_layer(layer).config
    numpy_arrays = {k: (_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in arrays.items()}
    set_params(layer, from_official(numpy_arrays, c, "torch", refold=refold))
