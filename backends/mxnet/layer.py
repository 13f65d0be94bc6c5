"""``DOConv1D``, ``DOConv2D``, ``DOConv3D``: DO-Conv hybrid blocks with the signatures of ``gluon.nn.Conv1D`` /
``Conv2D`` / ``Conv3D`` (paper Eq. 3 / 4): thin subclasses of one rank-generic :class:`_DOConv`, as Gluon's own
convolutions are of its ``_Conv``.

The construction never uses that a kernel is 2-D: M*N below is the patch length, the product of the kernel
sizes (K in 1-D, M*N in 2-D, T*M*N in 3-D), and W' has the plain convolution's kernel shape
(C_out, C_in/g, *kernel_size).

Parameters (their names in ``save_parameters`` files, ``collect_params`` and ``hybrid_forward``)::

    W     (C_out, C_in/g, D_mul)   the paper's W, canonical layout (trainable)
    D     (C_in, M*N, D_mul)       the trainable delta D' = D - I_fill, zeros at identity init (absent for a
                                   single-tap kernel: 1, 1x1 or 1x1x1)
    bias  (C_out,)                 as the Gluon convolution's (absent with use_bias=False)

``weight`` is W' = D^T o W as the Gluon convolution's weight of the layer's layout, (C_out, C_in/g, *kernel_size)
channels-first and (C_out, *kernel_size, C_in/g) channels-last (:func:`gluon_kernel_shape`), composed at each read
and read-only; no Parameter (:class:`ComposedWeight`). W, D and every kernel the core sees stay channels-first
whatever the layout.

The fixed I_fill (M*N identities tiled along D_mul, :func:`doconv.identity_fill`) is no parameter: the graph
builds it from ``eye`` (or, for D_mul = M*N, never materialises it at all), so it is neither saved nor trained.

Kernel composition (Fig. 3-b) runs as **one batched matrix product**, ``linalg.gemm2`` with ``axis=1``:
with W viewed as ``(g, C_out/g, C_in/g, S)`` and D = I_fill + D' as ``(g, M*N, C_in/g, S)`` the batch axes are
``(g, C_in/g)`` and the result is W' directly in OIHW order (OIW, OIDHW) -- the einsum ``gcms,gjcs->gjcm`` of
:data:`doconv.COMPOSE_EINSUM` without moving W. With ``groups=1`` W enters as stored, (C_out, C_in, S) with
``axis=0``: a reshape of the parameter is a copy that a static-alloc training graph keeps for the backward.
(Under ``grad_req='add'`` a recorded call reads W through a copy, because gemm2's backward does not add: see
:class:`_GemmOperand`.)
(The other formulations with MXNet's ops are slower, see bench/mxnet_models_results.md: ``batch_dot`` over
C_in needs W and W' transposed, and the torch backend's grouped 1-D ``Convolution``, C_in groups of S -> M*N
channels, misses oneDNN's fast paths.) The only intermediates are D-sized (D and its transposed copy)
and W' itself; the official (2-D) Gluon layer instead tiles W into an ``(MN, MN, C_in, C_out/g)`` tensor, MN times W'.
(For D_mul = M*N, ``W + W D'^T`` with W as gemm's accumulator is the same product; its backward is slower.)

**Every call composes W' from W and D as they are** (``composition='kernel'``, M*N > 1): imperatively, or inside
the graph of a hybridized block -- the layer's own CachedOp or a hybridized parent's, which calls
``hybrid_forward`` once with symbols -- where the composition and its backward run in the CachedOp. No kernel is
kept between calls, so no write to W or D can leave a stale one behind: a ``Trainer`` step, a kvstore pull,
``set_data``, ``load_parameters``, ``cast``, ``reset_ctx`` and raw in-place writes to the arrays
(``W.data()[:] = v``, ``nd.*(out=W.data())``, which no Gluon hook can see) alike. Inference that should not pay
the composition per call reuses one W' per layer inside an explicit scope, :func:`doconv.mxnet.cached`;
deployment folds (:func:`doconv.mxnet.fold`).

Feature composition (Fig. 3-a, ``composition='feature'``) is a depthwise conv with D into C_in*D_mul channels
followed by a grouped pointwise conv with W. ``'auto'`` picks the cheaper by :func:`doconv.choose_composition` for
the first NDArray input the layer sees (fixed from then on; ``'kernel'`` until then). A ``cached()`` scope
reuses W' only for layers that convolve with it (kernel composition).

Deferred shape inference (``in_channels=0``) works as for Gluon's convolutions: the layer alone infers C_in
from its first input (:meth:`_DOConv.infer_shape`); inside a hybridized parent, whose shape inference runs
on the symbol graph, the first graph carries a one-pixel shape probe (two tiny FullyConnected ops, with no
backward, whose zeros join D, or the bias of a single-tap layer) because MXNet's matrix products do not infer their
operands' shapes backwards. The probe adds exactly zero and is left out of every graph built once the shapes are
known (hybridize again to drop it).
Feature composition needs C_in for its depthwise conv: a layer called on an NDArray infers it first (the
layer's own ``hybridize()`` included), and a hybridized parent's first graph composes W' instead, as
``'auto'`` does before its first input.
"""

