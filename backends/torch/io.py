"""Parameters in and out of ``DOConv1d/2d/3d``: the backend contract, the canonical file, official checkpoints.

All conversions go through the core (:mod:`doconv.layouts`, :mod:`doconv.interchange`); this module
only moves arrays between NumPy (canonical layout, *full* D) and the layer's tensors (W, delta D', bias).
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping

import numpy as np
import torch
from torch import nn

from doconv import ROOT_NAME, DOConvConfig, DOConvParams, load_matching, save, standardize_flag
from doconv.layouts import D_to_delta, check_official_rank, delta_to_D, from_official

from .layer import LAYERS, _DOConvNd


def layer_from_config(config: DOConvConfig, *, dtype="float32", composition: str = "kernel", **kwargs) -> _DOConvNd:
    """A ready ``DOConv1d`` / ``DOConv2d`` / ``DOConv3d`` (by ``config.rank``) for ``config`` (``kwargs``:
    ``device``, ``d_init``)."""
    if not isinstance(config, DOConvConfig):
        raise TypeError(f"config must be a doconv.DOConvConfig, but got {type(config).__name__}")
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, but got dtype={dtype!r}")
    return LAYERS[config.rank](config.in_channels, config.out_channels, config.kernel_size, config.stride,
                               config.padding, config.dilation, config.groups, config.bias, config.padding_mode,
                               dtype=torch_dtype, D_mul=config.D_mul, composition=composition,
                               depthwise_separable=config.depthwise_separable, **kwargs)


def _check_layer(layer) -> _DOConvNd:
    if not isinstance(layer, _DOConvNd):
        raise TypeError(f"layer must be a doconv.torch.DOConv1d, DOConv2d or DOConv3d, but got {type(layer).__name__}")
    return layer


def layer_config(layer: _DOConvNd) -> DOConvConfig:
    return _check_layer(layer).config


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16,) else t).numpy().copy()


def get_params(layer: _DOConvNd) -> DOConvParams:
    """Canonical NumPy parameters (full D = I_fill + D'), in the layer's dtype (bfloat16 as float32)."""
    c = _check_layer(layer).config
    bias = None if layer.bias is None else _numpy(layer.bias)
    if layer.deployed:  # only W' is left: the identity-init parameters that compose to it
        from doconv import params_for_kernel
        return params_for_kernel(_numpy(layer.compose()), c, bias)
    D = None if layer.D is None else delta_to_D(_numpy(layer.D), c)
    return DOConvParams(_numpy(layer.W), D, bias)


def set_params(layer: _DOConvNd, params: DOConvParams, *, name: str = None) -> None:
    """Load canonical parameters (full D); a shape mismatch raises ValueError naming layer, array and shapes."""
    _check_params(layer, params, name)
    _write_params(layer, params)


def _check_params(layer: _DOConvNd, params: DOConvParams, name) -> None:
    c = _check_layer(layer).config
    if not isinstance(params, DOConvParams):
        raise TypeError(f"params must be a doconv.DOConvParams, but got {type(params).__name__}")
    if layer.deployed:
        raise ValueError(f"layer {name or type(layer).__name__} is deployed (folded): it holds only W'")
    params.check(c, where=f"layer {name or repr(c)}")


def _write_params(layer: _DOConvNd, params: DOConvParams) -> None:
    layer.invalidate_cache()  # a write doconv makes itself: an open cached() scope must not keep the old kernel
    with torch.no_grad():
        for name, value in _state_of(layer, params).items():
            getattr(layer, name).copy_(value)  # into the stored layout (c-major W keeps its strides)


def doconv_layers(model: nn.Module) -> Dict[str, _DOConvNd]:
    """Every DO-Conv layer (``DOConv1d/2d/3d``) of ``model`` by module path (a bare layer is named ``'self'``)."""
    return {name or ROOT_NAME: m for name, m in model.named_modules() if isinstance(m, _DOConvNd)}


def export_canonical(model: nn.Module, path, *, allow_nonfinite: bool = False) -> None:
    """Write every DO-Conv layer of ``model`` (any rank) to the core's canonical safetensors file, named by module path.

    NaN or +-inf in a parameter is a ValueError unless ``allow_nonfinite=True`` (:func:`doconv.save`)."""
    layers = _doconv_layers_of(model, "export")
    save(path, {name: (m.config, get_params(m)) for name, m in layers.items()}, allow_nonfinite=allow_nonfinite)


def _doconv_layers_of(model: nn.Module, what: str) -> Dict[str, _DOConvNd]:
    """The model's layers for ``what`` (export, import ...), or a TypeError / ValueError saying what is wrong.
    Paths are those of the model inside its wrappers (:func:`unwrap`), so files move between them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    layers = doconv_layers(unwrap(model))
    if not layers:
        raise ValueError(f"model has no DO-Conv layer (DOConv1d/2d/3d) to {what} ({type(model).__name__}): "
                         f"convert it first "
                         f"(doconv.torch.convert(model))")
    return layers


def import_canonical(model: nn.Module, path, *, strict: bool = True, allow_nonfinite: bool = False) -> List[str]:
    """Load a canonical file into ``model``: every layer of the file must be a DO-Conv layer of the model (of
    the file's rank) and, with ``strict=True``, every DO-Conv layer must be in the file.

    Matching is the core's :func:`doconv.load_matching` (``strict=True``): configs are compared
    resolved, so a file whose 'same' padding was written explicitly (Keras/Gluon, or ``padding=1``)
    loads into a ``padding='same'`` layer. Nothing is written unless every layer matches; a damaged file
    (checksums) or one holding NaN / +-inf (unless ``allow_nonfinite=True``) is a ValueError. Returns the
    names of the layers loaded.
    """
    layers = _doconv_layers_of(model, "import a canonical file into")
    params = load_matching(path, {name: m.config for name, m in layers.items()},
                           strict=standardize_flag(strict, "strict"), bare=isinstance(unwrap(model), _DOConvNd),
                           allow_nonfinite=allow_nonfinite)
    for name in params:  # every layer checked before any is written
        _check_params(layers[name], params[name], repr(name))
    for name in params:
        _write_params(layers[name], params[name])
    return list(params)


#: Prefixes that wrappers put before a model's keys: DataParallel / DDP, torch.compile.
WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel`` / ``DistributedDataParallel`` / ``torch.compile`` wrappers: its paths
    are the ones checkpoints and interchange files name (without ``module.`` / ``_orig_mod.``)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def import_official(model: nn.Module, arrays: Mapping[str, np.ndarray], *, refold: bool = False,
                    strict: bool = True) -> List[str]:
    """Load a checkpoint of the official PyTorch DO-Conv code into ``model``; returns the layers converted.

    ``arrays`` is a whole model's state dict (or, for a bare ``DOConv2d``, one layer's: keys ``W``, ``D`` = the
    delta, ``d_diag``, ``bias``); wrapper prefixes (``module.``, ``_orig_mod.``) are stripped from its keys and
    wrappers from ``model``. Each official layer's tensors are converted (:func:`doconv.layouts.from_official`),
    an official 1x1 layer's ``W`` (C_out, C_in/g, 1) becomes the kernel of the 1x1 ``nn.Conv2d`` that
    :func:`convert` keeps, and the whole dict, BatchNorm and the rest included, is loaded by
    ``model.load_state_dict(..., strict=strict)``; nothing is written unless every layer converts.

    The official layer pairs W rows with D slices as ``(o mod g)*(C_in/g) + c``; the core permutes D into
    the paper's pairing, which reproduces the official composed kernel exactly when ``groups == 1`` or
    ``C_out/groups == 1``. Otherwise (official DO-GConv, DO-DConv with a channel multiplier) no
    paper-pairing D exists and a ValueError says so; ``refold=True`` then imports the composed kernel itself
    (W = W', D = I_fill): identical outputs, the D/W split reset. The official code has 2-D layers only:
    a ``DOConv1d`` / ``DOConv3d`` in ``model`` is a ValueError saying so, before anything is written.
    """
    model = unwrap(model) if isinstance(model, nn.Module) else model
    layers = _doconv_layers_of(model, "import an official checkpoint into")
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a mapping of names to tensors (a state dict), but got "
                        f"{type(arrays).__name__}")
    strict = standardize_flag(strict, "strict")
    tensors = {WRAPPER_PREFIX.sub("", k): v for k, v in arrays.items()}
    bare = isinstance(model, _DOConvNd)
    out = dict(tensors)
    for name, layer in layers.items():
        check_official_rank(layer.config, where=f"layer {name!r} is a {type(layer).__name__}")
        prefix = "" if bare else name + "."
        own = {k[len(prefix):]: k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not own:
            raise ValueError(f"arrays has no tensors for layer {name!r} (no key starts with {prefix!r}); "
                             f"its first keys are {sorted(tensors)[:4]}")
        arrays_of_layer = {short: _numpy(tensors[k]) if isinstance(tensors[k], torch.Tensor) else
                           np.asarray(tensors[k]) for short, k in own.items()}
        try:
            params = from_official(arrays_of_layer, layer.config, "torch", refold=refold)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        _check_params(layer, params, repr(name))
        for k in own.values():
            del out[k]
        out.update({prefix + k: v for k, v in _state_of(layer, params).items()})
    for name, conv in ([] if bare else model.named_modules()):  # official 1x1 layers, kept as nn.Conv2d
        if type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and f"{name}.W" in out:
            W = out.pop(f"{name}.W")
            out[f"{name}.weight"] = torch.as_tensor(np.asarray(W) if not isinstance(W, torch.Tensor) else W
                                                    ).reshape(conv.weight.shape)
    model.load_state_dict(out, strict=strict)
    return list(layers)


def _state_of(layer: _DOConvNd, params: DOConvParams) -> Dict[str, torch.Tensor]:
    """``params`` (canonical, full D) as ``layer``'s state_dict entries (W, the delta D', bias)."""
    like = dict(dtype=layer.W.dtype, device=layer.W.device)
    state = {"W": torch.as_tensor(np.asarray(params.W), **like)}
    if layer.D is not None:
        state["D"] = torch.as_tensor(D_to_delta(np.asarray(params.D, dtype=np.float64), layer.config), **like)
    if layer.bias is not None:
        state["bias"] = torch.as_tensor(np.asarray(params.bias), **like)
    return state
