"""Whole models: ``convert`` every spatial ``gluon.nn.Conv1D`` / ``Conv2D`` / ``Conv3D`` to ``DOConv1D`` /
``DOConv2D`` / ``DOConv3D``, ``fold`` them back.

Each converted layer starts at W' = the conv's kernel exactly (:func:`doconv.params_for_kernel`), so the
converted net computes what the original computed until training moves D; ``fold`` gives the baseline's
plain convolutions holding W'. Reports name layers by block path (:func:`doconv.mxnet.io.named_blocks`), the
model itself being ``""``. The parameter I/O both use lives in :mod:`doconv.mxnet.io`; a channels-last conv's
weight, (C_out, *kernel_size, C_in/g), enters and leaves the canonical layout through its
:func:`~doconv.mxnet.io.kernel_from_gluon` / :func:`~doconv.mxnet.io.kernel_to_gluon`.
"""

from __future__ import annotations

import copy
import functools
import gc
import warnings
import weakref
from typing import List, Optional, Tuple

import numpy as np

import doconv
from doconv import standardize_flag
from doconv.contract import (COMPOSITIONS, D_INITS, Candidate, ConversionReport, ReportRow, check_choice,
                             check_convert_D_mul, check_D_mul, plan)

from ._mx import gluon, mx
from .cache import check_model, unscoped
from .io import get_params, kernel_from_gluon, kernel_to_gluon, named_blocks, param_contexts, set_params
from .layer import LAYERS, _DOConv, channels_last, gluon_kernel_shape


# ---- walking a network -------------------------------------------------------------------------------

def _places(model: gluon.Block) -> dict:
    """``{path: (block, parent, key)}``, the model itself at ``""`` (no parent)."""
    return {"": (model, None, None), **{path: (b, parent, key) for path, b, parent, key in named_blocks(model)}}


def _paths(model: gluon.Block, kind) -> List[Tuple[str, gluon.Block]]:
    return [(path, block) for path, (block, _, _) in _places(model).items() if isinstance(block, kind)]


def _replace(parent: gluon.Block, key: str, new: gluon.Block) -> None:
    old = parent._children[key]
    if getattr(parent, key, None) is old:
        # Block.__setattr__ refuses to change an attribute's type (Conv2D -> DOConv2D): bypass it, then
        # re-register the child under the same key so collect_params and the block paths see the new one.
        object.__setattr__(parent, key, new)
    for value in vars(parent).values():  # Gluon 1.x's list of children: a list attribute + register_child
        if isinstance(value, list) and any(item is old for item in value):
            value[:] = [new if item is old else item for item in value]
    parent._children[key] = new


def _swap(model: gluon.Block, swaps) -> gluon.Block:
    """Put each ``(parent, key, new)`` in place (parent None: ``new`` replaces the model itself, which is
    returned instead) and drop every cached graph above them (a hybridized ancestor would run the old ones)."""
    for parent, key, new in swaps:
        if parent is None:
            return new
        _replace(parent, key, new)
    for block, _, _ in _places(model).values():
        if isinstance(block, gluon.HybridBlock):
            block._clear_cached_op()
    return model


def _copy(model: gluon.Block) -> gluon.Block:
    """A deep copy of ``model`` for ``inplace=False``: its own parameter arrays (same names), no cached graph
    (a CachedOp is a C handle: the copy builds its own at its first call) and no Trainer."""
    blocks = [block for block, _, _ in _places(model).values()]
    memo = {}
    for block in blocks:
        if isinstance(block, gluon.HybridBlock):
            memo[id(block._cached_op)], memo[id(block._cached_op_args)] = None, []
    for param in model.collect_params().values():
        if param._trainer is not None:  # the Trainer holds the original's parameters, not the copy's
            memo[id(param._trainer)] = None
    try:
        out = copy.deepcopy(model, memo)
    except (TypeError, ValueError, AttributeError, RuntimeError, copy.Error) as error:
        raise ValueError(f"inplace=False needs a copy of model, but {type(model).__name__} cannot be deep-copied "
                         f"({type(error).__name__}: {error}): pass inplace=True to change model in place") from error
    for block, _, _ in _places(out).values():
        unscoped(block)
        if isinstance(block, gluon.HybridBlock):
            block._clear_cached_op()
    for param in out.collect_params().values():
        if param._data is not None:
            param._init_grad()  # copied arrays are not marked for autograd: fresh gradient buffers
    return out


def _start(model, inplace) -> Tuple[gluon.Block, bool]:
    check_model(model)
    return model, standardize_flag(inplace, "inplace")