from __future__ import annotations

import numbers

import numpy as np

from doconv import DOConvConfig, choose_composition
from doconv.config import standardize_tuple
from doconv.contract import COMPOSITIONS, D_INITS, LayerSpec, check_choice

from . import cache as _cache
from ._mx import gluon, mx


def gluon_padding(padding, rank: int = 2) -> tuple:
    """Gluon pads symmetrically with zeros: an int or ``rank`` ints (one per spatial axis, as ``(h, w)`` in 2-D);
    anything else is refused."""
    what = "an int" if rank == 1 else f"an int or {rank} ints"
    if isinstance(padding, str):
        raise ValueError(f"padding must be {what} (Gluon pads symmetrically), but got padding={padding!r}; use "
                         f"doconv.mxnet.layer_from_config to translate 'same'/'valid'")
    if isinstance(padding, (tuple, list)) and any(isinstance(p, (tuple, list)) for p in padding):
        raise ValueError(f"padding must be {what} (Gluon pads symmetrically), but got per-side "
                         f"padding={padding!r}")
    return standardize_tuple(padding, "padding", rank, minimum=0)


@mx.init.register
class DOConvDelta(mx.init.Initializer):
    """Initialiser of the delta D' = D - I_fill: zeros (``'identity'``) or D ~ N(0, 2/MN) (``'random'``, Table 7)."""

    def __init__(self, d_init="identity", MN=1, S=1):
        super().__init__(d_init=d_init, MN=MN, S=S)
        self.d_init, self.MN, self.S = d_init, MN, S

    def _init_weight(self, name, arr):
        if self.d_init == "identity":
            arr[:] = 0
            return
        from doconv import identity_fill
        D = np.random.normal(0.0, np.sqrt(2.0 / self.MN), size=arr.shape)
        arr[:] = D - identity_fill(self.MN, self.S)


def channels_last(layout: str) -> bool:
    """Whether ``layout`` puts channels last (``'NHWC'``, ``'NDHWC'``)."""
    return layout.endswith("C")


def gluon_kernel_shape(kernel_shape, layout: str) -> tuple:
    """The shape of a Gluon convolution's weight for ``layout``, from the canonical (C_out, C_in/g, *kernel_size).

    Gluon orders a convolution's weight as its data (it infers the weight's shape from a data shape, N -> C_out,
    C -> C_in/g), so a channels-last layer's weight is (C_out, *kernel_size, C_in/g).
    """
    out, per_group, *kernel = kernel_shape
    return (out, *kernel, per_group) if channels_last(layout) else (out, per_group, *kernel)


#: What to do instead of writing W' (``layer.weight``); ``{plain}`` names the Gluon convolution fold gives.
READ_ONLY = ("set W and D (doconv.mxnet.set_params, load_parameters), or fold first (doconv.mxnet.fold) to get a "
             "gluon.nn.{plain} whose weight can be set")


