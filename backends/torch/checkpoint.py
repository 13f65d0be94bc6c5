"""Checkpoints that name a DO-Conv layer's state otherwise: translated, or refused with what to do instead.

``DOConv{1,2,3}d._load_from_state_dict`` hands every ``load_state_dict`` through :func:`translate` before torch
reads the layer's own keys (``W``, ``D``, ``bias``):

- the official DO-Conv code's layer also stores ``W`` and ``D``, with ``d_diag`` (or ``D_diag``) beside them,
  and for 1 < groups pairs D with W differently: loading its tensors by name would compute another kernel,
  so it is refused, naming :func:`doconv.torch.import_official`, which converts it;
- a plain convolution's ``weight`` (no ``W``; ``nn.Conv1d/2d/3d`` of the layer's rank) loads as
  :func:`doconv.torch.convert` converts a conv:
  W[..., :M*N] = the kernel, the other D_mul - M*N columns zero, D' = 0, so W' is that kernel.
"""

from __future__ import annotations

from typing import List

import torch

from doconv import DOConvConfig

OFFICIAL_KEYS = ("d_diag", "D_diag")


def translate(state_dict: dict, prefix: str, config: DOConvConfig, error_msgs: List[str]) -> bool:
    """Rewrite ``state_dict`` (the entries under ``prefix``) into this layer's keys; False, with a message in
    ``error_msgs`` (torch raises them all after loading), where the layer must not load from it."""
    where = prefix.rstrip(".") or "the layer"
    official = [prefix + k for k in OFFICIAL_KEYS if prefix + k in state_dict]
    if official:
        error_msgs.append(
            f"{where}: the checkpoint holds the official DO-Conv layer's "
            f"{', '.join(map(repr, official))}; its D pairs channels differently for 1 < groups, so loading its "
            f"tensors by name computes another kernel. Load it with doconv.torch.import_official(model, state_dict)")
        return False
    if prefix + "weight" in state_dict and prefix + "W" not in state_dict:
        if prefix + "D" in state_dict:  # reading it as a plain conv's would set D' = 0 over the file's D
            error_msgs.append(f"{where}: the checkpoint holds a plain convolution's "
                              f"{prefix + 'weight'!r} beside a DO-Conv layer's {prefix + 'D'!r} but no "
                              f"{prefix + 'W'!r}: a mixed or damaged checkpoint, which loads neither way")
            return False
        return _plain_to_params(state_dict, prefix, config, error_msgs)
    return True


def _plain_to_params(state_dict: dict, prefix: str, c: DOConvConfig, error_msgs: List[str]) -> bool:
    kernel = state_dict[prefix + "weight"]
    if not isinstance(kernel, torch.Tensor) or tuple(kernel.shape) != c.kernel_shape:
        shape = tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
        error_msgs.append(f"size mismatch for {prefix}weight: a plain convolution's kernel of shape {shape} cannot "
                          f"load into {c!r}, whose composed kernel has shape {c.kernel_shape}")
        return False
    if c.S < c.MN:
        error_msgs.append(f"{prefix}weight: a plain convolution's kernel cannot load into a depthwise_separable layer "
                          f"with D_mul={c.S} < M*N={c.MN} (its kernels have rank D_mul)")
        return False
    W = kernel.new_zeros(c.W_shape)
    W[..., :c.MN] = kernel.reshape(c.out_channels, c.in_per_group, c.MN)
    del state_dict[prefix + "weight"]
    state_dict[prefix + "W"] = W
    if c.has_D:
        state_dict[prefix + "D"] = kernel.new_zeros(c.D_shape)
    return True
