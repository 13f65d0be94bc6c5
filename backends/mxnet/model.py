"""The backend contract for Gluon: canonical parameters, whole-model convert / fold, interchange and official files.

Layer names are block paths, the keys ``save_parameters`` uses (``"features.0.conv1"``): a
``HybridSequential``'s children by index, every other child by its attribute name.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Tuple

import numpy as np

import doconv
from doconv import selection, standardize_flag
from doconv.layouts import D_to_delta, delta_to_D, from_official

from ._mx import gluon, mx
from .layer import DOConv2D, KernelInit

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
    config = layer_config(layer)
    params.check(config, where=f"layer {name or layer.name!r}")
    dtype = np.dtype(layer.W.dtype)
    for param, value in ((layer.W, params.W), (layer.D, D_to_delta(params.D, config)), (layer.bias, params.bias)):
        if param is not None:
            param.set_data(mx.nd.array(np.asarray(value, dtype=dtype), dtype=dtype))


# ---- walking a network -------------------------------------------------------------------------------

def named_blocks(block: gluon.Block, prefix: str = "") -> Iterator[Tuple[str, gluon.Block, gluon.Block, str]]:
    """Every descendant as ``(path, block, parent, key)``, depth first, in registration order."""
    for key, child in block._children.items():
        path = f"{prefix}.{key}" if prefix else key
        yield path, child, block, key
        yield from named_blocks(child, path)


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


def _clear_cached_graphs(model: gluon.Block) -> None:
    """Drop every cached graph above a replaced layer (a hybridized ancestor would run the old one)."""
    for block in [model, *(b for _, b, _, _ in named_blocks(model))]:
        if isinstance(block, gluon.HybridBlock):
            block._clear_cached_op()


def _selected(path: str, block, include, exclude) -> bool:
    if include is not None and not selection.selects(include, path, block):
        return False
    return not selection.selects(exclude, path, block)


@dataclasses.dataclass
class ConversionRow:
    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    groups: int
    D_mul: int
    weights: str


class ConversionReport(list):
    """Rows of replaced (or folded) layers; ``str()`` is a Markdown table."""

    def __str__(self) -> str:
        head = "| layer | kind | C_in | C_out | kernel | groups | D_mul | weights |\n|---|---|---|---|---|---|---|---|"
        rows = [f"| {r.name} | {r.kind} | {r.in_channels} | {r.out_channels} | {r.kernel_size[0]}x{r.kernel_size[1]} "
                f"| {r.groups} | {r.D_mul} | {r.weights} |" for r in self]
        return "\n".join([head, *rows, f"\n{len(self)} layer(s)"])


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
    W's draws W' as the conv's weight would have been drawn (:class:`~doconv.mxnet.layer.KernelInit`), the
    bias takes the conv bias's.
    """
    ctxs = _contexts(conv.weight)
    if ctxs is None:
        return False
    new.cast(conv.weight.dtype)
    new.initialize(ctx=ctxs)
    if conv.weight._deferred_init:
        init, _, default, _ = conv.weight._deferred_init
        a = new._args
        new.W._deferred_init = (KernelInit(init, conv.weight.name, a["kernel_size"], a["groups"]), ctxs, default, None)
        if new.bias is not None and conv.bias._deferred_init:
            init, _, default, _ = conv.bias._deferred_init
            new.bias._deferred_init = (init, ctxs, default, None)
    return conv.weight._deferred_init == ()  # initialised with a known shape: data to copy


def _refuse(error: Exception, what: str, path: str, done: str):
    kind = TypeError if isinstance(error, TypeError) else ValueError
    raise kind(f"cannot {what} layer {path!r}: {error}; nothing was {done}") from error


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
        config = new.config
        bias = None if conv.bias is None else conv.bias.data(conv.bias.list_ctx()[0]).asnumpy()
        params = doconv.params_for_kernel(conv.weight.data(conv.weight.list_ctx()[0]).asnumpy(), config, bias)
        if d_init == "random":
            params.D = get_params(new).D
        set_params(new, params, name=path)
    return new, with_data


