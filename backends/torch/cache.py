"""``cached(model)``: the one way a DO-Conv layer (``DOConv1d/2d/3d``) reuses a composed kernel, explicit and scoped.

Outside this context every forward composes W' = D^T o W from the parameters as they are at that call.
No implicit cache is correct: writes through ``.data`` (``p.data.mul_(m).add_(...)``, the teacher update
of DINO / mean-teacher / BYOL), through ``.data = ...`` or through fused optimizers bump no version
counter, so no key built on the tensors can see them. As ``torch.nn.utils.parametrize.cached()`` does,
the reuse is therefore a promise the caller makes for a scope::

    with doconv.torch.cached(model):      # no writes to W or D until the block ends
        for x in loader:
            y = model(x)                  # each layer composes W' once, on its first call

Inside the scope a call that needs no gradient (``torch.no_grad()`` / ``inference_mode``, or parameters
that do not require grad) reuses the layer's kernel; a call that needs one composes afresh, so training
inside the scope stays correct (but gains nothing). Calls while tracing, compiling or under torch.func
transforms never read it: a trace or a compiled graph would keep the kernel as a constant after the
scope. The kernel belongs to the parameters it was composed from: a call with other W or D tensors
(``torch.func.functional_call``) composes afresh. Leaving the outermost scope drops every kernel; moving
the layer (``to()``) drops it too; nothing pickles, deep-copies or saves it. For deployment, fold
(:func:`doconv.torch.fold`): a plain convolution needs no promise.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn


def needs_grad(W: torch.Tensor, D: Optional[torch.Tensor]) -> bool:
    """Whether a call must record the composition for autograd."""
    return torch.is_grad_enabled() and (W.requires_grad or (D is not None and D.requires_grad))


class KernelCache:
    """A layer's side of the scope: how many ``cached()`` scopes hold it, and the kernel composed in them."""

    __slots__ = ("depth", "entry")

    def __init__(self):
        self.depth = 0
        self.entry = None  # (W, D, kernel): the kernel and the parameter tensors it was composed from

    def usable(self) -> bool:
        """Whether a call that needs no gradient may read the scope's kernel: a scope is open, and no trace,
        compiler or torch.func transform would keep the kernel beyond this call."""
        return bool(self.depth) and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                                         or torch._C._are_functorch_transforms_active())

    def kernel(self, W: torch.Tensor, D: Optional[torch.Tensor], compose: Callable[[], torch.Tensor]) -> torch.Tensor:
        entry = self.entry
        if entry is None or entry[0] is not W or entry[1] is not D:
            # composed outside inference_mode, so later no_grad calls of the scope may use it too
            with torch.inference_mode(False), torch.no_grad():
                entry = self.entry = (W, D, compose())
        return entry[2]

    def clear(self) -> None:
        self.entry = None


def kernel_caches(model: nn.Module) -> Iterator[KernelCache]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    for module in model.modules():
        cache = module.__dict__.get("_kernel_cache")
        if isinstance(cache, KernelCache):
            yield cache


@contextlib.contextmanager
def cached(model: nn.Module):
    """Within the block, every DO-Conv layer of ``model`` composes its kernel once for calls that need no
    gradient, and reuses it; the caller promises not to write W or D meanwhile. See the module doc."""
    caches = list(dict.fromkeys(kernel_caches(model)))  # a module at several paths is one layer
    for cache in caches:
        cache.depth += 1
    try:
        yield model
    finally:
        for cache in caches:
            cache.depth -= 1
            if not cache.depth:
                cache.clear()
