"""Parameters in and out of the DO-Conv layers (``DOConv1D`` / ``2D`` / ``3D``): the backend contract, the
canonical file, official GluonCV arrays (2-D only, as the official code is).

All conversions go through the core (:mod:`doconv.layouts`, :mod:`doconv.interchange`); this module only
moves arrays between NumPy (canonical layout, *full* D) and the layer's Parameters (W, delta D', bias).

Layer names are block paths, the keys ``save_parameters`` uses (``"features.0.conv1"``): a
``HybridSequential``'s children by index, every other child by its attribute name. A model that is itself
the layer (a bare convolution or DO-Conv layer) has the path ``""`` in reports and :data:`doconv.ROOT_NAME` in
files, as in PyTorch.

A Gluon convolution's own ``weight`` is ordered as its data (:func:`doconv.mxnet.layer.gluon_kernel_shape`):
channels-last layouts hold (C_out, *kernel_size, C_in/g). :func:`kernel_from_gluon` / :func:`kernel_to_gluon` are
the only way such a weight enters or leaves the canonical layout.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import numpy as np

import doconv
from doconv import standardize_flag
from doconv.layouts import D_to_delta, check_official_rank, delta_to_D, from_official, nchw_to_nhwc, nhwc_to_nchw

from ._mx import gluon, mx
from .cache import check_model
from .layer import LAYERS, _DOConv, channels_last

#: Gluon's Convolution pads symmetrically with zeros, fixed at construction: no per-side or non-zero
#: padding (so no 'causal', which pads one side), and no TF-style 'same' at stride > 1 (its pads depend on
#: the input size). 'same' at stride 1 with an odd kernel and 'valid' are translated to symmetric ints by
#: :func:`layer_from_config`.
UNSUPPORTED_FEATURES = frozenset({"asymmetric_padding", "padding_mode", "same_strided", "same_even_kernel",
                                  "causal_padding"})


# ---- one layer ---------------------------------------------------------------------------------------

def symmetric_padding(config: doconv.DOConvConfig) -> Tuple[int, ...]:
    """The Gluon ``padding`` of a config, one int per spatial axis, or ValueError when Gluon cannot express
    its padding."""
    if config.padding_mode != "zeros":
        raise ValueError(f"Gluon pads with zeros only, but got padding_mode={config.padding_mode!r}")
    if config.padding == "same" and max(config.stride) > 1:
        raise ValueError(f"padding='same' with stride={config.stride} depends on the input size; Gluon's padding "
                         f"is fixed at construction: give symmetric ints")
    pads = config.pads(*(1,) * config.rank)  # at stride 1, 'same' pads do not depend on the input size
    if any(before != after for before, after in pads):
        raise ValueError(f"Gluon pads symmetrically, but {config!r} needs per-side pads {pads}")
    return tuple(before for before, _ in pads)


def layer_from_config(config: doconv.DOConvConfig, *, dtype="float32", composition="kernel", ctx=None,
                      **kwargs) -> _DOConv:
    """An initialised ``DOConv1D`` / ``DOConv2D`` / ``DOConv3D`` (by ``config.rank``) for ``config`` on
    ``ctx`` (default ``mx.cpu()``), cast to ``dtype``."""
    layer = LAYERS[config.rank](config.out_channels, config.kernel_size, strides=config.stride,
                                padding=symmetric_padding(config), dilation=config.dilation, groups=config.groups,
                                use_bias=config.bias, in_channels=config.in_channels, D_mul=config.D_mul,
                                depthwise_separable=config.depthwise_separable, composition=composition, **kwargs)
    layer.initialize(ctx=ctx or mx.cpu())
    layer.cast(dtype)
    return layer


def layer_config(layer: _DOConv) -> doconv.DOConvConfig:
    """The layer's :class:`doconv.DOConvConfig` (padding as symmetric per-side pairs)."""
    if not isinstance(layer, _DOConv):
        raise TypeError(f"layer must be a doconv.mxnet DO-Conv layer (DOConv1D, DOConv2D or DOConv3D), but got "
                        f"{type(layer).__name__}")
    return layer.config


def get_params(layer: _DOConv) -> doconv.DOConvParams:
    """Canonical NumPy parameters in the layer's dtype: W, the *full* D = I_fill + D', bias."""
    config = layer_config(layer)
    read = lambda p: None if p is None else p.data(p.list_ctx()[0]).asnumpy()  # noqa: E731
    return doconv.DOConvParams(read(layer.W), delta_to_D(read(layer.D), config), read(layer.bias))


def set_params(layer: _DOConv, params: doconv.DOConvParams, *, name: Optional[str] = None) -> None:
    """Write canonical parameters (full D) into every context's copy; ValueError naming layer, array and shapes."""
    _check_params(layer, params, name)
    _write_params(layer, params)


