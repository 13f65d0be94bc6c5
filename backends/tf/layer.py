"""DO-Conv layers for Keras 3 in one, two and three spatial dimensions: ``DOConv1D``, ``DOConv2D`` and
``DOConv3D``, drop-ins for ``keras.layers.Conv1D`` / ``Conv2D`` / ``Conv3D``.

One rank-generic base, :class:`BaseDOConv` (Keras' own ``BaseConv(rank=...)`` pattern), holds every
argument check, the variables, the composition and the forward; the three public classes only fix the
rank and their drop-in's defaults. Written with ``keras.ops`` only, so it runs on every Keras 3 backend:
TensorFlow (also tested in ``tf.function`` and with XLA), torch (also under ``jit_compile=True``: no graph
break in the layer, so torch.compile compiles it once per shape) and JAX (float64 layers need
``jax_enable_x64``, as any float64 computation in JAX).

Variables, in this fixed order (Keras weight files are positional, ``store["0"]``, ``store["1"]``...)::

    W        (C_in/g, D_mul, filters)   the conventional kernel over the D_mul axis, input-channel major
    D        (MN, D_mul, C_in)          the trainable delta D' = D - I_fill (absent for 1x1 kernels)
    bias     (filters,)                 if use_bias

MN is the patch length, the product of the kernel sizes (K in 1-D, M*N in 2-D, T*M*N in 3-D): the
construction never uses that a kernel is 2-D (:mod:`doconv.config`). W is stored input-channel major
("filters last", as Keras kernels) because the composition is a batch of per-input-channel matrix
products (MN x D_mul) @ (D_mul x filters/g): in this layout the matmul reads W as it is stored, with
no transpose forward or backward (bench/tf_results.md). The official TensorFlow layer's ``kernel`` is
(D_mul, C_in/g, filters) and its ``D`` is (M*N, D_mul, C_in), with another channel pairing: use
:func:`doconv.tf.import_official` to load an official (2-D) checkpoint. The canonical layout of the
core is reached by transposes only (:func:`get_params` / :func:`set_params`, :data:`W_TO_CANONICAL`).
The fixed I_fill (paper Section 4) is a constant, never a variable: it is neither trained nor saved.
"""

from __future__ import annotations

import inspect
import numbers

import numpy as np

import keras
from keras import activations, constraints, initializers, ops, regularizers

import doconv
from doconv.config import RANKS, standardize_tuple
from doconv.contract import COMPOSITIONS, D_INITS, LayerSpec, check_choice

from . import cache
from .folded import plain_layer
from .initializers import ChannelMajorInitializer, DeltaInitializer

#: The composition W' = D^T o W (paper Eq. 3) in this layer's variable layout. It is
#: :data:`doconv.COMPOSE_EINSUM` (``"gcms,gjcs->gjcm"``) with every operand's axes reordered to
#: the Keras layout: D' (MN, S, g, C_in/g) "msgc", W (C_in/g, S, g, C_out/g) "csgj", and the
#: channels-last kernel (MN, C_in/g, g, C_out/g) "mcgj" (``(*kernel_size, C_in/g, filters)`` once reshaped); the
#: test suite pins it to :func:`doconv.compose`. The layer evaluates it as one batched matmul, or, with one
#: input channel per group (depthwise), as a product and a sum over S (:meth:`BaseDOConv._compose`).
KERAS_COMPOSE_EINSUM = "msgc,csgj->mcgj"

#: Axis permutations of W between the layer variable (C_in/g, S, C_out) and canonical (C_out, C_in/g, S).
W_TO_CANONICAL, W_FROM_CANONICAL = (2, 0, 1), (1, 2, 0)

def _positive_int(value, name):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid value for argument `{name}`. Expected a strictly positive int. "
                         f"Received: {name}={value!r}")
    return int(value)


def _one_of(value, allowed, name):
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"The `{name}` argument must be one of {allowed}. Received: {name}={value!r}")
    return value.lower()


def _tf_gpu_visible() -> bool:
    import tensorflow as tf
    return bool(tf.config.list_logical_devices("GPU"))


