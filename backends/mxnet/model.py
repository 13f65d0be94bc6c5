"""The backend contract for Gluon: canonical parameters, whole-model convert / fold, interchange and official files.

Layer names are block paths, the keys ``save_parameters`` uses (``"features.0.conv1"``): a
``HybridSequential``'s children by index, every other child by its attribute name. A model that is itself
the layer (a bare ``Conv2D`` or ``DOConv2D``) has the path ``""`` in reports and :data:`doconv.ROOT_NAME` in
files, as in PyTorch.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Iterator, List, Optional, Tuple

import numpy as np

import doconv
from doconv import standardize_flag
from doconv.contract import (COMPOSITIONS, D_INITS, Candidate, ConversionReport, ReportRow, check_choice,
                             check_convert_D_mul, check_D_mul, plan)
from doconv.layouts import D_to_delta, delta_to_D, from_official

from ._mx import gluon, mx
from .cache import check_model, unscoped
from .layer import DOConv2D

#: Gluon's Convolution pads symmetrically with zeros, fixed at construction: no per-side or non-zero
#: padding, and no TF-style 'same' at stride > 1 (its pads depend on the input size). 'same' at stride 1
#: with an odd kernel and 'valid' are translated to symmetric ints by :func:`layer_from_config`.
UNSUPPORTED_FEATURES = frozenset({"asymmetric_padding", "padding_mode", "same_strided", "same_even_kernel"})


# ---- one layer ---------------------------------------------------------------------------------------

def symmetric_padding(config: doconv.DOConvConfig) -> Tuple[int, int]:
    """The Gluon ``padding=(h, w)`` of a config, or ValueError when Gluon cannot express its padding."""
    if config.padding_mode != "zeros":
        raise ValueError(f"Gluon pads with zeros only, but got padding_mode={config.padding_mode!r}")
    if config.padding == "same" and config.stride != (1, 1):
        raise ValueError(f"padding='same' with stride={config.stride} depends on the input size; Gluon's padding "
                         f"is fixed at construction: give symmetric ints")
    (top, bottom), (left, right) = config.pads(0, 0) if config.padding == "same" else config.pads(1, 1)
    if top != bottom or left != right:
        raise ValueError(f"Gluon pads symmetrically, but {config!r} needs per-side pads "
                         f"{((top, bottom), (left, right))}")
    return (top, left)


def layer_from_config(config: doconv.DOConvConfig, *, dtype="float32", composition="kernel", ctx=None,
                      **kwargs) -> DOConv2D:
    """An initialised ``DOConv2D`` for ``config`` on ``ctx`` (default ``mx.cpu()``), cast to ``dtype``."""
    layer = DOConv2D(config.out_channels, config.kernel_size, strides=config.stride,
                     padding=symmetric_padding(config), dilation=config.dilation, groups=config.groups,
                     use_bias=config.bias, in_channels=config.in_channels, D_mul=config.D_mul,
                     depthwise_separable=config.depthwise_separable, composition=composition, **kwargs)
    layer.initialize(ctx=ctx or mx.cpu())
    layer.cast(dtype)
    return layer


def layer_config(layer: DOConv2D) -> doconv.DOConvConfig:
    """The layer's :class:`doconv.DOConvConfig` (padding as symmetric per-side pairs)."""
    if not isinstance(layer, DOConv2D):
        raise TypeError(f"layer must be a doconv.mxnet.DOConv2D, but got {type(layer).__name__}")
    return layer.config


def get_params(layer: DOConv2D) -> doconv.DOConvParams:
    """Canonical NumPy parameters in the layer's dtype: W, the *full* D = I_fill + D', bias."""
    config = layer_config(layer)
    read = lambda p: None if p is None else p.data(p.list_ctx()[0]).asnumpy()  # noqa: E731
    return doconv.DOConvParams(read(layer.W), delta_to_D(read(layer.D), config), read(layer.bias))


def set_params(layer: DOConv2D, params: doconv.DOConvParams, *, name: Optional[str] = None) -> None:
    """Write canonical parameters (full D) into every context's copy; ValueError naming layer, array and shapes."""
    _check_params(layer, params, name)
    _write_params(layer, params)


