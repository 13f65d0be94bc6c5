"""``DOConv1d`` / ``DOConv2d`` / ``DOConv3d``: DO-Conv / DO-DConv / DO-GConv layers with the signatures of
``torch.nn.Conv1d`` / ``Conv2d`` / ``Conv3d``.

The construction never uses that a kernel is 2-D: D is, per input channel, a (prod(kernel_size) x D_mul)
matrix and W' = D^T o W. So one rank-generic base, :class:`_DOConvNd` (as torch's ``_ConvNd``), holds
everything, and the three classes only name their rank. "M*N" below is prod(kernel_size) in any rank
(K in 1-D, T*M*N in 3-D).

The layer is an explicit ``nn.Module`` (not a subclass of ``nn.ConvNd``, not a parametrization of
its ``weight``): its trainable state *is* the paper's, under the core's names.

state_dict keys (canonical layout, :mod:`doconv.compose`)
    ``W``     (C_out, C_in/g, D_mul)   the conventional kernel over the D_mul axis
    ``D``     (C_in, M*N, D_mul)       the trainable delta D' = D - I_fill (zeros at identity init;
                                       paper Section 4: "we optimize D' = D - I"); absent for 1x1
    ``bias``  (C_out,)                 absent with ``bias=False``
The fixed ``I_fill`` (M*N, D_mul) is a non-persistent buffer: it moves with ``to()`` but is not saved.
With ``groups=1`` the parameter W keeps that shape but is *stored* c-major (strides of a contiguous
(C_in, D_mul, C_out), the layout the composition's products run fast in; see
:mod:`doconv.torch.functional`). ``state_dict()`` hands out W itself, as ``nn.Conv2d`` does its weight
(sharing storage: EMA / teacher updates written into state_dict values reach the parameter);
``torch.save`` and ``safetensors.torch.save_model`` store it, while raw ``safetensors`` ``save_file``
asks for ``.contiguous()`` tensors. ``load_state_dict`` copies into the stored layout, and a W of any
layout (e.g. through ``torch.func.functional_call``) is correct.

Why not a subclass of ``nn.ConvNd``: a model-zoo init loop ``if isinstance(m, nn.Conv2d):
nn.init.kaiming_normal_(m.weight)`` would silently write into a freshly computed tensor and change
nothing. As a separate class the loop skips the layer visibly (``isinstance`` is False), and
``layer.weight`` is documented as a read-only *computed* kernel. Initialise a model before
:func:`doconv.torch.convert` (which keeps the weights), or call ``reset_parameters()``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from doconv import DOConvConfig, choose_composition, identity_fill
from doconv.config import kaiming_bound
from doconv.contract import COMPOSITIONS, D_INITS, check_choice

from . import checkpoint, functional as DF
from .folded import folded_conv
from .cache import KernelCache, needs_grad

W_STORAGES = ("c-major", "contiguous")
#: 'auto' with a c-major W: feature composition must save this share of kernel composition's MACC.
#: Feature composition's depthwise conv with a channel multiplier of S runs far below the machine's
#: MACC rate (bench/torch_results.md), so a near-tie in MACC is a clear loss in time.
FAST_KERNEL_MARGIN = 0.05


_DOC = r"""Depthwise over-parameterized {rank}-D convolution (Cao et al., Eq. 3), a drop-in for ``nn.Conv{rank}d``.

    ``O = (D, W) * P = (D^T o W) * P``: the layer trains D and W and convolves with the composed
    kernel ``W'[o, c, m] = sum_s D[(o // (C_out/g)) * (C_in/g) + c, m, s] * W[o, c, s]``, m running over
    the M*N = prod(kernel_size) taps of the kernel flattened in C order.
    ``groups=1`` is DO-Conv, ``groups=in_channels`` DO-DConv, anything else DO-GConv.

    Args: every ``nn.Conv{rank}d`` argument, same order and defaults (``padding`` also takes per-side
    pairs {sides} with every padding mode, and ``'same'`` with any stride, TF's rule{causal}), plus

    - ``D_mul``: the depth multiplier S >= M*N (default M*N); ``depthwise_separable=True`` allows
      S < M*N (a rank-S kernel per input channel, trained by kernel composition on purpose);
    - ``d_init``: ``'identity'`` (D' = 0, the paper's default) or ``'random'`` (D ~ N(0, 2/MN));
    - ``W_storage``: ``'c-major'`` (the default; groups=1 layers with M*N > 1, others are contiguous
      either way) or ``'contiguous'``. Code that flattens parameters with ``view(-1)`` --
      ``torch.optim.LBFGS``, ``torch.nn.utils.parameters_to_vector`` -- raises on a c-major W, as on
      any non-contiguous (e.g. channels_last) parameter: use ``'contiguous'`` there (same values,
      a slower training step at most shapes, BENCHMARKS.md), or :meth:`contiguous_W` on built layers;
    - ``composition``: ``'kernel'`` (Fig. 3-b, the default in every backend), ``'feature'`` (Fig. 3-a)
      or ``'auto'``, the cheaper by :func:`doconv.choose_composition` for the input at hand: kernel
      composition in inference, and in training feature composition only where that saves more than
      :data:`FAST_KERNEL_MARGIN` of the multiply-adds (deep layers at very small batch, e.g. a
      512-channel 7x7 layer below about 134 input positions); see BENCHMARKS.md.

    Storage and routes (same values everywhere, see :mod:`doconv.torch.functional`): with ``groups=1``
    W is stored c-major (its shape stays (C_out, C_in, S), and ``state_dict()`` shares it). A
    training step at stride 1 convolves with ``conv_transpose{rank}d`` of the reversed taps (from
    ``MIN_TRANSPOSED_IN_CHANNELS`` input channels on), every other call with ``conv{rank}d`` of the
    composed kernel.

    Arguments are validated by :class:`doconv.DOConvConfig` (the error names the argument).
    Every call composes W' from W and D as they are at that call, whatever wrote them (``.data``,
    fused optimizers, EMA loops); :func:`doconv.torch.cached` reuses one kernel within a scope in
    which the caller promises not to write them, and :func:`doconv.torch.fold` deploys (into an
    ``nn.Conv{rank}d``).

    Shape: input (N, C_in, {spatial}) or (C_in, {spatial}); output (N, C_out, {spatial_out}) with
    sizes as ``nn.Conv{rank}d``'s (or TF's rule for ``'same'`` with stride > 1).

    Example::

        >>> layer = DOConv{rank}d(16, 32, 3, padding=1, groups=2)
        >>> layer(torch.randn({example})).shape
        torch.Size([{example_out}])
    """

#: Per rank: (per-side padding form, spatial axes, output axes, example input, its output shape)
_DOC_FIELDS = {
    1: ("``((left, right),)``", "L", "L_out", "8, 16, 50", "8, 32, 50"),
    2: ("``((top, bottom), (left, right))``", "H, W", "H_out, W_out", "8, 16, 28, 28", "8, 32, 28, 28"),
    3: ("``((front, back), (top, bottom), (left, right))``", "D, H, W", "D_out, H_out, W_out",
        "2, 16, 4, 14, 14", "2, 32, 4, 14, 14"),
}


def _doc(rank: int) -> str:
    sides, spatial, spatial_out, example, example_out = _DOC_FIELDS[rank]
    causal = ", and ``'causal'``: the left pad d*(k-1), Keras' Conv1D" if rank == 1 else ""
    return _DOC.format(rank=rank, sides=sides, causal=causal, spatial=spatial, spatial_out=spatial_out,
                       example=example, example_out=example_out)


class _DOConvNd(nn.Module):
    """The rank-generic DO-Conv layer (the subclasses set ``_rank``); see :class:`DOConv2d`."""

    _rank: int = 0  # spatial axes: 1, 2 or 3, set by each subclass

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 D_mul: Optional[int] = None, d_init: str = "identity", composition: str = "kernel",
                 W_storage: str = "c-major", depthwise_separable: bool = False):
        super().__init__()
        if self._rank not in (1, 2, 3):
            raise TypeError(f"{type(self).__name__} is abstract: use DOConv1d, DOConv2d or DOConv3d")
        bias = False if bias is None else bias  # nn.ConvNd reads bias=None as no bias
        stride, padding, dilation = (DF.ntuple_of_one(v, self._rank) for v in (stride, padding, dilation))
        self.config = DOConvConfig(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                   bias, padding_mode, D_mul, depthwise_separable=depthwise_separable,
                                   rank=self._rank)
        self.d_init = check_choice(d_init, "d_init", D_INITS)
        self.composition = check_choice(composition, "composition", COMPOSITIONS)
        check_choice(W_storage, "W_storage", W_STORAGES)
        self.deployed = False
        c, factory = self.config, {"device": device, "dtype": dtype}
        # groups=1: W stored c-major (same shape, strides of (C_in, S, C_out)), see doconv.torch.functional
        self._c_major = fast = c.has_D and c.groups == 1 and W_storage == "c-major"
        self.W = nn.Parameter(DF.c_major_empty(c.W_shape, **factory) if fast else torch.empty(c.W_shape, **factory))
        if c.has_D:
            self.D = nn.Parameter(torch.empty(c.D_shape, **factory))
            self.register_buffer("I_fill", self._identity_like(self.W), persistent=False)
        else:
            self.register_parameter("D", None)
            self.register_buffer("I_fill", None, persistent=False)
        self.bias = nn.Parameter(torch.empty(c.out_channels, **factory)) if c.bias else None
        self._kernel_cache = KernelCache()  # used only inside doconv.torch.cached(...)
        self._auto = {}     # (input shape, margin) -> composition, for composition="auto"
        self._valid_shapes = set()  # input shapes checked by config.output_shape
        self.reset_parameters()

    # ---- nn.ConvNd-compatible attributes -----------------------------------------------------
    in_channels = property(lambda self: self.config.in_channels)
    out_channels = property(lambda self: self.config.out_channels)
    kernel_size = property(lambda self: self.config.kernel_size)
    stride = property(lambda self: self.config.stride)
    @property
    def padding(self):
        """As ``nn.ConvNd.padding``: ``'same'``/``'valid'`` or one int per axis (``(pad_h, pad_w)`` in 2-D);
        per-side pads, which ``nn.ConvNd`` cannot hold, as pairs (``((top, bottom), (left, right))``), and
        ``'causal'`` (1-D) as given."""
        p = self.config.padding
        return p if isinstance(p, str) or any(lo != hi for lo, hi in p) else tuple(lo for lo, _ in p)

    dilation = property(lambda self: self.config.dilation)
    groups = property(lambda self: self.config.groups)
    padding_mode = property(lambda self: self.config.padding_mode)
    transposed = False  # nn.ConvNd's, read by code that walks convolutions (FLOP counters, converters)
    output_padding = property(lambda self: (0,) * self._rank)
    D_mul = property(lambda self: self.config.D_mul)

    def reset_parameters(self) -> None:
        """The core's init (:func:`doconv.init_params`), drawn from torch's RNG.

        W and bias ~ U(+-1/sqrt(fan_in)) with fan_in = C_in/g * M * N, so at identity init W' = W[..., :MN]
        is distributed as a fresh ``nn.ConvNd`` kernel; D' = 0 ('identity') or D ~ N(0, 2/MN) ('random').
        """
        bound = kaiming_bound(self.config.fan_in())
        self._kernel_cache.clear()  # (a write the layer makes itself: a scope must not keep the old kernel)
        with torch.no_grad():
            if self.deployed:
                raise RuntimeError(f"reset_parameters() on a deployed (folded) {type(self).__name__}: fold a fresh "
                                   f"layer instead")
            self.W.copy_(torch.empty(self.W.shape, dtype=self.W.dtype, device=self.W.device).uniform_(-bound, bound))
            # (drawn contiguous, then copied: the same seed gives the same W whatever the storage)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
            if self.D is not None:
                if self.d_init == "identity":
                    self.D.zero_()
                else:
                    self.D.normal_(0.0, (2.0 / self.config.MN) ** 0.5).sub_(self.I_fill)

    def _identity_like(self, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(identity_fill(self.config.MN, self.config.S), dtype=like.dtype, device=like.device)

    def _apply(self, fn, recurse=True):
        """I_fill is a constant of the config, not state: rebuilt after every ``to()`` / ``half()`` /
        ``to_empty()`` (which leaves buffers uninitialised: meta-device init, ``nn.utils.skip_init``)."""
        out = super()._apply(fn, recurse)
        self._kernel_cache.clear()
        if self.I_fill is not None:
            self.I_fill = self._identity_like(self.I_fill)
        return out

    # ---- the composed kernel ------------------------------------------------------------------
    def full_D(self) -> Optional[torch.Tensor]:
        """D = I_fill + D' (None for 1x1 kernels)."""
        return None if self.D is None else DF.full_D(self.D, self.I_fill)

    def compose(self) -> torch.Tensor:
        """The composed kernel W' (OIHW), differentiable, never cached."""
        if self.deployed:
            return self._parameters["weight"]
        return self._compose(self.W, self.D)

    def _compose(self, W: torch.Tensor, D: Optional[torch.Tensor]) -> torch.Tensor:
        return DF.compose_kernel(W, D, self.config, self.I_fill)

    @property
    def weight(self) -> torch.Tensor:
        """The composed kernel W' = D^T o W, OIHW. Computed on every read: writing into it changes nothing."""
        return self.compose()

    def __setattr__(self, name, value):
        if name == "weight" and not self.__dict__.get("deployed", True):
            raise AttributeError(
                f"{type(self).__name__}.weight is the composed kernel W' = D^T o W, computed from W and D on every "
                "read; "
                "set W and D (set_params, load_state_dict), or fold first (fuse(), switch_to_deploy(), "
                "doconv.torch.fold) to get a plain convolution whose weight can be replaced")
        super().__setattr__(name, value)

    def kernel(self) -> torch.Tensor:
        """W' for the convolution: the :func:`doconv.torch.cached` scope's kernel where a call may read it,
        else composed afresh."""
        return self.compose() if self.deployed else self._kernel(self.W, self.D)

    def _kernel(self, W: torch.Tensor, D: Optional[torch.Tensor]) -> torch.Tensor:
        scope = self._kernel_cache
        if D is not None and scope.usable() and not needs_grad(W, D):  # (1x1: W' is W itself)
            return scope.kernel(W, D, lambda: self._compose(W, D))
        return self._compose(W, D)

    @property
    def W_storage(self) -> str:
        """``'c-major'`` or ``'contiguous'``: how W is stored now (its shape is the same either way)."""
        return "c-major" if self.W is not None and DF.c_major(self.W, self.config.groups) and \
            not self.W.is_contiguous() else "contiguous"

    def contiguous_W(self) -> "_DOConvNd":
        """Store W contiguous in place (same values, same Parameter object, so optimizers keep it)."""
        self._c_major = False
        if self.W is not None and not self.W.is_contiguous():
            self.W.data = self.W.data.contiguous()
            self._kernel_cache.clear()
        return self

    def invalidate_cache(self) -> None:
        """Drop the kernel of the open :func:`doconv.torch.cached` scope (after a deliberate write inside
        it); a no-op outside one, where every call composes afresh anyway."""
        self._kernel_cache.clear()

    def __getstate__(self):
        """Pickles and deep copies carry W and D, never a scope's kernel."""
        return {**super().__getstate__(), "_kernel_cache": KernelCache()}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("_cache", None)  # the implicit cache of older pickles: never read
        self.__dict__.setdefault("_kernel_cache", KernelCache())
        self.__dict__.setdefault("_valid_shapes", set())

    # ---- forward ------------------------------------------------------------------------------
    def _check_input(self, x, dtype: torch.dtype) -> None:
        if isinstance(x, torch.fx.Proxy):
            name = type(self).__name__
            raise TypeError(f"torch.fx.symbolic_trace traces into {name}, whose forward branches on its input "
                            f"and route; fold the model first (doconv.torch.fold), or trace with {name} as a leaf "
                            f"module (a torch.fx.Tracer whose is_leaf_module says so; torchvision's "
                            f"create_feature_extractor: tracer_kwargs={{'leaf_modules': [{name}]}})")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, but got {type(x).__name__}")
        # A trace records tensor ops only (int(size) would warn); torch.compile would turn the per-shape check into
        # guards on every size, so a dynamic=True graph would recompile for each new batch or image size.
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            self._check_traced(x)
        else:
            try:
                known = x.shape in self._valid_shapes  # checked once per input shape: most of a call's Python time
            except TypeError:  # a symbolic size (torch.export, ONNX's dynamo export with dynamic dims): unhashable
                self._check_traced(x)
                known = True
            if not known:
                self.config.output_shape(x.shape, unbatched=True)  # ValueError naming rank / channels / sizes
                if len(self._valid_shapes) >= 64:
                    self._valid_shapes.clear()
                self._valid_shapes.add(x.shape)
        if x.dtype != dtype and not DF.autocast_enabled(x):
            raise TypeError(f"input dtype {x.dtype} differs from the layer's {dtype}; "
                            f"cast one of them (layer.to(dtype) or x.to(dtype)) or use torch.autocast")

    def _check_traced(self, x: torch.Tensor) -> None:
        """The input check of a traced (``torch.jit.trace``), compiled (``torch.compile``) or symbolic
        (``torch.export``) shape: the number of dims, and the channels where they are a plain int; the program's
        convolution checks the other sizes as it runs. Reading a traced or symbolic size as an int would pin it
        to the example's value."""
        rank, shape = self._rank, x.shape
        if len(shape) not in (rank + 1, rank + 2):
            raise ValueError(f"input must be {rank + 1}-D (unbatched) or {rank + 2}-D (batched), but "
                             f"got input shape {tuple(shape)}")
        channels = shape[-rank - 1]
        if type(channels) is int and channels != self.config.in_channels:
            raise ValueError(f"input has {channels} channels but in_channels={self.config.in_channels} "
                             f"(input shape {tuple(shape)})")

    def _route(self, x: torch.Tensor, c_major: bool) -> str:
        """The composition of a call that composes afresh (a scope's kernel is kernel composition); forward
        calls it only for layers with D, and does not read D again (a parametrization of D runs once)."""
        if self.composition != "auto":
            return self.composition
        shape = tuple(x.shape) if x.dim() == self._rank + 2 else (1, *x.shape)
        margin = FAST_KERNEL_MARGIN if c_major else 0.0
        if torch.compiler.is_compiling():
            if not all(type(n) is int for n in shape):  # symbolic sizes: the cost model would pin them to the example
                return "kernel"  # (every backend's default, and inference's)
            return choose_composition(self.config, shape, margin)
        if (shape, margin) not in self._auto:
            self._auto[shape, margin] = choose_composition(self.config, shape, margin)
        return self._auto[shape, margin]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            kernel = self.compose()
            self._check_input(x, kernel.dtype)
            return DF.conv(x, kernel, self.bias, self.config)
        W, D = self.W, self.D  # read once: a parametrization of W or D runs once per call, as on nn.ConvNd's weight
        self._check_input(x, W.dtype)
        # Inference, and every trace (its checks re-run it without grad): one kernel, one convolution.
        if D is None or self.composition != "feature" and (not needs_grad(W, D) or torch.jit.is_tracing()):
            return DF.conv(x, self._kernel(W, D), self.bias, self.config)
        route = self._route(x, DF.c_major(W, self.config.groups))
        return DF.training_forward(x, W, D, self.bias, self.config, route, self.I_fill)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``nn.Module``'s, after :func:`doconv.torch.checkpoint.translate` (official checkpoints refused,
        a plain convolution's ``weight`` loaded as ``convert`` converts it); then the storage of W kept."""
        if not self.deployed and not checkpoint.translate(state_dict, prefix, self.config, error_msgs):
            return
        self._kernel_cache.clear()  # loading writes W and D: an open cached() scope must not keep the old kernel
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.I_fill is not None and self.W is not None and self.I_fill.device != self.W.device:
            self.I_fill = self._identity_like(self.W)  # assign=True into a meta-device layer: I_fill is not saved
        if self.W is None or self.D is None or self.config.groups != 1:
            return
        if getattr(self, "_c_major", False) and not DF.c_major(self.W, 1):  # assign=True with another layout
            self.W.data = DF.to_c_major(self.W.data)
        elif getattr(self, "_c_major", None) is False and not self.W.is_contiguous():  # 'contiguous' storage
            self.W.data = self.W.data.contiguous()

    def __prepare_scriptable__(self):
        raise NotImplementedError(
            f"torch.jit.script cannot compile {type(self).__name__} (its composition is a custom autograd.Function); "
            "fold the model first (doconv.torch.fold(model)), or use torch.jit.trace, torch.export or "
            "torch.compile, which all take the layer as it is")

    # ---- folding --------------------------------------------------------------------------------
    def fuse(self) -> nn.Module:
        """A plain convolution holding W' (timm's ``reparameterize_model`` calls this): same outputs.

        An ``nn.Conv1d/2d/3d`` (the layer's rank) when it can express the padding, else a ``FoldedConv1d/2d/3d``
        (a subclass of it that pads per side first): per-side pads, ``'same'`` with stride > 1, ``'causal'``.
        """
        with torch.no_grad():
            kernel = self.compose().detach().clone()
        return folded_conv(self.config, kernel, None if self.bias is None else self.bias.detach().clone(),
                           requires_grad=self._kernel_requires_grad(),
                           bias_requires_grad=self.bias is not None and self.bias.requires_grad)

    def _kernel_requires_grad(self) -> bool:
        """Whether W' trains once folded: if any of the parameters it is composed of trains."""
        if self.deployed:
            return self._parameters["weight"].requires_grad
        return any(p.requires_grad for p in (self.W, self.D) if p is not None)

    def switch_to_deploy(self) -> None:
        """Fold in place (idempotent): W, D and I_fill are replaced by one ``weight`` = W'.

        The state_dict then holds ``weight`` and ``bias``, as a plain ``nn.ConvNd``'s.
        """
        if self.deployed:
            return
        with torch.no_grad():
            kernel = self.compose().detach().clone()
        requires_grad = self._kernel_requires_grad()
        del self.W, self.D, self.I_fill
        self.W = self.D = self.I_fill = None  # plain attributes, so the names stay defined
        self._kernel_cache.clear()
        self.deployed = True
        # register_parameter would refuse the name: the class's ``weight`` property already answers it.
        bias = self._parameters.pop("bias", None)  # keep nn.ConvNd's key order: weight, bias
        self._parameters["weight"] = nn.Parameter(kernel, requires_grad=requires_grad)
        if bias is not None:
            self._parameters["bias"] = bias

    def extra_repr(self) -> str:
        c = self.config
        s = f"{c.in_channels}, {c.out_channels}, kernel_size={c.kernel_size}, stride={c.stride}"
        if c.padding != ((0, 0),) * c.rank:
            s += f", padding={self.padding!r}"
        if c.dilation != (1,) * c.rank:
            s += f", dilation={c.dilation}"
        if c.groups != 1:
            s += f", groups={c.groups}"
        if not c.bias:
            s += ", bias=False"
        if c.padding_mode != "zeros":
            s += f", padding_mode={c.padding_mode!r}"
        s += f", D_mul={c.D_mul}" + (", depthwise_separable=True" if c.depthwise_separable else "")
        if self.composition != "kernel":
            s += f", composition={self.composition!r}"
        if not self.deployed and self.D is not None and self.config.groups == 1 and self.W_storage != "c-major":
            s += ", W_storage='contiguous'"
        if self.deployed:
            s += ", deployed=True"
        return s


class DOConv1d(_DOConvNd):
    __doc__ = _doc(1)
    _rank = 1


class DOConv2d(_DOConvNd):
    __doc__ = _doc(2)
    _rank = 2


class DOConv3d(_DOConvNd):
    __doc__ = _doc(3)
    _rank = 3


#: The layer class of each rank (``config.rank``).
LAYERS = {1: DOConv1d, 2: DOConv2d, 3: DOConv3d}
