"""Whole Keras models: ``convert`` conventional convolutions to DO-Conv, ``fold`` them back.

Both return ``(new_model, report)``; the input model is left untouched and shares no variable with the
result. Keras cannot replace a layer of a Sequential or functional model in place (its graph holds the
layer), so those are rebuilt with ``keras.models.clone_model``. Other layers and subclassed models are
copied from their config (Keras' ``get_config`` / ``from_config``, as ``clone_model`` copies every layer)
and changed through the attributes that hold their layers (``self.conv``, lists, tuples and dicts of
layers); ``inplace=True`` changes such a model itself.

- :func:`convert`: every ``Conv1D`` / ``Conv2D`` / ``Conv3D`` (not 1x1) becomes a :class:`DOConv1D` /
  :class:`DOConv2D` / :class:`DOConv3D`, every ``DepthwiseConv1D`` / ``DepthwiseConv2D`` a DO-DConv
  (``groups = C_in``) and every ``SeparableConv1D`` / ``SeparableConv2D`` a DO-DConv followed by its
  pointwise 1x1 convolution (its depthwise part is DO-DConv's case, paper Section 3), each carrying the
  original kernel exactly (:func:`doconv.params_for_kernel`: W = kernel, D = I_fill; Section 4), so outputs
  are identical at identity init. The report (:class:`doconv.contract.ConversionReport`) has a row for
  every convolution-like layer: converted, kept (1x1, transposed convolutions, include/exclude) or skipped
  (subclasses, whose ``call`` may differ).
- :func:`fold`: every DO-Conv layer becomes the plain convolution of its rank (``Conv1D``/``Conv2D``/
  ``Conv3D``, or the depthwise one) holding its composed kernel W' (Section 3, "Training and inference"):
  the baseline's parameter count and inference cost, savable as ``.keras`` and exportable with
  ``model.export()``.
"""

from __future__ import annotations

import keras
from keras.src.models.functional import Functional  # keras.Model(inputs, outputs) makes one; no public name

import doconv
from doconv import layouts
from doconv.contract import (COMPOSITIONS, D_INITS, Candidate, ConversionReport, ReportRow, check_choice,
                             check_convert_D_mul, check_D_mul, plan)

from .folded import SPLICE, build_shape, spliceable
from .layer import LAYERS, BaseDOConv, get_params, layer_config, set_params

L = keras.layers
#: What ``convert`` reports: every convolution-like layer of Keras, and DO-Conv's own.
CONV_LIKE = (L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose,
             L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D, L.SeparableConv2D, BaseDOConv)
#: The plain, depthwise and separable convolutions ``convert`` replaces (exactly these types: a subclass's
#: ``call`` may differ). Keras has no 3-D depthwise or separable layer.
CONVS, DEPTHWISE, SEPARABLE = (L.Conv1D, L.Conv2D, L.Conv3D), (L.DepthwiseConv1D, L.DepthwiseConv2D), \
    (L.SeparableConv1D, L.SeparableConv2D)
CONVERTIBLE = CONVS + DEPTHWISE + SEPARABLE
#: Convolution-like layers kept by design, and why.
KEPT = ((BaseDOConv, "already DO-Conv"),
        ((L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose),
         "transposed convolution: DO-Conv over-parameterizes forward convolutions"))