def _check_params(layer: _DOConv, params: doconv.DOConvParams, name: Optional[str]) -> None:
    if not isinstance(params, doconv.DOConvParams):
        raise TypeError(f"params must be a doconv.DOConvParams, but got {type(params).__name__}")
    params.check(layer_config(layer), where=f"layer {name or layer.name!r}")


def _write_params(layer: _DOConv, params: doconv.DOConvParams) -> None:
    layer.invalidate_cache()  # a write doconv makes itself: an open cached() scope must not keep the old W'
    dtype = np.dtype(layer.W.dtype)
    D = None if layer.D is None else D_to_delta(params.D, layer.config)
    for param, value in ((layer.W, params.W), (layer.D, D), (layer.bias, params.bias)):
        if param is not None:
            param.set_data(mx.nd.array(np.asarray(value, dtype=dtype), dtype=dtype))


def param_contexts(param) -> Optional[list]:
    """The contexts holding ``param``'s data, or None while it was never initialised."""
    try:
        return param.list_ctx()
    except RuntimeError:
        return None


# ---- Gluon convolution weights -----------------------------------------------------------------------

def kernel_from_gluon(weight, layout: str) -> np.ndarray:
    """A Gluon convolution's ``weight`` of ``layout`` as the canonical kernel (C_out, C_in/g, *kernel_size).

    A channels-last weight (C_out, *kernel_size, C_in/g) has its channel axis last, as a channels-last input
    does: it moves back to axis 1 as an input's does (:func:`doconv.layouts.nhwc_to_nchw`, any rank).
    """
    return nhwc_to_nchw(weight) if channels_last(layout) else np.asarray(weight)


def kernel_to_gluon(kernel, layout: str) -> np.ndarray:
    """The canonical kernel (C_out, C_in/g, *kernel_size) as a Gluon convolution's ``weight`` of ``layout``
    (the inverse of :func:`kernel_from_gluon`)."""
    return nchw_to_nhwc(kernel) if channels_last(layout) else np.asarray(kernel)


# ---- walking a network -------------------------------------------------------------------------------

def named_blocks(block: gluon.Block, prefix: str = "") -> Iterator[Tuple[str, gluon.Block, gluon.Block, str]]:
    """Every descendant as ``(path, block, parent, key)``, depth first, in registration order; a block
    reached at several paths is yielded at each."""
    for key, child in block._children.items():
        path = f"{prefix}.{key}" if prefix else key
        yield path, child, block, key
        yield from named_blocks(child, path)


# ---- files -------------------------------------------------------------------------------------------

def doconv_layers(model: gluon.Block) -> dict:
    """``{path: layer}`` of every DO-Conv layer of a model, each once (a bare layer is :data:`doconv.ROOT_NAME`, as in
    PyTorch: Gluon's own block names come from a process-wide counter)."""
    check_model(model)
    if isinstance(model, _DOConv):
        return {doconv.ROOT_NAME: model}
    seen, out = set(), {}
    for path, block, _, _ in named_blocks(model):
        if isinstance(block, _DOConv) and id(block) not in seen:
            seen.add(id(block))
            out[path] = block
    return out


def _layers(model: gluon.Block, what: str) -> dict:
    layers = doconv_layers(model)
    if not layers:
        raise ValueError(f"model has no DO-Conv layer to {what} ({type(model).__name__} holds none): convert it "
                         f"first (doconv.mxnet.convert(model))")
    return layers


def export_canonical(model: gluon.Block, path, *, allow_nonfinite: bool = False) -> None:
    """Write every DO-Conv layer of ``model`` to the core's interchange file (:func:`doconv.save`), named by block
    path. NaN or +-inf in a parameter is a ValueError unless ``allow_nonfinite=True``."""
    layers = _layers(model, "export")
    doconv.save(path, {name: (layer_config(layer), get_params(layer)) for name, layer in layers.items()},
                allow_nonfinite=allow_nonfinite)


def import_canonical(model: gluon.Block, path, *, strict: bool = True, allow_nonfinite: bool = False) -> List[str]:
    """Load an interchange file into ``model`` (:func:`doconv.load_matching`); returns the layer names loaded.

    ValueError on a model without DO-Conv layers (convert it first), a layer the model lacks, (``strict``)
    a model layer missing from the file, a config that differs from the model's layer, a damaged file, or
    NaN / +-inf unless ``allow_nonfinite=True``; every layer is checked before any is written. Configs are
    compared resolved (:meth:`doconv.DOConvConfig.resolved`): a file whose layer pads ``'same'`` (PyTorch,
    Keras) loads into the Gluon layer holding the equal explicit symmetric pads. Each layer's rank is part
    of its config (a file without ranks holds 2-D layers).
    """
    layers = _layers(model, "load an interchange file into")
    strict = standardize_flag(strict, "strict")
    stored = doconv.load_matching(path, {name: layer_config(layer) for name, layer in layers.items()},
                                  strict=strict, bare=isinstance(model, _DOConv), allow_nonfinite=allow_nonfinite)
    for name, params in stored.items():
        _check_params(layers[name], params, name)
    for name, params in stored.items():
        _write_params(layers[name], params)
    return list(stored)


