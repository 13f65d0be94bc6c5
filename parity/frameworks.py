"""What the harness asks of a framework, and which frameworks take part (einops' EINOPS_TEST_BACKENDS rule).

A :class:`Framework` is a thin adapter over one backend (``doconv.torch``, ``doconv.tf`` on each Keras
backend, ``doconv.mxnet``) that speaks NumPy in the canonical layout (channels-first inputs
``(N, C, *spatial)``, W ``(C_out, C_in/g, S)``, full D ``(C_in, MN, S)``, kernels ``(C_out, C_in/g, *k)``),
in every rank. Each method is one call into the backend's public API
(:mod:`doconv` contract names) plus the framework's own autograd / optimizer / layout transposes;
everything numeric the harness judges is computed by the core. Gradients come back as the
framework stores its trainable variables (:meth:`Framework.gradients`); :mod:`doconv.parity.checks`
maps them to canonical W, D and bias by probing (see :func:`doconv.parity.checks.probe_layout`), so an
adapter never re-states its backend's storage layout.

Selection: ``--frameworks`` / ``DOCONV_PARITY_FRAMEWORKS`` (comma separated). An unknown name is an
error; a framework that is not installed, whose backend does not provide the contract yet, or (Keras)
that needs another Keras backend than this process runs, is reported as missing with the command that
gets it, and skipped (``--strict`` makes that a failure).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from doconv import DOConvConfig, DOConvParams, load, save
from doconv.contract import missing_names

ENV_VAR = "DOCONV_PARITY_FRAMEWORKS"

#: Selectable names -> (``module`` or ``module:factory`` of the adapters (the factory defaults to
#: ``frameworks``), how to get the framework). ``tf``, ``keras/torch`` and ``keras/jax`` are the one Keras
#: layer (``doconv.tf``) on Keras' three backends; Keras runs on one backend per process.
KNOWN = {
    "core": ("doconv.parity.fw_core", "pip install doconv (NumPy only; always available)"),
    "torch": ("doconv.parity.fw_torch", "pip install 'doconv[torch]'  (or: nox -s parity)"),
    "tf": ("doconv.parity.fw_tf:tf_frameworks", "pip install 'doconv[tf-cpu]' and run with KERAS_BACKEND unset "
                                                "or tensorflow  (or: nox -s parity)"),
    "keras/torch": ("doconv.parity.fw_tf:keras_torch_frameworks",
                    "pip install 'doconv[torch]' keras, then in a process of its own: KERAS_BACKEND=torch "
                    "doconv-parity export DIR -f keras/torch; doconv-parity check DIR  (nox -s parity chains it)"),
    "keras/jax": ("doconv.parity.fw_tf:keras_jax_frameworks",
                  "pip install 'doconv[jax]' (no TensorFlow needed), then in a process of its own: "
                  "KERAS_BACKEND=jax doconv-parity export DIR -f keras/jax; doconv-parity check DIR  "
                  "(nox -s parity chains it)"),
    "mxnet": ("doconv.parity.fw_mxnet", "pip install 'doconv[mxnet]' in a separate environment "
                                        "(numpy<1.24, no torch); nox -s parity chains it"),
}
DEFAULT = ("core", "torch", "tf", "keras/torch", "keras/jax", "mxnet")

class Missing(Exception):
    """A framework that cannot take part here: ``reason`` says why, ``hint`` how to get it."""

    def __init__(self, name: str, reason: str, hint: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason, self.hint = name, reason, hint


def import_backend(name: str, framework_module: str, backend_module: str):
    """Import the framework and its doconv backend; :class:`Missing` if either is absent or incomplete."""
    hint = KNOWN[name][1]
    try:
        importlib.import_module(framework_module)
    except ImportError as err:
        raise Missing(name, f"{framework_module} is not installed ({err})", hint) from None
    try:
        backend = importlib.import_module(backend_module)
    except ImportError as err:
        raise Missing(name, f"{backend_module} cannot be imported ({err})", hint) from None
    lacking = missing_names(backend)  # the doconv.contract.Backend protocol
    if lacking:
        raise Missing(name, f"{backend_module} does not provide {', '.join(lacking)} yet", hint)
    return backend


def parse_selection(text: Optional[str], *, empty_is_default: bool = True) -> Tuple[str, ...]:
    """``'torch,tf'`` -> ``('torch', 'tf')``; None (and, if ``empty_is_default``, empty) -> the default; an
    unknown name, or a text that names no framework at all (``','``), is a ValueError."""
    if text is None or (empty_is_default and not text.strip()):
        return DEFAULT
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError(f"no framework named in frameworks={text!r}; known: {sorted(KNOWN)} "
                         f"(set with --frameworks or {ENV_VAR})")
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ValueError(f"unknown framework(s) {unknown} in frameworks={text!r}; known: {sorted(KNOWN)} "
                         f"(set with --frameworks or {ENV_VAR})")
    return names


def selection(cli_value: Optional[str] = None) -> Tuple[str, ...]:
    """The option wins over the environment variable, which wins over the default. An empty option
    (``-f "$FW"`` with FW unset) is an error, not the default: that would run every framework."""
    if cli_value is not None:
        return parse_selection(cli_value, empty_is_default=False)
    return parse_selection(os.environ.get(ENV_VAR))


def load_frameworks(names: Sequence[str]) -> Tuple[List["Framework"], List[Missing]]:
    """Adapters of every selected framework that is usable here, and the missing ones (never raises Missing)."""
    ready, missing = [], []
    for name in names:
        if name == "core":
            continue  # the core's own self-check is not an adapter (see doconv.parity.checks.core_results)
        module, _, factory = KNOWN[name][0].partition(":")
        try:
            ready.extend(getattr(importlib.import_module(module), factory or "frameworks")())
        except Missing as err:
            missing.append(err)
    return ready, missing


def family_of(label: str) -> str:
    """The selection name (:data:`KNOWN`) of a report row's framework label: ``'tf/NHWC'`` -> ``'tf'``,
    ``'keras/torch/NCHW'`` -> ``'keras/torch'``; a label of no known framework is returned as it is."""
    parts = label.split("/")
    for n in range(len(parts), 0, -1):
        if "/".join(parts[:n]) in KNOWN:
            return "/".join(parts[:n])
    return label


@dataclasses.dataclass
class Layer:
    """One framework layer under test: the framework object(s) plus what the harness needs to know."""

    obj: Any                 # the model handed to the backend's model-level functions
    layer: Any               # the DO-Conv layer itself
    config: DOConvConfig
    dtype: str
    state: Dict[str, Any] = dataclasses.field(default_factory=dict)


class Framework:
    """Base adapter. Subclasses fill in the framework calls; arrays in and out are NumPy, canonical layout."""

    #: Row label in the report, e.g. ``'torch'``, ``'tf/NCHW'`` or ``'keras/jax/NHWC'``.
    name = "?"
    #: The selection name (a key of :data:`KNOWN`: ``torch``, ``tf``, ``keras/jax``...) the adapter answers to.
    family = "?"
    dtypes: Tuple[str, ...] = ("float64", "float32")
    unsupported: frozenset = frozenset()
    #: doconv.layouts flavour of the official checkpoints this backend imports.
    official_flavour: Optional[str] = None
    #: Official layer limits (Gluon: D_mul = MN only); a case outside them has no official counterpart.
    official_supports: Callable[[DOConvConfig], bool] = staticmethod(lambda config: True)
    #: Whether the backend's ``cached()`` scope serves this adapter's inference :meth:`forward` (False where
    #: the backend documents that every call composes afresh, as Keras on JAX, whose calls may be traced).
    scope_serves_inference = True

    # ---- the layer ----------------------------------------------------------------------------
    def build(self, config: DOConvConfig, dtype: str, composition: str = "kernel") -> Layer:
        raise NotImplementedError

    def set_params(self, layer: Layer, params: DOConvParams) -> None:
        self.backend.set_params(layer.layer, params)

    def get_params(self, layer: Layer) -> DOConvParams:
        return self.backend.get_params(layer.layer)

    def forward(self, layer: Layer, x: np.ndarray, *, training: bool = True) -> np.ndarray:
        """Output (channels first) for a channels-first input; ``training=False`` is the framework's inference
        path."""
        raise NotImplementedError

    # ---- autograd and updates, in the framework's own storage ----------------------------------
    def trainables(self, layer: Layer) -> Dict[str, np.ndarray]:
        """The trainable variables as stored (W, the delta D' and bias, in the backend's layout)."""
        raise NotImplementedError

    def gradients(self, layer: Layer, x: np.ndarray, u: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """d/dx and d/d(variable) of ``sum(u * forward(x))`` by the framework's autograd."""
        raise NotImplementedError

    def perturb(self, layer: Layer, deltas: Dict[str, np.ndarray]) -> None:
        """Add ``deltas`` to the stored variables in place, as an optimizer step does."""
        raise NotImplementedError

    def raw_write(self, layer: Layer, deltas: Dict[str, np.ndarray]) -> None:
        """Add ``deltas`` to the stored variables through a path no hook or version counter sees (torch
        ``.data``, the Keras backend variable, an MXNet NDArray written in place)."""
        raise NotImplementedError

    def sgd(self, layer: Layer, x: np.ndarray, u: np.ndarray, lr: float, steps: int) -> None:
        """``steps`` steps of the framework's plain SGD optimizer on the loss ``sum(u * forward(x))``."""
        raise NotImplementedError

    def cached(self, layer: Layer):
        """The backend's explicit kernel scope, ``doconv.<fw>.cached(model)``."""
        return self.backend.cached(layer.obj)

    # ---- fold, files, official checkpoints ------------------------------------------------------
    def fold(self, layer: Layer) -> Tuple[np.ndarray, Optional[np.ndarray], Callable[[np.ndarray], np.ndarray]]:
        """Fold with the backend's ``fold``: (channels-first kernel, bias, forward of the plain conv on a
        channels-first input)."""
        raise NotImplementedError

    # The backend's contract functions, called as they are (``self.backend`` is the doconv.<fw> module).
    def export_canonical(self, layer: Layer, path: str) -> None:
        self.backend.export_canonical(layer.obj, path)

    def import_canonical(self, layer: Layer, path: str) -> None:
        self.backend.import_canonical(layer.obj, path)

    def import_official(self, layer: Layer, arrays: Dict[str, np.ndarray], *, refold: bool = False) -> None:
        self.backend.import_official(layer.layer, arrays, refold=refold)

    # ---- shared helpers ---------------------------------------------------------------------------
    def layer_name(self, layer: Layer) -> str:
        """The name the backend's ``export_canonical`` gives this layer (learned once by exporting)."""
        if "name" not in layer.state:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "probe.safetensors")
                self.export_canonical(layer, path)
                names = list(load(path))
            if len(names) != 1:
                raise ValueError(f"{self.name}: export_canonical wrote layers {names} for a one-layer model")
            layer.state["name"] = names[0]
        return layer.state["name"]

    def import_foreign(self, layer: Layer, path: str) -> None:
        """Import a one-layer canonical file written by another framework, whatever its layer name was.

        Layer names are model paths and differ between frameworks; the file's single layer is renamed to
        this layer's name (config and arrays untouched) before the backend's ``import_canonical`` reads it.
        """
        (name, entry), = load(path).items()
        own = self.layer_name(layer)
        if name == own:
            return self.import_canonical(layer, path)
        with tempfile.TemporaryDirectory() as tmp:
            renamed = os.path.join(tmp, "renamed.safetensors")
            save(renamed, {own: entry})
            self.import_canonical(layer, renamed)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