def _identity_fill(MN, S, dtype):
    """:func:`doconv.identity_fill` (MN x MN identities tiled along S, zeros after the last whole block) built
    from ``keras.ops``, so that every compiler traces it as ops. Converting the NumPy array (and ``ops.pad``)
    breaks torch.compile's graph at every call, which then recompiles once per layer past its limit."""
    if S < MN:
        return ops.eye(MN, S, dtype=dtype)
    blocks = S // MN
    fill = ops.tile(ops.eye(MN, dtype=dtype), (1, blocks))
    if blocks * MN == S:
        return fill
    return ops.concatenate([fill, ops.zeros((MN, S - blocks * MN), dtype=dtype)], axis=1)


def _batched_matmul(a, b):
    """``a @ b`` over the leading axes: ``ops.matmul`` on TensorFlow (its fastest gradient), an einsum
    elsewhere (Keras 3.15's torch ``ops.matmul`` returns float32 for float64 operands)."""
    if keras.backend.backend() == "tensorflow":
        return ops.matmul(a, b)
    return ops.einsum("...ms,...sj->...mj", a, b)


def _constraint_on_W(constraint, rank: int):
    """``constraint``, given for a ``Conv{rank}D`` kernel (*kernel_size, C_in/g, filters), for W (C_in/g, D_mul,
    filters): an ``axis`` over the kernel positions becomes the D_mul axis, C_in/g and filters keep their
    meaning (a per-filter norm stays per filter); a constraint without ``axis`` (elementwise) as it is."""
    axis = getattr(constraint, "axis", None)
    if axis is None:
        return constraint
    to_W = {**{a: 1 for a in range(rank)}, rank: 0, rank + 1: 2}
    axes = [axis] if isinstance(axis, int) else list(axis)
    if any(not -rank - 2 <= a < rank + 2 for a in axes):
        raise ValueError(f"kernel_constraint={type(constraint).__name__}(axis={axis!r}) names an axis outside a "
                         f"{rank + 2}-D convolution kernel (*kernel_size, C_in/g, filters)")
    mapped = sorted({to_W[a % (rank + 2)] for a in axes})
    config = {**constraint.get_config(), "axis": mapped[0] if isinstance(axis, int) and len(mapped) == 1 else mapped}
    return type(constraint).from_config(config)


def _dense(x):
    """``x`` with its values laid out in its own axis order (a D-sized copy at most). Eager torch keeps a transpose
    as a strided view, and its batched matmul runs such an operand as a loop of one small product per matrix,
    tens of times slower than one batched GEMM (a 256-channel layer's composition: 4.8 ms against 0.13 ms);
    TensorFlow and XLA lay out a transpose's result anyway."""
    return ops.reshape(ops.reshape(x, (-1,)), x.shape)