def _check_params(layer: DOConv2D, params: doconv.DOConvParams, name: Optional[str]) -> None:
    if not isinstance(params, doconv.DOConvParams):
        raise TypeError(f"params must be a doconv.DOConvParams, but got {type(params).__name__}")
    params.check(layer_config(layer), where=f"layer {name or layer.name!r}")


def _write_params(layer: DOConv2D, params: doconv.DOConvParams) -> None:
    layer.invalidate_cache()  # a write doconv makes itself: an open cached() scope must not keep the old W'
    dtype = np.dtype(layer.W.dtype)
    D = None if layer.D is None else D_to_delta(params.D, layer.config)
    for param, value in ((layer.W, params.W), (layer.D, D), (layer.bias, params.bias)):
        if param is not None:
            param.set_data(mx.nd.array(np.asarray(value, dtype=dtype), dtype=dtype))


# ---- walking a network -------------------------------------------------------------------------------

def named_blocks(block: gluon.Block, prefix: str = "") -> Iterator[Tuple[str, gluon.Block, gluon.Block, str]]:
    """Every descendant as ``(path, block, parent, key)``, depth first, in registration order; a block
    reached at several paths is yielded at each."""
    for key, child in block._children.items():
        path = f"{prefix}.{key}" if prefix else key
        yield path, child, block, key
        yield from named_blocks(child, path)


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


def _kind(block: gluon.Block) -> str:
    kernel = getattr(block, "_kwargs", {}).get("kernel")
    return type(block).__name__ + (" 1x1" if kernel is not None and tuple(kernel) == (1, 1) else "")


def _shared_note(decision, reason: str = "") -> str:
    note = f"same block as {decision.first!r} (shared)" if decision.shared_with else ""
    return "; ".join(text for text in (reason, note) if text)


def _refuse(error: Exception, what: str, path: str, done: str):
    kind = TypeError if isinstance(error, TypeError) else ValueError
    raise kind(f"cannot {what} layer {path!r}: {error}; nothing was {done}") from error


# ---- convert -----------------------------------------------------------------------------------------

#: The convolution-like blocks every report lists.
CONVOLUTIONS = (gluon.nn.Conv2D, gluon.nn.Conv2DTranspose)


def _candidate(path: str, block: gluon.Block) -> Candidate:
    """What ``convert`` may do with the block at ``path``: convert it, keep it (1x1, transposed) or skip it."""
    if isinstance(block, gluon.nn.Conv2DTranspose):
        return Candidate(path, id(block), block, "transposed convolution")
    if type(block) is not gluon.nn.Conv2D:
        return Candidate(path, id(block), block, "gluon.nn.Conv2D subclass: its hybrid_forward may differ",
                         "skipped")
    if tuple(block._kwargs["kernel"]) == (1, 1):
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
    """Initialiser of W that draws W' as a ``gluon.nn.Conv2D`` draws its weight (what ``convert`` gives W).

    ``init`` (the conv weight's own initializer, or None for the one passed to ``initialize()``) fills a
    (C_out, C_in/g, M, N) kernel under the conv weight's ``name`` -- its shape, so its fan, and its name --
    and W holds that kernel as :func:`doconv.params_for_kernel` does: W' = the kernel at D' = 0.
    """

    def __init__(self, init=None, name="weight", kernel_size=(3, 3), groups=1):
        super().__init__(init=_dumps(init), name=name, kernel_size=list(kernel_size), groups=groups)
        self.conv_init, self.conv_name, self.kernel_size, self.groups = init, name, tuple(kernel_size), groups

    def _init_weight(self, desc, arr):
        outer = getattr(desc, "global_init", None) or mx.init.Uniform()
        cout, per_group, s = arr.shape
        config = doconv.DOConvConfig(per_group * self.groups, cout, self.kernel_size, groups=self.groups, D_mul=s)
        kernel = mx.nd.zeros(config.kernel_shape, dtype=arr.dtype)
        mx.init.create(outer)(mx.init.InitDesc(self.conv_name, {"__init__": self.conv_init or outer}), kernel)
        arr[:] = doconv.params_for_kernel(kernel.asnumpy(), config).W


