"""Whole Keras models: ``convert`` conventional convolutions to DO-Conv, ``fold`` them back.

Both return a *new* model (Sequential or functional, nested ones included, via
``keras.models.clone_model``); the input model is left untouched and shares no variable with it.

- :func:`convert`: every non-pointwise ``Conv2D`` becomes a :class:`DOConv2D` and every
  ``DepthwiseConv2D`` a DO-DConv (``groups = C_in``), carrying the original kernel exactly
  (:func:`doconv.params_for_kernel`: W = kernel, D = I_fill; paper Section 4), so outputs are
  identical at identity init. The report lists every convolution and what happened to it.
- :func:`fold`: every :class:`DOConv2D` becomes the plain ``Conv2D`` / ``DepthwiseConv2D`` holding
  its composed kernel W' (paper Section 3, "Training and inference"): the baseline's parameter count
  and inference cost, savable as ``.keras`` and exportable with ``model.export()``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import keras
import numpy as np

import doconv
from doconv import layouts, selection

from .layer import DOConv2D, get_params, layer_config, set_params


@dataclasses.dataclass
class ReportRow:
    """One convolution of the model and what :func:`convert` did with it."""

    name: str
    source: str
    action: str          # "DO-Conv", "DO-DConv", "DO-GConv", or "kept: <reason>"
    kernel_size: tuple
    strides: tuple
    channels: str        # "C_in -> C_out"
    groups: int
    D_mul: Optional[int]
    params_before: int
    params_after: int


class ConversionReport(list):
    """The rows of a conversion; ``print(report)`` shows them as a table."""

    COLUMNS = ("name", "source", "action", "kernel_size", "strides", "channels", "groups", "D_mul",
               "params_before", "params_after")

    @property
    def converted(self) -> List[ReportRow]:
        return [row for row in self if not row.action.startswith("kept")]

    def __str__(self) -> str:
        cells = [self.COLUMNS] + [tuple(str(getattr(r, c)) for c in self.COLUMNS) for r in self]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.COLUMNS))]
        line = lambda row: "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |"  # noqa: E731
        out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
        before = sum(r.params_before for r in self)
        after = sum(r.params_after for r in self)
        out.append(f"{len(self.converted)} of {len(self)} convolutions converted; "
                   f"their parameters {before:,} -> {after:,}")
        return "\n".join(out)


# ---- helpers -----------------------------------------------------------------------------

def _walk(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk(layer)


def _by_name(model) -> dict:
    out = {}
    for layer in _walk(model):
        if not layer.weights or isinstance(layer, keras.Model):
            continue  # only layers whose weights are carried over (input layers get new names)
        if layer.name in out:
            raise ValueError(f"model {model.name!r} holds two layers named {layer.name!r} (in nested models); "
                             f"rename one so that weights can be carried over by name")
        out[layer.name] = layer
    return out


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model (Sequential or functional), but got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: build it (or call it once) before converting")


def _selector(value, name, model) -> Callable:
    """``layer -> bool`` for ``include``/``exclude``: a callable as given, else glob patterns over layer
    names (``fnmatch.fnmatchcase``, as ``doconv.torch.convert``), each of which must match the name of
    at least one layer of ``model`` (nested models included), else ValueError: a typo is refused rather
    than silently converting what it meant to leave (``doconv.torch.convert`` refuses them too)."""
    patterns = selection.glob_patterns(value, name, "a callable layer -> bool")
    if patterns is None:
        return lambda layer: None
    if callable(patterns):
        return patterns
    convs = [layer.name for layer in _walk(model)
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, DOConv2D))]
    selection.refuse_unmatched({name: patterns}, [layer.name for layer in _walk(model)], "layer name", convs)
    return lambda layer: selection.matches(layer.name, patterns)


def _in_channels(layer) -> int:
    shape = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return shape[2]
    return shape[2] * layer.groups


def _build_shape(layer, channels):
    return (None, None, None, channels) if layer.data_format == "channels_last" else (None, channels, None, None)


def _transform(model, make):
    """Clone ``model``; ``make(layer)`` returns a built replacement carrying its weights, or None."""
    _check_model(model)
    replaced, from_make = set(), []

    def clone(layer):
        try:
            new = make(layer)
        except (ValueError, TypeError) as err:  # e.g. a DOConv2D argument: the user's error, not the model's
            if type(err) not in (ValueError, TypeError):  # a subclass: passed on as it is
                from_make.append(err)
                raise
            error = type(err)(f"layer {layer.name!r} ({type(layer).__name__}): {err}")
            from_make.append(error)
            raise error from err
        if new is None:
            return layer.__class__.from_config(layer.get_config())
        replaced.update(id(sub) for sub in [new, *(_walk(new) if isinstance(new, keras.Model) else ())])
        return new

    try:
        new_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except ValueError as err:
        if any(err is e for e in from_make):
            raise
        raise ValueError(f"cannot rebuild model {model.name!r} ({type(model).__name__}): only Sequential and "
                         f"functional models can be converted or folded ({err})") from err
    old_layers, new_layers = _by_name(model), _by_name(new_model)
    if set(old_layers) != set(new_layers):
        raise RuntimeError(f"keras.models.clone_model renamed layers of {model.name!r}: "
                           f"{sorted(set(old_layers) ^ set(new_layers))}")
    for name, new in new_layers.items():
        old = old_layers[name]
        if id(new) not in replaced:
            new.set_weights(old.get_weights())
    return _splice(new_model)


def _splice(model):
    """A Sequential model with every :func:`_nhwc_wrapper` replacement spliced in flat (others as they are)."""
    wrapped = [layer for layer in model.layers if getattr(layer, "_doconv_nhwc_wrapper", False)]
    if not wrapped or not isinstance(model, keras.Sequential):
        return model
    layers = [sub for layer in model.layers
              for sub in (layer.layers if getattr(layer, "_doconv_nhwc_wrapper", False) else [layer])]
    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    return keras.Sequential([inputs, *layers], name=model.name, trainable=model.trainable)


# ---- convert --------------------------------------------------------------------------------

def convert(model, *, D_mul=None, d_init="identity", include=None, exclude=None, composition="kernel"):
    """Replace every non-pointwise ``Conv2D`` / ``DepthwiseConv2D`` by a DO-Conv layer.

    Args:
        model: a built Sequential or functional model (e.g. ``keras.applications.ResNet50(weights=None)``).
        D_mul: depth multiplier for every converted layer (None: M*N of each layer).
        d_init: ``'identity'`` carries the original kernel exactly (W = kernel, D = I_fill);
            ``'random'`` keeps the kernel in W and the bias but draws D He-normal (Table 7's
            random init, as ``doconv.torch.convert``): outputs then change.
        include, exclude: layer names or glob patterns (``'conv*'``, ``fnmatch`` rules, as
            ``doconv.torch.convert``), a collection of them, or a callable ``layer -> bool``: the
            convolutions to convert / to keep. A pattern that matches no layer name of the model
            is a ValueError (a typo would otherwise be silently ignored).
        composition: passed to every :class:`DOConv2D`.

    Returns:
        ``(new_model, report)``; ``print(report)`` lists every convolution and what happened to it.
    """
    if d_init not in ("identity", "random"):
        raise ValueError(f"d_init must be one of ('identity', 'random'), but got d_init={d_init!r}")
    _check_model(model)
    included, excluded = _selector(include, "include", model), _selector(exclude, "exclude", model)
    report = ConversionReport()

    def make(layer):
        if type(layer) not in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and not isinstance(layer, DOConv2D):
                report.append(ReportRow(layer.name, type(layer).__name__, "kept: a Conv2D subclass (its call may "
                                        "differ)", tuple(layer.kernel_size), tuple(layer.strides), "", getattr(layer, "groups", 1),
                                        None, layer.count_params(), layer.count_params()))
            return None
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        cin = _in_channels(layer)
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        filters = cin * layer.depth_multiplier if depthwise else layer.filters
        groups = cin if depthwise else layer.groups
        row = ReportRow(layer.name, type(layer).__name__, "", tuple(layer.kernel_size), tuple(layer.strides),
                        f"{cin} -> {filters}", groups, None, layer.count_params(), layer.count_params())
        report.append(row)
        reason = ("pointwise (1x1): no D (paper Section 4)" if np.prod(layer.kernel_size) == 1 else
                  "excluded" if exclude is not None and excluded(layer) else
                  "not included" if include is not None and not included(layer) else None)
        if reason:
            row.action = f"kept: {reason}"
            return None
        prefix = "depthwise" if depthwise else "kernel"
        new = DOConv2D(filters, layer.kernel_size, layer.strides, layer.padding, layer.data_format,
                       layer.dilation_rate, groups, activation=layer.activation, use_bias=layer.use_bias,
                       kernel_initializer=getattr(layer, f"{prefix}_initializer"),
                       bias_initializer=layer.bias_initializer,
                       kernel_regularizer=getattr(layer, f"{prefix}_regularizer"),
                       bias_regularizer=layer.bias_regularizer, activity_regularizer=layer.activity_regularizer,
                       kernel_constraint=getattr(layer, f"{prefix}_constraint"),
                       bias_constraint=layer.bias_constraint, D_mul=D_mul, d_init=d_init,
                       composition=composition, name=layer.name, dtype=layer.dtype_policy,
                       trainable=layer.trainable)
        new.build(_build_shape(layer, cin))
        config = layer_config(new)
        oihw = layouts.depthwise_hwcm_to_oihw(kernel) if depthwise else layouts.hwio_to_oihw(kernel)
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        params = doconv.params_for_kernel(oihw, config, bias)
        if d_init == "random":
            params.D = get_params(new).D  # the new layer's own He-normal draw; W and bias stay the original's
        set_params(new, params)
        row.action, row.D_mul, row.params_after = config.kind, config.D_mul, new.count_params()
        return new

    return _transform(model, make), report


# ---- fold -------------------------------------------------------------------------------------

def _nhwc_wrapper(layer, plain):
    """``Sequential([Permute to NHWC, plain (channels_last), Permute back to NCHW])``, built."""
    policy = layer.dtype_policy
    wrapper = keras.Sequential([keras.layers.Permute((2, 3, 1), name=f"{layer.name}_to_nhwc", dtype=policy), plain,
                                keras.layers.Permute((3, 1, 2), name=f"{layer.name}_to_nchw", dtype=policy)],
                               name=f"{layer.name}_nhwc")
    wrapper.build((None, layer.doconv_config.in_channels, None, None))
    wrapper._doconv_nhwc_wrapper = True  # noqa: SLF001  (marks it for :func:`_splice`)
    return wrapper


def folded_layer(layer: DOConv2D):
    """The plain built ``Conv2D`` (``DepthwiseConv2D`` when ``groups = C_in > 1``) equal to ``layer``.

    The kernel W' is composed by the core (:func:`doconv.fold`) from the layer's parameters (in
    float32 for variable dtypes NumPy cannot multiply, such as ``bfloat16``, then cast back);
    regularizers, constraints, activation, dtype policy and name carry over.

    ``channels_first`` on the TensorFlow backend: a ``channels_first`` Keras ``Conv2D`` is not a
    faithful fold there, so the result is ``Sequential([Permute((2, 3, 1)), <the plain layer in
    channels_last>, Permute((3, 1, 2))])`` (same inputs, outputs and parameter count; :func:`fold`
    splices the three layers into a Sequential model). Reasons, TensorFlow 2.21 / Keras 3.15:
    TensorFlow's CPU ``Conv2D`` kernel refuses NCHW (float64 with ``groups=1`` raises
    "Conv2D op only supports NHWC on the CPU"), and Keras' TensorFlow ``ops.add`` turns the
    ``(1, filters, 1, 1)`` bias of a channels_first ``Conv2D``/``DepthwiseConv2D`` into an NHWC
    ``bias_add`` whenever the input's static width equals ``filters``, adding the bias along the
    width (wrong outputs, e.g. 9 filters on a 9-pixel-wide input). The DOConv2D layer itself
    adds its bias with ``tf.add`` and is correct in both layouts.
    """
    c = layer_config(layer)
    params = get_params(layer)
    dtype = params.W.dtype
    if dtype not in (np.float16, np.float32, np.float64):  # ml_dtypes' bfloat16 etc.: NumPy's einsum refuses them
        params = params.astype(np.float32)
    kernel, bias = (None if a is None else a.astype(dtype) for a in doconv.fold(params, c))
    nhwc = layer.data_format == "channels_first" and keras.backend.backend() == "tensorflow"
    data_format = "channels_last" if nhwc else layer.data_format
    common = dict(kernel_size=c.kernel_size, strides=c.stride, padding=layer.padding, data_format=data_format,
                  dilation_rate=c.dilation, activation=layer.activation, use_bias=c.bias,
                  bias_initializer=layer.bias_initializer, bias_regularizer=layer.bias_regularizer,
                  activity_regularizer=layer.activity_regularizer, bias_constraint=layer.bias_constraint,
                  name=layer.name, dtype=layer.dtype_policy, trainable=layer.trainable)
    if c.groups == c.in_channels and c.groups > 1:
        new = keras.layers.DepthwiseConv2D(depth_multiplier=c.out_per_group,
                                           depthwise_initializer=layer.kernel_initializer,
                                           depthwise_regularizer=layer.kernel_regularizer,
                                           depthwise_constraint=layer.kernel_constraint, **common)
        kernel = layouts.oihw_to_depthwise_hwcm(kernel, c.in_channels)
    else:
        new = keras.layers.Conv2D(c.out_channels, groups=c.groups, kernel_initializer=layer.kernel_initializer,
                                  kernel_regularizer=layer.kernel_regularizer,
                                  kernel_constraint=layer.kernel_constraint, **common)
        kernel = layouts.oihw_to_hwio(kernel)
    new.build((None, None, None, c.in_channels) if nhwc else _build_shape(layer, c.in_channels))
    new.set_weights([kernel] + ([bias] if c.bias else []))
    return _nhwc_wrapper(layer, new) if nhwc else new


def fold(model):
    """A new model with every :class:`DOConv2D` replaced by its folded plain convolution.

    A ``channels_first`` layer on the TensorFlow backend folds to ``Permute``, the plain layer in
    ``channels_last``, ``Permute`` (see :func:`folded_layer` for why): spliced flat into a
    Sequential model, a nested ``Sequential`` named ``<layer>_nhwc`` in a functional one.
    """
    return _transform(model, lambda layer: folded_layer(layer) if isinstance(layer, DOConv2D) else None)