def convert(model: gluon.Block, *, D_mul=None, d_init="identity", include=None, exclude=None,
            composition="kernel") -> Tuple[gluon.Block, ConversionReport]:
    """Swap every non-pointwise ``gluon.nn.Conv2D`` of ``model`` for a ``DOConv2D`` in place, keeping weights.

    Each converted layer starts at W' = the conv's kernel exactly (:func:`doconv.params_for_kernel`), so
    outputs are unchanged. ``include``/``exclude``: fnmatch patterns (or lists of them, or a callable
    ``(path, block) -> bool``) on block paths; a pattern that matches no path is a ValueError. Sharing
    survives: a block used at several paths becomes one DOConv2D at all of them (selected at its first
    path), and blocks sharing parameters (``params=``) become DOConv2Ds sharing W, D and bias. A conv whose
    weight is not initialised yet becomes a deferred DOConv2D that is initialised as the conv would have been
    (the conv's initializers, pending or its own, draw W' and bias). W and D take the conv weight's
    ``grad_req``, ``lr_mult`` and ``wd_mult``, bias the conv bias's. ``d_init='random'`` re-initialises D (and
    therefore changes outputs). Every layer is built before any is swapped: an error (naming the block path)
    leaves the model as it was. Returns ``(model, report)``.
    """
    include = selection.glob_patterns(include, "include", "a callable(path, block)")
    exclude = selection.glob_patterns(exclude, "exclude", "a callable(path, block)")
    selection.refuse_unmatched({"include": include, "exclude": exclude},
                               (path for path, _, _, _ in named_blocks(model)), "block path")
    report = ConversionReport()
    swaps = []  # (parent, key, DOConv2D), made once every layer is built
    made, tied = {}, {}  # id(Conv2D) -> (path, its DOConv2D); id(weight Parameter) -> (path, the DOConv2D made from it)
    for path, block, parent, key in list(named_blocks(model)):
        if id(block) in made:  # one block at several paths: one DOConv2D at all of them
            first, new = made[id(block)]
            swaps.append((parent, key, new))
            report.append(dataclasses.replace(report[[r.name for r in report].index(first)], name=path,
                                              weights=f"shared with {first!r}"))
            continue
        if type(block) is not gluon.nn.Conv2D or tuple(block._kwargs["kernel"]) == (1, 1):
            continue
        if not _selected(path, block, include, exclude):
            continue
        first, shared = tied.get(id(block.weight), (None, None))  # Gluon params= sharing between blocks
        try:
            new, with_data = _converted(block, path, shared, D_mul, d_init, composition)
        except (ValueError, TypeError) as error:
            _refuse(error, "convert", path, "converted")
        made[id(block)] = (path, new)
        tied.setdefault(id(block.weight), (path, new))
        swaps.append((parent, key, new))
        cin, cfg_d = new.in_channels, new._args
        kind = doconv.DOConvConfig(cin, **cfg_d).kind if cin else (
            "DO-Conv" if cfg_d["groups"] == 1 else "DO-GConv or DO-DConv (C_in deferred)")
        weights = f"tied to {first!r} (shared parameters)" if shared is not None else \
            "kept" if with_data else "deferred"
        report.append(ConversionRow(path, kind, cin,
                                    cfg_d["out_channels"], cfg_d["kernel_size"], cfg_d["groups"], cfg_d["D_mul"],
                                    weights))
    for parent, key, new in swaps:
        _replace(parent, key, new)
    _clear_cached_graphs(model)
    return model, report


def _check_foldable(layer: DOConv2D, path: str) -> None:
    if not layer.in_channels:
        _refuse(ValueError("in_channels is not known yet (in_channels=0 and no input seen)"), "fold", path, "folded")
    if layer.W._data is None:
        _refuse(ValueError("its parameters are not initialised (initialize() or load_parameters() first)"),
                "fold", path, "folded")


