"""doconv.tf: DO-Conv for Keras 3, on each of its backends: TensorFlow, torch and JAX (``KERAS_BACKEND``;
the JAX install needs no TensorFlow). The layers are ``keras.ops`` only and pass one test suite on all three
(tests/backend_keras); what differs is where a ``cached()`` scope serves a call (TensorFlow and torch eager
inference, never on JAX) and that TensorFlow is also tested in ``tf.function``, XLA and SavedModel export.

- :class:`DOConv1D`, :class:`DOConv2D`, :class:`DOConv3D` -- drop-ins for ``keras.layers.Conv1D`` (also
  ``padding='causal'``), ``Conv2D`` and ``Conv3D``, thin subclasses of one rank-generic
  :class:`BaseDOConv` (importing ``doconv.tf`` registers them as ``doconv>DOConv1D`` etc., so ``.keras``
  files load without ``custom_objects``);
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
from .layer import (KERAS_COMPOSE_EINSUM, LAYERS, W_FROM_CANONICAL, W_TO_CANONICAL, BaseDOConv, DOConv1D, DOConv2D,
                    DOConv3D, get_params, layer_config, set_params)
from .model import convert, doconv_layers, fold, named_layers

#: Features of :data:`doconv.cases.FEATURES` Keras cannot express: its convolutions take only
#: 'valid'/'same' (and, in 1-D, 'causal') with zero padding, and refuse stride > 1 together with
#: dilation > 1. ('same' with stride > 1 and 'same' with an odd total pad are TensorFlow's own rule:
#: supported; 1-D and 3-D layers and causal padding are supported.)
UNSUPPORTED_FEATURES = frozenset({"explicit_padding", "asymmetric_padding", "padding_mode", "stride_and_dilation"})

__all__ = [
    "BaseDOConv", "DOConv1D", "DOConv2D", "DOConv3D", "KERAS_COMPOSE_EINSUM", "LAYERS", "UNSUPPORTED_FEATURES",
    "W_FROM_CANONICAL", "W_TO_CANONICAL", "cached",
    "convert", "doconv_layers", "export_canonical", "fold", "get_params", "import_canonical", "import_official",
    "keras_padding", "layer_config", "layer_from_config", "named_layers", "set_params",
]
