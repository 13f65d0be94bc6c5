"""Gradient accumulation (``grad_req='add'``): W, D and bias gradients summed over batches, against the core's
VJPs (randomised D), however the layer runs and whenever grad_req was set.

MXNet 1.9.1's ``linalg.gemm2`` backward ignores the 'add' request of its operands, and a ``groups=1`` layer hands
W to it as stored; ``groups=2`` reshapes W first and is the control."""

import numpy as np
import pytest
import doconv
from doconv.mxnet import DOConv1D, DOConv2D, DOConv3D, convert, get_params
from doconv.mxnet._mx import gluon, mx
from doconv.selfcheck import layer_vjp

LAYERS = {1: DOConv1D, 2: DOConv2D, 3: DOConv3D}
SPATIAL = {1: (7,), 2: (6, 5), 3: (4, 5, 3)}
#: How the layer runs: alone, hybridized alone, or inside a hybridized parent (one static-alloc CachedOp,
#: as GluonCV trains its nets).
MODES = ["imperative", "hybridized", "parent"]


def _layer(rank, groups, seed):
    layer = LAYERS[rank](4, 3, padding=1, groups=groups, in_channels=4)
    layer.initialize(mx.init.Normal(0.5))
    rng = np.random.default_rng(seed)
    for param in (layer.D, layer.bias):  # D' and bias no identity / zeros
        param.set_data(mx.nd.array(rng.normal(0, 0.3, size=param.shape)))
    return layer


def _runner(layer, mode):
    if mode == "imperative":
        return layer
    if mode == "hybridized":
        layer.hybridize()
        return layer
    net = gluon.nn.HybridSequential()
    net.add(layer)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def _batches(rank, layer, n, seed):
    """``n`` (x, cotangent) pairs for ``layer``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=(2, 4, *SPATIAL[rank])).astype(np.float32)
        y = doconv.forward(x, get_params(layer), layer.config)
        out.append((x, rng.normal(size=y.shape).astype(np.float32)))
    return out


def _step(runner, x, u):
    with mx.autograd.record():
        y = runner(mx.nd.array(x))
    y.backward(mx.nd.array(u))


def _expected(layer, batches):
    """The core's W, D and bias gradients, summed over ``batches``."""
    params, config = get_params(layer), layer.config
    grads = [layer_vjp(u, x, params, config) for x, u in batches]
    return {k: sum(g[k] for g in grads) for k in ("W", "D", "bias")}


def _check(layer, batches, what):
    want = _expected(layer, batches)
    for key, param in (("W", layer.W), ("D", layer.D), ("bias", layer.bias)):
        doconv.assert_close(param.grad().asnumpy(), want[key], np.float32, f"{what}: {key}'s gradient")


def _run(runner, layer, batches):
    for x, u in batches:
        _step(runner, x, u)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_add_set_before_the_first_call_sums_the_batches(rank, mode, groups):
    layer = _layer(rank, groups, seed=rank)
    layer.collect_params().setattr("grad_req", "add")
    runner = _runner(layer, mode)
    batches = _batches(rank, layer, 2, seed=10 + rank)
    _run(runner, layer, batches)
    _check(layer, batches, f"add from the start ({mode})")


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_grad_req_changed_after_the_graph_was_built(rank, mode, groups):
    # Gluon's CachedOp keeps its graph across grad_req changes (the backward takes the requests from the
    # arrays): write -> add -> write -> add on one graph, each phase against the core.
    layer = _layer(rank, groups, seed=rank)
    runner = _runner(layer, mode)
    batches = _batches(rank, layer, 6, seed=20 + rank)
    for phase, (req, chunk) in enumerate([("write", batches[:1]), ("add", batches[1:3]), ("write", batches[3:4]),
                                          ("add", batches[4:6])]):
        layer.collect_params().setattr("grad_req", req)  # a change zeroes the gradients (Gluon's _init_grad)
        _run(runner, layer, chunk)
        _check(layer, chunk, f"phase {phase}, grad_req={req!r} ({mode})")


def test_add_reaches_converted_convs_and_the_trainer():
    # The user's path: grad_req='add' on a Gluon net, convert (which carries it to W and D), hybridize as GluonCV
    # does, accumulate two batches, one Trainer step (which must see fresh gradients on W: no stale warning).
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, padding=1, in_channels=4))
    net.initialize(mx.init.Normal(0.5))
    net.collect_params().setattr("grad_req", "add")
    net, _ = convert(net, d_init="random")
    layer = net[0]
    assert layer.W.grad_req == layer.D.grad_req == "add"
    net.hybridize(static_alloc=True, static_shape=True)
    batches = _batches(2, layer, 2, seed=3)
    _run(net, layer, batches)
    _check(layer, batches, "converted, hybridized parent")
    want = _expected(layer, batches)["W"]  # before the step changes W
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    before = get_params(layer).W
    trainer.step(1)
    doconv.assert_close(get_params(layer).W, before - 0.1 * want, np.float32, "W after the step")
