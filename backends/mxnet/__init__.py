"""doconv.mxnet: DO-Conv for MXNet Gluon 1.9 -- ``DOConv2D``, a drop-in for ``gluon.nn.Conv2D``, and GluonCV
model conversion.

- :mod:`doconv.mxnet.layer`  -- ``DOConv2D`` (parameters ``W``, ``D`` = the trainable delta D' = D - I_fill,
  ``bias``; ``weight``: W' read-only); every call composes the kernel from W and D as they are
- :mod:`doconv.mxnet.cache`  -- ``cached(model)``: reuse each layer's kernel within an explicit inference scope
- :mod:`doconv.mxnet.io`     -- the backend contract (``layer_from_config``, ``layer_config``, ``get_params`` /
  ``set_params``), ``named_blocks`` / ``doconv_layers`` (layers by block path), ``export_canonical`` /
  ``import_canonical`` (the core's interchange file) and ``import_official`` (the official GluonCV layer's
  ``weight`` and ``D``, one layer or a whole net)
- :mod:`doconv.mxnet.model`  -- whole models: ``convert`` / ``fold``, each returning ``(model, report)``

Gluon pads symmetrically with zeros only: ``UNSUPPORTED_FEATURES`` lists the shared cases' features it lacks.
"""

from .cache import cached
from .io import (UNSUPPORTED_FEATURES, doconv_layers, export_canonical, get_params, import_canonical,
                 import_official, layer_config, layer_from_config, named_blocks, set_params)
from .layer import DOConv2D
from .model import convert, fold

__all__ = ["DOConv2D", "UNSUPPORTED_FEATURES", "cached", "convert", "doconv_layers", "export_canonical", "fold",
           "get_params", "import_canonical", "import_official", "layer_config", "layer_from_config", "named_blocks",
           "set_params"]
