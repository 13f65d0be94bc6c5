"""The layer contract: what every backend's layer, ``convert`` and ``fold`` promise, written once.

:mod:`doconv.compose` and :mod:`doconv.reference` say what a DO-Conv layer computes; this module says
how the three backends present it, so that they cannot drift apart:

- the **choices** a layer takes (:data:`COMPOSITIONS`, :data:`D_INITS`) and the one check of them,
  :func:`check_choice`, whose message names the argument, the allowed values and the value received;
- :class:`LayerSpec`, a layer's arguments before its input channels are known (Keras builds on the first
  input, Gluon infers ``in_channels`` late): every check that needs no C_in runs when the layer is made,
  and :meth:`LayerSpec.bind` gives the :class:`~doconv.DOConvConfig` once C_in is known;
- the **conversion report**, :class:`ConversionReport`: one :class:`ReportRow` per convolution-like layer
  of the model (converted, folded, kept or skipped, and why), printable as a table and as data;
- the pure part of ``convert``'s planning, :func:`plan`: include / exclude patterns, each backend's own
  skip reasons, and layers reached at several paths (one shared layer must be converted at all or none);
- :class:`Backend`, the names a backend module provides; the parity harness checks a backend against it.
"""

from __future__ import annotations

import dataclasses
from typing import (Any, ContextManager, Dict, Hashable, Iterable, List, Mapping, Optional, Protocol, Sequence,
                    runtime_checkable)

from . import selection
from .compose import DOConvParams
from .config import DOConvConfig

#: ``'kernel'``: compose W' = D^T o W, then one convolution (paper Fig. 3-b); ``'feature'``: a depthwise
#: convolution with D, then a grouped 1x1 convolution with W (Fig. 3-a); ``'auto'``: the cheaper of the two
#: by :func:`doconv.choose_composition` for the input at hand (kernel composition wherever no gradient is
#: needed, since the kernel's cost does not grow with the batch).
COMPOSITIONS = ("kernel", "feature", "auto")
#: ``'identity'``: D' = 0, so D = I_fill and W' = W[..., :M*N] (the paper's default, Section 4);
#: ``'random'``: D ~ N(0, 2/MN) (Table 7's random-init protocol).
D_INITS = ("identity", "random")