class BaseDOConv(cache.ComposesKernel, keras.layers.Layer):
    """DO-Conv (Cao et al.) in ``rank`` spatial dimensions: a Keras convolution whose kernel is composed from D and W.

    The rank-generic base of :class:`DOConv1D`, :class:`DOConv2D` and :class:`DOConv3D` (as Keras'
    ``BaseConv(rank, ...)`` is of ``Conv1D``/``Conv2D``/``Conv3D``): use those. The layer trains a depthwise
    kernel D (one MN x D_mul matrix per input channel, MN the product of the kernel sizes) and a conventional
    kernel W; the convolution kernel is their composition (paper Eq. 3 and 4), with m the C-order index of a
    kernel position (``m = i*N + j`` in 2-D, ``m = k`` in 1-D, ``m = (t*M + i)*N + j`` in 3-D)::

        W'[*position(m), c, o] = sum_s D[(o // (filters/g)) * (C_in/g) + c, m, s] * W[s, c, o]

    so after training the layer folds (:meth:`fold`) into the plain ``Conv{rank}D`` (or
    ``DepthwiseConv{rank}D``) at no extra inference cost. ``groups=1`` is DO-Conv, ``groups=C_in``
    DO-DConv (what :func:`doconv.tf.convert` makes of a ``DepthwiseConv1D``/``DepthwiseConv2D``), else
    DO-GConv.

    Args:
        rank: the number of spatial axes, 1, 2 or 3 (fixed by each subclass).
        filters ... bias_constraint: as ``keras.layers.Conv{rank}D`` (``padding`` is ``'valid'`` or
            ``'same'``, TensorFlow's rule at any stride, or for ``rank=1`` ``'causal'``: Keras' left pad of
            ``dilation_rate * (kernel_size - 1)``; ``strides > 1`` with ``dilation_rate > 1`` is refused,
            as in Keras). Input channels are inferred in ``build()``.
        kernel_initializer: initialises W, called with shape (D_mul, C_in/g, filters) (then
            stored input-channel major). Its fans are D_mul * C_in/g and D_mul * filters, the plain
            convolution's when D_mul = MN: at identity init W' = W, distributed exactly as a fresh
            ``Conv{rank}D`` kernel. With D_mul = MN it may also return a ``Conv{rank}D`` kernel
            (*kernel_size, C_in/g, filters) (e.g. ``keras.initializers.Constant(conv.kernel)``), so that
            W' is that kernel at identity init.
        kernel_regularizer, kernel_constraint: apply to **W only**, whose axes are (C_in/g, D_mul, filters): a
            constraint with an ``axis`` (``MaxNorm``, ``MinMaxNorm``, ``UnitNorm``) is given the kernel's
            axes (*kernel_size, C_in/g, filters), as for ``Conv{rank}D``, and W takes them as the matching ones
            (kernel positions -> D_mul), so ``MaxNorm(axis=[0, 1, 2])`` still bounds each filter's norm. D has
            its own ``D_regularizer`` / ``D_constraint`` (default None). The trained variable is the delta
            D' = D - I_fill, so an L2 penalty (or an optimizer's weight decay) pulls D towards the identity
            (Section 4).
        D_mul: depth multiplier S of D, default MN; must be >= MN (1 or None for 1x1 kernels)
            unless ``depthwise_separable=True`` (a rank-S kernel per input channel, on purpose).
        d_init: ``'identity'`` (D = I_fill, the paper's default) or ``'random'`` (He-normal D).
        composition: ``'kernel'`` (compose W', then one conv; Fig. 3-b), ``'feature'`` (depthwise
            conv with D, then grouped 1x1 conv with W; Fig. 3-a) or ``'auto'`` (the cheaper by
            :func:`doconv.composition_cost`, decided when the input shape is static; else kernel).
        lora_rank, lora_alpha: ``Conv2D``'s LoRA arguments; only None is accepted: a low-rank delta
            on the composed kernel would bypass W and D.

    Variables and shapes (g = groups, S = D_mul, MN = prod(kernel_size))::

        W       (C_in/g, S, filters)   the conventional kernel, input-channel major (layer.W)
        D       (MN, S, C_in)          the trainable delta D' = D - I_fill; None for 1x1 kernels
        bias    (filters,)             if use_bias
        kernel  (*kernel_size, C_in/g, filters)  W' composed on every read: a tensor, read-only

    Input ``(batch, *spatial, C_in)`` (``channels_first``: ``(batch, C_in, *spatial)``); output
    ``(batch, *spatial_out, filters)`` with ``Conv{rank}D``'s output sizes. :func:`doconv.tf.get_params`
    gives the canonical layout (full D), as in every backend.

    Every call composes W' from the variables as they are at that call, whatever wrote them (an
    optimizer, ``assign``, the backend variable itself, a checkpoint restore, ``stateless_call``'s
    values). To reuse one composition over many inference calls, open :func:`doconv.tf.cached`
    around them, or deploy the folded model (:func:`doconv.tf.fold`).

    Mixed precision (``"mixed_float16"``/``"mixed_bfloat16"``): W and D are float32 variables that
    Keras does not autocast; D = D' + I_fill and W' = D^T o W are computed in float32 and only W' is
    cast to the compute dtype, as the folded convolution casts its float32 kernel: rounding D, W and
    every product to 11 or 8 mantissa bits first would cost about the compute dtype's whole tolerance.
    Feature composition casts the float32 D and W to the compute dtype for its two convolutions.
    """

    def __init__(self, rank, filters, kernel_size, strides=1, padding="valid", data_format=None,
                 dilation_rate=1, groups=1, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, activity_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, lora_rank=None, lora_alpha=None, *, D_mul=None, d_init="identity",
                 composition="kernel", D_regularizer=None, D_constraint=None, depthwise_separable=False,
                 **kwargs):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS} (spatial axes), but got rank={rank!r}")
        self.rank = rank
        if lora_rank is not None or lora_alpha is not None:  # Conv2D's LoRA arguments: accepted, not supported
            raise ValueError(f"{type(self).__name__} does not support LoRA: W' is composed from W and D, which a "
                             f"low-rank delta on the composed kernel would bypass. Received: lora_rank={lora_rank}, "
                             f"lora_alpha={lora_alpha}")
        self.filters = _positive_int(filters, "filters")
        self.groups = _positive_int(groups, "groups")
        if self.filters % self.groups:
            raise ValueError(f"The number of filters must be evenly divisible by the number of groups. "
                             f"Received: groups={groups}, filters={filters}")
        self.kernel_size = standardize_tuple(kernel_size, "kernel_size", rank)
        self.strides = standardize_tuple(strides, "strides", rank)
        self.dilation_rate = standardize_tuple(dilation_rate, "dilation_rate", rank)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(f"`strides > 1` not supported in conjunction with `dilation_rate > 1`. "
                             f"Received: strides={self.strides} and dilation_rate={self.dilation_rate}")
        if rank > 1 and isinstance(padding, str) and padding.lower() == "causal":
            raise ValueError(f"padding='causal' pads a 1-D layer only (Keras' Conv1D), but {type(self).__name__} is "
                             f"{rank}-D: use 'valid' or 'same'. Received: padding={padding!r}")
        self.padding = _one_of(padding, ("valid", "same", "causal") if rank == 1 else ("valid", "same"), "padding")
        self.data_format = _one_of(data_format or keras.config.image_data_format(),
                                   ("channels_last", "channels_first"), "data_format")
        self.d_init = check_choice(d_init, "d_init", D_INITS)
        self.composition = check_choice(composition, "composition", COMPOSITIONS)
        self._spec = LayerSpec(self.filters, self.kernel_size, self.strides, self.padding, self.dilation_rate,
                               self.groups, bool(use_bias), D_mul=D_mul, depthwise_separable=depthwise_separable,
                               rank=rank)
        self.D_mul = self._spec.D_mul
        self.depthwise_separable = depthwise_separable
        self.activation = activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.D_regularizer = regularizers.get(D_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.D_constraint = constraints.get(D_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=rank + 2)

    # ---- build ------------------------------------------------------------------------------
    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def build(self, input_shape):
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(f"The channel dimension of the inputs to {type(self).__name__} should be defined. "
                             f"Received input_shape={tuple(input_shape)} with data_format={self.data_format!r}")
        if channels % self.groups:
            raise ValueError(f"The number of input channels must be evenly divisible by the number of groups. "
                             f"Received groups={self.groups}, but the input has {channels} channels "
                             f"(full input shape is {tuple(input_shape)}).")
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2, axes={self._channel_axis: channels})
        self.doconv_config = self._spec.bind(channels)
        self.compute_output_shape(input_shape)  # raises on inputs smaller than the dilated kernel
        c = self.doconv_config
        self.W = self.add_weight(name="W", shape=(c.in_per_group, c.S, c.out_channels),
                                 initializer=ChannelMajorInitializer(self.kernel_initializer, c.kernel_size),
                                 regularizer=self.kernel_regularizer,
                                 constraint=_constraint_on_W(self.kernel_constraint, self.rank), autocast=False)
        self.D = None
        if c.has_D:
            self.D = self.add_weight(name="D", shape=(c.MN, c.S, c.in_channels),
                                     initializer=DeltaInitializer(self.d_init, c.MN, c.S),
                                     regularizer=self.D_regularizer, constraint=self.D_constraint, autocast=False)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(c.out_channels,), initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer, constraint=self.bias_constraint)
        self._transpose_to_nhwc = (self.data_format == "channels_first" and keras.backend.backend() == "tensorflow"
                                   and not _tf_gpu_visible())

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        first = 1 if self.data_format == "channels_last" else 2
        for axis, k, s, d in zip(range(first, first + self.rank), self.kernel_size, self.strides, self.dilation_rate):
            size = shape[axis]
            if size is None:
                continue
            if self.padding in ("same", "causal"):  # causal: 'valid' after a left pad of d * (k - 1)
                shape[axis] = -(-size // s)
            else:
                if size < d * (k - 1) + 1:
                    raise ValueError(f"The input is smaller than the dilated kernel: input shape "
                                     f"{tuple(input_shape)}, kernel_size={self.kernel_size}, "
                                     f"dilation_rate={self.dilation_rate}, padding='valid'")
                shape[axis] = (size - d * (k - 1) - 1) // s + 1
        shape[self._channel_axis] = self.filters
        return tuple(shape)

    # ---- composition (paper Eq. 3 / Fig. 3) -------------------------------------------------
    def _full_D(self, delta=None):
        """D = D' + I_fill in the layer layout (MN, S, C_in), I_fill constant; ``delta``: D' (default: the layer's)."""
        delta = ops.convert_to_tensor(self.D if delta is None else delta)
        return delta + _identity_fill(self.doconv_config.MN, self.doconv_config.S, delta.dtype)[:, :, None]

    def _weights(self):
        """The tensors W' is composed from: (W,) or (W, D), read now, in the variables' dtype
        (they are not autocast: the composition runs at full precision under mixed precision)."""
        return tuple(ops.convert_to_tensor(v) for v in (self.W, self.D) if v is not None)

    def _compose(self, *weights):
        """W' = D^T o W as a channels-last kernel (*kernel_size, C_in/g, filters), differentiable in W and D'.

        ``weights``: the tensors W (and D) to compose from, by default the variables' values."""
        c = self.doconv_config
        W, *delta = weights or self._weights()
        if not c.has_D:
            return ops.reshape(W, (*c.kernel_size, c.in_per_group, c.out_channels))
        g = c.groups
        if c.in_per_group == 1:
            # One input channel per group (depthwise layers, any multiplier): W'[m, g, j] = sum_s D[m, s, g] W[s, g, j]
            # is an elementwise product and a sum over S in the variables' own layouts, no matmul and no transposes
            # (the batched matmul would be C_in products of (MN x S) @ (S x C_out/g), mostly launch overhead).
            D = ops.reshape(self._full_D(*delta), (c.MN, c.S, g, 1))
            kernel = ops.sum(D * ops.reshape(W, (1, c.S, g, c.out_per_group)), axis=1)
            return ops.reshape(kernel, (*c.kernel_size, 1, c.out_channels))
        # KERAS_COMPOSE_EINSUM as one batched matmul over the input channels (g, c): (MN x S) @ (S x C_out/g).
        # Faster than ops.einsum's lowering, which transposes W forward and dW backward (bench/tf_results.md).
        D = _dense(ops.transpose(ops.reshape(self._full_D(*delta), (c.MN, c.S, g, c.in_per_group)), (2, 3, 0, 1)))
        W = ops.reshape(W, (c.in_per_group, c.S, g, c.out_per_group))
        W = ops.reshape(W, (1, *W.shape[:2], c.out_per_group)) if g == 1 else ops.transpose(W, (2, 0, 1, 3))
        kernel = ops.transpose(_batched_matmul(D, W), (2, 1, 0, 3))  # (g, c, MN, j) -> (MN, c, g, j): "mcgj"
        return ops.reshape(kernel, (*c.kernel_size, c.in_per_group, c.out_channels))

    @property
    def kernel(self):
        """The composed kernel W' ((*kernel_size, C_in/g, filters), as ``Conv{rank}D.kernel``); recomputed on every
        read, a tensor, not a variable."""
        if not self.built:
            raise AttributeError("You must build the layer before accessing `kernel`.")
        return self._compose()

    @kernel.setter
    def kernel(self, value):
        raise AttributeError(f"{type(self).__name__}.kernel is the composed kernel W' = D^T o W, computed from the "
                             f"variables W and D: it cannot be set. Assign layer.W / layer.D (or "
                             f"doconv.tf.set_params), or fold the layer first (layer.fold(), doconv.tf.fold(model)) "
                             f"to get a Conv{self.rank}D whose kernel is a variable. Layer: {self.name!r}")

    # ---- forward ----------------------------------------------------------------------------
    def _conv(self, inputs, kernel, *, depthwise=False, pointwise=False):
        """``ops.conv`` / ``ops.depthwise_conv`` with the layer's geometry (``pointwise``: a plain 1x1).

        ``depthwise``: ``kernel`` is (*kernel_size, C_in, multiplier). Keras has no 3-D depthwise op; there
        it is the grouped convolution with groups = C_in, whose output channel c * multiplier + m is the
        depthwise one's. ``padding='causal'`` is ``Conv1D``'s: a left pad of d * (k - 1), then 'valid'."""
        strides, padding, dilation = (1, "valid", 1) if pointwise else (self.strides, self.padding, self.dilation_rate)
        data_format, rank = self.data_format, self.rank
        if self._transpose_to_nhwc:  # TensorFlow's CPU kernels do not all take NCHW (float64 Conv2D does not)
            inputs, data_format = ops.transpose(inputs, (0, *range(2, rank + 2), 1)), "channels_last"
        if padding == "causal":
            pads = [[0, 0]] * 3
            pads[1 if data_format == "channels_last" else 2] = [dilation[0] * (self.kernel_size[0] - 1), 0]
            inputs, padding = ops.pad(inputs, pads), "valid"
        if depthwise and rank == 3:
            kernel, depthwise = ops.reshape(kernel, (*kernel.shape[:3], 1, -1)), False
        op = ops.depthwise_conv if depthwise else ops.conv
        outputs = op(inputs, kernel, strides, padding, data_format, dilation)
        return ops.transpose(outputs, (0, rank + 1, *range(1, rank + 1))) if self._transpose_to_nhwc else outputs

    def _resolve_composition(self, inputs):
        if self.composition != "auto":
            return self.composition
        shape = tuple(inputs.shape)
        if any(v is None for v in shape):
            return "kernel"
        nchw = shape if self.data_format == "channels_first" else (shape[0], shape[-1], *shape[1:-1])
        return doconv.choose_composition(self.doconv_config, nchw)

    def _to_compute_dtype(self, x):
        return x if keras.backend.standardize_dtype(x.dtype) == self.compute_dtype else ops.cast(x, self.compute_dtype)

    def _kernel_for_call(self):
        """W' composed now in the variables' dtype, cast to the compute dtype."""
        return self._to_compute_dtype(self._compose())

    def call(self, inputs, training=None):
        c = self.doconv_config
        # An open cached() scope's kernel, for the calls that may read it; a 1x1 kernel is W itself: nothing to keep.
        held = cache.held_for_call(self, training) if c.has_D else None
        if held is None and c.has_D and self._resolve_composition(inputs) == "feature":
            # Fig. 3-a: P' = D o P (depthwise conv into C_in*S channels, channel k*S + s), O = W * P'.
            depthwise = ops.transpose(ops.reshape(self._full_D(), (*c.kernel_size, c.S, c.in_channels)),
                                      (*range(self.rank), self.rank + 1, self.rank))
            pointwise = ops.reshape(self.W, (*(1,) * self.rank, c.in_per_group * c.S, c.out_channels))
            outputs = self._conv(self._conv(inputs, self._to_compute_dtype(depthwise), depthwise=True),
                                 self._to_compute_dtype(pointwise), pointwise=True)
        else:
            kernel = self._kernel_for_call() if held is None else held.kernel_or(self._kernel_for_call)
            if c.groups == c.in_channels and c.groups > 1:  # depthwise: a native op on every backend
                outputs = self._conv(inputs, ops.reshape(kernel, (*c.kernel_size, c.in_channels, c.out_per_group)),
                                     depthwise=True)
            else:
                outputs = self._conv(inputs, kernel)
        if self.use_bias:
            ones = (1,) * self.rank
            shape = (1, *ones, self.filters) if self.data_format == "channels_last" else (1, self.filters, *ones)
            outputs = outputs + ops.reshape(self.bias, shape)
        return outputs if self.activation is None else self.activation(outputs)

    def invalidate_cache(self):
        """Drop the kernel held for this layer by the open :func:`doconv.tf.cached` scope (after a write
        inside it); a no-op outside one, where every call composes anyway."""
        cache.drop(self)

    def set_weights(self, weights):
        """Keras' own, and the kernel of an open :func:`doconv.tf.cached` scope dropped (a write through the
        layer itself; ``Model.set_weights`` assigns the variables directly: the scope's promise covers it)."""
        super().set_weights(weights)
        self.invalidate_cache()

    def load_own_variables(self, store):
        """Keras' own (``load_weights``, ``.keras`` files), and the scope's kernel dropped, as :meth:`set_weights`."""
        super().load_own_variables(store)
        self.invalidate_cache()

    def fold(self):
        """The plain built ``Conv{rank}D`` (a depthwise one for DO-DConv) holding the composed kernel W'
        (:func:`doconv.tf.folded.plain_layer`; channels_first on TensorFlow: between two ``Permute``)."""
        return plain_layer(self, layer_config(self), get_params(self))

    # ---- serialisation ----------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
            data_format=self.data_format, dilation_rate=self.dilation_rate, groups=self.groups,
            activation=activations.serialize(self.activation), use_bias=self.use_bias,
            kernel_initializer=initializers.serialize(self.kernel_initializer),
            bias_initializer=initializers.serialize(self.bias_initializer),
            kernel_regularizer=regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=regularizers.serialize(self.bias_regularizer),
            activity_regularizer=regularizers.serialize(self.activity_regularizer),
            kernel_constraint=constraints.serialize(self.kernel_constraint),
            bias_constraint=constraints.serialize(self.bias_constraint),
            D_mul=self.D_mul, d_init=self.d_init, composition=self.composition,
            depthwise_separable=self.depthwise_separable, D_regularizer=regularizers.serialize(self.D_regularizer),
            D_constraint=constraints.serialize(self.D_constraint),
        )
        return config