def _numpy(value) -> np.ndarray:
    return value.asnumpy() if isinstance(value, mx.nd.NDArray) else np.asarray(value)


def _official_layer(arrays: dict, where: str) -> dict:
    """One official layer's arrays by short name (``weight``, ``D``, ``bias``), a Gluon prefix stripped."""
    plain = {}
    for key, value in arrays.items():
        short = key.rsplit("_", 1)[-1] if key not in ("weight", "D", "bias") else key
        if short in plain:
            raise ValueError(f"{where}: more than one entry for {short!r} ({sorted(arrays)})")
        plain[short] = value
    return plain


def import_official(model: gluon.Block, arrays, *, refold: bool = False) -> List[str]:
    """Load the official GluonCV DO-Conv code's arrays into ``model``, exactly (same W'); returns the layers.

    The official code is 2-D only, and so is this: a 1-D or 3-D layer is a ValueError naming it.

    A bare ``DOConv2D``: one layer's arrays, ``weight`` (C_out, C_in/g, M, N) as W, the delta ``D``
    (MN, MN, C_in), ``bias``; keys may carry a Gluon prefix (``'conv0_weight'``). A net: a whole official
    net's parameters as ``save_parameters`` names them (``mx.nd.load(file)``), keys ``<block path>.<name>``:
    each DOConv2D takes its official layer's ``<path>.weight`` / ``.D`` / ``.bias``, every other parameter its
    own key. A key that names nothing, or a parameter without its key, is a ValueError; nothing is written
    unless everything matches.

    The official layer pairs D slices with W rows as ``c*g + o // (C_out/g)``; the core's index maps move them to
    the paper's pairing (:func:`doconv.layouts.from_official`), which is always possible for this flavour.
    """
    layers = _layers(model, "load official arrays into")
    for name, layer in layers.items():
        check_official_rank(layer.spec, where=f"layer {name!r} is a {type(layer).__name__}")
    if not hasattr(arrays, "items"):
        raise TypeError(f"arrays must be a mapping of names to arrays, but got {type(arrays).__name__}")
    arrays = {key: _numpy(value) for key, value in arrays.items()}
    if isinstance(model, _DOConv):
        own = {doconv.ROOT_NAME: _official_layer(arrays, "official arrays")}
        rest = {}
    else:
        own, rest = {}, dict(arrays)
        for name in layers:
            prefix = name + "."
            keys = [k for k in arrays if k.startswith(prefix) and "." not in k[len(prefix):]]
            if not keys:
                raise ValueError(f"arrays has no entry for layer {name!r} (no key starts with {prefix!r}); its first "
                                 f"keys are {sorted(arrays)[:4]}")
            own[name] = _official_layer({k[len(prefix):]: arrays[k] for k in keys}, f"layer {name!r}")
            for k in keys:
                del rest[k]
    params = {}
    for name, layer in layers.items():
        try:
            params[name] = from_official(own[name], layer_config(layer), "gluon", refold=refold)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
        _check_params(layer, params[name], name)
    others = _other_params(model, layers, rest)
    for name, layer in layers.items():
        _write_params(layer, params[name])
    for param, value in others:
        param._load_init(mx.nd.array(value, dtype=param.dtype),
                         ctx=param_contexts(param) or param._deferred_init[1])
    return list(layers)


def _other_params(model: gluon.Block, layers: dict, arrays: dict) -> list:
    """``[(Parameter, array)]`` for the parameters of ``model`` outside its DO-Conv layers, by their
    ``save_parameters`` names, checked: every one present, no key left over, shapes agreeing."""
    if isinstance(model, _DOConv):
        return []
    ours = {id(p) for layer in layers.values() for p in layer.collect_params().values()}
    params = {k: p for k, p in model._collect_params_with_prefix().items() if id(p) not in ours}
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise ValueError(f"arrays do not match the model: keys that name no parameter {extra}, parameters "
                         f"without a key {missing}")
    out = []
    for key, param in params.items():
        value = arrays[key]
        known = param.shape or ()
        if len(known) != value.ndim or any(k not in (0, v) for k, v in zip(known, value.shape)):
            raise ValueError(f"arrays[{key!r}] has shape {value.shape}, but the parameter {param.name!r} has shape "
                             f"{param.shape}")
        out.append((param, value))
    return out


__all__ = ["UNSUPPORTED_FEATURES", "doconv_layers", "export_canonical", "get_params", "import_canonical",
           "import_official", "kernel_from_gluon", "kernel_to_gluon", "layer_config", "layer_from_config",
           "named_blocks", "param_contexts", "set_params", "symmetric_padding"]