#: Actions of a report row: ``'kept'`` is a layer left as it is by choice (include / exclude) or by design
#: (a 1x1 kernel has no D to train; transposed convolutions), ``'skipped'`` one that cannot be converted
#: safely (a subclass whose forward may differ, a kernel a hook rewrites).
ACTIONS = ("converted", "folded", "kept", "skipped")


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``, else a ValueError naming ``name``, ``allowed`` and ``value``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, but got {name}={value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A DO-Conv layer's arguments without its input channels: checked now, bound to a config later.

    Every argument of :class:`~doconv.DOConvConfig` but ``in_channels``; construction runs every check
    that does not need C_in (kernel, stride, padding, dilation, groups dividing ``out_channels``, ``D_mul``
    against M*N), so a layer refuses bad arguments when it is made, not at its first input.
    """

    out_channels: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    D_mul: Optional[int] = None
    depthwise_separable: bool = False
    rank: int = 2

    def __post_init__(self):
        groups = self.groups
        # C_in = groups is the one input width every valid ``groups`` admits: the checks that remain for
        # bind() are the ones about the real C_in.
        probe = DOConvConfig(groups if isinstance(groups, int) and groups > 0 else 1, **self._arguments())
        for name in ("kernel_size", "stride", "padding", "dilation", "D_mul", "rank"):
            object.__setattr__(self, name, getattr(probe, name))

    def _arguments(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def bind(self, in_channels: int) -> DOConvConfig:
        """The configuration for ``in_channels`` input channels (ValueError naming them if ``groups`` does
        not divide them)."""
        return DOConvConfig(in_channels, **self._arguments())

    @classmethod
    def of(cls, config: DOConvConfig) -> "LayerSpec":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def check_D_mul(D_mul: Any) -> Optional[int]:
    """``D_mul`` as a model-wide option (``convert``): None (M*N of each layer) or a positive int; whether it
    reaches each layer's M*N is checked per layer."""
    if D_mul is None:
        return None
    try:
        return LayerSpec(1, (1, 2), D_mul=D_mul, depthwise_separable=True).D_mul
    except (TypeError, ValueError) as error:
        raise type(error)(f"D_mul must be a positive int or None (meaning M*N of each layer), "
                          f"but got D_mul={D_mul!r}") from error


def check_convert_D_mul(D_mul: Optional[int], kernel_size: Sequence[int]) -> None:
    """``convert`` keeps each convolution's kernel in ``W[..., :M*N]`` (identity D), which needs D_mul >= M*N:
    a ValueError saying so (a layer made on its own may go below with ``depthwise_separable=True``; a converted
    one cannot keep its kernel there)."""
    mn = 1
    for k in kernel_size:
        mn *= int(k)
    if D_mul is not None and mn > 1 and D_mul < mn:
        raise ValueError(f"D_mul must be >= M*N = {mn} for kernel_size={tuple(kernel_size)}, but got D_mul={D_mul}: "
                         f"convert keeps each convolution's kernel in W[..., :M*N] (D_mul=None takes M*N of each "
                         f"layer)")


# ---- the conversion report -------------------------------------------------------------------------------

@dataclasses.dataclass
class ReportRow:
    """One convolution-like layer of a model and what ``convert`` / ``fold`` did with it."""

    path: str               # the layer's path in the model (module path, Keras layer name, Gluon block path)
    kind: str               # the layer's type before the change, e.g. 'Conv2d', 'DepthwiseConv2D'
    action: str             # one of ACTIONS
    layer: str = ""         # the result ('DO-GConv(6, 9, kernel_size=(3, 3), groups=3)', 'Conv2d', ...)
    params_before: int = 0
    params_after: int = 0
    D_mul: Optional[int] = None
    reason: str = ""        # why kept or skipped; ties and sharing for converted rows
    shared_with: str = ""   # the first path of a layer reached at several paths (counted once)

    def __post_init__(self):
        check_choice(self.action, "action", ACTIONS)


class ConversionReport(list):
    """The rows of a ``convert`` or ``fold`` (a list of :class:`ReportRow`): ``print(report)`` shows a
    Markdown table and a total, :meth:`to_dicts` gives the rows as data."""

    COLUMNS = ("path", "kind", "action", "layer", "params_before", "params_after", "D_mul", "reason")
    HEADINGS = ("path", "kind", "action", "layer", "params before", "params after", "D_mul", "note")

    def rows(self, action: str) -> List[ReportRow]:
        """The rows of one action, each shared layer once."""
        return [r for r in self if r.action == check_choice(action, "action", ACTIONS) and not r.shared_with]

    def to_dicts(self) -> List[Dict[str, Any]]:
        return [dataclasses.asdict(row) for row in self]

    def __str__(self) -> str:
        cell = lambda v: "" if v is None else str(v)  # noqa: E731
        lines = ["| " + " | ".join(self.HEADINGS) + " |", "|" + "---|" * 4 + "---:|" * 3 + "---|"]
        lines += ["| " + " | ".join(cell(getattr(r, c)) for c in self.COLUMNS) + " |" for r in self]
        changed = [r for r in self if r.action in ("converted", "folded") and not r.shared_with]
        counts = ", ".join(f"{len(self.rows(a))} {a}" for a in ACTIONS if self.rows(a))
        total = (f"{counts or 'no convolution'}; parameters of the changed layers "
                 f"{sum(r.params_before for r in changed):,} -> {sum(r.params_after for r in changed):,}")
        shared = [r for r in self if r.shared_with]
        if shared:
            total += f"; {len(shared)} more path(s) reach a layer listed above (shared, counted once)"
        return "\n".join(lines + ["", total])


# ---- convert's planning ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Candidate:
    """A convolution-like layer at one path: ``key`` identifies the layer object (the same key at several
    paths is one shared layer); ``reason`` is the backend's own reason to leave it (None: convertible), and
    ``action`` says whether that leaves it ``'kept'`` or ``'skipped'`` (:data:`ACTIONS`)."""

    path: str
    key: Hashable
    obj: Any = None
    reason: Optional[str] = None
    action: str = "kept"


@dataclasses.dataclass
class Decision:
    path: str
    obj: Any
    first: str              # the first path of this layer (== path unless shared)
    reason: Optional[str]   # None: convert; else why it is left as it is
    action: str             # 'converted', or 'kept' / 'skipped' with ``reason``

    @property
    def shared_with(self) -> str:
        return "" if self.first == self.path else self.first


def plan(candidates: Iterable[Candidate], *, include=None, exclude=None, names: Optional[Iterable[str]] = None,
         noun: str = "layer path") -> List[Decision]:
    """What ``convert`` does with each candidate, before the model changes.

    ``include`` / ``exclude``: None, glob patterns over paths or a callable ``(path, obj) -> bool``
    (:mod:`doconv.selection`); a pattern matching none of ``names`` (default: the candidates' paths) is a
    ValueError, as a typo. A candidate is left with the first reason of: not included, excluded, the
    backend's own. A layer reached at several paths takes its first path's decision, and include / exclude
    selecting some of its paths but not all is a ValueError (converting one path would untie the weights).
    """
    candidates = list(candidates)
    include = selection.glob_patterns(include, "include", "a callable(path, layer)")
    exclude = selection.glob_patterns(exclude, "exclude", "a callable(path, layer)")
    names = [c.path for c in candidates] if names is None else list(names)
    selection.refuse_unmatched({"include": include, "exclude": exclude}, names, noun)
    first: Dict[Hashable, Decision] = {}
    out = []
    for c in candidates:
        if include is not None and not selection.selects(include, c.path, c.obj):
            reason, action = "not included", "kept"
        elif selection.selects(exclude, c.path, c.obj):
            reason, action = "excluded", "kept"
        else:
            reason, action = c.reason, ("converted" if c.reason is None else check_choice(c.action, "action", ACTIONS))
        earlier = first.get(c.key)
        if earlier is None:
            decision = first[c.key] = Decision(c.path, c.obj, c.path, reason, action)
        else:
            if (reason is None) != (earlier.reason is None):  # (a backend's own reason is the same at every path)
                converted, kept = (earlier.path, c.path) if reason is not None else (c.path, earlier.path)
                raise ValueError(f"the layer at {earlier.path!r} is also used at {c.path!r} (one shared layer), but "
                                 f"include/exclude select {converted!r} and not {kept!r}: select all of its paths "
                                 f"or none (converting one path only would untie the weights)")
            decision = Decision(c.path, c.obj, earlier.path, earlier.reason, earlier.action)
        out.append(decision)
    return out


# ---- what a backend module provides ----------------------------------------------------------------------

@runtime_checkable
class Backend(Protocol):
    """The names of ``doconv.torch``, ``doconv.tf`` and ``doconv.mxnet`` that the parity harness and users
    rely on; arrays cross it in the canonical NumPy layout (:mod:`doconv.compose`)."""

    UNSUPPORTED_FEATURES: frozenset

    def layer_from_config(self, config: DOConvConfig, **kwargs) -> Any: ...

    def layer_config(self, layer: Any) -> DOConvConfig: ...

    def get_params(self, layer: Any) -> DOConvParams: ...

    def set_params(self, layer: Any, params: DOConvParams) -> None: ...

    def convert(self, model: Any, **kwargs) -> Any: ...

    def fold(self, model: Any, **kwargs) -> Any: ...

    def export_canonical(self, model: Any, path: Any) -> None: ...

    def import_canonical(self, model: Any, path: Any) -> Any: ...

    def import_official(self, model: Any, arrays: Mapping[str, Any], *, refold: bool = False) -> Any: ...

    def cached(self, model: Any) -> ContextManager: ...


def missing_names(backend: Any) -> List[str]:
    """The :class:`Backend` names ``backend`` lacks (``isinstance(backend, Backend)`` says only yes or no)."""
    names = [n for n in Backend.__dict__.get("__annotations__", {})] + [
        n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]
    return [n for n in dict.fromkeys(names) if not hasattr(backend, n)]
