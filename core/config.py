"""The validated hyper-parameters of one DO-Conv layer, and the arithmetic of its shapes.

Paper symbols and the names used here (channels-first world: NCL, NCHW, NCDHW):

==============  =====================  ==========================================
paper           here                   meaning
==============  =====================  ==========================================
C_in            ``in_channels``        input channels
C_out           ``out_channels``       output channels (``filters``/``channels``)
M x N           ``kernel_size``        spatial size of the kernel / the patch
M*N             ``MN``                 patch length, ``m = i*N + j``
D_mul           ``D_mul`` (``S``)      depth multiplier of D, ``S >= MN``
--              ``groups`` (``g``)     1: DO-Conv, C_in: DO-DConv, else DO-GConv
--              ``rank``               number of spatial axes: 1, 2 or 3
==============  =====================  ==========================================

The paper writes the 2-D case, but its construction never uses that a patch has two axes: D is,
per input channel, a (patch length) x D_mul matrix acting on the flattened patch. So for every rank
``M x N`` reads "the kernel's extent" and ``MN`` "the patch length", the product of the kernel sizes:
``K`` for a 1-D kernel of length K, ``M*N`` in 2-D, ``T*M*N`` for a 3-D kernel (T x M x N), flattened
in C order (the last axis fastest: ``m = (t*M + i)*N + j``). Nothing else changes.

Every check raises ``ValueError``/``TypeError`` whose message names the argument, what is
allowed, and the value received (the PyTorch ``_ConvNd`` / Keras ``standardize_tuple`` rule).
The same shape arithmetic (:meth:`DOConvConfig.pads`, :meth:`DOConvConfig.output_shape`) serves
validation, the reference convolution and the cost model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal, Sequence, Tuple, Union

import numpy as np

Pair = Tuple[int, int]
Pads = Tuple[Pair, ...]  # one (before, after) pair per spatial axis: ((top, bottom), (left, right)) in 2-D
PaddingSpec = Union[Literal["same", "valid", "causal"], Pads]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("same", "valid", "causal")
RANKS = (1, 2, 3)
#: How messages name the spatial axes of an input of each rank.
AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_sequence(value: Any) -> Any:
    """A 1-D NumPy array as a list (``nn.Conv2d`` takes ``kernel_size=np.array([3, 3])``); bytes and
    strings stay scalars, so ``b"\\x03\\x03"`` is refused rather than read as ``(3, 3)``."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    if isinstance(value, (str, bytes, bytearray)):
        return None
    return value if isinstance(value, Sequence) else None