def _conv_args(conv: gluon.nn.Conv2D) -> dict:
    k = conv._kwargs
    return dict(channels=k["num_filter"], kernel_size=tuple(k["kernel"]), strides=tuple(k["stride"]),
                padding=tuple(k["pad"]), dilation=tuple(k["dilate"]), groups=k["num_group"], layout=k["layout"],
                activation=conv.act._act_type if conv.act is not None else None, use_bias=not k["no_bias"])


def _contexts(param) -> Optional[list]:
    try:
        return param.list_ctx()
    except RuntimeError:  # never initialised
        return None


def _carry_settings(new: DOConv2D, conv: gluon.nn.Conv2D) -> None:
    """The conv weight's grad_req / lr_mult / wd_mult on W and D (a frozen conv stays frozen), its bias's on bias."""
    for param, old in ((new.W, conv.weight), (new.D, conv.weight), (new.bias, conv.bias)):
        if param is not None and old is not None:
            param.grad_req, param.lr_mult, param.wd_mult = old.grad_req, old.lr_mult, old.wd_mult


def _initialise_like(new: DOConv2D, conv: gluon.nn.Conv2D) -> bool:
    """Initialise ``new`` where the conv's weight lives, with its dtype; False if the conv held no data yet.

    A conv still deferred (``initialize(init)`` ran, C_in unknown) leaves its pending initializers to ``new``:
    W's draws W' as the conv's weight would have been drawn (:class:`KernelInit`), the
    bias takes the conv bias's.
    """
    ctxs = _contexts(conv.weight)
    if ctxs is None:
        return False
    new.cast(conv.weight.dtype)
    new.initialize(ctx=ctxs)
    if conv.weight._deferred_init:
        init, _, default, _ = conv.weight._deferred_init
        spec = new.spec
        new.W._deferred_init = (KernelInit(init, conv.weight.name, spec.kernel_size, spec.groups), ctxs, default,
                                None)
        if new.bias is not None and conv.bias._deferred_init:
            init, _, default, _ = conv.bias._deferred_init
            new.bias._deferred_init = (init, ctxs, default, None)
    return conv.weight._deferred_init == ()  # initialised with a known shape: data to copy


def _converted(conv: gluon.nn.Conv2D, path: str, shared: Optional[DOConv2D], D_mul, d_init, composition):
    """The DOConv2D for ``conv`` (sharing ``shared``'s parameters, if any) and whether it holds the conv's data."""
    args = _conv_args(conv)
    cin = conv.weight.shape[1] * args["groups"]
    bias = {} if conv.bias is None else {"bias_initializer": conv.bias.init}
    new = DOConv2D(**args, in_channels=cin, D_mul=D_mul, d_init=d_init, composition=composition,
                   weight_initializer=KernelInit(conv.weight.init, conv.weight.name, args["kernel_size"],
                                                 args["groups"]),
                   prefix=conv.prefix, params=None if shared is None else shared.params, **bias)
    if shared is not None:
        return new, False
    _carry_settings(new, conv)
    with_data = _initialise_like(new, conv) and cin > 0
    if with_data:
        bias = None if conv.bias is None else conv.bias.data(conv.bias.list_ctx()[0]).asnumpy()
        params = doconv.params_for_kernel(conv.weight.data(conv.weight.list_ctx()[0]).asnumpy(), new.config, bias)
        if d_init == "random":
            params.D = get_params(new).D
        set_params(new, params, name=path)
    return new, with_data


def _layer_text(layer: DOConv2D) -> str:
    """The report's ``layer`` column: the config as ``repr(config)`` with its kind, or the spec while C_in is
    deferred."""
    if layer.in_channels:
        return repr(layer.config).replace("DOConvConfig", layer.config.kind)
    kind = "DO-Conv" if layer.spec.groups == 1 else "DO-GConv or DO-DConv"
    return repr(layer.spec).replace("LayerSpec(", f"{kind}(in_channels deferred, ")


