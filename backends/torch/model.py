"""Whole models: ``convert`` every spatial ``nn.Conv2d`` to ``DOConv2d``, ``fold`` them back.

The paper's protocol (Section 4): replacing the conventional layers is the *only* change. With
``d_init='identity'`` the converted layer holds ``W[..., :MN] = kernel``, the other D_mul - MN columns
zero and D' = 0 (:func:`doconv.params_for_kernel`), so the converted model computes exactly what the
original computed until training moves D.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from doconv import DOConvConfig, selection, standardize_flag

from .layer import COMPOSITIONS, D_INITS, W_STORAGES, DOConv2d, _check_choice, _pair_of_one

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


@dataclasses.dataclass
class ReportRow:
    name: str
    action: str        # 'converted', 'folded' or 'skipped'
    layer: str         # the config, or the skipped module's type
    params_before: int
    params_after: int
    reason: str = ""
    shared_with: str = ""  # the first path of a module used at several paths (its parameters count once)


class Report(list):
    """The rows of a convert/fold (a list of :class:`ReportRow`) that prints as a Markdown table."""

    def __str__(self) -> str:
        head = "| module | action | layer | params before | params after | note |\n|---|---|---|---:|---:|---|"
        rows = [f"| {r.name} | {r.action} | {r.layer} | {r.params_before} | {r.params_after} | {r.reason} |"
                for r in self]
        changed = [r for r in self if r.action != "skipped" and not r.shared_with]
        skipped = [r for r in self if r.action == "skipped" and not r.shared_with]
        shared = [r for r in self if r.shared_with]
        total = (f"\n\n{len(changed)} layer(s) {self.verb}, {len(skipped)} skipped; parameters "
                 f"{sum(r.params_before for r in changed)} -> {sum(r.params_after for r in changed)}")
        if shared:
            total += f"; {len(shared)} more path(s) use a module listed above (shared, counted once)"
        return "\n".join([head, *rows]) + total

    verb = "changed"


def _selector(selector: Selector, argument: str):
    """``selector`` checked once, up front: None, a callable, or its glob patterns as a list."""
    return selection.glob_patterns(selector, argument, "a callable(name, module)")


def _check_patterns(selectors: dict, names) -> None:
    """A pattern matching no module path is a typo: refuse it rather than convert what it meant to leave."""
    selection.refuse_unmatched(selectors, names, "module path")


def _check_options(D_mul, d_init: str, composition: str, W_storage: str) -> None:
    """The options every converted layer gets, checked once by the layer's and the core's checks."""
    _check_choice(d_init, "d_init", D_INITS)
    _check_choice(composition, "composition", COMPOSITIONS)
    _check_choice(W_storage, "W_storage", W_STORAGES)
    try:  # the core's D_mul check apart from the kernel size (which convert checks per layer)
        DOConvConfig(1, 1, (1, 2), D_mul=D_mul, depthwise_separable=True)
    except (TypeError, ValueError) as error:
        raise type(error)(f"D_mul must be a positive int or None (meaning M*N of each layer), "
                          f"but got D_mul={D_mul!r}") from error


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
    return (model if standardize_flag(inplace, "inplace") else copy.deepcopy(model)), report


def _config_of(conv: nn.Conv2d, D_mul) -> DOConvConfig:
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    stride, padding, dilation = (_pair_of_one(v) for v in (conv.stride, padding, conv.dilation))
    return DOConvConfig(conv.in_channels, conv.out_channels, conv.kernel_size, stride, padding, dilation,
                        conv.groups, conv.bias is not None, conv.padding_mode, D_mul)


#: The hooks a replaced module hands on to its replacement (torch.ao.quantization's module swap does the
#: same): forward pre-hooks, forward hooks and backward hooks, with their flags. The dicts themselves move,
#: so a handle taken on the old module still removes its hook.
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def _carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` in ``old``'s training mode, holding ``old``'s forward and backward hooks."""
    new.train(old.training)
    for name in _HOOKS:
        if name in old.__dict__:
            setattr(new, name, old.__dict__[name])
    return new


