"""Opt-in retrofit: DO-Conv on an existing ``nn.Conv1d/2d/3d`` through ``torch.nn.utils.parametrize``.

``parametrize(conv)`` replaces ``conv.weight`` by the composed kernel D^T o W of two new tensors,
``conv.parametrizations.weight.original0`` (W) and ``...original1`` (the delta D'), initialised so the
kernel is unchanged. Prefer :class:`doconv.torch.DOConv2d` (or 1d / 3d): the parametrized conv has torch's generated
state_dict keys and nn.ConvNd's padding options only, and :func:`doconv.torch.cached` does not reach it
(torch's own ``torch.nn.utils.parametrize.cached()`` does, for every parametrization in the process). ``torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")`` folds it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from doconv import identity_fill

from . import functional as DF
from .model import config_of


class DOConvKernel(nn.Module):
    """The parametrization: ``(W, D') -> W' = (I_fill + D')^T o W`` (paper Eq. 3), OIHW."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.config = config
        fill = torch.as_tensor(identity_fill(config.MN, config.S), device=device, dtype=dtype)
        self.register_buffer("I_fill", fill, persistent=False)

    def forward(self, W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        return DF.compose_kernel(W, DF.full_D(D, self.I_fill), self.config)

    def right_inverse(self, kernel: torch.Tensor):
        """The identity-init split of ``kernel``: W[..., :MN] = kernel, the other columns 0, D' = 0."""
        c = self.config
        W = kernel.new_zeros(c.W_shape)
        W[..., :c.MN] = kernel.reshape(c.out_channels, c.in_per_group, c.MN)
        return W, kernel.new_zeros(c.D_shape)


def parametrize(conv: nn.Module, *, D_mul: Optional[int] = None) -> nn.Module:
    """Turn ``conv`` (in place) into a DO-Conv whose ``weight`` is composed; returns ``conv``."""
    config = config_of(conv, D_mul)  # TypeError unless an nn.Conv1d / Conv2d / Conv3d
    if not config.has_D:
        raise ValueError(f"conv has kernel_size={conv.kernel_size}: a pointwise (1x1) convolution has no D to "
                         f"parametrize")
    if torch_parametrize.is_parametrized(conv, "weight"):
        raise ValueError("conv.weight is already parametrized")
    kernel = DOConvKernel(config, device=conv.weight.device, dtype=conv.weight.dtype)
    torch_parametrize.register_parametrization(conv, "weight", kernel)
    return conv
