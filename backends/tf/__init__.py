"""doconv.tf: DO-Conv for Keras 3 (TensorFlow backend first; also runs with ``KERAS_BACKEND=torch``).

- :class:`DOConv2D` -- a drop-in for ``keras.layers.Conv2D`` (registered as ``doconv>DOConv2D``,
  so ``.keras`` files load without ``custom_objects``);
- :func:`convert` / :func:`fold` -- whole models (Sequential, functional, subclassed) to DO-Conv and back
  to plain convolutions, each returning ``(model, report)`` (a :class:`doconv.contract.ConversionReport`);
- :func:`cached` -- a scope in which each DO-Conv layer composes its kernel once for inference
  (outside it every call composes from the variables as they are);
- :func:`export_canonical` / :func:`import_canonical` / :func:`import_official` -- checkpoints;
- :func:`layer_from_config`, :func:`layer_config`, :func:`get_params`, :func:`set_params` -- the
  backend contract shared with ``doconv.torch`` and ``doconv.mxnet`` (canonical NumPy layout).
"""

from .cache import cached
from .io import export_canonical, import_canonical, import_official, keras_padding, layer_from_config
from .layer import (KERAS_COMPOSE_EINSUM, W_FROM_CANONICAL, W_TO_CANONICAL, DOConv2D, get_params, layer_config,
                    set_params)
from .model import convert, doconv_layers, fold, named_layers

#: Features of :data:`doconv.cases.FEATURES` Keras cannot express: its convolutions take only
#: 'valid'/'same' with zero padding, and refuse stride > 1 together with dilation > 1.
#: ('same' with stride > 1 and 'same' with an odd total pad are TensorFlow's own rule: supported.)
UNSUPPORTED_FEATURES = frozenset({"explicit_padding", "asymmetric_padding", "padding_mode", "stride_and_dilation"})

__all__ = [
    "DOConv2D", "KERAS_COMPOSE_EINSUM", "UNSUPPORTED_FEATURES", "W_FROM_CANONICAL", "W_TO_CANONICAL", "cached",
    "convert", "doconv_layers", "export_canonical", "fold", "get_params", "import_canonical", "import_official",
    "keras_padding", "layer_config", "layer_from_config", "named_layers", "set_params",
]