def standardize_flag(value: Any, name: str) -> bool:
    """``True``/``False`` from a bool, a NumPy bool or the ints 0 and 1; anything else is a TypeError
    naming ``name`` (a string such as ``'False'`` is truthy, so truthiness would read it as True)."""
    if isinstance(value, (bool, np.bool_)) or (_is_int(value) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, but got {name}={value!r}")


def standardize_tuple(value: Any, name: str, n: int, *, minimum: int = 1) -> Tuple[int, ...]:
    """Return ``n`` ints from an int or a length-``n`` sequence of ints, each ``>= minimum``
    (Keras' ``standardize_tuple``).

    >>> standardize_tuple(3, "kernel_size", 3)
    (3, 3, 3)
    >>> standardize_tuple((3, 1), "kernel_size", 2)
    (3, 1)
    """
    what = "an int" if n == 1 else f"an int or {n} ints"
    sequence = _as_sequence(value)
    if _is_int(value):
        items = (int(value),) * n
    elif sequence is not None:
        if len(sequence) != n:
            raise ValueError(f"{name} must be {what}, but got {name}={value!r} of length {len(sequence)}")
        if not all(_is_int(v) for v in sequence):
            raise TypeError(f"{name} must be {what}, but got {name}={value!r}")
        items = tuple(int(v) for v in sequence)
    else:
        raise TypeError(f"{name} must be {what}, but got {name}={value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, but got {name}={value!r}")
    return items


def standardize_pair(value: Any, name: str, *, minimum: int = 1) -> Pair:
    """:func:`standardize_tuple` with two ints: ``standardize_pair(3, "kernel_size") == (3, 3)``."""
    return standardize_tuple(value, name, 2, minimum=minimum)  # type: ignore[return-value]


def _per_side_example(rank: int) -> str:
    return {1: "((left, right),)", 2: "((top, bottom), (left, right))",
            3: "((front, back), (top, bottom), (left, right))"}[rank]


def standardize_padding(value: Any, rank: int = 2) -> PaddingSpec:
    """Normalise every padding form to ``'same'``, ``'valid'``, ``'causal'`` or one per-side pair per axis.

    Accepted: an int (all sides), ``rank`` ints (symmetric per axis, as ``nn.Conv2d``'s ``(h, w)``),
    ``rank`` per-side pairs (``((top, bottom), (left, right))`` in 2-D, ``((left, right),)`` in 1-D), or
    the strings ``'same'``/``'valid'`` and, in 1-D, ``'causal'`` (case-insensitive). In per-side form an
    axis may be one int, symmetric: ``(1, (2, 3))`` is ``((1, 1), (2, 3))``.
    """
    example = _per_side_example(rank)
    if isinstance(value, str):
        lowered = value.lower()
        allowed = PADDING_STRINGS if rank == 1 else PADDING_STRINGS[:2]
        if lowered not in allowed:
            raise ValueError(f"padding must be one of {allowed}, an int, {rank} int(s) or {example}, but got "
                             f"padding={value!r}" + (" ('causal' pads a 1-D layer only)" if lowered == "causal" else ""))
        return lowered  # type: ignore[return-value]
    sequence = _as_sequence(value)
    if _is_int(value) or (sequence is not None and all(_is_int(v) for v in sequence)):
        if sequence is not None and len(sequence) != rank:
            hint = f"; per-side pads are written {example}" if len(sequence) == 2 * rank or rank == 1 else ""
            raise ValueError(f"padding must be an int, {rank} int(s) or {example} for a {rank}-D layer, but got "
                             f"padding={value!r} of length {len(sequence)}{hint}")
        return tuple((p, p) for p in standardize_tuple(value, "padding", rank, minimum=0))
    if sequence is not None and len(sequence) == rank:
        try:
            return tuple(standardize_pair(v, "padding", minimum=0) for v in sequence)
        except (TypeError, ValueError) as err:
            raise type(err)(f"padding as {example} needs {rank} pair(s) of ints >= 0, "
                                          f"but got padding={value!r}") from None
    raise TypeError(f"padding must be 'same', 'valid', an int, {rank} int(s) or {example} for a {rank}-D layer, "
                    f"but got padding={value!r}")


def check_pad_fits(mode: str, size: int, pads: Pair, axis: str) -> None:
    """torch's limits on padding one input axis of ``size``: reflect pads < size, circular pads <= size
    (a pad may wrap around once). NumPy would reflect or wrap again, so the core refuses as torch does."""
    lo, hi = pads
    if mode == "reflect" and max(lo, hi) >= size:
        raise ValueError(f"padding_mode='reflect' needs each pad < the input {axis} {size}, but got pads ({lo}, {hi})")
    if mode == "circular" and max(lo, hi) > size:
        raise ValueError(f"padding_mode='circular' needs each pad <= the input {axis} {size} (a pad may wrap "
                         f"around once), but got pads ({lo}, {hi})")


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> Pair:
    """TensorFlow's SAME rule for one axis: output ``ceil(size/stride)``, the odd pixel at the end.

    ``total = max((out - 1)*stride + dilation*(kernel - 1) + 1 - size, 0)``, split as
    ``(total // 2, total - total // 2)``. At stride 1 this is PyTorch's ``padding='same'`` too.

    The code computes the same total with ``(out - 1)*stride = size - 1 - (size - 1) % stride`` and ``max(e, 0)``
    as ``(e + abs(e)) // 2``: no branch on ``size``, and (for sizes >= 1) divisions of non-negative numbers only,
    so the integer arithmetic that ``torch.jit.trace`` (ONNX) and ``torch.export`` record for a traced or
    symbolic size is this rule at every size. ``-(-size // stride)`` for the ceiling would record ONNX's
    truncating Div, Python's ``max`` compares (a trace keeps the branch of its example), and the bounds of
    ``(size - 1) % stride`` are what lets ``torch.export`` prove the padded size large enough for the kernel.
    """
    excess = dilation * (kernel - 1) - (size - 1) % stride  # (out - 1)*stride + dilation*(kernel - 1) + 1 - size
    total = (excess + abs(excess)) // 2  # max(excess, 0)
    return (total // 2, total - total // 2)


@dataclasses.dataclass(frozen=True)
class DOConvConfig:
    """Validated configuration of a DO-Conv / DO-DConv / DO-GConv layer.

    Arguments follow ``torch.nn.Conv{1,2,3}d`` plus ``D_mul`` (paper: D_mul, here also ``S``), which
    defaults to ``M*N``, and ``rank``, the number of spatial axes (1, 2 or 3; ``kernel_size``, ``stride``,
    ``dilation`` and ``padding`` take that many entries). ``D_mul < M*N`` is refused (Section 3: the
    composite could then not express every conventional kernel) unless ``depthwise_separable=True`` opts
    in to the depthwise-separable mode of the end of Section 3. A single-tap kernel (1x1, or 1 / 1x1x1)
    has no D (Section 4: "DO-Conv is not applied"), so ``D_mul`` must be 1 or None there.

    Canonical shapes (see :mod:`doconv.compose`)::

        W         (C_out, C_in/g, S)       paper W in R^{C_out x D_mul x C_in}
        D         (C_in, MN, S)            paper D in R^{(MxN) x D_mul x C_in}
        kernel W' (C_out, C_in/g, M, N)    OIHW, m = i*N + j  (OIL / OIDHW in 1-D / 3-D)
        bias      (C_out,)
    """

    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...] = 1  # type: ignore[assignment]  # standardised to `rank` ints
    padding: PaddingSpec = 0  # type: ignore[assignment]
    dilation: Tuple[int, ...] = 1  # type: ignore[assignment]
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    D_mul: int = None  # type: ignore[assignment]  # resolved to M*N in __post_init__
    depthwise_separable: bool = False
    rank: int = 2

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if not _is_int(self.rank) or self.rank not in RANKS:
            raise (TypeError if not _is_int(self.rank) else ValueError)(
                f"rank must be one of {RANKS} (spatial axes), but got rank={self.rank!r}")
        put("rank", int(self.rank))
        for name in ("in_channels", "out_channels", "groups"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be a positive int, but got {name}={value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, but got {name}={value!r}")
            put(name, int(value))
        for name in ("kernel_size", "stride", "dilation"):
            put(name, standardize_tuple(getattr(self, name), name, self.rank))
        put("padding", standardize_padding(self.padding, self.rank))
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % self.groups:
                raise ValueError(f"{name} must be divisible by groups, but got {name}={getattr(self, name)} "
                                 f"and groups={self.groups}")
        put("bias", standardize_flag(self.bias, "bias"))
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {set(PADDING_MODES)}, "
                             f"but got padding_mode={self.padding_mode!r}")
        put("depthwise_separable", standardize_flag(self.depthwise_separable, "depthwise_separable"))
        put("D_mul", self._resolve_D_mul(self.D_mul))

    def _resolve_D_mul(self, value: Any) -> int:
        mn = self.MN
        if value is None:
            return mn
        if not _is_int(value) or value < 1:
            raise (TypeError if not _is_int(value) else ValueError)(
                f"D_mul must be a positive int or None (meaning M*N={mn}), but got D_mul={value!r}")
        value = int(value)
        if mn == 1 and value != 1:
            raise ValueError(f"D_mul must be 1 or None for a single-tap kernel, which has no spatial patch to "
                             f"over-parameterize (paper Section 4), but got D_mul={value} with "
                             f"kernel_size={self.kernel_size}")
        if value < mn and not self.depthwise_separable:
            raise ValueError(
                f"D_mul must be >= M*N = {mn} for kernel_size={self.kernel_size}, but got D_mul={value}: "
                f"with fewer columns, W' = D^T W has rank <= {value} per input channel and cannot express "
                f"every conventional kernel (paper Section 3). Pass depthwise_separable=True to train a "
                f"depthwise-separable layer by kernel composition on purpose.")
        return value

    # ---- derived sizes ------------------------------------------------------------------
    @property
    def MN(self) -> int:
        """Patch length: the product of the kernel sizes (M*N in 2-D, K in 1-D, T*M*N in 3-D)."""
        return math.prod(self.kernel_size)

    @property
    def S(self) -> int:
        """Alias of ``D_mul`` (the paper's depth multiplier), as in the shape formulas."""
        return self.D_mul

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def has_D(self) -> bool:
        """False for 1x1 kernels: no D, and W' is W."""
        return self.MN > 1

    @property
    def kind(self) -> str:
        if self.groups == 1:
            return "DO-Conv"
        if self.groups == self.in_channels:
            return "DO-DConv"
        return "DO-GConv"

    @property
    def W_shape(self) -> Tuple[int, int, int]:
        return (self.out_channels, self.in_per_group, self.D_mul)

    @property
    def D_shape(self) -> Tuple[int, int, int] | None:
        return (self.in_channels, self.MN, self.D_mul) if self.has_D else None

    @property
    def kernel_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_per_group, *self.kernel_size)

    @property
    def bias_shape(self) -> Tuple[int] | None:
        return (self.out_channels,) if self.bias else None

    # ---- geometry -----------------------------------------------------------------------
    def pads(self, *spatial: int) -> Pads:
        """Per-side padding, one ``(before, after)`` pair per axis, for an input of this spatial size."""
        if self.padding == "valid":
            return ((0, 0),) * self.rank
        if self.padding == "causal":  # Keras Conv1D: the output at t sees inputs up to t only
            return ((self.dilation[0] * (self.kernel_size[0] - 1), 0),)
        if self.padding == "same":
            return tuple(same_pads(size, k, s, d) for size, k, s, d in
                         zip(spatial, self.kernel_size, self.stride, self.dilation))
        return self.padding  # type: ignore[return-value]

    def resolved(self) -> "DOConvConfig":
        """The same layer with its padding made explicit wherever that does not depend on the input.

        ``'valid'`` is zero pads, ``'causal'`` is ``(d*(k-1), 0)``, and ``'same'`` at stride 1 is ``d*(k-1)``
        split with the odd pixel at the end, whatever the input size; ``'same'`` with stride > 1 stays
        ``'same'``. Configs whose ``resolved()`` forms are equal describe the same layer (a Gluon layer records
        'same' as its explicit pads, a Keras layer keeps the string); the converse does not hold for settings
        that happen to be inert (``padding_mode`` with zero pads, ``depthwise_separable`` with D_mul >= M*N),
        which stay part of a layer's identity.
        """
        if self.padding in ("valid", "causal") or (self.padding == "same" and max(self.stride) == 1):
            return dataclasses.replace(self, padding=self.pads(*(1,) * self.rank))
        return self

    def output_shape(self, input_shape: Sequence[int], *, unbatched: bool = False) -> Tuple[int, ...]:
        """``(batch, C_out, *spatial_out)`` for a channels-first input shape; ValueError if it cannot be convolved.

        ``unbatched=True`` also takes a ``(C, *spatial)`` shape, as ``nn.Conv{1,2,3}d`` do, and then gives
        ``(C_out, *spatial_out)``; every message quotes the shape as given.
        """
        rank, axes = self.rank, "".join(a[0].upper() for a in AXIS_NAMES[self.rank])
        if unbatched and len(input_shape) == rank + 1:
            return self._output_shape((1, *input_shape), tuple(input_shape))[1:]
        if len(input_shape) != rank + 2:
            batched = f"{rank + 2}-D (N, C, {', '.join(axes)})"
            wanted = f"{rank + 1}-D (C, {', '.join(axes)}) or {batched}" if unbatched else batched
            raise ValueError(f"input must be {wanted}, but got input shape {tuple(input_shape)}")
        return self._output_shape(input_shape, tuple(input_shape))

    def _output_shape(self, input_shape: Sequence[int], shown: tuple) -> Tuple[int, ...]:
        if any(isinstance(v, (bool, numbers.Real)) and not _is_int(v) for v in input_shape):  # 5.9, True
            raise TypeError(f"input shape must hold ints, but got input shape {shown}")
        batch, channels, *spatial = (int(v) for v in input_shape)
        if min(batch, channels, *spatial) < 0:
            raise ValueError(f"input shape must hold sizes >= 0, but got input shape {shown}")
        if channels != self.in_channels:
            raise ValueError(f"input has {channels} channels but in_channels={self.in_channels} "
                             f"(input shape {shown})")
        out = []
        for size, (lo, hi), k, s, d, axis in zip(spatial, self.pads(*spatial), self.kernel_size,
                                                 self.stride, self.dilation, AXIS_NAMES[self.rank]):
            span = d * (k - 1) + 1
            if size + lo + hi < span:
                raise ValueError(f"input {axis} {size} padded by ({lo}, {hi}) is smaller than the dilated "
                                 f"kernel extent {span} (kernel_size={self.kernel_size}, "
                                 f"dilation={self.dilation}); input shape {shown}")
            check_pad_fits(self.padding_mode, size, (lo, hi), axis)
            out.append((size + lo + hi - span) // s + 1)
        return (batch, self.out_channels, *out)

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict; ``DOConvConfig.from_dict(c.to_dict()) == c``."""
        out = dataclasses.asdict(self)
        for key in ("kernel_size", "stride", "dilation"):
            out[key] = list(out[key])
        if not isinstance(self.padding, str):
            out["padding"] = [list(p) for p in self.padding]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DOConvConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a layer config must be a dict, but got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
        missing = sorted({"in_channels", "out_channels", "kernel_size"} - set(data))
        if missing:
            raise ValueError(f"config is missing required field(s) {missing}")
        return cls(**data)

    def fan_in(self) -> int:
        """Fan-in of the composed kernel W' (C_in/g * MN), as for the conventional layer."""
        return self.in_per_group * self.MN

    def __repr__(self) -> str:  # compact, non-default fields only (nn.Conv2d.extra_repr style)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        defaults.update(D_mul=self.MN, padding=((0, 0),) * self.rank, stride=(1,) * self.rank,
                        dilation=(1,) * self.rank)
        shown = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"]
        for f in dataclasses.fields(self)[3:]:
            value = getattr(self, f.name)
            if value != defaults[f.name]:
                shown.append(f"{f.name}={value!r}")
        return f"DOConvConfig({', '.join(shown)})"


def kaiming_bound(fan_in: int) -> float:
    """PyTorch's default conv init bound: ``kaiming_uniform_(a=sqrt(5))`` is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    return 1.0 / math.sqrt(fan_in)