def _count(block: gluon.Block) -> int:
    """Parameters of ``block`` (a dimension still deferred counts 0)."""
    return sum(int(np.prod(p.shape)) for p in block.collect_params().values() if p.shape is not None)


def _single_tap(kernel) -> bool:
    return all(int(k) == 1 for k in kernel)


def _kind(block: gluon.Block) -> str:
    """The report's ``kind``: the block's type, with its kernel when that is a single tap ('Conv2D 1x1')."""
    kernel = getattr(block, "_kwargs", {}).get("kernel")
    single = kernel is not None and _single_tap(kernel)
    return type(block).__name__ + (" " + "x".join(map(str, kernel)) if single else "")


def _shared_note(decision, reason: str = "") -> str:
    note = f"same block as {decision.first!r} (shared)" if decision.shared_with else ""
    return "; ".join(text for text in (reason, note) if text)


def _refuse(error: Exception, what: str, path: str, done: str):
    kind = TypeError if isinstance(error, TypeError) else ValueError
    raise kind(f"cannot {what} layer {path!r}: {error}; nothing was {done}") from error


# ---- convert -----------------------------------------------------------------------------------------

#: The DO-Conv layer that replaces each Gluon convolution.
REPLACES = {cls.plain: cls for cls in LAYERS.values()}
TRANSPOSED = (gluon.nn.Conv1DTranspose, gluon.nn.Conv2DTranspose, gluon.nn.Conv3DTranspose)
#: The convolution-like blocks every report lists.
CONVOLUTIONS = (*REPLACES, *TRANSPOSED)


def _candidate(path: str, block: gluon.Block) -> Candidate:
    """What ``convert`` may do with the block at ``path``: convert it, keep it (single tap, transposed) or
    skip it."""
    if isinstance(block, _DOConv):  # converting a converted net again keeps its layers, and says so
        return Candidate(path, id(block), block, "already DO-Conv")
    if isinstance(block, TRANSPOSED):
        return Candidate(path, id(block), block, "transposed convolution")
    if type(block) not in REPLACES:
        base = next(plain for plain in REPLACES if isinstance(block, plain))
        return Candidate(path, id(block), block, f"gluon.nn.{base.__name__} subclass: its hybrid_forward may differ",
                         "skipped")
    if _single_tap(block._kwargs["kernel"]):
        return Candidate(path, id(block), block, "pointwise: DO-Conv has no D")
    return Candidate(path, id(block), block)


def _dumps(init):
    """``init`` as ``Initializer.dumps`` writes it (``Parameter.var`` stores the initializer's kwargs as JSON)."""
    if init is None or isinstance(init, str):
        return init
    try:
        return init.dumps()
    except (TypeError, ValueError):  # kwargs JSON cannot hold: the name only (the object itself still draws)
        return type(init).__name__.lower()


@mx.init.register
class KernelInit(mx.init.Initializer):
    """Initialiser of W that draws W' as a Gluon convolution draws its weight (what ``convert`` gives W).

    ``init`` (the conv weight's own initializer, or None for the one passed to ``initialize()``) fills a kernel
    shaped as the conv's weight of ``layout`` (:func:`doconv.mxnet.layer.gluon_kernel_shape`) under its ``name``
    -- its shape, so its fan and the order of its draws, and its name -- and W holds that kernel as
    :func:`doconv.params_for_kernel` does: W' = the kernel at D' = 0.
    """

    def __init__(self, init=None, name="weight", kernel_size=(3, 3), groups=1, layout="NCHW"):
        super().__init__(init=_dumps(init), name=name, kernel_size=list(kernel_size), groups=groups, layout=layout)
        self.conv_init, self.conv_name, self.kernel_size, self.groups = init, name, tuple(kernel_size), groups
        self.layout = layout

    def _init_weight(self, desc, arr):
        outer = getattr(desc, "global_init", None) or mx.init.Uniform()
        cout, per_group, s = arr.shape
        config = doconv.DOConvConfig(per_group * self.groups, cout, self.kernel_size, groups=self.groups, D_mul=s,
                                     rank=len(self.kernel_size))
        kernel = mx.nd.zeros(gluon_kernel_shape(config.kernel_shape, self.layout), dtype=arr.dtype)
        mx.init.create(outer)(mx.init.InitDesc(self.conv_name, {"__init__": self.conv_init or outer}), kernel)
        arr[:] = doconv.params_for_kernel(kernel_from_gluon(kernel.asnumpy(), self.layout), config).W


def _conv_args(conv: gluon.Block) -> dict:
    k = conv._kwargs
    return dict(channels=k["num_filter"], kernel_size=tuple(k["kernel"]), strides=tuple(k["stride"]),
                padding=tuple(k["pad"]), dilation=tuple(k["dilate"]), groups=k["num_group"], layout=k["layout"],
                activation=conv.act._act_type if conv.act is not None else None, use_bias=not k["no_bias"])


