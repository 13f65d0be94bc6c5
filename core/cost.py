"""Cost model of the two compositions (paper Section 3, "Training efficiency and composition choice").

For an input of shape (B, C_in, H, W) and output size H_out x W_out (the paper writes H x W, stride 1)::

    feature composition   P' = D o P     : B * S * MN * C_in * H_out * W_out
                          O  = W * P'    : B * C_out * C_in/g * H_out * W_out * S
    kernel composition    W' = D^T o W   : S * MN * C_in/g * C_out          (once per weight update)
                          O  = W' * P    : B * C_out * C_in/g * H_out * W_out * MN

Memory of the intermediate: W' (C_out * C_in/g * MN values) against P' (B * C_in * S * H_out * W_out).
In 1-D and 3-D, MN is the patch length and H_out * W_out the number of output positions (L_out, or
T_out * H_out * W_out): the same formulas.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

from .config import DOConvConfig


@dataclasses.dataclass(frozen=True)
class CompositionCost:
    """Multiply-accumulates and intermediate bytes of each composition for one forward pass."""

    kernel_macc: int
    feature_macc: int
    kernel_bytes: int
    feature_bytes: int

    @property
    def cheaper(self) -> str:
        """``'kernel'`` unless feature composition needs strictly fewer MACC (ties go to kernel)."""
        return self.choice(0.0)

    def choice(self, margin: float) -> str:
        """``'feature'`` only where it saves more than ``margin`` of kernel composition's MACC."""
        return "feature" if self.feature_macc < (1.0 - margin) * self.kernel_macc else "kernel"


def composition_cost(config: DOConvConfig, input_shape: Sequence[int], itemsize: int = 4) -> CompositionCost:
    """MACC and intermediate bytes of kernel vs feature composition for a channels-first ``input_shape``."""
    batch, _, *spatial_out = config.output_shape(input_shape)
    positions = batch * math.prod(spatial_out)
    mn, s, cin, cin_g, cout = config.MN, config.S, config.in_channels, config.in_per_group, config.out_channels
    if not config.has_D:  # a 1x1 layer is a plain conv either way
        conv = positions * cout * cin_g
        return CompositionCost(conv, conv, cout * cin_g * itemsize, cout * cin_g * itemsize)
    return CompositionCost(
        kernel_macc=s * mn * cin_g * cout + positions * cout * cin_g * mn,
        feature_macc=positions * s * mn * cin + positions * cout * cin_g * s,
        kernel_bytes=cout * cin_g * mn * itemsize,
        feature_bytes=positions * cin * s * itemsize,
    )


def choose_composition(config: DOConvConfig, input_shape: Sequence[int], margin: float = 0.0) -> str:
    """What ``composition='auto'`` runs: the composition with fewer MACC for this input.

    ``margin`` (0 <= margin < 1) is the fraction of kernel composition's MACC that feature composition
    must save to be chosen: a backend whose kernel composition runs closer to its arithmetic than its
    depthwise convolution does (a depthwise conv with a channel multiplier of S is far from a dense
    conv's efficiency) sets it from its own measurements.
    """
    if not isinstance(margin, numbers.Real) or isinstance(margin, bool) or not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), but got margin={margin!r}")
    return composition_cost(config, input_shape).choice(margin)
