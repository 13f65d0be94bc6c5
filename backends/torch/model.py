"""Whole models: ``convert`` every spatial ``nn.Conv1d/2d/3d`` to ``DOConv1d/2d/3d``, ``fold`` them back.

The paper's protocol (Section 4): replacing the conventional layers is the *only* change. With
``d_init='identity'`` the converted layer holds ``W[..., :MN] = kernel``, the other D_mul - MN columns
zero and D' = 0 (:func:`doconv.params_for_kernel`), so the converted model computes exactly what the
original computed until training moves D.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from doconv import DOConvConfig, standardize_flag
from doconv.contract import (Candidate, ConversionReport, ReportRow, check_choice, check_convert_D_mul, check_D_mul,
                             plan)

from . import functional as DF
from .folded import PLAIN_CONVS
from .layer import COMPOSITIONS, D_INITS, LAYERS, W_STORAGES, _DOConvNd

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

#: The convolutions ``convert`` replaces (exactly these classes, by rank) and the transposed ones it reports kept.
CONVS = tuple(PLAIN_CONVS.values())
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _check_options(D_mul, d_init: str, composition: str, W_storage: str) -> None:
    """The options every converted layer gets, checked once, before any layer's own checks."""
    check_choice(d_init, "d_init", D_INITS)
    check_choice(composition, "composition", COMPOSITIONS)
    check_choice(W_storage, "W_storage", W_STORAGES)
    check_D_mul(D_mul)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
    return model


def _start(model, inplace: bool):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    if standardize_flag(inplace, "inplace"):
        return model
    try:
        return copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 -- whatever a module holds that cannot be copied
        raise ValueError(f"inplace=False needs a copy of model, but {type(model).__name__} cannot be deep-copied "
                         f"({type(error).__name__}: {error}): pass inplace=True") from error


def rank_of(conv: nn.Module) -> int:
    """The number of spatial axes of an ``nn.Conv1d/2d/3d`` (or a subclass), by its class."""
    for rank, kind in PLAIN_CONVS.items():
        if isinstance(conv, kind):
            return rank
    raise TypeError(f"conv must be a torch.nn.Conv1d, Conv2d or Conv3d, but got {type(conv).__name__}")


def config_of(conv: nn.Module, D_mul) -> DOConvConfig:
    rank = rank_of(conv)
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    stride, padding, dilation = (DF.ntuple_of_one(v, rank) for v in (conv.stride, padding, conv.dilation))
    return DOConvConfig(conv.in_channels, conv.out_channels, conv.kernel_size, stride, padding, dilation,
                        conv.groups, conv.bias is not None, conv.padding_mode, D_mul, rank=rank)


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


