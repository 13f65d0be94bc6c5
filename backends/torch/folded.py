"""The plain convolution a ``DOConv2d`` folds into: ``nn.Conv2d``, or :class:`FoldedConv2d` for the pads it lacks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from doconv import DOConvConfig

from . import functional as DF


class FoldedConv2d(nn.Conv2d):
    """A folded layer whose padding ``nn.Conv2d`` cannot express (per-side pads, 'same' with stride > 1).

    An ``nn.Conv2d`` (same parameters, same ``state_dict`` keys) that pads per ``config.pads`` with its
    padding mode first, then convolves without padding. ONNX and ``torch.export`` see F.pad + conv.
    """

    def __init__(self, config: DOConvConfig, device=None, dtype=None):
        super().__init__(config.in_channels, config.out_channels, config.kernel_size, config.stride, 0,
                         config.dilation, config.groups, config.bias, "zeros", device=device, dtype=dtype)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.conv(x, self.weight, self.bias, self.config)

    def __prepare_scriptable__(self):
        raise NotImplementedError(
            f"torch.jit.script cannot compile FoldedConv2d (padding={self.config.padding!r}, which nn.Conv2d "
            "cannot express); use torch.jit.trace or torch.export instead")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per-side padding={self.config.padding!r}, " \
                                      f"padding_mode={self.config.padding_mode!r}"


def folded_conv(config: DOConvConfig, kernel: torch.Tensor, bias: Optional[torch.Tensor], *,
                requires_grad: bool = True, bias_requires_grad: Optional[bool] = None) -> nn.Conv2d:
    """The plain convolution for ``config`` holding ``kernel`` (OIHW) and ``bias``; its weight trains if
    ``requires_grad``, its bias if ``bias_requires_grad`` (default: ``requires_grad``)."""
    padding = config.padding
    if padding == "same" and max(config.stride) > 1 or padding not in ("same", "valid") and any(
            lo != hi for lo, hi in padding):
        conv = FoldedConv2d(config, device=kernel.device, dtype=kernel.dtype)
    else:
        if padding not in ("same", "valid"):
            padding = (padding[0][0], padding[1][0])
        conv = nn.Conv2d(config.in_channels, config.out_channels, config.kernel_size, config.stride, padding,
                         config.dilation, config.groups, config.bias, config.padding_mode,
                         device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    conv.weight.requires_grad_(requires_grad)
    if conv.bias is not None:
        conv.bias.requires_grad_(requires_grad if bias_requires_grad is None else bias_requires_grad)
    return conv
