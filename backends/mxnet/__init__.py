"""doconv.mxnet: DO-Conv for MXNet Gluon 1.9 -- ``DOConv1D``, ``DOConv2D`` and ``DOConv3D``, drop-ins for
``gluon.nn.Conv1D`` / ``Conv2D`` / ``Conv3D``, and whole-model conversion (GluonCV nets included).

- :mod:`doconv.mxnet.layer`  -- the layers, one rank-generic base (parameters ``W``, ``D`` = the trainable
  delta D' = D - I_fill, ``bias``; ``weight``: W' read-only); every call composes the kernel from W and D as
  they are
- :mod:`doconv.mxnet.cache`  -- ``cached(model)``: reuse each layer's kernel within an explicit inference scope
- :mod:`doconv.mxnet.io`     -- the backend contract (``layer_from_config``, ``layer_config``, ``get_params`` /
  ``set_params``), ``named_blocks`` / ``doconv_layers`` (layers by block path), ``export_canonical`` /
  ``import_canonical`` (the core's interchange file) and ``import_official`` (the official GluonCV layer's
  ``weight`` and ``D``, one layer or a whole net; 2-D only, as the official code is)
- :mod:`doconv.mxnet.model`  -- whole models: ``convert`` / ``fold``, each returning ``(model, report)``

Gluon pads symmetrically with zeros only: ``UNSUPPORTED_FEATURES`` lists the shared cases' features it lacks.
"""

from .cache import cached
from .io import (UNSUPPORTED_FEATURES, doconv_layers, export_canonical, get_params, import_canonical,
                 import_official, layer_config, layer_from_config, named_blocks, set_params)
from .layer import DOConv1D, DOConv2D, DOConv3D
from .model import convert, fold

__all__ = ["DOConv1D", "DOConv2D", "DOConv3D", "UNSUPPORTED_FEATURES", "cached", "convert", "doconv_layers",
           "export_canonical", "fold", "get_params", "import_canonical", "import_official", "layer_config",
           "layer_from_config", "named_blocks", "set_params"]
