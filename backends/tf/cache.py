"""``cached(model)``: the one way a DO-Conv layer (``DOConv1D``/``2D``/``3D``) reuses a composed kernel, explicit
and scoped.

Outside this context every call composes W' = D^T o W from the variables as they are at that call.
No implicit cache is correct in Keras: ``layer.stateless_call`` (and ``Model.stateless_call``) computes
with values that never reach the variables, and the backend variable can be written past every Keras
method (``layer.W.value.assign``, raw ops, ``load_state_dict`` on the torch backend). As
``torch.nn.utils.parametrize.cached()`` does, the reuse is a promise the caller makes for a scope::

    with doconv.tf.cached(model):          # no writes to W or D until the block ends
        for x in batches:
            y = model(x, training=False)   # each layer composes W' once, on its first such call

Which calls read the scope's kernel: eager calls that need no gradient, i.e. ``training`` is not true,
no ``tf.GradientTape`` is recording (torch backend: grad mode is off, as in ``model.predict``), and the
call is not traced: not inside a ``tf.function`` (so not ``model.predict``/``evaluate`` on TensorFlow,
whose functions are traced and kept on the model), not while ``torch.compile``/``torch.jit`` trace, and
not in Keras' stateless or symbolic scopes (``stateless_call`` computes with the values it is given,
building a functional model calls layers symbolically); on other backends (JAX) no call reads it.
Every other call composes afresh, so nothing traced while the scope is open can keep the scope's
kernel as a constant, and training inside the scope stays correct (it gains nothing). Inside the
scope the calls that read the kernel use kernel composition even where the layer would choose feature
composition: with W' at hand, one convolution is the cheaper path. A layer without D (a 1x1 kernel,
W' is W) keeps nothing and reads W at every call.

The kernels live here, keyed by the layer, never on the layer: nothing of them is in ``layer.weights``,
a ``.keras``/weights file, a checkpoint, a SavedModel, a pickle or a deep copy. Leaving the outermost
scope that holds a layer drops its kernel (also when an exception leaves it); scopes nest. The
registry is process-wide, as ``torch.nn.utils.parametrize.cached()``'s flag is: calls from every
thread read it while it is open. For deployment, fold (:func:`doconv.tf.fold`): a plain convolution
needs no promise.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import keras
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.symbolic_scope import in_symbolic_scope


class ComposesKernel:
    """Marks a layer whose convolution kernel is composed, so that :func:`cached` holds it.

    In ``call`` such a layer asks :func:`held_for_call` whether this call reads a scope's kernel;
    ``invalidate_cache`` calls :func:`drop`."""


class _Held:
    """A layer held by open ``cached()`` scopes: how many hold it, and the kernel composed in them."""

    __slots__ = ("layer", "depth", "kernel")

    def __init__(self, layer):
        self.layer, self.depth, self.kernel = layer, 0, None

    def kernel_or(self, compose: Callable):
        """The held kernel, composed by ``compose()`` on first use."""
        if self.kernel is None:
            self.kernel = compose()
        return self.kernel


#: id(layer) -> _Held, for the layers of every open scope (the entry keeps the layer alive, so its id is not reused).
_HELD: Dict[int, _Held] = {}


def _traced_or_differentiated() -> bool:
    """Whether the current call may be traced into a graph, or differentiated (backend by backend)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.eager import record  # the public tapes expose no "is recording" query
        return not tf.executing_eagerly() or record.could_possibly_record()
    if backend == "torch":
        import torch
        return (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._are_functorch_transforms_active())
    return True  # JAX and others trace their calls: always compose


def held_for_call(layer, training) -> Optional[_Held]:
    """``layer``'s entry when an open scope holds it and this call may read the kernel, else None.

    A call may read it when it needs no gradient and is not traced: see the module doc."""
    # The layer's identity last: a compiler tracing the call (torch.compile) then guards on none of it,
    # and one compiled graph serves every layer of a shape.
    if not _HELD or training or in_stateless_scope() or in_symbolic_scope() or _traced_or_differentiated():
        return None
    held = _HELD.get(id(layer))
    return held if held is not None and held.layer is layer else None


def drop(layer) -> None:
    """Discard the kernel an open scope holds for ``layer`` (no-op outside a scope)."""
    held = _HELD.get(id(layer))
    if held is not None and held.layer is layer:
        held.kernel = None


@contextlib.contextmanager
def cached(model):
    """Within the block, every DO-Conv layer of ``model`` (a model, a layer containing some, or a
    DO-Conv layer) composes its kernel once and reuses it; the caller promises not to write W or D
    meanwhile. Leaving the outermost scope (also by an exception) drops the kernels.

    Only eager calls that need no gradient read the kept kernel: ``training`` not true, no recording
    ``tf.GradientTape`` (torch backend: grad mode off), not inside a ``tf.function`` (so not
    ``model.predict``/``evaluate`` on TensorFlow), ``torch.compile`` or ``torch.jit`` trace, not in
    ``stateless_call`` or a symbolic call. Every other call composes afresh. The module doc says why."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a keras Model or Layer, but got {type(model).__name__}")
    layers = [layer for layer in model._flatten_layers(include_self=True, recursive=True)
              if isinstance(layer, ComposesKernel)]
    held = []
    for layer in layers:
        entry = _HELD.get(id(layer))
        if entry is None:
            entry = _HELD[id(layer)] = _Held(layer)
        entry.depth += 1
        held.append(entry)
    try:
        yield model
    finally:
        for entry in held:
            entry.depth -= 1
            if not entry.depth:
                entry.kernel = None
                del _HELD[id(entry.layer)]
