"""The plain convolution a DO-Conv layer folds into: ``nn.Conv1d/2d/3d``, or a ``FoldedConv{1,2,3}d`` for the pads
they lack."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from doconv import DOConvConfig

from . import functional as DF

#: torch's convolution class for each rank (``config.rank``).
PLAIN_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _PrePadded:
    """A folded layer whose padding ``nn.ConvNd`` cannot express (per-side pads, 'same' with stride > 1,
    'causal').

    Mixed into ``nn.Conv1d/2d/3d`` (same parameters, same ``state_dict`` keys): it pads per ``config.pads``
    with its padding mode first, then convolves without padding. ONNX and ``torch.export`` see F.pad + conv.
    """

    def __init__(self, config: DOConvConfig, device=None, dtype=None):
        super().__init__(config.in_channels, config.out_channels, config.kernel_size, config.stride, 0,
                         config.dilation, config.groups, config.bias, "zeros", device=device, dtype=dtype)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.conv(x, self.weight, self.bias, self.config)

    def __prepare_scriptable__(self):
        plain = PLAIN_CONVS[self.config.rank].__name__
        raise NotImplementedError(
            f"torch.jit.script cannot compile {type(self).__name__} (padding={self.config.padding!r}, which "
            f"nn.{plain} cannot express); use torch.jit.trace or torch.export instead")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per-side padding={self.config.padding!r}, " \
                                      f"padding_mode={self.config.padding_mode!r}"


class FoldedConv1d(_PrePadded, nn.Conv1d):
    __doc__ = _PrePadded.__doc__


class FoldedConv2d(_PrePadded, nn.Conv2d):
    __doc__ = _PrePadded.__doc__


class FoldedConv3d(_PrePadded, nn.Conv3d):
    __doc__ = _PrePadded.__doc__


FOLDED_CONVS = {1: FoldedConv1d, 2: FoldedConv2d, 3: FoldedConv3d}


def plain_padding(config: DOConvConfig):
    """The ``padding`` argument of ``nn.ConvNd`` for ``config``, or None where it has none: per-side pads that
    differ, 'same' with stride > 1 (TF's rule, the odd pixel at the end), 'causal'."""
    padding = config.padding
    if padding == "valid" or padding == "same" and all(s == 1 for s in config.stride):
        return padding
    if isinstance(padding, str) or any(lo != hi for lo, hi in padding):
        return None
    return tuple(lo for lo, _ in padding)


def folded_conv(config: DOConvConfig, kernel: torch.Tensor, bias: Optional[torch.Tensor], *,
                requires_grad: bool = True, bias_requires_grad: Optional[bool] = None) -> nn.Module:
    """The plain convolution for ``config`` (``nn.Conv{rank}d``, or ``FoldedConv{rank}d``, a subclass of it,
    for pads it cannot express) holding ``kernel`` (OIHW) and ``bias``; its weight trains if ``requires_grad``,
    its bias if ``bias_requires_grad`` (default: ``requires_grad``)."""
    padding = plain_padding(config)
    factory = dict(device=kernel.device, dtype=kernel.dtype)
    if padding is None:
        conv = FOLDED_CONVS[config.rank](config, **factory)
    else:
        conv = PLAIN_CONVS[config.rank](config.in_channels, config.out_channels, config.kernel_size, config.stride,
                                        padding, config.dilation, config.groups, config.bias, config.padding_mode,
                                        **factory)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    conv.weight.requires_grad_(requires_grad)
    if conv.bias is not None:
        conv.bias.requires_grad_(requires_grad if bias_requires_grad is None else bias_requires_grad)
    return conv