def convert(model: gluon.Block, *, D_mul=None, d_init="identity", include=None, exclude=None,
            composition="kernel", inplace=False) -> Tuple[gluon.Block, ConversionReport]:
    """Replace every non-pointwise ``gluon.nn.Conv2D`` of ``model`` by a ``DOConv2D`` keeping its weights.

    Each converted layer starts at W' = the conv's kernel exactly (:func:`doconv.params_for_kernel`), so
    outputs are unchanged. Returns ``(model, report)``, a :class:`doconv.contract.ConversionReport` with a
    row per ``Conv2D`` / ``Conv2DTranspose`` path: converted, kept (1x1: no D; transposed convolutions; not
    included / excluded) or skipped (``Conv2D`` subclasses, whose ``hybrid_forward`` may differ).

    ``inplace=False`` (default) converts a deep copy (own arrays, the original's parameter names) and leaves
    ``model`` as it was; a net that cannot be deep-copied is a ValueError asking for ``inplace=True``, which
    changes ``model`` and returns it (a bare ``Conv2D`` is returned as a new ``DOConv2D`` either way).

    **Build the Trainer after convert.** The converted layers' W, D and bias are new Parameters: a
    ``gluon.Trainer`` made before ``convert`` holds the conv weights that no longer run and does not train
    the DO-Conv layers (under ``ignore_stale_grad=True``, silently). Such a Trainer warns at its first
    ``step`` (or ``update``) after ``convert`` if the replaced weights got no gradient since.

    ``include`` / ``exclude``: glob patterns over block paths (or lists of them, or a callable
    ``(path, block) -> bool``); a pattern that matches no path is a ValueError. Sharing survives: a block
    used at several paths becomes one DOConv2D at all of them (include / exclude must select all of its paths
    or none), and blocks sharing parameters (``params=``) become DOConv2Ds sharing W, D and bias. A conv
    whose weight is not initialised yet becomes a deferred DOConv2D that is initialised as the conv would have
    been (the conv's initializers, pending or its own, draw W' and bias). W and D take the conv weight's
    ``grad_req``, ``lr_mult`` and ``wd_mult``, bias the conv bias's. ``d_init='random'`` re-initialises D (and
    so changes the outputs). The options and every layer are checked before anything is swapped: an error
    (naming the block path) leaves the model as it was.
    """
    model, inplace = _start(model, inplace)
    check_choice(d_init, "d_init", D_INITS)
    check_choice(composition, "composition", COMPOSITIONS)
    check_D_mul(D_mul)
    decisions = plan([_candidate(path, block) for path, block in _paths(model, CONVOLUTIONS)], include=include,
                     exclude=exclude, names=[path for path, _, _, _ in named_blocks(model)], noun="block path")
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
                      f"reached them since: the DOConv2D layers' W, D and bias are new Parameters that this Trainer "
                      f"does not hold, so it does not train them. Build the Trainer after convert "
                      f"(gluon.Trainer(net.collect_params(), ...))", UserWarning, stacklevel=3)


# ---- fold --------------------------------------------------------------------------------------------

def _check_foldable(layer: DOConv2D, path: str) -> None:
    if not layer.in_channels:
        _refuse(ValueError("in_channels is not known yet (in_channels=0 and no input seen)"), "fold", path, "folded")
    if layer.W._data is None:
        _refuse(ValueError("its parameters are not initialised (initialize() or load_parameters() first)"),
                "fold", path, "folded")


def _folded(layer: DOConv2D) -> gluon.nn.Conv2D:
    """The ``gluon.nn.Conv2D`` holding the layer's W' and bias, on its contexts, in its dtype and prefix."""
    config, spec = layer.config, layer.spec
    conv = gluon.nn.Conv2D(spec.out_channels, spec.kernel_size, strides=spec.stride, padding=layer.padding,
                           dilation=spec.dilation, groups=spec.groups, layout=layer.layout,
                           activation=layer.activation, use_bias=spec.bias, in_channels=config.in_channels,
                           prefix=layer.prefix)
    conv.cast(layer.W.dtype)
    conv.initialize(ctx=layer.W.list_ctx())
    kernel, bias = doconv.fold(get_params(layer), config)
    dtype = np.dtype(layer.W.dtype)
    conv.weight.set_data(mx.nd.array(kernel, dtype=dtype))
    if bias is not None:
        conv.bias.set_data(mx.nd.array(bias, dtype=dtype))
    return conv