def _in_channels(conv: gluon.Block) -> int:
    """C_in of a Gluon convolution (0 while deferred), read from its weight's C_in/g axis: last for a
    channels-last layout (:func:`doconv.mxnet.layer.gluon_kernel_shape`)."""
    k = conv._kwargs
    return conv.weight.shape[-1 if channels_last(k["layout"]) else 1] * k["num_group"]


def _kernel_init(conv: gluon.Block, init) -> KernelInit:
    """W's initializer for ``conv``: draws W' as ``init`` draws the conv's weight (:class:`KernelInit`)."""
    k = conv._kwargs
    return KernelInit(init, conv.weight.name, tuple(k["kernel"]), k["num_group"], k["layout"])


def _carry_settings(new: _DOConv, conv: gluon.Block) -> None:
    """The conv weight's grad_req / lr_mult / wd_mult on W and D (a frozen conv stays frozen), its bias's on bias."""
    for param, old in ((new.W, conv.weight), (new.D, conv.weight), (new.bias, conv.bias)):
        if param is not None and old is not None:
            param.grad_req, param.lr_mult, param.wd_mult = old.grad_req, old.lr_mult, old.wd_mult


def _initialise_like(new: _DOConv, conv: gluon.Block) -> bool:
    """Initialise ``new`` where the conv's weight lives, with its dtype; False if the conv held no data yet.

    A conv still deferred (``initialize(init)`` ran, C_in unknown) leaves its pending initializers to ``new``:
    W's draws W' as the conv's weight would have been drawn (:class:`KernelInit`), the
    bias takes the conv bias's.
    """
    ctxs = param_contexts(conv.weight)
    if ctxs is None:
        return False
    new.cast(conv.weight.dtype)
    new.initialize(ctx=ctxs)
    if conv.weight._deferred_init:
        init, _, default, _ = conv.weight._deferred_init
        new.W._deferred_init = (_kernel_init(conv, init), ctxs, default, None)
        if new.bias is not None and conv.bias._deferred_init:
            init, _, default, _ = conv.bias._deferred_init
            new.bias._deferred_init = (init, ctxs, default, None)
    return conv.weight._deferred_init == ()  # initialised with a known shape: data to copy


def _converted(conv: gluon.Block, path: str, shared: Optional[_DOConv], D_mul, d_init, composition):
    """The DO-Conv layer for ``conv`` (sharing ``shared``'s parameters, if any) and whether it holds the conv's
    data."""
    args = _conv_args(conv)
    cin = _in_channels(conv)
    bias = {} if conv.bias is None else {"bias_initializer": conv.bias.init}
    new = REPLACES[type(conv)](**args, in_channels=cin, D_mul=D_mul, d_init=d_init, composition=composition,
                               weight_initializer=_kernel_init(conv, conv.weight.init),
                               prefix=conv.prefix, params=None if shared is None else shared.params, **bias)
    if shared is not None:
        return new, False
    _carry_settings(new, conv)
    with_data = _initialise_like(new, conv) and cin > 0
    if with_data:
        bias = None if conv.bias is None else conv.bias.data(conv.bias.list_ctx()[0]).asnumpy()
        weight = conv.weight.data(conv.weight.list_ctx()[0]).asnumpy()
        params = doconv.params_for_kernel(kernel_from_gluon(weight, args["layout"]), new.config, bias)
        if d_init == "random":
            params.D = get_params(new).D
        set_params(new, params, name=path)
    return new, with_data


def _layer_text(layer: _DOConv) -> str:
    """The report's ``layer`` column: the config as ``repr(config)`` with its kind, or the spec while C_in is
    deferred."""
    if layer.in_channels:
        return repr(layer.config).replace("DOConvConfig", layer.config.kind)
    kind = "DO-Conv" if layer.spec.groups == 1 else "DO-GConv or DO-DConv"
    return repr(layer.spec).replace("LayerSpec(", f"{kind}(in_channels deferred, ")


def _frees_what_it_replaces(function):
    """``function`` (convert or fold), then a cycle collection: a replaced Gluon block and its ``_BlockScope``
    refer to each other, so its parameters and their gradients (a kernel set of the whole net) would stay
    allocated until Python's collector happens to run. Collected after ``function`` returns, when its locals,
    the replaced blocks among them, are gone."""
    @functools.wraps(function)
    def collected(*args, **kwargs):
        result = function(*args, **kwargs)
        gc.collect()
        return result
    return collected


