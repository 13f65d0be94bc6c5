"""Checkpoints: the core's canonical interchange file, and the official TensorFlow layer's variables.

- :func:`export_canonical` / :func:`import_canonical`: every :class:`DOConv2D` of a model, named
  by its Keras layer name, in the canonical layout and the paper's pairing (:mod:`doconv.interchange`),
  so a file written by the PyTorch or Gluon backend loads here and the other way round.
- :func:`import_official`: the official TF layer's ``kernel`` (D_mul, C_in/g, filters) and delta
  ``D`` (M*N, D_mul, C_in), converted by :func:`doconv.layouts.from_official` to the paper's
  pairing with the exact same composed kernel (``refold=True`` where no such D exists).
"""

from __future__ import annotations

import doconv
from doconv import layouts

from .layer import DOConv2D, get_params, layer_config, set_params
from .model import _walk


def _do_layers(model) -> dict:
    if isinstance(model, DOConv2D):
        return {model.name: model}
    out = {}
    for layer in _walk(model):
        if isinstance(layer, DOConv2D):
            if layer.name in out:
                raise ValueError(f"two DOConv2D layers are named {layer.name!r}; canonical files key layers by name")
            out[layer.name] = layer
    return out


def export_canonical(model, path) -> None:
    """Write every :class:`DOConv2D` of ``model`` (or a single layer) to a canonical safetensors file."""
    layers = _do_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} holds no DOConv2D layer to export")
    doconv.save(path, {name: (layer_config(layer), get_params(layer)) for name, layer in layers.items()})


def import_canonical(model, path, *, strict=True) -> list:
    """Load a canonical file into the model's :class:`DOConv2D` layers (matched by name).

    Matching is the core's :func:`doconv.load_matching`: ValueError when the file names a layer the
    model lacks, when a config differs (compared by :meth:`doconv.DOConvConfig.resolved`, so a
    file's explicit pads load into the Keras ``'same'``/``'valid'`` they equal), or (``strict=True``)
    when a DOConv2D layer of the model is absent from the file. Returns the names loaded.
    """
    layers = _do_layers(model)
    params = doconv.load_matching(path, {name: layer_config(layer) for name, layer in layers.items()}, strict=strict,
                                  bare=isinstance(model, DOConv2D))
    for name, layer_params in params.items():
        set_params(layers[name], layer_params)
    return sorted(params)


def import_official(layer, arrays, *, refold=False) -> None:
    """Load the official TF DO-Conv layer's arrays (``kernel``, ``D``, optional ``bias``) into ``layer``."""
    set_params(layer, layouts.from_official(arrays, layer_config(layer), "tf", refold=refold))