def _weight_hook(conv: nn.Module) -> Optional[str]:
    """The name of a forward pre-hook that recomputes ``weight`` (the hook forms of weight_norm and spectral_norm,
    torch.nn.utils.prune), which DO-Conv would silently drop, since it composes the kernel itself."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    for hook in conv._forward_pre_hooks.values():
        for kind, name in ((WeightNorm, "weight_norm"), (SpectralNorm, "spectral_norm"), (BasePruningMethod, "prune")):
            if isinstance(hook, kind):
                return name
    return None


def from_conv(conv: nn.Module, *, D_mul: Optional[int] = None, d_init: str = "identity",
              composition: str = "kernel", W_storage: str = "c-major") -> _DOConvNd:
    """A ``DOConv{1,2,3}d`` with ``conv``'s (an ``nn.Conv{1,2,3}d``) configuration, device, dtype and weights
    (W[..., :MN] = kernel).

    With ``d_init='identity'`` it computes exactly what ``conv`` computes; ``'random'`` keeps the kernel
    in W but draws D ~ N(0, 2/MN), so the outputs change (Table 7's random-init protocol).
    """
    c = config_of(conv, D_mul)
    layer = LAYERS[c.rank](c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                           c.bias, c.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                           D_mul=c.D_mul, d_init=d_init, composition=composition, W_storage=W_storage)
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


def _candidate(name: str, module: nn.Module) -> Candidate:
    """What ``convert`` may do with the conv at ``name``: convert it, keep it (1x1, transposed) or skip it
    (unsafe)."""
    if isinstance(module, _DOConvNd):  # converting a converted model again keeps its layers, and says so
        return Candidate(name, id(module), module, "already DO-Conv")
    if isinstance(module, TRANSPOSED):
        return Candidate(name, id(module), module, "transposed convolution: DO-Conv over-parameterizes the kernel "
                                                   "of a forward convolution")
    base = PLAIN_CONVS[rank_of(module)]
    if type(module) is not base:
        return Candidate(name, id(module), module, f"nn.{base.__name__} subclass: its forward may differ", "skipped")
    hook = _weight_hook(module)
    if hook is not None:
        return Candidate(name, id(module), module, f"{hook} hook: it recomputes weight, which DO-Conv composes",
                         "skipped")
    if math.prod(module.kernel_size) == 1:
        return Candidate(name, id(module), module, "pointwise: DO-Conv has no D")
    return Candidate(name, id(module), module)


def _paths(model: nn.Module, kind) -> list:
    """``(path, module)`` for every path to a ``kind`` module, shared ones included."""
    return [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, kind)]


def _kind(module: nn.Module) -> str:
    size = getattr(module, "kernel_size", None)
    pointwise = isinstance(size, tuple) and math.prod(size) == 1
    return type(module).__name__ + (" " + "x".join("1" * len(size)) if pointwise else "")


def convert(model: nn.Module, *, D_mul: Optional[int] = None, d_init: str = "identity", include: Selector = None,
            exclude: Selector = None, inplace: bool = False, composition: str = "kernel", W_storage: str = "c-major"):
    """Replace every non-pointwise ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` of ``model`` by a ``DOConv1d`` /
    ``DOConv2d`` / ``DOConv3d`` keeping its weights.

    ``include``/``exclude``: glob patterns over module paths (``'layer1.*'``), lists of them, or a callable
    ``(name, module) -> bool``; ``include=None`` means every candidate. A pattern that matches no module
    path is refused (ValueError), as a typo. 1x1 convolutions (no D, paper Section 4) and transposed
    convolutions are kept and subclasses of the ``nn.ConvNd`` classes (their ``forward`` may differ) skipped,
    and reported. A conv used at several
    paths (weight sharing) becomes one DO-Conv layer held at all of them, with a report row per path; include /
    exclude must then select all of its paths or none (:func:`doconv.contract.plan`). Returns
    ``(model, report)`` (a :class:`doconv.contract.ConversionReport`); the model is a deep copy unless
    ``inplace=True``. ``D_mul``, ``d_init``, ``composition`` and ``W_storage`` are passed to every
    DO-Conv layer; they and every layer's configuration are checked before the model changes (an error
    names the layer's path).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    _check_options(D_mul, d_init, composition, W_storage)
    decisions = plan([_candidate(name, m) for name, m in _paths(model, CONVS + TRANSPOSED + (_DOConvNd,))],
                     include=include, exclude=exclude,
                     names=[name for name, _ in model.named_modules(remove_duplicate=False)], noun="module path")
    model = _start(model, inplace)
    modules = dict(model.named_modules(remove_duplicate=False))  # the copy's modules at the decided paths
    configs, owners, ties = {}, {}, {}
    for d in decisions:  # every layer's config and weight ties checked before anything changes
        if d.action == "converted" and not d.shared_with:
            try:
                check_convert_D_mul(D_mul, modules[d.path].kernel_size)
                configs[d.path] = config_of(modules[d.path], D_mul)
            except (TypeError, ValueError) as error:
                raise type(error)(f"layer {d.path!r}: {error}") from error
            ties[d.path] = _ties(d.path, modules[d.path], configs[d.path], owners)
    report, layers = ConversionReport(), {}
    for d in decisions:
        module = modules[d.path]
        size = _count(module)
        if d.action != "converted":
            report.append(ReportRow(d.path, _kind(module), d.action, _kind(module), size, size,
                                    reason=_shared_note(d, d.reason), shared_with=d.shared_with))
            continue
        note = _shared_note(d)
        if d.first not in layers:
            layers[d.first] = layer = from_conv(module, D_mul=D_mul, d_init=d_init, composition=composition,
                                                W_storage=W_storage)
            for keys, path in ties[d.first]:  # converting each alone would silently untie them
                for key in keys:
                    setattr(layer, key, getattr(layers[path], key))
                note = "; ".join(filter(None, [note, f"{'/'.join(keys)} tied to {path!r} (a shared Parameter)"]))
        layer = layers[d.first]
        model = _set_submodule(model, d.path, layer)
        report.append(ReportRow(d.path, _kind(module), "converted", repr(layer.config).replace(
            "DOConvConfig", layer.config.kind), size, _count(layer), layer.config.D_mul, note, d.shared_with))
    _watch_optimizers([d.obj for d in decisions if d.action == "converted" and not d.shared_with])
    return model, report


# ---- optimizers built before convert -------------------------------------------------------------------

#: How many conversions marked replaced parameters, and torch's global optimizer-step hook (registered once).
_WATCH = {"conversions": 0, "hook": None}


def _grad_state(param):
    """What identifies ``param``'s gradient as it is now: (id, version), or None with no gradient."""
    return None if param.grad is None else (id(param.grad), param.grad._version)


def _watch_optimizers(convs) -> None:
    """Mark the parameters of ``convs`` (replaced by a conversion) with their gradient's state, and make every
    optimizer check, at its first ``step`` after this conversion, whether it steps only such parameters."""
    for conv in convs:
        for param in conv.parameters(recurse=False):
            param._doconv_replaced = _grad_state(param)
    _WATCH["conversions"] += 1
    if _WATCH["hook"] is None:
        _WATCH["hook"] = register_optimizer_step_pre_hook(_check_optimizer)


def _check_optimizer(optimizer, args, kwargs) -> None:
    """Warn once when ``optimizer`` steps parameters of convolutions that ``convert`` replaced and that got no
    gradient since: it was built before the conversion, so the DO-Conv layers' W, D and bias are not in it and
    nothing they compute trains. Checked at an optimizer's first step after each conversion (one attribute read
    per step otherwise)."""
    if getattr(optimizer, "_doconv_checked", 0) == _WATCH["conversions"]:
        return
    optimizer._doconv_checked = _WATCH["conversions"]
    missing = object()
    stale = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            then = getattr(param, "_doconv_replaced", missing)
            stale += then is not missing and (param.grad is None or _grad_state(param) == then)
    if stale:
        warnings.warn(f"this {type(optimizer).__name__} steps {stale} parameter(s) of convolutions that "
                      f"doconv.torch.convert replaced, which got no gradient since: it was built before convert, so "
                      f"the DO-Conv layers' W, D and bias are not in it and do not train. Build the optimizer after "
                      f"convert, from the converted model's parameters()", UserWarning, stacklevel=3)


def _shared_note(decision, reason: str = "") -> str:
    note = f"same module as {decision.first!r} (shared)" if decision.shared_with else ""
    return "; ".join(text for text in (reason, note) if text)


def _ties(name: str, conv: nn.Module, config: DOConvConfig, owners: dict) -> list:
    """``[(('W', 'D') or ('bias',), path of the earlier layer)]``: what the DO-Conv layer for ``conv`` takes from an
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
                                 f"but their {LAYERS[config.rank].__name__} {key} shapes differ ({mine[key]} vs "
                                 f"{theirs[key]}): they cannot stay tied")
        ties.append((tuple(mine), path))
    return ties


def fold(model: nn.Module, *, inplace: bool = False):
    """Replace every DO-Conv layer (``DOConv1d/2d/3d``) by the plain convolution holding its composed kernel
    (``layer.fuse()``: an ``nn.Conv1d/2d/3d``).

    Same outputs, the parameter count of the never-converted model. Returns ``(model, report)``: the model
    is a deep copy unless ``inplace=True``; a DO-Conv layer used at several paths becomes one plain
    convolution held at all of them (a report row per path).
    """
    model = _start(model, inplace)
    report, convs = ConversionReport(), {}
    first = {}
    for name, module in _paths(model, _DOConvNd):
        shared = first.setdefault(id(module), name)
        if shared == name:
            convs[name] = _carry_over(module, module.fuse())
        conv = convs[shared]
        report.append(ReportRow(name, type(module).__name__, "folded", type(conv).__name__, _count(module),
                                _count(conv),
                                module.config.D_mul, "" if shared == name else f"same module as {shared!r} (shared)",
                                "" if shared == name else shared))
        model = _set_submodule(model, name, conv)
    return model, report