@_frees_what_it_replaces
def convert(model: gluon.Block, *, D_mul=None, d_init="identity", include=None, exclude=None,
            composition="kernel", inplace=False) -> Tuple[gluon.Block, ConversionReport]:
    """Replace every non-pointwise ``gluon.nn.Conv1D`` / ``Conv2D`` / ``Conv3D`` of ``model`` by a ``DOConv1D`` /
    ``DOConv2D`` / ``DOConv3D`` keeping its weights.

    Each converted layer starts at W' = the conv's kernel exactly (:func:`doconv.params_for_kernel`), so
    outputs are unchanged. Returns ``(model, report)``, a :class:`doconv.contract.ConversionReport` with a
    row per convolution or transposed convolution path (any rank): converted, kept (single tap: no D;
    transposed convolutions; not included / excluded) or skipped (subclasses of the Gluon convolutions, whose
    ``hybrid_forward`` may differ).

    ``inplace=False`` (default) converts a deep copy (own arrays, the original's parameter names) and leaves
    ``model`` as it was; a net that cannot be deep-copied is a ValueError asking for ``inplace=True``, which
    changes ``model`` and returns it (a bare ``Conv2D`` is returned as a new ``DOConv2D`` either way, and
    likewise in 1-D and 3-D).

    **Build the Trainer after convert.** The converted layers' W, D and bias are new Parameters: a
    ``gluon.Trainer`` made before ``convert`` holds the conv weights that no longer run and does not train
    the DO-Conv layers (under ``ignore_stale_grad=True``, silently). Such a Trainer warns at its first
    ``step`` (or ``update``) after ``convert`` if the replaced weights got no gradient since.

    ``include`` / ``exclude``: glob patterns over block paths (or lists of them, or a callable
    ``(path, block) -> bool``); a pattern that matches no path is a ValueError. Sharing survives: a block
    used at several paths becomes one DO-Conv layer at all of them (include / exclude must select all of its
    paths or none), and blocks sharing parameters (``params=``) become DO-Conv layers sharing W, D and bias. A
    conv whose weight is not initialised yet becomes a deferred DO-Conv layer that is initialised as the conv would have
    been (the conv's initializers, pending or its own, draw W' and bias). W and D take the conv weight's
    ``grad_req``, ``lr_mult`` and ``wd_mult``, bias the conv bias's. ``d_init='random'`` re-initialises D (and
    so changes the outputs). The options and every layer are checked before anything is swapped: an error
    (naming the block path) leaves the model as it was.
    """
    model, inplace = _start(model, inplace)
    check_choice(d_init, "d_init", D_INITS)
    check_choice(composition, "composition", COMPOSITIONS)
    check_D_mul(D_mul)
    decisions = plan([_candidate(path, block) for path, block in _paths(model, CONVOLUTIONS + (_DOConv,))],
                     include=include, exclude=exclude, names=[path for path, _, _, _ in named_blocks(model)],
                     noun="block path")
    work = model if inplace else _copy(model)
    places = _places(work)
    report, made, tied, swaps = ConversionReport(), {}, {}, []
    for d in decisions:
        block, parent, key = places[d.path]
        size = _count(block)
        if d.action != "converted":
            report.append(ReportRow(d.path, _kind(block), d.action, _kind(block), size, size,
                                    reason=_shared_note(d, d.reason), shared_with=d.shared_with))
            continue
        if d.first not in made:
            first, shared = tied.get(id(block.weight), (None, None))  # Gluon's params= sharing between blocks
            try:
                check_convert_D_mul(D_mul, block._kwargs["kernel"])
                new, with_data = _converted(block, d.path, shared, D_mul, d_init, composition)
            except (ValueError, TypeError) as error:
                _refuse(error, "convert", d.path, "converted")
            tied.setdefault(id(block.weight), (d.path, new))
            made[d.first] = new, (f"W, D and bias tied to {first!r} (shared Parameters, params=)" if shared else
                                  "" if with_data else "in_channels deferred: W and D take their shapes (and the "
                                                       "conv's initializers) at the first input")
        new, note = made[d.first]
        swaps.append((parent, key, new))
        report.append(ReportRow(d.path, _kind(block), "converted", _layer_text(new), size, _count(new),
                                new.spec.D_mul, "; ".join(filter(None, [note, _shared_note(d)])), d.shared_with))
    work = _swap(work, swaps)
    _watch_trainers([d.obj for d in decisions if d.action == "converted" and not d.shared_with])
    return work, report