def fold(model: gluon.Block, *, inplace=False) -> Tuple[gluon.Block, ConversionReport]:
    """Replace every ``DOConv2D`` of ``model`` by a plain ``gluon.nn.Conv2D`` holding W' and bias.

    The folded net has the baseline's parameters and cost (paper Section 3). Returns ``(model, report)``
    (a row 'folded' per DOConv2D path); the model is a deep copy unless ``inplace=True`` (as for
    :func:`convert`); a bare ``DOConv2D`` gives its ``Conv2D``. A DOConv2D used at several paths becomes one
    Conv2D held at all of them. Every layer is checked (C_in known, initialised) before any is replaced: an
    error names the block path and leaves the model as it was.
    """
    model, inplace = _start(model, inplace)
    for path, layer in _paths(model, DOConv2D):
        _check_foldable(layer, path)
    work = model if inplace else _copy(model)
    places = _places(work)
    report, convs, first, swaps = ConversionReport(), {}, {}, []
    for path, layer in _paths(work, DOConv2D):
        shared = first.setdefault(id(layer), path)
        if shared == path:
            convs[path] = _folded(layer)
        conv = convs[shared]
        _, parent, key = places[path]
        swaps.append((parent, key, conv))
        report.append(ReportRow(path, "DOConv2D", "folded", "Conv2D", _count(layer), _count(conv), layer.spec.D_mul,
                                "" if shared == path else f"same block as {shared!r} (shared)",
                                "" if shared == path else shared))
    return _swap(work, swaps), report


# ---- files -------------------------------------------------------------------------------------------

def doconv_layers(model: gluon.Block) -> dict:
    """``{path: DOConv2D}`` of a model, each layer once (a bare layer is :data:`doconv.ROOT_NAME`, as in
    PyTorch: Gluon's own block names come from a process-wide counter)."""
    check_model(model)
    if isinstance(model, DOConv2D):
        return {doconv.ROOT_NAME: model}
    seen, out = set(), {}
    for path, block, _, _ in named_blocks(model):
        if isinstance(block, DOConv2D) and id(block) not in seen:
            seen.add(id(block))
            out[path] = block
    return out


def _layers(model: gluon.Block, what: str) -> dict:
    layers = doconv_layers(model)
    if not layers:
        raise ValueError(f"model has no DOConv2D layer to {what} ({type(model).__name__} holds none): convert it "
                         f"first (doconv.mxnet.convert(model))")
    return layers


def export_canonical(model: gluon.Block, path, *, allow_nonfinite: bool = False) -> None:
    """Write every DOConv2D of ``model`` to the core's interchange file (:func:`doconv.save`), named by block
    path. NaN or +-inf in a parameter is a ValueError unless ``allow_nonfinite=True``."""
    layers = _layers(model, "export")
    doconv.save(path, {name: (layer_config(layer), get_params(layer)) for name, layer in layers.items()},
                allow_nonfinite=allow_nonfinite)


def import_canonical(model: gluon.Block, path, *, strict: bool = True, allow_nonfinite: bool = False) -> List[str]:
    """Load an interchange file into ``model`` (:func:`doconv.load_matching`); returns the layer names loaded.

    ValueError on a model without DOConv2D layers (convert it first), a layer the model lacks, (``strict``)
    a model layer missing from the file, a config that differs from the model's layer, a damaged file, or
    NaN / +-inf unless ``allow_nonfinite=True``; every layer is checked before any is written. Configs are
    compared resolved (:meth:`doconv.DOConvConfig.resolved`): a file whose layer pads ``'same'`` (PyTorch,
    Keras) loads into the Gluon layer holding the equal explicit symmetric pads.
    """
    layers = _layers(model, "load an interchange file into")
    strict = standardize_flag(strict, "strict")
    stored = doconv.load_matching(path, {name: layer_config(layer) for name, layer in layers.items()},
                                  strict=strict, bare=isinstance(model, DOConv2D), allow_nonfinite=allow_nonfinite)
    for name, params in stored.items():
        _check_params(layers[name], params, name)
    for name, params in stored.items():
        _write_params(layers[name], params)
    return list(stored)


def _numpy(value) -> np.ndarray:
    return value.asnumpy() if isinstance(value, mx.nd.NDArray) else np.asarray(value)


