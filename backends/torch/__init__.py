"""doconv.torch: DO-Conv for PyTorch (``DOConv1d``, ``DOConv2d``, ``DOConv3d``: drop-ins for ``nn.Conv1d/2d/3d``),
model-wide convert/fold, checkpoints.

state_dict of a DO-Conv layer (every rank): ``W`` (C_out, C_in/g, D_mul), ``D`` -- the trainable delta D' = D - I_fill,
(C_in, M*N, D_mul), absent for 1x1 kernels -- and ``bias``; the fixed ``I_fill`` is a non-persistent buffer.
Every call composes the kernel from W and D as they are; ``cached(model)`` reuses it within a scope.
"""

from .cache import cached
from .io import (doconv_layers, export_canonical, get_params, import_canonical, import_official, layer_config,
                 layer_from_config, set_params)
from .folded import FoldedConv1d, FoldedConv2d, FoldedConv3d, folded_conv
from .layer import COMPOSITIONS, DOConv1d, DOConv2d, DOConv3d
from .model import convert, fold, from_conv
from .parametrize import parametrize

#: Every feature of the shared case table is expressible, in 1, 2 and 3 dimensions (per-side pads and 'causal'
#: via F.pad, TF's 'same' rule).
UNSUPPORTED_FEATURES: frozenset = frozenset()

__all__ = [
    "COMPOSITIONS", "DOConv1d", "DOConv2d", "DOConv3d", "FoldedConv1d", "FoldedConv2d", "FoldedConv3d",
    "UNSUPPORTED_FEATURES", "cached", "convert",
    "doconv_layers", "export_canonical", "fold", "folded_conv", "from_conv", "get_params",
    "import_canonical", "import_official", "layer_config", "layer_from_config", "parametrize", "set_params",
]
