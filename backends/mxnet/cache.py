"""``cached(model)``: the one way a DO-Conv layer (``DOConv1D`` / ``2D`` / ``3D``) reuses a composed kernel,
explicit and scoped.

Outside this context every call composes W' = D^T o W from W and D as they are. No implicit cache can be
correct in Gluon: NDArrays carry no version counter, so raw in-place writes (``W.data()[:] = v``,
``w = W.data(); w *= 2``, ``nd.random.normal(out=W.data())``) reach the arrays unseen. As
``torch.nn.utils.parametrize.cached()`` does, reuse is therefore a promise the caller makes for a scope::

    with doconv.mxnet.cached(net):        # no writes to W or D until the block ends
        for x in loader:
            y = net(x)                    # each layer composes W' once (per context), on its first call

Inside the scope a call outside ``autograd.record()`` reuses the layer's W', imperatively and hybridized; a
recorded call composes afresh, so training inside the scope stays correct (but gains nothing). Leaving the
outermost scope (normally or by an exception) drops every W'. The W' is no Gluon Parameter: it is in no
``collect_params()``, no ``save_parameters`` file and no Trainer.

Hybridized graphs. A CachedOp takes its inputs from Parameters only, and a graph built outside the scope
composes W' inside itself. So the scope clears the cached graph of every hybridized block of ``model`` that holds
a DO-Conv layer, on entry and on exit: the first call inside the scope (outside ``autograd.record()``; one
inside builds a composing graph) builds a graph whose convolutions read the scope's W', fed by a handle that
lives only in that CachedOp's argument list, and the first call after the scope builds a composing graph again.
Each scope therefore costs one graph build at each end. Pass the outermost hybridized block: a hybridized
ancestor of ``model`` keeps its own graph, which composes (correct, uncached). ``export()`` inside the scope
writes the composing graph with W and D, the files it writes outside. For deployment, fold
(:func:`doconv.mxnet.fold`): a plain convolution needs no promise.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

from ._mx import gluon, mx


class _Layer:
    """A layer's side of the open scopes: how many hold it, and its W' per (context, dtype)."""

    __slots__ = ("layer", "depth", "kernels")

    def __init__(self, layer):
        self.layer, self.depth, self.kernels = layer, 0, {}

    def kernel(self, ctx):
        key = (ctx, self.layer._dtype)
        if key not in self.kernels:
            with mx.autograd.pause():
                self.kernels[key] = self.layer._compose_nd(ctx)
        return self.kernels[key]


_LAYERS = {}  # id(layer) -> _Layer, while some scope holds the layer
_GRAPHS = {}  # id(HybridBlock) -> [block, depth], while some scope holds the block
_BUILD = threading.local()  # .inputs: {id(layer): _KernelInput} while a held block builds its graph


class _KernelInput(gluon.Parameter):
    """How a scope's W' enters a CachedOp: Gluon's ``_build_cache`` takes graph inputs from Parameters only.
    It exists only in one block's ``_cached_op_args``, from the graph's build to the scope's exit; it is never
    an entry of ``params``, so ``collect_params``, files and trainers never see it."""

    def __init__(self, layer):
        super().__init__(layer.prefix + "cached_kernel", shape=layer.config.kernel_shape, dtype=layer.W.dtype,
                         grad_req="null")
        self._layer = layer

    def data(self, ctx=None):
        layer = self._layer
        ctx = layer.W.data(ctx).context  # Parameter.data's rule: its one context, else the current one
        held = _LAYERS.get(id(layer))
        if held is None or mx.autograd.is_recording():  # (no scope: never reached, the exit clears the graph)
            return layer._compose_nd(ctx)  # recorded: gradients reach W and D through it
        return held.kernel(ctx)


def kernel(layer, F, x):
    """The scope's W' for this call of ``layer`` (a Symbol while a held block builds its graph), or None where
    the call must compose: no scope holds the layer, autograd records, or C_in is still unknown."""
    held = _LAYERS.get(id(layer))
    if held is None or mx.autograd.is_recording() or not layer.in_channels:
        return None
    if F is mx.sym:
        inputs = getattr(_BUILD, "inputs", None)
        if inputs is None:  # a graph of a block no scope holds (an ancestor of the scope's net)
            return None
        if id(layer) not in inputs:
            inputs[id(layer)] = _KernelInput(layer)
        return inputs[id(layer)].var()
    return held.kernel(x.context)


def drop(layer) -> None:
    """Drop ``layer``'s W' of the open scope (no-op outside one)."""
    held = _LAYERS.get(id(layer))
    if held is not None:
        held.kernels.clear()


def _build_cache(block, *args):
    """``block._build_cache`` while a scope holds it: a graph built outside ``autograd.record()`` reads the
    scope's W'; ``_cached_graph`` (what ``export`` and shape inference read) stays the composing graph."""
    base = type(block)._build_cache
    if id(block) not in _GRAPHS or mx.autograd.is_recording():
        return base(block, *args)
    if any(p._deferred_init for p in block.collect_params().values()):
        base(block, *args)  # the composing graph infers the deferred shapes first
        block._clear_cached_op()
    composing = block._get_graph(*args)
    block._cached_graph, _BUILD.inputs = (), {}
    try:
        block._get_graph(*args)
        inputs = _BUILD.inputs
    finally:
        _BUILD.inputs = None
    params = [*block.collect_params().values(), *inputs.values()]
    block._cached_op_args = [(False, p) for p in params]  # what base resolves graph inputs against
    with warnings.catch_warnings():  # W and D of the layers reading W' are no inputs of this graph
        warnings.filterwarnings("ignore", r"Parameter .* is not used by any computation", UserWarning)
        base(block, *args)
    block._cached_graph = composing


def _export(block, *args, **kwargs):
    """``block.export`` while a scope holds it: the composing graph with W and D, as export writes outside (it
    saves the parameters of ``_cached_op_args``, which hold the scope's W' handles instead)."""
    scoped = block._cached_op_args
    inputs = set(block._cached_graph[1].list_inputs()) if block._cached_graph else set()
    block._cached_op_args = [(False, p) for p in block.collect_params().values() if p.name in inputs]
    try:
        return type(block).export(block, *args, **kwargs)
    finally:
        block._cached_op_args = scoped


def _held(model):
    """The DO-Conv layers of ``model`` that compose (have D) and its hybrid blocks holding one, each once."""
    from .layer import _DOConv

    layers, graphs, found = [], [], {}  # found: id(block) -> whether its subtree holds a composing layer

    def walk(block):
        if id(block) not in found:  # a block at several paths counts once
            held = isinstance(block, _DOConv) and block.D is not None
            if held:
                layers.append(block)
            for child in block._children.values():
                held = walk(child) or held
            if held and isinstance(block, gluon.HybridBlock):
                graphs.append(block)
            found[id(block)] = held
        return found[id(block)]
    walk(model)
    return layers, graphs


def check_model(model) -> None:
    """The TypeError of every model-level function of doconv.mxnet for a ``model`` that is no Gluon block."""
    if not isinstance(model, gluon.Block):
        raise TypeError(f"model must be a mxnet.gluon.Block (a net, a block or a DO-Conv layer), but got "
                        f"{type(model).__name__}")


def unscoped(block) -> None:
    """Remove what an open scope set on ``block`` itself (a copy of a held block is held by no scope)."""
    for method in ("_build_cache", "export"):
        vars(block).pop(method, None)


@contextlib.contextmanager
def cached(model):
    """Within the block, every DO-Conv layer of ``model`` (a net, any block, or a layer itself) composes W' at
    most once per context for calls outside ``autograd.record()`` and reuses it; the caller promises not to
    write W or D meanwhile. Hybridized graphs are rebuilt on entry and exit. See the module doc."""
    check_model(model)
    layers, graphs = _held(model)
    for layer in layers:
        _LAYERS.setdefault(id(layer), _Layer(layer)).depth += 1
    for block in graphs:
        held = _GRAPHS.setdefault(id(block), [block, 0])
        held[1] += 1
        if held[1] == 1:
            block._clear_cached_op()  # a graph built before the scope composes: rebuild it to read W'
            block._build_cache, block.export = _build_cache.__get__(block), _export.__get__(block)
    try:
        yield model
    finally:
        for block in graphs:
            held = _GRAPHS[id(block)]
            held[1] -= 1
            if not held[1]:
                del _GRAPHS[id(block)]
                unscoped(block)
                # A graph built inside the scope reads W': never reuse it after. (Its composing twin is built for
                # the dtypes of that moment, which a later load_parameters(cast_dtype=True) may change: it goes
                # too, so export() after a scope needs one call first, as after hybridize().)
                block._clear_cached_op()
        for layer in layers:
            held = _LAYERS[id(layer)]
            held.depth -= 1
            if not held.depth:
                del _LAYERS[id(layer)]


__all__ = ["cached"]