def _official_layer(arrays: dict, where: str) -> dict:
    """One official layer's arrays by short name (``weight``, ``D``, ``bias``), a Gluon prefix stripped."""
    plain = {}
    for key, value in arrays.items():
        short = key.rsplit("_", 1)[-1] if key not in ("weight", "D", "bias") else key
        if short in plain:
            raise ValueError(f"{where}: more than one entry for {short!r} ({sorted(arrays)})")
        plain[short] = value
    return plain


def import_official(model: gluon.Block, arrays, *, refold: bool = False) -> List[str]:
    """Load the official GluonCV DO-Conv code's arrays into ``model``, exactly (same W'); returns the layers.

    A bare ``DOConv2D``: one layer's arrays, ``weight`` (C_out, C_in/g, M, N) as W, the delta ``D``
    (MN, MN, C_in), ``bias``; keys may carry a Gluon prefix (``'conv0_weight'``). A net: a whole official
    net's parameters as ``save_parameters`` names them (``mx.nd.load(file)``), keys ``<block path>.<name>``:
    each DOConv2D takes its official layer's ``<path>.weight`` / ``.D`` / ``.bias``, every other parameter its
    own key. A key that names nothing, or a parameter without its key, is a ValueError; nothing is written
    unless everything matches.

    The official layer pairs D slices with W rows as ``c*g + o // (C_out/g)``; the core's index maps move them to
    the paper's pairing (:func:`doconv.layouts.from_official`), which is always possible for this flavour.
    """
    layers = _layers(model, "load official arrays into")
    if not hasattr(arrays, "items"):
        raise TypeError(f"arrays must be a mapping of names to arrays, but got {type(arrays).__name__}")
    arrays = {key: _numpy(value) for key, value in arrays.items()}
    if isinstance(model, DOConv2D):
        own = {doconv.ROOT_NAME: _official_layer(arrays, "official arrays")}
        rest = {}
    else:
        own, rest = {}, dict(arrays)
        for name in layers:
            prefix = name + "."
            keys = [k for k in arrays if k.startswith(prefix) and "." not in k[len(prefix):]]
            if not keys:
                raise ValueError(f"arrays has no entry for layer {name!r} (no key starts with {prefix!r}); its first "
                                 f"keys are {sorted(arrays)[:4]}")
            own[name] = _official_layer({k[len(prefix):]: arrays[k] for k in keys}, f"layer {name!r}")
            for k in keys:
                del rest[k]
    params = {}
    for name, layer in layers.items():
        try:
            params[name] = from_official(own[name], layer_config(layer), "gluon", refold=refold)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
        _check_params(layer, params[name], name)
    others = _other_params(model, layers, rest)
    for name, layer in layers.items():
        _write_params(layer, params[name])
    for param, value in others:
        param._load_init(mx.nd.array(value, dtype=param.dtype), ctx=_contexts(param) or param._deferred_init[1])
    return list(layers)


def _other_params(model: gluon.Block, layers: dict, arrays: dict) -> list:
    """``[(Parameter, array)]`` for the parameters of ``model`` outside its DOConv2D layers, by their
    ``save_parameters`` names, checked: every one present, no key left over, shapes agreeing."""
    if isinstance(model, DOConv2D):
        return []
    ours = {id(p) for layer in layers.values() for p in layer.collect_params().values()}
    params = {k: p for k, p in model._collect_params_with_prefix().items() if id(p) not in ours}
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise ValueError(f"arrays do not match the model: keys that name no parameter {extra}, parameters "
                         f"without a key {missing}")
    out = []
    for key, param in params.items():
        value = arrays[key]
        known = param.shape or ()
        if len(known) != value.ndim or any(k not in (0, v) for k, v in zip(known, value.shape)):
            raise ValueError(f"arrays[{key!r}] has shape {value.shape}, but the parameter {param.name!r} has shape "
                             f"{param.shape}")
        out.append((param, value))
    return out


__all__ = ["UNSUPPORTED_FEATURES", "convert", "doconv_layers", "export_canonical", "fold", "get_params",
           "import_canonical", "import_official", "layer_config", "layer_from_config", "named_blocks",
           "set_params", "symmetric_padding"]
