"""Layers from core configs, the core's canonical interchange file, and the official TensorFlow layer's variables.

- :func:`layer_from_config` / :func:`keras_padding`: a built DO-Conv layer of the config's rank
  (:class:`DOConv1D`, :class:`DOConv2D`, :class:`DOConv3D`) for a core config (the backend contract shared
  with ``doconv.torch`` and ``doconv.mxnet``);

- :func:`export_canonical` / :func:`import_canonical`: every DO-Conv layer of a model, named by its
  path (:func:`doconv.tf.model.named_layers`: the Keras layer name in Sequential and functional models),
  in the canonical layout and the paper's pairing (:mod:`doconv.interchange`), so a file written by the
  PyTorch or Gluon backend loads here and the other way round.
- :func:`import_official`: the official TF layer's ``kernel`` (D_mul, C_in/g, filters) and delta ``D``
  (M*N, D_mul, C_in), converted by :func:`doconv.layouts.from_official` to the paper's pairing with the
  exact same composed kernel (``refold=True`` where no such D exists). 2-D only: the official code has
  no 1-D or 3-D layer.
"""

from __future__ import annotations

import dataclasses
from typing import List, Mapping

import numpy as np

import doconv
from doconv import layouts

from .layer import LAYERS, BaseDOConv, get_params, layer_config, set_params
from .folded import build_shape
from .model import doconv_layers


def layer_from_config(config: doconv.DOConvConfig, *, dtype="float32", composition="kernel",
                      data_format="channels_last", **kwargs) -> BaseDOConv:
    """A built DO-Conv layer for a core config: :class:`DOConv1D`, :class:`DOConv2D` or :class:`DOConv3D` by
    ``config.rank`` (padding must be expressible in Keras)."""
    if not isinstance(config, doconv.DOConvConfig):
        raise TypeError(f"config must be a doconv.DOConvConfig, but got {type(config).__name__}")
    layer = LAYERS[config.rank](config.out_channels, config.kernel_size, config.stride, keras_padding(config),
                                data_format, config.dilation, config.groups, use_bias=config.bias,
                                D_mul=config.D_mul, depthwise_separable=config.depthwise_separable,
                                composition=composition, dtype=dtype, **kwargs)
    layer.build(build_shape(layer.data_format, config.in_channels, config.rank))
    return layer


def keras_padding(config: doconv.DOConvConfig) -> str:
    """``'same'``/``'valid'`` (1-D also ``'causal'``) for a core config, or ValueError when Keras cannot express
    its padding.

    Explicit pads map to one of those when :meth:`doconv.DOConvConfig.resolved` says they are the same
    layer: zero pads, TensorFlow's SAME pads at stride 1 (which do not depend on the input size), or in
    1-D the causal left pad d * (k - 1).
    """
    if config.padding_mode != "zeros":
        raise ValueError(f"Keras convolutions pad with zeros only, but got padding_mode={config.padding_mode!r}")
    if isinstance(config.padding, str):
        return config.padding
    names = ("valid", "same", "causal") if config.rank == 1 else ("valid", "same")
    for name in names:  # the core's resolved() is the one rule for "the same padding"
        if config.resolved() == dataclasses.replace(config, padding=name).resolved():
            return name
    raise ValueError(f"Keras padding is {' or '.join(map(repr, names))} only; padding={config.padding} of "
                     f"{config!r} is none of them")


def _layers(model, what: str) -> dict:
    layers = doconv_layers(model)  # TypeError for what is no Keras layer
    if not layers:
        raise ValueError(f"model has no DO-Conv layer to {what} ({type(model).__name__} {model.name!r} holds "
                         f"none): convert it first (doconv.tf.convert(model))")
    return layers


def export_canonical(model, path, *, allow_nonfinite: bool = False) -> None:
    """Write every DO-Conv layer of ``model`` (or a single layer) to a canonical safetensors file, named by
    path. NaN or +-inf in a parameter is a ValueError unless ``allow_nonfinite=True`` (:func:`doconv.save`)."""
    layers = _layers(model, "export")
    doconv.save(path, {name: (layer_config(layer), get_params(layer)) for name, layer in layers.items()},
                allow_nonfinite=allow_nonfinite)


def import_canonical(model, path, *, strict: bool = True, allow_nonfinite: bool = False) -> List[str]:
    """Load a canonical file into the model's DO-Conv layers (matched by path); returns their names.

    Matching is the core's :func:`doconv.load_matching`: ValueError when the file names a layer the model
    lacks, when a config differs (compared by :meth:`doconv.DOConvConfig.resolved`, so a file's explicit
    pads load into the Keras ``'same'``/``'valid'``/``'causal'`` they equal), when (``strict=True``) a DO-Conv
    layer of the
    model is absent from the file, or when the file holds NaN / +-inf (unless ``allow_nonfinite=True``).
    Nothing is written unless every layer matches.
    """
    layers = _layers(model, "import a canonical file into")
    params = doconv.load_matching(path, {name: layer_config(layer) for name, layer in layers.items()}, strict=strict,
                                  bare=isinstance(model, BaseDOConv), allow_nonfinite=allow_nonfinite)
    for name, layer_params in params.items():  # every layer checked before any is written
        layer_params.check(layer_config(layers[name]), where=f"layer {name!r}")
    for name, layer_params in params.items():
        set_params(layers[name], layer_params)
    return list(params)


def import_official(model, arrays: Mapping[str, np.ndarray], *, refold: bool = False) -> List[str]:
    """Load the official TF DO-Conv layer's arrays into ``model``; returns the paths of the layers loaded.

    ``model`` a bare :class:`DOConv2D`: ``arrays`` are one layer's (``kernel``, ``D``, optional ``bias``). A
    model: keys are prefixed by each layer's path (``'conv1.kernel'``, ``'block.conv.D'``; ``/`` also
    separates, as in Keras variable paths), and every DO-Conv layer of the model must have its arrays (and be
    2-D: official checkpoints are; a 1-D or 3-D layer is a ValueError naming it). Every layer is converted
    (:func:`doconv.layouts.from_official`) before any is written.
    """
    layers = _layers(model, "import an official checkpoint into")
    for name, layer in layers.items():
        layouts.check_official_rank(layer_config(layer), where=f"layer {name!r} is a {type(layer).__name__}")
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a mapping of names to arrays, but got {type(arrays).__name__}")
    if isinstance(model, BaseDOConv):
        own = {model.name: dict(arrays)}
    else:
        keys = {key.replace("/", "."): key for key in arrays}
        own = {}
        for name in layers:
            mine = {k[len(name) + 1:]: arrays[key] for k, key in keys.items()
                    if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
            if not mine:
                raise ValueError(f"arrays has no entry for layer {name!r} (no key starts with {name + '.'!r}); "
                                 f"its first keys are {sorted(arrays)[:4]}")
            own[name] = mine
    params = {}
    for name, layer in layers.items():
        try:
            params[name] = layouts.from_official({k: np.asarray(v) for k, v in own[name].items()},
                                                 layer_config(layer), "tf", refold=refold)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
    for name, layer_params in params.items():
        set_params(layers[name], layer_params)
    return list(params)