def fold(model: gluon.Block, *, return_report: bool = False):
    """Replace every ``DOConv2D`` (the model itself included) by a plain ``gluon.nn.Conv2D`` holding W' and bias.

    The folded net has the baseline's parameters and cost (paper Section 3). Returns the model (or the new
    conv if ``model`` is itself a DOConv2D), with the report when ``return_report=True``. Every layer is
    checked (C_in known, initialised) before any is replaced: an error names the block path and leaves the
    model as it was.
    """
    return_report = standardize_flag(return_report, "return_report")  # checked before the model changes
    report = ConversionReport()

    def folded(layer: DOConv2D, name: str) -> gluon.nn.Conv2D:
        config = layer_config(layer)
        a = layer._args
        conv = gluon.nn.Conv2D(a["out_channels"], a["kernel_size"], strides=a["stride"], padding=a["padding"],
                               dilation=a["dilation"], groups=a["groups"], layout=layer.layout,
                               activation=layer.activation, use_bias=a["bias"], in_channels=config.in_channels,
                               prefix=layer.prefix)
        conv.cast(layer.W.dtype)
        conv.initialize(ctx=layer.W.list_ctx())
        kernel, bias = doconv.fold(get_params(layer), config)
        dtype = np.dtype(layer.W.dtype)
        conv.weight.set_data(mx.nd.array(kernel, dtype=dtype))
        if bias is not None:
            conv.bias.set_data(mx.nd.array(bias, dtype=dtype))
        report.append(ConversionRow(name, "Conv2D", config.in_channels, config.out_channels, config.kernel_size,
                                    config.groups, config.D_mul, "folded"))
        return conv

    if isinstance(model, DOConv2D):
        _check_foldable(model, model.name)
        out = folded(model, model.name)
    else:
        places = [(path, block, parent, key) for path, block, parent, key in named_blocks(model)
                  if isinstance(block, DOConv2D)]
        for path, block, _, _ in places:
            _check_foldable(block, path)
        convs = {}  # id(DOConv2D) -> its Conv2D: a block used at several paths stays one block
        for path, block, _, _ in places:
            if id(block) not in convs:
                convs[id(block)] = folded(block, path)
        for _, block, parent, key in places:
            _replace(parent, key, convs[id(block)])
        _clear_cached_graphs(model)
        out = model
    return (out, report) if return_report else out


# ---- files -------------------------------------------------------------------------------------------

def doconv_layers(model: gluon.Block) -> dict:
    """``{path: DOConv2D}`` of a model (a bare layer is :data:`doconv.ROOT_NAME`, as in PyTorch: Gluon's own
    block names come from a process-wide counter)."""
    if isinstance(model, DOConv2D):
        return {doconv.ROOT_NAME: model}
    return {path: block for path, block, _, _ in named_blocks(model) if isinstance(block, DOConv2D)}


def export_canonical(model: gluon.Block, path) -> None:
    """Write every DOConv2D of ``model`` to the core's interchange file (:func:`doconv.save`)."""
    doconv.save(path, {name: (layer_config(layer), get_params(layer)) for name, layer in doconv_layers(model).items()})


def import_canonical(model: gluon.Block, path) -> None:
    """Load an interchange file into ``model`` (:func:`doconv.load_matching`, strict).

    ValueError on a model without DOConv2D layers (convert it first), a missing/extra layer or a config that
    differs from the model's layer. Configs are compared resolved (:meth:`doconv.DOConvConfig.resolved`): a file
    whose layer pads ``'same'`` (PyTorch, Keras) loads into the Gluon layer holding the equal explicit symmetric
    pads.
    """
    layers = doconv_layers(model)
    if not layers:
        raise ValueError(f"model has no DOConv2D layer to load an interchange file into ({type(model).__name__} "
                         f"holds none): convert it first (doconv.mxnet.convert(model)), then import_canonical")
    stored = doconv.load_matching(path, {name: layer_config(layer) for name, layer in layers.items()}, strict=True,
                                  bare=isinstance(model, DOConv2D))
    for name, layer in layers.items():
        set_params(layer, stored[name], name=name)


def import_official(layer: DOConv2D, arrays, *, refold: bool = False) -> None:
    """Load the official GluonCV DO-Conv layer's arrays (``weight`` (C_out, C_in/g, M, N) as W, delta ``D``
    (MN, MN, C_in), ``bias``; keys may carry a Gluon prefix such as ``'conv0_weight'``) with the exact same W'.

    The official layer pairs D slices with W rows as ``c*g + o // (C_out/g)``; the core's index maps move them to
    the paper's pairing (:func:`doconv.layouts.from_official`), which is always possible for this flavour.
    """
    plain = {}
    for key, value in arrays.items():
        short = key.rsplit("_", 1)[-1] if key not in ("weight", "D", "bias") else key
        if short in plain:
            raise ValueError(f"official arrays: more than one entry for {short!r} ({sorted(arrays)})")
        plain[short] = value.asnumpy() if isinstance(value, mx.nd.NDArray) else np.asarray(value)
    set_params(layer, from_official(plain, layer_config(layer), "gluon", refold=refold))


__all__ = ["UNSUPPORTED_FEATURES", "ConversionReport", "convert", "export_canonical", "fold", "get_params",
           "import_canonical", "import_official", "layer_config", "layer_from_config", "named_blocks",
           "set_params", "symmetric_padding"]