def check_model(model, what: str = "model"):
    """``model`` if it is a built Keras layer or model, else TypeError / ValueError naming it."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"{what} must be a keras Model or Layer, but got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"{what} {model.name!r} is not built: build it (or call it once) first")
    return model


def is_graph_model(layer) -> bool:
    """A Sequential or functional model: its layers are nodes of a graph, not attributes."""
    return isinstance(layer, (keras.Sequential, Functional))


_KERAS_ATTRIBUTES = set()


def _own_attribute(name: str) -> bool:
    """Whether attribute ``name`` is a user's rather than Keras' or TensorFlow's own bookkeeping (``_layers``,
    the checkpoint dependencies ``_self_*``, ...)."""
    if not _KERAS_ATTRIBUTES:
        probes = keras.layers.Layer(name="doconv_probe"), keras.Model(name="doconv_probe")  # named: no auto-name taken
        _KERAS_ATTRIBUTES.update(*(vars(probe) for probe in probes))
    return name not in _KERAS_ATTRIBUTES and not name.startswith("_self_")


def _join(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _retrack(parent, old, new) -> None:
    """``new`` in ``old``'s place among ``parent``'s tracked layers (same order, so the same weight order)."""
    tracker = parent._tracker
    if tracker.is_in_store("layers", old):
        if tracker.is_in_store("layers", new):  # a layer held twice: the first slot already replaced it
            tracker.untrack(old)
        else:
            tracker.replace_tracked_value("layers", old, new)


def _slots(layer, prefix: str) -> list:
    """``(name, child, put)`` for the layers directly in ``layer``: a graph model's by layer name (``put`` is
    None: only a clone can change them), other layers' by attribute (``put(new)`` replaces the child)."""
    if is_graph_model(layer):
        return [(c.name, c, None) for c in layer.layers if not isinstance(c, keras.layers.InputLayer)]
    out = []

    def put_attribute(key):
        def put(new):
            _retrack(layer, getattr(layer, key), new)
            setattr(layer, key, new)
        return put

    def put_item(key, index):
        def put(new):
            container = getattr(layer, key)
            _retrack(layer, container[index], new)
            if isinstance(container, tuple):
                items = [new if i == index else v for i, v in enumerate(container)]
                setattr(layer, key, container._make(items) if hasattr(container, "_make") else type(container)(items))
            else:
                container[index] = new
        return put

    attributes = list(vars(layer).items())
    # Keras on torch: a layer is a torch.nn.Module, whose __setattr__ keeps a sublayer in _modules, not in vars
    attributes += [(k, v) for k, v in getattr(layer, "_modules", {}).items() if isinstance(v, keras.layers.Layer)]
    for key, value in attributes:
        if not _own_attribute(key):
            continue
        if isinstance(value, keras.layers.Layer):
            out.append((key, value, put_attribute(key)))
        elif isinstance(value, (list, tuple, dict)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            out += [(f"{key}.{i}", v, put_item(key, i)) for i, v in items if isinstance(v, keras.layers.Layer)]
    reached = {id(child) for _, child, _ in out}
    for child in layer._flatten_layers(include_self=False, recursive=False):
        if id(child) not in reached and any(isinstance(sub, CONV_LIKE) for sub in
                                            child._flatten_layers(include_self=True, recursive=True)):
            where = f"in {prefix!r}" if prefix else "in the model"
            raise ValueError(f"layer {child.name!r} ({type(child).__name__}) {where} ({type(layer).__name__}) "
                             f"holds convolutions but is in no attribute doconv.tf can "
                             f"replace: hold it in an attribute (self.x = layer), or in a list, tuple or dict "
                             f"attribute of layers")
    return out


def named_layers(model, prefix: str = "", _ancestors=()):
    """``(path, layer)`` for every layer in ``model``, depth first, at every path that reaches it (a shared
    layer at each). A path is layer names in Sequential and functional models and attribute names (list
    indices, dict keys) elsewhere, joined by dots: ``'conv1'``, ``'block.conv'``, ``'blocks.0'``.
    Convolution-like layers are not entered."""
    for name, child, _ in _slots(model, prefix):
        path = _join(prefix, name)
        yield path, child
        if not isinstance(child, CONV_LIKE) and id(child) not in _ancestors:
            yield from named_layers(child, path, (*_ancestors, id(model)))


def _paths(model) -> list:
    return [(model.name, model)] if isinstance(model, CONV_LIKE) else list(named_layers(model))


def doconv_layers(model) -> dict:
    """``{path: layer}`` of the DO-Conv layers (any rank) of ``model``, each layer once (a bare layer under its
    name)."""
    out, seen = {}, set()
    for path, layer in _paths(check_model(model)):
        if isinstance(layer, BaseDOConv) and id(layer) not in seen:
            seen.add(id(layer))
            out[path] = layer
    return out


# ---- rebuilding with replacements ---------------------------------------------------------------

class _CopyError(ValueError):
    """A layer that cannot be copied (raised once, at the innermost layer, and passed on as it is)."""


def _copy(layer, path: str, inplace_hint: bool):
    """A new ``layer`` from its config, built and holding its weights (what ``clone_model`` does per layer).

    A subclassed model's or custom layer's config rebuilds the layers its ``__init__`` makes: where convert or
    fold replaced one of them since, the copy gets a copy of the replacement (:func:`_align`)."""
    classes = {type(sub).__name__: type(sub) for sub in layer._flatten_layers(include_self=True, recursive=True)}
    try:
        with keras.saving.custom_object_scope(classes):
            new = type(layer).from_config(layer.get_config())
            config = layer.get_build_config()
            if config and not new.built and type(new).build is keras.layers.Layer.build and "input_shape" in config:
                # no build() of its own: Keras builds such a layer by running call() on a symbolic input
                new(keras.KerasTensor(config["input_shape"], dtype=layer.input_dtype))
            elif config and not new.built:
                new.build_from_config(config)
        if not is_graph_model(layer) and not isinstance(layer, CONV_LIKE):
            _align(layer, new, path, inplace_hint)
        new.set_weights(layer.get_weights())
    except _CopyError:
        raise
    except Exception as error:  # whatever the user's get_config / __init__ / build raise: said with the way out
        hint = " or pass inplace=True to change the model itself" if inplace_hint else ""
        raise _CopyError(f"cannot copy layer {path!r} ({type(layer).__name__}) to leave the model untouched: Keras "
                         f"rebuilds a layer from its config, which failed ({type(error).__name__}: {error}). Give "
                         f"{type(layer).__name__} a get_config() its __init__ accepts (Keras' default needs "
                         f"__init__(..., **kwargs)){hint}") from error
    return new


def _align(source, copy, prefix: str, inplace_hint: bool) -> None:
    """Give ``copy`` (built from ``source``'s config) ``source``'s layers where they differ: copies of the layers
    of another type (a DOConv2D where ``__init__`` made a Conv2D) and of every graph model (its config holds its
    layers, auto-generated names included, so paths stay the same)."""
    mine, theirs = _slots(source, prefix), _slots(copy, prefix)
    if [name for name, _, _ in mine] != [name for name, _, _ in theirs]:
        raise _CopyError(f"cannot copy layer {prefix or source.name!r} ({type(source).__name__}): its config "
                         f"rebuilds layers {[n for n, _, _ in theirs]}, but it holds {[n for n, _, _ in mine]}")
    for (name, child, _), (_, other, put) in zip(mine, theirs):
        path = _join(prefix, name)
        if is_graph_model(child) or type(child) is not type(other):
            put(_copy(child, path, inplace_hint))
        elif not isinstance(child, CONV_LIKE):
            _align(child, other, path, inplace_hint)


def _below(path: str, replacements: dict) -> bool:
    return any(p.startswith(path + ".") for p in replacements) if path else bool(replacements)


def _clone_graph(model, prefix: str, replacements: dict):
    """A clone of a Sequential / functional ``model`` with ``replacements`` (``{path: new layer}``) in it."""
    def clone(layer):
        path = _join(prefix, layer.name)
        if path in replacements:
            return replacements[path]
        if is_graph_model(layer):
            return _clone_graph(layer, path, replacements)
        new = _copy(layer, path, False)
        if _below(path, replacements):
            _operate(new, path, replacements)
        return new

    new = keras.models.clone_model(model, clone_function=clone)
    if not isinstance(new, keras.Sequential) or not any(getattr(sub, SPLICE, False) for sub in new.layers):
        return new
    layers = [sub for layer in new.layers for sub in (layer.layers if getattr(layer, SPLICE, False) else [layer])]
    inputs = keras.Input(batch_shape=new.inputs[0].shape, dtype=new.inputs[0].dtype)
    return keras.Sequential([inputs, *layers], name=new.name, trainable=new.trainable)


def _operate(layer, prefix: str, replacements: dict) -> None:
    """Replace, in ``layer`` itself, the children at the paths of ``replacements`` (and below)."""
    for name, child, put in _slots(layer, prefix):
        path = _join(prefix, name)
        if path in replacements:
            put(replacements[path])
        elif _below(path, replacements):
            if is_graph_model(child):
                put(_clone_graph(child, path, replacements))
            else:
                _operate(child, path, replacements)
    if isinstance(layer, keras.Model):  # functions traced before hold the old layers
        layer.train_function = layer.test_function = layer.predict_function = None


def _check_inplace(model, inplace) -> bool:
    """``inplace`` as a bool, or the ValueError of a model Keras cannot change in place (before any work)."""
    inplace = doconv.standardize_flag(inplace, "inplace")
    if inplace and is_graph_model(model):
        raise ValueError(f"inplace=True is not possible for a Keras {type(model).__name__} model ({model.name!r}): "
                         f"Keras rebuilds it (keras.models.clone_model); use the returned model (inplace=False)")
    if inplace and isinstance(model, CONV_LIKE):
        raise ValueError(f"inplace=True is not possible for a bare layer ({model.name!r}): a layer cannot become "
                         f"another; use the returned layer (inplace=False)")
    return inplace


def _transform(model, replacements: dict, inplace: bool):
    if is_graph_model(model):
        return _clone_graph(model, "", replacements)
    if isinstance(model, CONV_LIKE):
        return replacements.get(model.name) or _copy(model, model.name, False)
    target = model if inplace else _copy(model, model.name, True)
    _operate(target, "", replacements)
    return target


# ---- convert --------------------------------------------------------------------------------

def _kind(layer) -> str:
    size = getattr(layer, "kernel_size", None)
    pointwise = size is not None and all(k == 1 for k in size)
    return type(layer).__name__ + (" " + "x".join("1" * len(size)) if pointwise else "")


def _candidate(path: str, layer) -> Candidate:
    """What ``convert`` may do with the layer at ``path``: convert it, keep it (by design) or skip it (unsafe)."""
    for kinds, reason in KEPT:
        if isinstance(layer, kinds):
            return Candidate(path, id(layer), layer, reason)
    if type(layer) not in CONVERTIBLE:
        base = next(k.__name__ for k in CONVERTIBLE if isinstance(layer, k))
        return Candidate(path, id(layer), layer, f"{base} subclass: its call may differ", "skipped")
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return Candidate(path, id(layer), layer, "LoRA or quantized kernel: DO-Conv composes the kernel", "skipped")
    if all(k == 1 for k in layer.kernel_size):
        return Candidate(path, id(layer), layer, "pointwise: DO-Conv has no D")
    return Candidate(path, id(layer), layer)


def _in_channels(layer) -> int:
    shape = tuple((layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel).shape)
    return shape[-2] * getattr(layer, "groups", 1)  # kernels are (*kernel_size, C_in/g, filters) or (..., C_in, m)


def _do_layer(layer, *, name, filters, groups, kernel_oihw, bias, prefix, use_bias, activation, activity_regularizer,
              D_mul, d_init, composition):
    """A built DO-Conv layer of ``layer``'s rank and geometry holding ``kernel_oihw`` (+ ``bias``) at identity D."""
    cls = LAYERS[layer.rank]
    new = cls(filters, layer.kernel_size, layer.strides, layer.padding, layer.data_format, layer.dilation_rate,
              groups, activation=activation, use_bias=use_bias,
              kernel_initializer=getattr(layer, f"{prefix}_initializer"),
              bias_initializer=layer.bias_initializer,
              kernel_regularizer=getattr(layer, f"{prefix}_regularizer"),
              bias_regularizer=layer.bias_regularizer,
              activity_regularizer=activity_regularizer,
              kernel_constraint=getattr(layer, f"{prefix}_constraint"), bias_constraint=layer.bias_constraint,
              D_mul=D_mul, d_init=d_init, composition=composition, name=name, dtype=layer.dtype_policy,
              trainable=layer.trainable)
    cin = _in_channels(layer)
    new.build(build_shape(layer.data_format, cin, layer.rank))
    params = doconv.params_for_kernel(kernel_oihw, layer_config(new), bias)
    if d_init == "random":
        params.D = get_params(new).D  # the new layer's own He-normal draw; W and bias stay the original's
    set_params(new, params)
    return new


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


def replacement(layer, *, D_mul=None, d_init="identity", composition="kernel"):
    """The built DO-Conv layer (a Sequential for a separable one) computing what ``layer`` computes at
    identity init: ``Conv{r}D`` -> ``DOConv{r}D``, ``DepthwiseConv{r}D`` -> DO-DConv, ``SeparableConv{r}D`` ->
    ``Sequential([DO-DConv (its depthwise part), Conv{r}D 1x1 (its pointwise part, bias, activation)])``."""
    options = dict(D_mul=D_mul, d_init=d_init, composition=composition)
    last = dict(use_bias=layer.use_bias, activation=layer.activation, activity_regularizer=layer.activity_regularizer)
    bias = _numpy(layer.bias) if layer.use_bias else None
    cin = _in_channels(layer)
    if isinstance(layer, CONVS):
        return _do_layer(layer, name=layer.name, filters=layer.filters, groups=layer.groups, prefix="kernel",
                         kernel_oihw=layouts.hwio_to_oihw(_numpy(layer.kernel)), bias=bias, **last, **options)
    separable = isinstance(layer, SEPARABLE)
    depthwise = layouts.depthwise_hwcm_to_oihw(_numpy(layer.depthwise_kernel if separable else layer.kernel))
    if isinstance(layer, DEPTHWISE):
        return _do_layer(layer, name=layer.name, filters=cin * layer.depth_multiplier, groups=cin,
                         prefix="depthwise", kernel_oihw=depthwise, bias=bias, **last, **options)
    first = _do_layer(layer, name=f"{layer.name}_depthwise", filters=cin * layer.depth_multiplier, groups=cin,
                      prefix="depthwise", kernel_oihw=depthwise, bias=None, use_bias=False, activation=None,
                      activity_regularizer=None, **options)
    conv = getattr(L, f"Conv{layer.rank}D")
    pointwise = conv(layer.filters, 1, data_format=layer.data_format, activation=layer.activation,
                     use_bias=layer.use_bias, kernel_initializer=layer.pointwise_initializer,
                     bias_initializer=layer.bias_initializer, kernel_regularizer=layer.pointwise_regularizer,
                     bias_regularizer=layer.bias_regularizer, activity_regularizer=layer.activity_regularizer,
                     kernel_constraint=layer.pointwise_constraint, bias_constraint=layer.bias_constraint,
                     name=f"{layer.name}_pointwise", dtype=layer.dtype_policy, trainable=layer.trainable)
    pointwise.build(build_shape(layer.data_format, first.filters, layer.rank))
    pointwise.set_weights([_numpy(layer.pointwise_kernel)] + ([bias] if layer.use_bias else []))
    return spliceable([first, pointwise], layer.name, cin, layer.data_format, layer.rank)


def _describe(new) -> str:
    """The report's ``layer`` cell: the DO-Conv config (kind instead of 'DOConvConfig'), or the plain layers."""
    if isinstance(new, BaseDOConv):
        return repr(layer_config(new)).replace("DOConvConfig", layer_config(new).kind)
    if isinstance(new, keras.Sequential):
        return " + ".join(_describe(sub) for sub in new.layers)
    return _kind(new)


def _note(decision, reason: str = "") -> str:
    shared = f"same layer as {decision.first!r} (shared)" if decision.shared_with else ""
    return "; ".join(text for text in (reason or "", shared) if text)


def convert(model, *, D_mul=None, d_init="identity", include=None, exclude=None, composition="kernel",
            inplace=False):
    """Replace every convertible convolution of ``model`` by DO-Conv; returns ``(new_model, report)``.

    Args:
        model: a built Keras model (Sequential, functional or subclassed; e.g.
            ``keras.applications.Xception(weights=None)``) or layer.
        D_mul: depth multiplier for every converted layer (None: M*N of each layer).
        d_init: ``'identity'`` carries the original kernel exactly (W = kernel, D = I_fill);
            ``'random'`` keeps the kernel in W and the bias but draws D He-normal (Table 7's random
            init): outputs then change.
        include, exclude: layer paths or glob patterns (``'conv*'``, ``'block.*'``; ``fnmatch`` rules), a
            collection of them, or a callable ``(path, layer) -> bool``. A pattern that matches no path of
            the model is a ValueError (a typo would otherwise be silently ignored).
        composition: passed to every DO-Conv layer made (default ``'kernel'``).
        inplace: False (the default) leaves ``model`` untouched. True changes a subclassed model or custom
            layer itself; for a Sequential or functional model it is a ValueError (Keras rebuilds those).

    Compile the returned model (again): an optimizer built before holds the replaced layers' variables.

    Every option and every layer's configuration is checked before anything is built; an error names the
    layer's path. ``print(report)`` lists every convolution-like layer and what happened to it.
    """
    inplace = _check_inplace(check_model(model), inplace)
    check_choice(d_init, "d_init", D_INITS)
    check_choice(composition, "composition", COMPOSITIONS)
    check_D_mul(D_mul)
    paths = _paths(model)
    decisions = plan([_candidate(p, layer) for p, layer in paths if isinstance(layer, CONV_LIKE)], include=include,
                     exclude=exclude, names=[p for p, _ in paths], noun="layer path")
    report, made = ConversionReport(), {}
    for d in decisions:
        layer, kind = d.obj, _kind(d.obj)
        if d.action != "converted":
            report.append(ReportRow(d.path, kind, d.action, kind, layer.count_params(), layer.count_params(),
                                    reason=_note(d, d.reason), shared_with=d.shared_with))
            continue
        if not d.shared_with:
            try:
                check_convert_D_mul(D_mul, layer.kernel_size)
                made[d.path] = replacement(layer, D_mul=D_mul, d_init=d_init, composition=composition)
            except (TypeError, ValueError) as error:
                raise type(error)(f"layer {d.path!r} ({type(layer).__name__}): {error}") from error
        new = made[d.first]
        do = next(sub for sub in new._flatten_layers(include_self=True) if isinstance(sub, BaseDOConv))
        report.append(ReportRow(d.path, kind, "converted", _describe(new), layer.count_params(), new.count_params(),
                                layer_config(do).D_mul, _note(d), d.shared_with))
    replacements = {d.path: made[d.first] for d in decisions if d.action == "converted"}
    return _transform(model, replacements, inplace), report


# ---- fold -------------------------------------------------------------------------------------

def fold(model, *, inplace=False):
    """Every DO-Conv layer of ``model`` replaced by its folded plain convolution (:meth:`BaseDOConv.fold`);
    returns ``(new_model, report)``, a row per folded layer path. ``inplace`` as in :func:`convert`.

    A ``channels_first`` layer on the TensorFlow backend folds to ``Permute``, the plain layer in
    ``channels_last``, ``Permute`` (:func:`doconv.tf.folded.plain_layer` says why): spliced flat into a
    Sequential model, a nested ``Sequential`` named ``<layer>_nhwc`` elsewhere.
    """
    inplace = _check_inplace(check_model(model), inplace)
    report, made, first = ConversionReport(), {}, {}
    for path, layer in _paths(model):
        if not isinstance(layer, BaseDOConv):
            continue
        earlier = first.setdefault(id(layer), path)
        if earlier == path:
            made[path] = layer.fold()
        new = made[earlier]
        shared = "" if earlier == path else earlier
        report.append(ReportRow(path, type(layer).__name__, "folded", _describe(new), layer.count_params(),
                                new.count_params(), layer_config(layer).D_mul,
                                f"same layer as {earlier!r} (shared)" if shared else "", shared))
    replacements = {row.path: made[row.shared_with or row.path] for row in report}
    return _transform(model, replacements, inplace), report