class ComposedWeight:
    """``layer.weight``: W' = D^T o W in the Gluon convolution's weight layout (:func:`gluon_kernel_shape`:
    (C_out, C_in/g, *kernel_size), or (C_out, *kernel_size, C_in/g) for a channels-last layer), read as a Gluon
    convolution's weight Parameter is read (``data(ctx)``, ``list_data()``, ``list_ctx()``, ``shape``,
    ``dtype``, ``name``) and composed from W and D at each read (recorded under ``autograd.record()``, so
    gradients reach W and D).

    It is no Parameter, so that no ``collect_params``, parameter file or Trainer ever holds it: idioms that
    select parameters by name (``collect_params('.*weight')``) find a DO-Conv layer's W, D and bias instead.
    ``set_data`` refuses: W' is no storage of its own.
    """

    def __init__(self, layer: "_DOConv"):
        self._layer = layer

    @property
    def name(self) -> str:
        return self._layer.prefix + "weight"

    @property
    def shape(self) -> tuple:
        """As a deferred Gluon convolution weight's: C_in/g is 0 until C_in is known."""
        layer = self._layer
        spec = layer.spec
        return gluon_kernel_shape((spec.out_channels, layer.in_channels // spec.groups) + spec.kernel_size,
                                  layer.layout)

    @property
    def dtype(self):
        return self._layer.W.dtype

    def list_ctx(self) -> list:
        return self._layer.W.list_ctx()

    def data(self, ctx=None):
        """W' on ``ctx`` (Parameter.data's rule for None: W's one context, else the current one)."""
        return self._layer._weight_nd(self._layer.W.data(ctx).context)

    def list_data(self) -> list:
        return [self._layer._weight_nd(ctx) for ctx in self.list_ctx()]

    def set_data(self, data):
        layer = self._layer
        raise ValueError(f"{self.name} is the composed kernel W' = D^T o W of a {type(layer).__name__}, not a "
                         f"Parameter: {READ_ONLY.format(plain=layer.plain.__name__)}")

    def __repr__(self) -> str:
        return f"ComposedWeight({self.name}, shape={self.shape}, dtype={self.dtype})"


class _GemmOperand(gluon.Parameter):
    """W of a ``groups=1`` layer, whose composition hands it straight to ``linalg.gemm2`` (see
    :meth:`_DOConv.compose`). MXNet 1.9.1's ``linalg.gemm2`` backward writes its operands' gradients where it
    is asked to add them (``grad_req='add'``, gradient accumulation), and W's summed gradient comes out wrong.
    So under ``grad_req='add'`` a recorded call reads W through a copy (``identity``, whose backward adds):
    gemm2 then writes the copy's gradient and the copy adds it to W's.

    The choice is made at each read, not in a graph: Gluon's CachedOp (the layer's, or a hybridized
    parent's) reads every Parameter's ``data()`` at each call and takes the requests from the arrays, so one
    graph serves either grad_req, set before the first call or changed after. Under ``'write'`` (and
    outside ``autograd.record()``) ``data()`` is the parameter's own array, as Gluon's; under ``'add'`` a
    recorded call costs one W-sized copy and its gradient. (A recorded in-place write to ``data()`` under
    ``'add'`` reaches that copy only: write through ``set_data`` or outside ``autograd.record()``.)"""

    def data(self, ctx=None):
        array = super().data(ctx)
        if self._grad_req == "add" and mx.autograd.is_recording():
            return mx.nd.identity(array)
        return array


def _shapes_agree(a, b) -> bool:
    """Gluon's rule for shared parameters: equal length, equal where both are known (0 = unknown)."""
    return a is None or b is None or len(a) == len(b) and all(i == j or 0 in (i, j) for i, j in zip(a, b))


class _DOConv(gluon.HybridBlock):
    r"""Depthwise over-parameterized convolution over ``rank`` spatial axes: the rank-generic base of
    :class:`DOConv1D`, :class:`DOConv2D` and :class:`DOConv3D`, each a drop-in for its Gluon convolution.

    ``O = (D, W) * P = (D^T o W) * P`` (Eq. 3): ``groups=1`` is DO-Conv, ``groups=in_channels`` DO-DConv
    (Eq. 4), anything between DO-GConv. Every argument of the Gluon convolution keeps its meaning; in addition
    (keyword-only):

    D_mul : int or None
        The depth multiplier of D (default M*N, the product of the kernel sizes). ``D_mul < M*N`` only with
        ``depthwise_separable=True``.
    d_init : ``'identity'`` (D' = 0, so W' = W at init, the paper's default) or ``'random'``.
    composition : ``'kernel'`` (default), ``'feature'`` or ``'auto'`` (see the module docstring).

    ``padding`` is Gluon's symmetric zero padding: an int or one int per spatial axis. Channels-last layouts
    (``'NHWC'``, ``'NDHWC'``) are accepted where MXNet's own Convolution runs them (GPU): on CPU, MXNet
    cannot, and the first call says so with a ValueError. ``gluon.nn.Conv1D`` takes ``'NCW'`` only, and so
    does :class:`DOConv1D`.

    Shapes (channels first): input (N, C_in, *spatial), output (N, C_out, *spatial_out) as the Gluon
    convolution's; ``W`` (C_out, C_in/g, D_mul), ``D`` (C_in, M*N, D_mul) holding D' = D - I_fill,
    ``bias`` (C_out,), and ``weight``, the composed W' (read-only) as the Gluon convolution's weight:
    (C_out, C_in/g, *kernel_size), or (C_out, *kernel_size, C_in/g) channels-last. W and D do not depend on
    the layout.
    """

    #: Spatial axes, the layouts the Gluon convolution takes (the first is its default) and that convolution,
    #: which :func:`doconv.mxnet.fold` gives and :func:`doconv.mxnet.convert` replaces: set by each subclass.
    rank: int
    LAYOUTS: tuple
    plain: type

    def __init__(self, channels, kernel_size, strides, padding, dilation, groups, layout, activation, use_bias,
                 weight_initializer, bias_initializer, in_channels, *, D_mul=None, d_init="identity",
                 composition="kernel", depthwise_separable=False, **kwargs):
        super().__init__(**kwargs)
        check_choice(layout, "layout", self.LAYOUTS)
        check_choice(composition, "composition", COMPOSITIONS)
        check_choice(d_init, "d_init", D_INITS)
        if not isinstance(in_channels, numbers.Integral) or isinstance(in_channels, bool) or in_channels < 0:
            raise ValueError(f"in_channels must be a positive int, or 0 to infer it from the first input, "
                             f"but got in_channels={in_channels!r}")
        pad = gluon_padding(padding, self.rank)
        # Every check that needs no C_in runs now, the rest when C_in is known (given, or at the first input).
        spec = self._spec = LayerSpec(channels, kernel_size, stride=strides, padding=pad, dilation=dilation,
                                      groups=groups, bias=use_bias, D_mul=D_mul,
                                      depthwise_separable=depthwise_separable, rank=self.rank)
        self._padding = pad  # Gluon's one int per axis; the spec holds it per side
        self._layout, self._composition, self._auto = layout, composition, None
        self._activation, self.d_init = activation, d_init
        cin = int(in_channels)
        if cin:
            spec.bind(cin)  # ValueError names in_channels and groups
        mn, s = self._mn, spec.D_mul
        with self.name_scope():
            self.W = self._param("W", shape=(spec.out_channels, cin // spec.groups, s), init=weight_initializer,
                                 kind=_GemmOperand if spec.groups == 1 and mn > 1 else gluon.Parameter)
            self.D = self._param("D", shape=(cin, mn, s), init=DOConvDelta(d_init, mn, s)) if mn > 1 else None
            self.bias = self.params.get("bias", shape=(spec.out_channels,), init=bias_initializer,
                                        allow_deferred_init=True) if use_bias else None
            self.act = gluon.nn.Activation(activation, prefix=activation + "_") if activation is not None else None

    def _param(self, key, shape, init, kind=gluon.Parameter) -> gluon.Parameter:
        """``self.params.get(key)``, except that a layer built with ``params=other.params`` (Gluon's sharing) takes
        the other layer's parameter whatever its initializer (each layer holds its own initializer object, which
        ``ParameterDict.get`` would refuse as a mismatch), if its shape agrees. A new parameter is a ``kind``."""
        name = self.params.prefix + key
        shared = self.params._get_impl(name)
        if shared is None:
            param = kind(name, shape=shape, init=init, allow_deferred_init=True)
            self.params.update({name: param})
            return param
        if not _shapes_agree(shared.shape, shape):
            raise ValueError(f"params: the shared parameter {name!r} (shape {shared.shape}) does not fit this layer "
                             f"(needs shape {shape})")
        return shared

    def load_parameters(self, filename, *args, **kwargs):
        """Gluon's; the layer's own graph is then rebuilt, because it builds I_fill in the parameters' dtype,
        which ``cast_dtype=True`` may change (a plain conv's graph holds no such constant)."""
        super().load_parameters(filename, *args, **kwargs)
        self._clear_cached_op()
        self.invalidate_cache()

    def invalidate_cache(self):
        """Drop the W' of the open :func:`doconv.mxnet.cached` scope (after a deliberate write to W or D inside
        it); a no-op outside one, where every call composes afresh anyway."""
        _cache.drop(self)

    def _compose_nd(self, ctx):
        """W' in the layer's dtype on ``ctx``, imperatively (recorded when autograd records)."""
        return self._kernel(mx.nd, self.W.data(ctx), None if self.D is None else self.D.data(ctx))

    def _weight_nd(self, ctx):
        """W' as the Gluon convolution's weight of the layer's layout on ``ctx`` (``layer.weight``)."""
        return self._channels_last_kernel(mx.nd, self._compose_nd(ctx))

    @property
    def weight(self) -> "ComposedWeight":
        """The composed kernel W' = D^T o W, read as the Gluon convolution's ``weight`` is:
        ``layer.weight.data(ctx)``, in its layout ((C_out, C_in/g, *kernel_size), channels-last
        (C_out, *kernel_size, C_in/g)). Read-only, and no Parameter (see :class:`ComposedWeight`)."""
        return ComposedWeight(self)

    def __setattr__(self, name, value):
        if name == "weight":  # before Block.__setattr__, which would register a Parameter under that name
            raise AttributeError(f"{self.name}.weight is the composed kernel W' = D^T o W, computed from W and D "
                                 f"at each read: {READ_ONLY.format(plain=self.plain.__name__)}")
        super().__setattr__(name, value)

    # ---- configuration -----------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        """C_in, 0 while it is still to be inferred from the first input."""
        return self.W.shape[1] * self._spec.groups

    @property
    def spec(self) -> LayerSpec:
        """The layer's arguments but C_in (:class:`doconv.contract.LayerSpec`), known from construction."""
        return self._spec

    @property
    def config(self) -> DOConvConfig:
        """The layer's :class:`doconv.DOConvConfig` (needs C_in: known or inferred)."""
        if not self.in_channels:
            raise ValueError(f"{self.name}: in_channels is not known yet (in_channels=0 and no input seen)")
        return self._spec.bind(self.in_channels)

    @property
    def padding(self) -> tuple:
        """Gluon's symmetric zero padding, one int per spatial axis (``(h, w)`` in 2-D)."""
        return self._padding

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def composition(self) -> str:
        return self._composition

    @property
    def activation(self):
        return self._activation

    def infer_shape(self, x, *args):
        """Deferred initialisation of this layer alone: C_in from the input's channel axis."""
        cin = int(x.shape[self._layout.find("C")])
        cfg = self._spec.bind(cin)
        self.W.shape = cfg.W_shape
        if self.D is not None:
            self.D.shape = cfg.D_shape

    # ---- forward -------------------------------------------------------------------------
    @property
    def _channels_last(self) -> bool:
        return channels_last(self._layout)

    def forward(self, x, *args):
        if isinstance(x, mx.nd.NDArray):
            if self._channels_last and x.context.device_type == "cpu":
                raise ValueError(f"{self.name}: layout={self._layout!r} is not supported on {x.context}: MXNet's "
                                 f"own Convolution runs channels-last layouts only on GPU; use "
                                 f"layout={self.LAYOUTS[0]!r} on CPU")
            if x.ndim != self.rank + 2:
                raise ValueError(f"{self.name}: input must be {self.rank + 2}-D ({self._layout}), but got input "
                                 f"shape {x.shape}")
            channels = int(x.shape[self._layout.find("C")])
            if self.in_channels and channels != self.in_channels:
                raise ValueError(f"{self.name}: input has {channels} channels but in_channels={self.in_channels} "
                                 f"(input shape {x.shape}, layout {self._layout!r})")
            if not self.in_channels and self._composition != "kernel":  # a graph built next may need C_in
                self.infer_shape(x)                                           # (feature composition)
            if self._composition == "auto" and self._auto is None:
                cfg = self._spec.bind(channels)
                shape = (x.shape[0], x.shape[-1], *x.shape[1:-1]) if self._channels_last else x.shape
                self._auto = choose_composition(cfg, shape)
                self._clear_cached_op()
        return super().forward(x, *args)

    def _conv_kwargs(self, num_filter=None, num_group=None, pointwise=False):
        """``Convolution``'s arguments: the layer's, or (``pointwise``) a stride-1 single-tap conv's."""
        a, ones = self._spec, (1,) * self.rank
        return dict(kernel=ones if pointwise else a.kernel_size, stride=ones if pointwise else a.stride,
                    pad=(0,) * self.rank if pointwise else self._padding,
                    dilate=ones if pointwise else a.dilation, num_filter=num_filter or a.out_channels,
                    num_group=num_group or a.groups, layout=self._layout)

    def _channels_last_kernel(self, F, kernel):
        """A channels-first kernel (O, I, *k) as MXNet's channels-last Convolution takes it, (O, *k, I)."""
        return F.transpose(kernel, (0, *range(2, self.rank + 2), 1)) if self._channels_last else kernel

    def _identity_fill(self, F, dtype):
        """I_fill (1, MN, S) from eye/tile/zeros (see :func:`doconv.identity_fill`)."""
        mn, s = self._mn, self._spec.D_mul
        if s <= mn:
            eye = F.eye(mn, s, dtype=dtype)
        else:
            eye = F.tile(F.eye(mn, dtype=dtype), reps=(1, s // mn))
            if s % mn:
                eye = F.concat(eye, F.zeros((mn, s % mn), dtype=dtype), dim=1)
        return F.reshape(eye, (1, mn, s))

    @property
    def _mn(self) -> int:
        """The patch length M*N: the product of the kernel sizes."""
        return int(np.prod(self._spec.kernel_size))

    def compose(self, F, W, D, dtype=None):
        """W' = D^T o W in OIHW order (OIW, OIDHW; Eq. 3), one ``linalg.gemm2``; ``D`` is the stored delta D'."""
        a = self._spec
        g, cout, s, mn = a.groups, a.out_channels, a.D_mul, self._mn
        if D is None:  # single tap: no D, W' is W
            return F.reshape(W, (0, 0) + a.kernel_size)
        eye = self._identity_fill(F, dtype or self._dtype)                    # (1, MN, S)
        if g == 1:
            # W as stored, its rows on axis 0 and the batch on C_in (axis 1): no reshape of the parameter, whose
            # copy a static-alloc training graph would keep for the backward, one kernel-sized buffer per layer.
            # (Under grad_req='add' a recorded call passes a copy of W instead: see _GemmOperand.)
            # While C_in is unknown, D arrives tied to the shape probe (see _shape_probe), which pins C_in
            # before gemm2's shape check compares W with D.
            full = F.swapaxes(F.reshape(F.broadcast_add(D, eye), (-1, mn, s)), 0, 1)  # D, as (MN, C_in, S)
            kernel = F.linalg.gemm2(W, full, transpose_b=True, axis=0)                 # (C_out, C_in, MN)
            return F.reshape(kernel, (0, 0) + a.kernel_size)
        wg = F.reshape(W, (g, cout // g, -1, s))                              # (g, C_out/g, C_in/g, S)
        full = F.swapaxes(F.reshape(F.broadcast_add(D, eye), (g, -1, mn, s)), 1, 2)  # D, as (g, MN, C_in/g, S)
        kernel = F.linalg.gemm2(wg, full, transpose_b=True, axis=1)         # (g, C_out/g, C_in/g, MN)
        return F.reshape(kernel, (cout, -1) + a.kernel_size)            # (C_out, C_in/g, *kernel_size)

    @property
    def _dtype(self):
        return np.dtype(self.W.dtype).name

    def _kernel(self, F, W, D):
        """W' in the layer's dtype (MXNet's linalg runs float32/64 only: float16 composes in float32)."""
        compute = self._dtype not in ("float32", "float64")
        if compute:
            W, D = F.cast(W, "float32"), (None if D is None else F.cast(D, "float32"))
        kernel = self.compose(F, W, D, "float32" if compute else None)
        return F.cast(kernel, self._dtype) if compute else kernel

    def _mode(self) -> str:
        """How this call composes: ``'kernel'`` while C_in is unknown (a hybridized parent's first graph) and
        for single-tap layers (no D), else the layer's composition (``'auto'``: its choice, ``'kernel'`` before one)."""
        if self.D is None or not self.in_channels:
            return "kernel"
        return self._auto or ("kernel" if self._composition == "auto" else self._composition)

    def hybrid_forward(self, F, x, W, D=None, bias=None):
        if self._mode() == "feature":
            compute = self._dtype not in ("float32", "float64")
            if compute:
                W, D = F.cast(W, "float32"), F.cast(D, "float32")
            out = self._feature(F, x, W, D, bias, compute)
        else:
            if F is mx.sym and not self.in_channels:
                D, bias = self._shape_probe(F, x, W, D, bias)
            kernel = _cache.kernel(self, F, x)  # the open cached() scope's W', where this call may read it
            if kernel is None:
                kernel = self._kernel(F, W, D)
            kernel = self._channels_last_kernel(F, kernel)
            extra = (bias,) if bias is not None else ()
            out = F.Convolution(x, kernel, *extra, no_bias=bias is None, **self._conv_kwargs())
        return self.act(out) if self.act is not None else out

    def _feature(self, F, x, W, D, bias, compute):
        """Feature composition (Fig. 3-a): depthwise conv with D into C_in*S channels, grouped pointwise conv
        with W."""
        cin, a = self.in_channels, self._spec  # known: hybrid_forward composes W' while it is not
        s = a.D_mul
        full = F.broadcast_add(D, self._identity_fill(F, "float32" if compute else self._dtype))
        dk = F.reshape(F.swapaxes(full, 1, 2), (cin * s, 1) + a.kernel_size)
        wk = F.reshape(W, (a.out_channels, -1) + (1,) * self.rank)
        if compute:
            dk, wk = F.cast(dk, self._dtype), F.cast(wk, self._dtype)
        dk, wk = self._channels_last_kernel(F, dk), self._channels_last_kernel(F, wk)
        feat = F.Convolution(x, dk, no_bias=True, **self._conv_kwargs(num_filter=cin * s, num_group=cin))
        extra = (bias,) if bias is not None else ()
        return F.Convolution(feat, wk, *extra, no_bias=bias is None, **self._conv_kwargs(pointwise=True))

    def _shape_probe(self, F, x, W, D, bias):
        """``(D, bias)`` with exact zeros added that tie the unknown C_in of W and D to the input's (symbol
        graphs only): to D where there is one, else to the bias (zeros of shape (C_out,)).

        Gluon infers a hybridized parent's deferred shapes on its symbol graph, and ``linalg.gemm2`` does not
        infer its operands' shapes from its output: without the probe, W and D would stay (C_out, 0, S) and
        (0, MN, S). ``FullyConnected`` infers its weight's shape from its data, and ``reshape`` and ``cast``
        infer backwards, so one pixel of x times W (and times D) pins C_in/g and C_in. Joining D puts the probe
        ahead of the composition in the graph, so gemm2's shape check sees C_in pinned and W needs no reshape
        (a reshaped parameter is a copy that a static-alloc training graph keeps). ``BlockGrad`` on both of
        the probe's inputs leaves it no backward: its gradient is zero, and computing it would hold a
        kernel-sized gradient of W per layer. The probe runs in float32 whatever the layer's dtype.
        """
        a = self._spec
        g, cout, s, mn = a.groups, a.out_channels, a.D_mul, self._mn
        channel, ndim = self._layout.find("C"), self.rank + 2
        end = tuple(None if axis == channel else 1 for axis in range(ndim))
        pixel = F.slice(x, begin=(0,) * ndim, end=end)                                # one pixel, all C_in
        pixel = F.cast(F.reshape(pixel, (g, -1)), "float32")                          # (g, C_in/g)
        first = F.slice_axis(pixel, axis=0, begin=0, end=1)                           # (1, C_in/g)

        def probe(data, weight, rows):
            weight = F.cast(F.reshape(F.BlockGrad(weight), (rows, -1)), "float32")
            return F.FullyConnected(F.BlockGrad(data), weight, num_hidden=rows, no_bias=True)
        probes = [probe(first, W, cout * s)]
        if D is not None:
            probes.append(probe(F.reshape(pixel, (1, -1)), D, mn * s))
        zero = F.cast(F.add_n(*[F.sum(F.zeros_like(p)) for p in probes]), self._dtype)   # (1,), exactly 0
        if D is not None:
            return F.broadcast_add(D, F.reshape(zero, (1, 1, 1))), bias
        zero = F.broadcast_to(F.reshape(zero, (1,)), shape=(cout,))
        return D, (zero if bias is None else F.broadcast_add(bias, zero))

    def __repr__(self):
        a = self._spec
        shown = [f"{self.in_channels or None} -> {a.out_channels}", f"kernel_size={a.kernel_size}",
                 f"stride={a.stride}"]
        zeros, ones = (0,) * self.rank, (1,) * self.rank
        for key, value, default in (("padding", self._padding, zeros), ("dilation", a.dilation, ones),
                                    ("groups", a.groups, 1), ("layout", self._layout, self.LAYOUTS[0])):
            if value != default:
                shown.append(f"{key}={value!r}")
        if a.D_mul != self._mn:
            shown.append(f"D_mul={a.D_mul}")
        if not a.bias:
            shown.append("bias=False")
        if self._composition != "kernel":
            shown.append(f"composition={self._composition!r}")
        if self.act is not None:
            shown.append(repr(self.act))
        return f"{type(self).__name__}({', '.join(shown)})"


class DOConv1D(_DOConv):
    """DO-Conv over one spatial axis (audio, time series), a drop-in for ``gluon.nn.Conv1D``: input
    (N, C_in, W), ``weight`` W' (C_out, C_in/g, K), D (C_in, K, D_mul). See :class:`_DOConv`.

    Example::

        layer = DOConv1D(64, 3, padding=2, dilation=2, in_channels=40)
        layer.initialize()
        y = layer(mx.nd.ones((8, 40, 128)))         # (8, 64, 128); equal to a Conv1D with W' at init
    """

    rank, LAYOUTS, plain = 1, ("NCW",), gluon.nn.Conv1D

    def __init__(self, channels, kernel_size, strides=1, padding=0, dilation=1, groups=1, layout="NCW",
                 activation=None, use_bias=True, weight_initializer=None, bias_initializer="zeros", in_channels=0,
                 *, D_mul=None, d_init="identity", composition="kernel", depthwise_separable=False, **kwargs):
        super().__init__(channels, kernel_size, strides, padding, dilation, groups, layout, activation, use_bias,
                         weight_initializer, bias_initializer, in_channels, D_mul=D_mul, d_init=d_init,
                         composition=composition, depthwise_separable=depthwise_separable, **kwargs)


class DOConv2D(_DOConv):
    """DO-Conv over two spatial axes, a drop-in for ``gluon.nn.Conv2D``: input (N, C_in, H, W) (``'NHWC'``
    on GPU), ``weight`` W' (C_out, C_in/g, M, N) (``'NHWC'``: (C_out, M, N, C_in/g), as Conv2D's),
    D (C_in, M*N, D_mul). See :class:`_DOConv`.

    Example::

        layer = DOConv2D(64, 3, padding=1, in_channels=32)
        layer.initialize()
        y = layer(mx.nd.ones((8, 32, 56, 56)))      # (8, 64, 56, 56); equal to a Conv2D with W' at init
        kernel = layer.weight.data()                # W', (64, 32, 3, 3)
    """

    rank, LAYOUTS, plain = 2, ("NCHW", "NHWC"), gluon.nn.Conv2D

    def __init__(self, channels, kernel_size, strides=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                 layout="NCHW", activation=None, use_bias=True, weight_initializer=None, bias_initializer="zeros",
                 in_channels=0, *, D_mul=None, d_init="identity", composition="kernel", depthwise_separable=False,
                 **kwargs):
        super().__init__(channels, kernel_size, strides, padding, dilation, groups, layout, activation, use_bias,
                         weight_initializer, bias_initializer, in_channels, D_mul=D_mul, d_init=d_init,
                         composition=composition, depthwise_separable=depthwise_separable, **kwargs)


class DOConv3D(_DOConv):
    """DO-Conv over three spatial axes (video, volumes), a drop-in for ``gluon.nn.Conv3D``: input
    (N, C_in, D, H, W) (``'NDHWC'`` on GPU), ``weight`` W' (C_out, C_in/g, T, M, N) (``'NDHWC'``:
    (C_out, T, M, N, C_in/g)), D (C_in, T*M*N, D_mul).
    See :class:`_DOConv`.

    Example::

        layer = DOConv3D(32, 3, padding=1, in_channels=16)
        layer.initialize()
        y = layer(mx.nd.ones((2, 16, 8, 32, 32)))   # (2, 32, 8, 32, 32); equal to a Conv3D with W' at init
    """

    rank, LAYOUTS, plain = 3, ("NCDHW", "NDHWC"), gluon.nn.Conv3D

    def __init__(self, channels, kernel_size, strides=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups=1,
                 layout="NCDHW", activation=None, use_bias=True, weight_initializer=None, bias_initializer="zeros",
                 in_channels=0, *, D_mul=None, d_init="identity", composition="kernel", depthwise_separable=False,
                 **kwargs):
        super().__init__(channels, kernel_size, strides, padding, dilation, groups, layout, activation, use_bias,
                         weight_initializer, bias_initializer, in_channels, D_mul=D_mul, d_init=d_init,
                         composition=composition, depthwise_separable=depthwise_separable, **kwargs)


#: The DO-Conv layer of each rank (``layer_from_config`` picks by ``config.rank``).
LAYERS = {cls.rank: cls for cls in (DOConv1D, DOConv2D, DOConv3D)}