# ---- the three drop-ins: a rank and the defaults of the Keras layer each replaces -----------

def _drop_in_init(rank, unit):
    """``__init__`` of the rank-``rank`` subclass: :meth:`BaseDOConv.__init__` with ``rank`` fixed, whose
    signature is ``keras.layers.Conv{rank}D``'s (same names, positional order and defaults: ``strides`` and
    ``dilation_rate`` default to ``unit``, as there) followed by DO-Conv's keyword-only arguments. Written
    once for the three classes, so their signatures cannot drift apart."""
    def __init__(self, *args, **kwargs):
        BaseDOConv.__init__(self, rank, *args, **kwargs)

    base = inspect.signature(BaseDOConv.__init__)
    parameters = [p.replace(default=unit) if p.name in ("strides", "dilation_rate") else p
                  for p in base.parameters.values() if p.name != "rank"]
    __init__.__signature__ = base.replace(parameters=parameters)
    __init__.__qualname__ = f"DOConv{rank}D.__init__"
    return __init__


@keras.saving.register_keras_serializable(package="doconv")
class DOConv1D(BaseDOConv):
    """1-D DO-Conv: a drop-in for ``keras.layers.Conv1D`` (also ``padding='causal'``), for audio and time series.

    Input ``(batch, steps, C_in)`` (``channels_first``: ``(batch, C_in, steps)``); D is one K x D_mul matrix
    per input channel (K = ``kernel_size``). Everything else is :class:`BaseDOConv`'s. Example::

        layer = doconv.tf.DOConv1D(64, 3, padding="causal", dilation_rate=4)
        y = layer(x)                                # x: (8, 128, 40) -> y: (8, 128, 64)
        plain = layer.fold()                        # a keras.layers.Conv1D with kernel W'
    """

    __init__ = _drop_in_init(1, 1)


