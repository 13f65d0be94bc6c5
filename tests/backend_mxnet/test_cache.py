"""The composed-kernel cache: inference never runs on a stale W', whatever wrote W or D, hybridized or not."""

import numpy as np
import pytest

import doconv
from doconv.mxnet import DOConv2D, get_params, layer_config
from doconv.mxnet._mx import gluon, mx


def two_layer_net(hybridize):
    net = gluon.nn.HybridSequential()
    net.add(DOConv2D(6, 3, padding=1, in_channels=4), DOConv2D(5, 3, strides=2, groups=1, D_mul=12, in_channels=6))
    net.initialize(mx.init.Xavier())
    rng = np.random.default_rng(0)
    for layer in net:  # randomise D, so that W' != W
        layer.D.set_data(mx.nd.array(rng.normal(0, 0.3, size=layer.D.shape)))
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    return net


def core_output(net, x):
    for layer in net:
        x = doconv.forward(x, get_params(layer), layer_config(layer))
    return x


def check(net, x, what):
    doconv.assert_close(net(mx.nd.array(x)).asnumpy(), core_output(net, x), "float32", what)


def train_step(net, trainer, x):
    with mx.autograd.record():
        loss = net(mx.nd.array(x)).square().mean()
    loss.backward()
    return trainer


@pytest.fixture
def counted(monkeypatch):
    """How many times each layer composed W' (DOConv2D._compose_nd calls)."""
    calls = []
    original = DOConv2D._compose_nd

    def compose(self, ctx):
        calls.append(self.name)
        return original(self, ctx)
    monkeypatch.setattr(DOConv2D, "_compose_nd", compose)
    return calls


@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
def test_inference_follows_every_weight_change(hybridize, counted, tmp_path):
    net = two_layer_net(hybridize)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    check(net, x, "first call")
    counted.clear()
    check(net, x, "cached")
    assert counted == [], "inference recomposed W' although nothing changed"

    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5, "momentum": 0.9})
    train_step(net, trainer, x)
    check(net, x, "after backward, before step")  # a step is pending: not cached
    trainer.step(2)
    check(net, x, "after Trainer.step")
    for _ in range(2):
        train_step(net, trainer, x).step(2)
        check(net, x, "after another step")

    net[0].W.set_data(net[0].W.data() * 1.5)
    check(net, x, "after W.set_data")
    net[1].D.set_data(net[1].D.data() - 0.2)
    check(net, x, "after D.set_data")

    path = str(tmp_path / "net.params")
    other = two_layer_net(hybridize=False)
    other[0].D.set_data(other[0].D.data() + 0.4)
    other.save_parameters(path)
    net.load_parameters(path)
    check(net, x, "after load_parameters")
    other[1].save_parameters(path)
    other[1].W.set_data(other[1].W.data() * 0)  # not saved
    net[1].load_parameters(path)
    check(net, x, "after a bare layer's load_parameters")

    net.initialize(mx.init.Uniform(), force_reinit=True)
    check(net, x, "after initialize(force_reinit=True)")

    net[0].W.data()[:] = 0.3  # a raw in-place write: documented as unseen until invalidate_cache()
    net[0].invalidate_cache()
    check(net, x, "after a raw write and invalidate_cache()")


def test_cache_is_per_context_and_never_saved(tmp_path):
    ctxs = [mx.cpu(0), mx.cpu(1)]
    layer = DOConv2D(3, 3, in_channels=2, prefix="conv_")
    layer.initialize(ctx=ctxs)
    layer.D.set_data(mx.nd.ones(layer.D.shape))
    x = np.random.default_rng(2).normal(size=(1, 2, 5, 5)).astype("float32")
    for ctx in ctxs:
        got = layer(mx.nd.array(x, ctx=ctx)).asnumpy()
        doconv.assert_close(got, doconv.forward(x, get_params(layer), layer_config(layer)), "float32", str(ctx))
    layer.save_parameters(str(tmp_path / "layer.params"))
    assert sorted(mx.nd.load(str(tmp_path / "layer.params"))) == ["D", "W", "bias"]
    assert layer.kernel_cache.grad_req == "null"