def _watch_trainers(convs) -> None:
    """Make each Trainer that holds a converted conv's weight check, at its next step, that it still trains."""
    for conv in convs:
        trainer = conv.weight._trainer
        if trainer is None or conv.weight.grad_req == "null":
            continue
        watched = vars(trainer).get("_doconv_replaced")
        if watched is None:
            watched = trainer._doconv_replaced = {}
            for method in ("step", "update"):
                def checked(*args, _method=getattr(trainer, method), **kwargs):
                    _check_trainer(_method.__self__)
                    return _method(*args, **kwargs)
                setattr(trainer, method, checked)
        watched[id(conv.weight)] = weakref.ref(conv.weight)


def _check_trainer(trainer) -> None:
    """Warn if the replaced conv weights this Trainer holds got no gradient since convert (it trains the
    converted net, whose DO-Conv layers it does not hold); then stop checking."""
    for method in ("step", "update"):
        vars(trainer).pop(method, None)
    weights = [ref() for ref in vars(trainer).pop("_doconv_replaced", {}).values()]
    stale = [w.name for w in weights if w is not None and w._data is not None
             and not any(d._fresh_grad for d in w.list_data())]
    if stale:
        warnings.warn(f"this gluon.Trainer holds {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}, the "
                      f"weight of {len(stale)} convolution(s) that doconv.mxnet.convert replaced, and no gradient "
                      f"reached them since: the DO-Conv layers' W, D and bias are new Parameters that this Trainer "
                      f"does not hold, so it does not train them. Build the Trainer after convert "
                      f"(gluon.Trainer(net.collect_params(), ...))", UserWarning, stacklevel=3)


# ---- fold --------------------------------------------------------------------------------------------

def _check_foldable(layer: _DOConv, path: str) -> None:
    if not layer.in_channels:
        _refuse(ValueError("in_channels is not known yet (in_channels=0 and no input seen)"), "fold", path, "folded")
    if layer.W._data is None:
        _refuse(ValueError("its parameters are not initialised (initialize() or load_parameters() first)"),
                "fold", path, "folded")


def _folded(layer: _DOConv) -> gluon.HybridBlock:
    """The plain Gluon convolution of the layer's rank (``layer.plain``) and layout holding its W' (in that
    layout's weight order) and bias, on its contexts, in its dtype and prefix."""
    config, spec = layer.config, layer.spec
    conv = layer.plain(spec.out_channels, spec.kernel_size, strides=spec.stride, padding=layer.padding,
                       dilation=spec.dilation, groups=spec.groups, layout=layer.layout,
                       activation=layer.activation, use_bias=spec.bias, in_channels=config.in_channels,
                       prefix=layer.prefix)
    conv.cast(layer.W.dtype)
    conv.initialize(ctx=layer.W.list_ctx())
    kernel, bias = doconv.fold(get_params(layer), config)
    dtype = np.dtype(layer.W.dtype)
    conv.weight.set_data(mx.nd.array(kernel_to_gluon(kernel, layer.layout), dtype=dtype))
    if bias is not None:
        conv.bias.set_data(mx.nd.array(bias, dtype=dtype))
    return conv


@_frees_what_it_replaces
def fold(model: gluon.Block, *, inplace=False) -> Tuple[gluon.Block, ConversionReport]:
    """Replace every ``DOConv1D`` / ``DOConv2D`` / ``DOConv3D`` of ``model`` by a plain ``gluon.nn.Conv1D`` /
    ``Conv2D`` / ``Conv3D`` holding W' and bias.

    The folded net has the baseline's parameters and cost (paper Section 3). Returns ``(model, report)``
    (a row 'folded' per DO-Conv path); the model is a deep copy unless ``inplace=True`` (as for
    :func:`convert`); a bare ``DOConv2D`` gives its ``Conv2D``. A layer used at several paths becomes one
    convolution held at all of them. Every layer is checked (C_in known, initialised) before any is replaced: an
    error names the block path and leaves the model as it was.
    """
    model, inplace = _start(model, inplace)
    for path, layer in _paths(model, _DOConv):
        _check_foldable(layer, path)
    work = model if inplace else _copy(model)
    places = _places(work)
    report, convs, first, swaps = ConversionReport(), {}, {}, []
    for path, layer in _paths(work, _DOConv):
        shared = first.setdefault(id(layer), path)
        if shared == path:
            convs[path] = _folded(layer)
        conv = convs[shared]
        _, parent, key = places[path]
        swaps.append((parent, key, conv))
        report.append(ReportRow(path, type(layer).__name__, "folded", type(conv).__name__, _count(layer),
                                _count(conv), layer.spec.D_mul,
                                "" if shared == path else f"same block as {shared!r} (shared)",
                                "" if shared == path else shared))
    return _swap(work, swaps), report


__all__ = ["convert", "fold"]
