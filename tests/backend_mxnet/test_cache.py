"""The composed-kernel cache: inference never runs on a stale W', whatever wrote W or D, hybridized or not."""

import numpy as np
import pytest

import doconv
from doconv.mxnet import UNSUPPORTED_FEATURES, DOConv2D, get_params, layer_config, set_params
from doconv.mxnet._mx import gluon, mx

GLUON_CASES = doconv.cases.select(UNSUPPORTED_FEATURES)


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
    # a validation call between the recorded forward and its backward caches W' before any gradient is
    # pending; the step after that backward must still be seen
    with mx.autograd.record():
        loss = net(mx.nd.array(x)).square().mean()
    check(net, x, "between a recorded forward and its backward")
    loss.backward()
    trainer.step(2)
    check(net, x, "after the step that followed")

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


def _graph_grads(net, layer, x, u):
    """Output and {x, W, D, bias} gradients of ``layer`` run through the hybridized parent ``net``."""
    xn = mx.nd.array(x, dtype=x.dtype)
    xn.attach_grad()
    with mx.autograd.record():
        y = net(xn)
    y.backward(mx.nd.array(u, dtype=x.dtype))
    grads = {"x": xn.grad.asnumpy(), "W": layer.W.grad().asnumpy(), "D": layer.D.grad().asnumpy()}
    if layer.bias is not None:
        grads["bias"] = layer.bias.grad().asnumpy()
    return y.asnumpy(), grads


def _parent(layer):
    net = gluon.nn.HybridSequential()
    net.add(layer)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


KERNEL_CASES = [c for c in GLUON_CASES if c.config.has_D]


@pytest.mark.parametrize("first", ["training", "inference", "both"],
                         ids=["graph-built-recording", "graph-built-for-inference", "two-parents-both-kinds"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.id for c in KERNEL_CASES])
def test_hybridized_parent_graphs_match_the_core(case, first, counted, h):
    """A parent's graph composes W' itself when built inside ``autograd.record()`` (a training graph) and reads
    the kernel cache when built outside (an inference graph); each gives the core's output and gradients in
    both modes, and so does a layer shared by parents of both kinds."""
    layer, params = h.build(case, "float64", seed=5)
    x = case.input(5, np.float64)
    u = np.random.default_rng(6).normal(size=case.config.output_shape(x.shape))
    want_out, want_grads = h.reference(case, params, x, u)
    net = _parent(layer)
    if first in ("inference", "both"):
        doconv.assert_close(net(h.nd(x, "float64")).asnumpy(), want_out, "float64", f"{case.id} inference")
    if first == "both":  # a second parent, its graph built while recording
        _graph_grads(_parent(layer), layer, x, u)
    counted.clear()
    out, grads = _graph_grads(net, layer, x, u)
    assert (counted == []) == (first == "training"), "a training graph composes in-graph, an inference one not"
    doconv.assert_close(out, want_out, "float64", f"{case.id} output")
    for name, grad in grads.items():
        doconv.assert_close(grad, want_grads[name], "float64", f"{case.id} d{name}")
    assert layer._graphs == {"training": {"compose"}, "inference": {"cache"}, "both": {"cache", "compose"}}[first]

    params.D = params.D + 0.25  # a weight change, then inference through the same graph
    set_params(layer, params)
    doconv.assert_close(net(h.nd(x, "float64")).asnumpy(), doconv.forward(x, params, case.config), "float64",
                        f"{case.id} inference after D.set_data")


@pytest.mark.parametrize("before, after", [([0], [1]), ([0, 1], [1]), ([0], [0, 1])])
def test_reset_ctx_moves_the_layer(before, after):
    layer = DOConv2D(3, 3, in_channels=2)
    layer.initialize(ctx=[mx.cpu(i) for i in before])
    layer.D.set_data(mx.nd.array(np.random.default_rng(3).normal(0, 0.3, size=layer.D.shape)))
    x = np.random.default_rng(4).normal(size=(1, 2, 5, 5)).astype("float32")
    layer(mx.nd.array(x, ctx=mx.cpu(before[0])))  # fills the cache on the old context
    layer.collect_params().reset_ctx([mx.cpu(i) for i in after])
    want = doconv.forward(x, get_params(layer), layer_config(layer))
    for i in after:
        doconv.assert_close(layer(mx.nd.array(x, ctx=mx.cpu(i))).asnumpy(), want, "float32", f"cpu({i})")


def _randomise(layer, seed):
    rng = np.random.default_rng(seed)
    for param in (layer.W, layer.D, layer.bias):
        param.set_data(mx.nd.array(rng.normal(0, 0.5, size=param.shape), dtype=param.dtype))


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_sharers_of_an_auto_layer_that_chose_feature_read_a_correct_kernel(hybridize):
    """The shared cache is filled by whichever sharer convolves with it: an 'auto' layer that chose feature
    composition (a small input) must not leave its kernel-composing sharers the unfilled buffer, nor may two
    'auto' sharers that chose differently (different input sizes)."""
    a = DOConv2D(8, 3, in_channels=3, composition="auto", prefix="shared_")
    kernel = DOConv2D(8, 3, in_channels=3, params=a.params)
    auto = DOConv2D(8, 3, in_channels=3, composition="auto", params=a.params)
    a.initialize()
    _randomise(a, 0)
    small, large = (np.random.default_rng(s).normal(size=shape).astype("float32")
                    for s, shape in ((1, (1, 3, 3, 3)), (2, (2, 3, 16, 16))))
    for layer in (a, kernel, auto):
        if hybridize:
            layer.hybridize()
    for step in ("first calls", "after D.set_data"):
        params = get_params(a)
        for layer, x in ((a, small), (kernel, large), (auto, large), (a, small)):
            doconv.assert_close(layer(mx.nd.array(x)).asnumpy(), doconv.forward(x, params, a.config), "float32",
                                f"{step}: {layer.name}")
        assert (a._auto, auto._auto) == ("feature", "kernel")
        a.D.set_data(a.D.data() + 0.3)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_load_parameters_casting_to_the_saved_dtype_casts_the_cache_too(tmp_path, hybridize):
    """``load_parameters(cast_dtype=True, dtype_source='saved')`` sets W's and D's dtype to the file's: W'
    (the kernel cache) follows, also after a float32 W' was cached."""
    saved = DOConv2D(4, 3, in_channels=2, prefix="layer_")
    saved.initialize()
    saved.cast("float64")
    _randomise(saved, 3)
    saved.save_parameters(str(tmp_path / "f64.params"))
    layer = DOConv2D(4, 3, in_channels=2, prefix="layer_")
    layer.initialize()
    if hybridize:
        layer.hybridize()
    x = np.random.default_rng(4).normal(size=(1, 2, 6, 5))
    layer(mx.nd.array(x, dtype="float32"))  # caches a float32 W'
    layer.load_parameters(str(tmp_path / "f64.params"), cast_dtype=True, dtype_source="saved")
    out = layer(mx.nd.array(x, dtype="float64"))
    assert out.dtype == np.float64 and layer.kernel_cache.data().dtype == np.float64
    doconv.assert_close(out.asnumpy(), doconv.forward(x, get_params(saved), layer_config(saved)), "float64", "loaded")