def _rewrites_weight(conv: nn.Conv2d) -> bool:
    """torch.nn.utils.weight_norm / spectral_norm (the hook forms): a pre-hook recomputes ``weight``."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return any(isinstance(hook, (SpectralNorm, WeightNorm)) for hook in conv._forward_pre_hooks.values())


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
    layer.W.requires_grad_(conv.weight.requires_grad)  # D is made of the weight too: it follows it
    if layer.D is not None:
        layer.D.requires_grad_(conv.weight.requires_grad)
    if conv.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    return _carry_over(conv, layer)


def _skip_reason(name: str, module: nn.Conv2d, include, exclude):
    """``(layer, reason)`` for a conv that ``convert`` leaves alone, None for one it converts."""
    if include is not None and not selection.selects(include, name, module):
        return type(module).__name__, "not included"
    if selection.selects(exclude, name, module):
        return type(module).__name__, "excluded"
    if type(module) is not nn.Conv2d:
        return type(module).__name__, "nn.Conv2d subclass: its forward may differ"
    if module.kernel_size == (1, 1):
        return "Conv2d 1x1", "pointwise: DO-Conv has no D"
    if _rewrites_weight(module):
        return "Conv2d", "weight_norm / spectral_norm hook: it recomputes weight, which DO-Conv composes"
    return None


def _paths(model: nn.Module, kind) -> list:
    """``(path, module, first path of that module)`` for every path to a ``kind`` module, shared ones included."""
    first = {}
    return [(name, module, first.setdefault(id(module), name))
            for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, kind)]


def _shared_note(name: str, first: str, reason: str = "") -> str:
    note = "" if name == first else f"same module as {first!r} (shared)"
    return "; ".join(text for text in (reason, note) if text)


def convert(model: nn.Module, *, D_mul: Optional[int] = None, d_init: str = "identity", include: Selector = None,
            exclude: Selector = None, inplace: bool = False, composition: str = "auto", W_storage: str = "c-major"):
    """Replace every non-pointwise ``nn.Conv2d`` of ``model`` by a ``DOConv2d`` keeping its weights.

    ``include``/``exclude``: glob patterns over module paths (``'layer1.*'``), lists of them, or a callable
    ``(name, module) -> bool``; ``include=None`` means every candidate. A pattern that matches no module
    path is refused (ValueError), as a typo. 1x1 convolutions (no D, paper Section 4) and ``nn.Conv2d``
    subclasses (their ``forward`` may differ) are left alone and reported. A conv used at several paths
    (weight sharing) becomes one ``DOConv2d`` held at all of them, with a report row per path; include /
    exclude must then select all of its paths or none. Returns ``(model, report)``; the model is a deep
    copy unless ``inplace=True``. ``D_mul``, ``d_init``, ``composition`` and ``W_storage`` are passed to
    every :class:`DOConv2d`; they and every layer's configuration are checked before the model changes
    (an error names the layer's path).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    _check_options(D_mul, d_init, composition, W_storage)
    include, exclude = _selector(include, "include"), _selector(exclude, "exclude")
    _check_patterns({"include": include, "exclude": exclude},
                    [name for name, _ in model.named_modules(remove_duplicate=False)])
    model, report = _start(model, inplace, "converted")
    plan, decided, owners = [], {}, {}
    for name, module, first in _paths(model, nn.Conv2d):
        skip = _skip_reason(name, module, include, exclude)
        if first != name and (skip is None) != (decided[first] is None):
            converted, kept = (first, name) if skip is not None else (name, first)
            raise ValueError(f"the nn.Conv2d at {first!r} is also used at {name!r} (one shared module), but include/"
                             f"exclude select {converted!r} and not {kept!r}: select all of its paths or none "
                             f"(converting one path only would untie the weights)")
        if first == name:
            decided[name] = skip
            ties = []
            if skip is None:
                try:
                    config = _config_of(module, D_mul)
                except (TypeError, ValueError) as error:
                    raise type(error)(f"layer {name!r}: {error}") from error
                ties = _ties(name, module, config, owners)
        plan.append((name, module, first, skip, ties))
    layers = {}
    for name, module, first, skip, ties in plan:
        size = _count(module)
        shared = "" if name == first else first
        if skip is not None:
            report.append(ReportRow(name, "skipped", skip[0], size, size, _shared_note(name, first, skip[1]), shared))
            continue
        note = _shared_note(name, first)
        if first not in layers:
            layers[first] = layer = from_conv(module, D_mul=D_mul, d_init=d_init, composition=composition,
                                              W_storage=W_storage)
            for keys, path in ties:  # converting each alone would silently untie them
                for key in keys:
                    setattr(layer, key, getattr(layers[path], key))
                note = "; ".join(filter(None, [note, f"{'/'.join(keys)} tied to {path!r} (a shared Parameter)"]))
        layer = layers[first]
        model = _set_submodule(model, name, layer)
        report.append(ReportRow(name, "converted", repr(layer.config).replace("DOConvConfig", layer.config.kind),
                                size, _count(layer), note, shared))
    return model, report


def _ties(name: str, conv: nn.Conv2d, config: DOConvConfig, owners: dict) -> list:
    """``[(('W', 'D') or ('bias',), path of the earlier layer)]``: what the DOConv2d for ``conv`` takes from an
    earlier one because the two convs hold one weight (or bias) Parameter. Checked before the model changes:
    the tied tensors must have one shape each (``owners``: id of a Parameter -> (first path, config))."""
    ties = []
    for original, shapes in ((conv.weight, lambda c: {"W": c.W_shape, "D": c.D_shape if c.has_D else None}),
                             (conv.bias, lambda c: {"bias": (c.out_channels,)})):
        if original is None:
            continue
        path, other = owners.setdefault(id(original), (name, config))
        if path == name:
            continue
        mine, theirs = shapes(config), shapes(other)
        for key in mine:
            if mine[key] != theirs[key]:
                raise ValueError(f"layer {name!r} shares its {'weight' if key != 'bias' else 'bias'} with {path!r}, "
                                 f"but their DOConv2d {key} shapes differ ({mine[key]} vs {theirs[key]}): they "
                                 f"cannot stay tied")
        ties.append((tuple(mine), path))
    return ties


def fold(model: nn.Module, *, inplace: bool = False):
    """Replace every ``DOConv2d`` by the plain convolution holding its composed kernel (``layer.fuse()``).

    Same outputs, the parameter count of the never-converted model. Returns the model (a deep copy
    unless ``inplace=True``); ``fold_report`` gives the rows as well.
    """
    return fold_report(model, inplace=inplace)[0]


def fold_report(model: nn.Module, *, inplace: bool = False):
    """``fold`` and its report: ``(model, rows)``; a ``DOConv2d`` used at several paths becomes one
    plain convolution held at all of them (a row per path)."""
    model, report = _start(model, inplace, "folded")
    convs = {}
    for name, module, first in _paths(model, DOConv2d):
        if first not in convs:
            convs[first] = _carry_over(module, module.fuse())
        conv = convs[first]
        report.append(ReportRow(name, "folded", repr(module.config), _count(module), _count(conv),
                                _shared_note(name, first), "" if name == first else first))
        model = _set_submodule(model, name, conv)
    return model, report
