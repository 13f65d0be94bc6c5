"""Whole models: ``convert`` every spatial ``nn.Conv2d`` to ``DOConv2d``, ``fold`` them back.

The paper's protocol (Section 4): replacing the conventional layers is the *only* change. With
``d_init='identity'`` the converted layer holds ``W[..., :MN] = kernel``, the other D_mul - MN columns
zero and D' = 0 (:func:`doconv.params_for_kernel`), so the converted model computes exactly what the
original computed until training moves D.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from doconv import DOConvConfig

from .layer import DOConv2d

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


@dataclasses.dataclass
class ReportRow:
    name: str
    action: str        # 'converted', 'folded' or 'skipped'
    layer: str         # the config, or the skipped module's type
    params_before: int
    params_after: int
    reason: str = ""


class Report(list):
    """The rows of a convert/fold (a list of :class:`ReportRow`) that prints as a Markdown table."""

    def __str__(self) -> str:
        head = "| module | action | layer | params before | params after | note |\n|---|---|---|---:|---:|---|"
        rows = [f"| {r.name} | {r.action} | {r.layer} | {r.params_before} | {r.params_after} | {r.reason} |"
                for r in self]
        changed = [r for r in self if r.action != "skipped"]
        total = (f"\n\n{len(changed)} layer(s) {self.verb}, {len(self) - len(changed)} skipped; parameters "
                 f"{sum(r.params_before for r in changed)} -> {sum(r.params_after for r in changed)}")
        return "\n".join([head, *rows]) + total

    verb = "changed"


def _matches(selector: Selector, name: str, module: nn.Module, argument: str) -> bool:
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(name, module))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{argument} must be None, a glob pattern, a list of patterns or a callable(name, module), "
                        f"but got {argument}={selector!r}")
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
    return model


def _start(model, inplace: bool, verb: str):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    report = Report()
    report.verb = verb
    return (model if inplace else copy.deepcopy(model)), report


def _config_of(conv: nn.Conv2d, D_mul) -> DOConvConfig:
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    return DOConvConfig(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                        conv.groups, conv.bias is not None, conv.padding_mode, D_mul)


def from_conv(conv: nn.Conv2d, *, D_mul: Optional[int] = None, d_init: str = "identity",
              composition: str = "auto", W_storage: str = "c-major") -> DOConv2d:
    """A ``DOConv2d`` with ``conv``'s configuration, device, dtype and weights (W[..., :MN] = kernel).

    With ``d_init='identity'`` it computes exactly what ``conv`` computes; ``'random'`` keeps the kernel
    in W but draws D ~ N(0, 2/MN), so the outputs change (Table 7's random-init protocol).
    """
    c = _config_of(conv, D_mul)
    layer = DOConv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                     c.bias, c.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype, D_mul=c.D_mul,
                     d_init=d_init, composition=composition, W_storage=W_storage)
    with torch.no_grad():
        layer.W.zero_()
        layer.W[..., :c.MN].copy_(conv.weight.reshape(c.out_channels, c.in_per_group, c.MN))
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    layer.train(conv.training)
    layer.requires_grad_(conv.weight.requires_grad)
    return layer


def convert(model: nn.Module, *, D_mul: Optional[int] = None, d_init: str = "identity", include: Selector = None,
            exclude: Selector = None, inplace: bool = False, composition: str = "auto", W_storage: str = "c-major"):
    """Replace every non-pointwise ``nn.Conv2d`` of ``model`` by a ``DOConv2d`` keeping its weights.

    ``include``/``exclude``: glob patterns over module paths (``'layer1.*'``), lists of them, or a callable
    ``(name, module) -> bool``; ``include=None`` means every candidate. 1x1 convolutions (no D, paper
    Section 4) and ``nn.Conv2d`` subclasses (their ``forward`` may differ) are left alone and reported.
    Returns ``(model, report)``; the model is a deep copy unless ``inplace=True``. ``D_mul``, ``d_init``,
    ``composition`` and ``W_storage`` are passed to every :class:`DOConv2d`.
    """
    model, report = _start(model, inplace, "converted")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d):
            continue
        size = _count(module)
        if include is not None and not _matches(include, name, module, "include"):
            report.append(ReportRow(name, "skipped", type(module).__name__, size, size, "not included"))
        elif _matches(exclude, name, module, "exclude"):
            report.append(ReportRow(name, "skipped", type(module).__name__, size, size, "excluded"))
        elif type(module) is not nn.Conv2d:
            report.append(ReportRow(name, "skipped", type(module).__name__, size, size,
                                    "nn.Conv2d subclass: its forward may differ"))
        elif module.kernel_size == (1, 1):
            report.append(ReportRow(name, "skipped", "Conv2d 1x1", size, size, "pointwise: DO-Conv has no D"))
        else:
            layer = from_conv(module, D_mul=D_mul, d_init=d_init, composition=composition, W_storage=W_storage)
            model = _set_submodule(model, name, layer)
            report.append(ReportRow(name, "converted", repr(layer.config).replace("DOConvConfig", layer.config.kind),
                                    size, _count(layer)))
    return model, report


def fold(model: nn.Module, *, inplace: bool = False):
    """Replace every ``DOConv2d`` by the plain convolution holding its composed kernel (``layer.fuse()``).

    Same outputs, the parameter count of the never-converted model. Returns the model (a deep copy
    unless ``inplace=True``); ``fold_report`` gives the rows as well.
    """
    return fold_report(model, inplace=inplace)[0]


def fold_report(model: nn.Module, *, inplace: bool = False):
    model, report = _start(model, inplace, "folded")
    for name, module in list(model.named_modules()):
        if isinstance(module, DOConv2d):
            conv = module.fuse()
            conv.train(module.training)
            report.append(ReportRow(name, "folded", repr(module.config), _count(module), _count(conv)))
            model = _set_submodule(model, name, conv)
    return model, report