@keras.saving.register_keras_serializable(package="doconv")
class DOConv2D(BaseDOConv):
    """2-D DO-Conv: a drop-in for ``keras.layers.Conv2D``.

    Input ``(batch, H, W, C_in)`` (``channels_first``: ``(batch, C_in, H, W)``); D is one (M*N) x D_mul matrix
    per input channel. Everything else is :class:`BaseDOConv`'s. Example::

        layer = doconv.tf.DOConv2D(64, 3, padding="same", activation="relu")
        y = layer(x)                                # x: (8, 32, 32, 16) -> y: (8, 32, 32, 64)
        plain = layer.fold()                        # a keras.layers.Conv2D with kernel W'
    """

    __init__ = _drop_in_init(2, (1, 1))


@keras.saving.register_keras_serializable(package="doconv")
class DOConv3D(BaseDOConv):
    """3-D DO-Conv: a drop-in for ``keras.layers.Conv3D``, for video and volumes.

    Input ``(batch, T, H, W, C_in)`` (``channels_first``: ``(batch, C_in, T, H, W)``); D is one (T*M*N) x D_mul
    matrix per input channel. Everything else is :class:`BaseDOConv`'s. DO-DConv (``groups = C_in``) runs and
    folds as the grouped ``Conv3D``: Keras has no 3-D depthwise layer. Example::

        layer = doconv.tf.DOConv3D(32, 3, strides=2, padding="same")
        y = layer(x)                                # x: (4, 8, 32, 32, 3) -> y: (4, 4, 16, 16, 32)
        plain = layer.fold()                        # a keras.layers.Conv3D with kernel W'
    """

    __init__ = _drop_in_init(3, (1, 1, 1))


#: The DO-Conv layer class of each rank.
LAYERS = {1: DOConv1D, 2: DOConv2D, 3: DOConv3D}


# ---- the backend contract: canonical <-> layer ---------------------------------------------

def _check_layer(layer):
    if not isinstance(layer, BaseDOConv):
        raise TypeError(f"layer must be a doconv.tf.DOConv1D, DOConv2D or DOConv3D, but got {type(layer).__name__}")
    if not layer.built:
        raise ValueError(f"layer {layer.name!r} is not built yet: call it on an input (or build it) first, "
                         f"its input channels are inferred then")
    return layer


def layer_config(layer) -> doconv.DOConvConfig:
    """The core config of a built DO-Conv layer (:class:`DOConv1D`, :class:`DOConv2D`, :class:`DOConv3D`)."""
    return _check_layer(layer).doconv_config


def _numpy(variable) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(ops.convert_to_tensor(variable)))


def get_params(layer) -> doconv.DOConvParams:
    """The layer's parameters in canonical layout (NumPy, full D, the variables' dtype)."""
    c = layer_config(layer)
    W = _numpy(layer.W).transpose(W_TO_CANONICAL)
    D = None
    if c.has_D:
        delta = _numpy(layer.D).transpose(2, 0, 1)
        D = doconv.layouts.delta_to_D(delta, c)
    bias = None if layer.bias is None else _numpy(layer.bias)
    return doconv.DOConvParams(np.ascontiguousarray(W), None if D is None else np.ascontiguousarray(D), bias)


def set_params(layer, params: doconv.DOConvParams) -> None:
    """Assign canonical parameters (full D) to the layer; ValueError naming layer, array and shapes."""
    c = layer_config(layer)
    if not isinstance(params, doconv.DOConvParams):
        raise TypeError(f"params must be a doconv.DOConvParams, but got {type(params).__name__}")
    params.check(c, where=f"layer {layer.name!r}")
    layer.invalidate_cache()  # a write doconv makes itself: an open cached() scope must not keep the old kernel
    layer.W.assign(np.asarray(params.W).transpose(W_FROM_CANONICAL))
    if c.has_D:
        layer.D.assign(doconv.layouts.D_to_delta(params.D, c).transpose(1, 2, 0))
    if c.bias:
        layer.bias.assign(np.asarray(params.bias))
