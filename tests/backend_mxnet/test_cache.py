"""Freshness: every call computes with D^T o W of W and D as they are now, whatever wrote them; the explicit
``cached()`` scope composes W' once per layer, is dropped on exit, and never outlives itself in a graph, a
parameter list or a file. Every check compares with ``doconv.forward`` of ``get_params`` (randomised D)."""

import contextlib
import itertools

import numpy as np
import pytest

import doconv
from doconv.mxnet import DOConv1D, DOConv2D, DOConv3D, cached, convert, get_params, layer_config, set_params
from doconv.mxnet._mx import gluon, mx
from doconv.mxnet.layer import _DOConv

GLUON_CASES = doconv.cases.select(doconv.mxnet.UNSUPPORTED_FEATURES)
KERNEL_CASES = [c for c in GLUON_CASES if c.config.has_D]
MODES = [False, True]
MODE_IDS = ["imperative", "hybridized"]


LAYERS = {1: DOConv1D, 2: DOConv2D, 3: DOConv3D}


def two_layer_net(hybridize, ctx=(0,), seed=0, rank=2):
    net = gluon.nn.HybridSequential()
    cls = LAYERS[rank]
    net.add(cls(6, 3, padding=1, in_channels=4), cls(5, 3, strides=2, D_mul=3 ** rank + 3, in_channels=6))
    net.initialize(mx.init.Xavier(), ctx=[mx.cpu(i) for i in ctx])
    rng = np.random.default_rng(seed)
    for layer in net:  # randomise D, so that W' != W
        layer.D.set_data(mx.nd.array(rng.normal(0, 0.3, size=layer.D.shape)))
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    return net


def core_output(net, x):
    for layer in net:
        x = doconv.forward(x, get_params(layer), layer_config(layer))
    return x


def check(net, x, what, ctx=mx.cpu(0)):
    """The net's output (in its current dtype) against the core's on the parameters read back now."""
    dtype = np.dtype(net[0].W.dtype).name
    x = x.astype(dtype)
    out = net(mx.nd.array(x, ctx=ctx, dtype=dtype))
    assert out.dtype == np.dtype(dtype), what
    doconv.assert_close(out.asnumpy(), core_output(net, x), dtype, what)


@pytest.fixture
def counted(monkeypatch):
    """The names of the layers that composed a scope's W' (``_DOConv._compose_nd``, every rank's), one entry per
    call."""
    calls = []
    original = _DOConv._compose_nd

    def compose(self, ctx):
        calls.append(self.name)
        return original(self, ctx)
    monkeypatch.setattr(_DOConv, "_compose_nd", compose)
    return calls


# ---- the write paths ------------------------------------------------------------------------------------

def _params(net):
    return [p for layer in net for p in (layer.W, layer.D)]


def _step(net, x, **trainer_kwargs):
    ctxs = net[0].W.list_ctx()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5, "momentum": 0.9}, **trainer_kwargs)
    with mx.autograd.record():
        losses = [net(part).square().mean() for part in gluon.utils.split_and_load(mx.nd.array(x), ctxs)]
    mx.autograd.backward(losses)
    trainer.step(len(x))


def _kvstore_pull(net, x):
    """Two contexts: with one, Gluon skips the string kvstore; here every step pulls the weights from it."""
    _step(net, x, kvstore="local", update_on_kvstore=True)


def _set_data(net, x):
    for p in _params(net):
        p.set_data(p.data() * 1.5 - 0.1)


def _slice_assign(net, x):
    for p in _params(net):
        p.data()[:] = 3 * p.data()


def _in_place(net, x):
    for p in _params(net):
        w = p.data()
        w *= 2


def _random_out(net, x):
    for p in _params(net):
        mx.nd.random.normal(0, 0.3, out=p.data())


_SEEDS = itertools.count(100)


def _load_parameters(net, x, path):
    other = two_layer_net(hybridize=False, seed=next(_SEEDS))
    other.save_parameters(path)
    net.load_parameters(path, ctx=net[0].W.list_ctx())


def _reset_ctx(net, x):
    """Contexts made to disagree by a raw write to cpu(1), then ``reset_ctx``: every copy becomes the mean, so the
    values the net computes with on cpu(0) change through ``reset_ctx`` alone."""
    for p in _params(net):
        p.data(mx.cpu(1))[:] = p.data(mx.cpu(1)) + 1
    net.collect_params().reset_ctx([mx.cpu(0), mx.cpu(1)])


def _cast(net, x):
    """float32 <-> float64: a W' kept from before would have the other dtype (or float32 rounding)."""
    net.cast("float64" if np.dtype(net[0].W.dtype) == np.float32 else "float32")


WRITES = {  # name: (write(net, x[, path]), contexts the net lives on)
    "Trainer.step": (_step, (0,)),
    "kvstore pull": (_kvstore_pull, (0, 1)),
    "set_data": (_set_data, (0,)),
    "W.data()[:] = 3 * W.data()": (_slice_assign, (0,)),
    "w = W.data(); w *= 2": (_in_place, (0,)),
    "nd.random.normal(out=W.data())": (_random_out, (0,)),
    "load_parameters": (_load_parameters, (0,)),
    "reset_ctx": (_reset_ctx, (0, 1)),
    "cast": (_cast, (0,)),
}


class Boom(Exception):
    pass


@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("path", list(WRITES))
def test_every_write_path_is_seen(path, hybridize, counted, tmp_path):
    write, ctx = WRITES[path]

    def written(net):
        before = [p.data().asnumpy() for p in _params(net)]
        if write is _load_parameters:
            write(net, x, str(tmp_path / "other.params"))
        else:
            write(net, x)
        if write is not _cast:  # (cast changes the dtype, not the values)
            assert any(np.abs(p.data().asnumpy() - b).max() > 1e-3 for p, b in zip(_params(net), before)), path

    net = two_layer_net(hybridize, ctx)
    layers = [layer.name for layer in net]
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    check(net, x, "default path")

    counted.clear()
    with cached(net):
        for call in range(3):
            check(net, x, f"inside a scope, call {call}")
    assert counted == layers, "inside a scope each layer composes W' exactly once"
    check(net, x, "default path after the scope")  # a kernel the scope left behind would serve this call ...

    written(net)  # ... and go stale here
    check(net, x, f"default path after {path}, a scope used before")
    check(net, x, f"default path after {path}, second call")

    counted.clear()
    with cached(net):
        for call in range(2):
            check(net, x, f"in a new scope after {path}, call {call}")
    assert counted == layers

    with pytest.raises(Boom):
        with cached(net):
            check(net, x, "in a scope left by an exception")
            raise Boom
    check(net, x, "default path after the scope left by an exception")
    written(net)
    check(net, x, f"default path after a scope left by an exception and {path}")
    counted.clear()
    with cached(net):
        check(net, x, f"in a scope after the exception and {path}")
    assert counted == layers


# ---- the scope ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("rank", [1, 3])
def test_a_scope_over_1d_and_3d_layers_composes_once_and_follows_writes_after(rank, hybridize, counted):
    net = two_layer_net(hybridize, rank=rank)
    layers = [layer.name for layer in net]
    x = np.random.default_rng(1).normal(size=(2, 4) + (7,) * rank).astype("float32")
    check(net, x, "default path")
    counted.clear()
    with cached(net):
        for call in range(3):
            check(net, x, f"inside a scope, call {call}")
        if hybridize:
            assert _kernel_inputs(net) == [f"{layer.prefix}cached_kernel" for layer in net]
    assert counted == layers, "inside a scope each layer composes W' exactly once"
    _random_out(net, x)
    check(net, x, "after the scope and a raw write")
    if hybridize:
        assert _kernel_inputs(net) == []


@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
def test_a_write_inside_the_scope_is_the_callers_promise_and_invalidate_cache_drops_the_kernel(hybridize, counted):
    net = two_layer_net(hybridize)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    with cached(net):
        before = net(mx.nd.array(x)).asnumpy()
        net[0].W.data()[:] = 2 * net[0].W.data()
        np.testing.assert_array_equal(net(mx.nd.array(x)).asnumpy(), before)  # the promise was broken: stale
        counted.clear()
        net[0].invalidate_cache()
        check(net, x, "after invalidate_cache()")
        assert counted == [net[0].name]
    net[0].invalidate_cache()  # a no-op outside a scope
    check(net, x, "after the scope")


@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
def test_scopes_nest_and_the_outermost_exit_drops(hybridize, counted):
    net = two_layer_net(hybridize)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    with cached(net):
        check(net, x, "outer scope")
        with cached(net[0]):
            check(net, x, "inner scope")
        check(net, x, "outer scope after the inner one")
        assert counted == [layer.name for layer in net]  # the inner exit dropped nothing
    _slice_assign(net, x)
    check(net, x, "after the outermost exit and a raw write")


def _graph_params(block):
    """The names of the Parameters that feed the block's CachedOp."""
    return [p.name for is_arg, p in block._cached_op_args if not is_arg]


def _kernel_inputs(block):
    return [name for name in _graph_params(block) if name.endswith("cached_kernel")]


def test_a_graph_built_in_the_scope_is_not_reused_after_it_and_one_built_before_is_rebuilt(counted):
    net = two_layer_net(hybridize=True)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    check(net, x, "graph built before the scope")
    assert _kernel_inputs(net) == [] and {net[0].W.name, net[0].D.name} <= set(_graph_params(net))  # it composes

    counted.clear()
    with cached(net):
        check(net, x, "first call in the scope")
        assert net._cached_op is not None and _kernel_inputs(net) == [f"{layer.prefix}cached_kernel" for layer in net]
        assert not {net[0].W.name, net[0].D.name} & set(_graph_params(net))  # no composition in the graph
        check(net, x, "second call")
    assert counted == [layer.name for layer in net]
    assert net._cached_op is None  # dropped on exit

    _random_out(net, x)
    check(net, x, "after the scope and a raw write")
    assert _kernel_inputs(net) == []


def test_a_hybridized_ancestor_outside_the_scope_keeps_composing():
    """``cached(net[0])`` while ``net`` is hybridized: net's graph is none of the scope's, so it composes (fresh,
    uncached) -- also when it is built inside the scope."""
    net = two_layer_net(hybridize=True)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    with cached(net[0]):
        check(net, x, "graph built inside a scope over a child")
        assert _kernel_inputs(net) == []
        _slice_assign(net, x)
        check(net, x, "a write inside that scope reaches the ancestor's graph")


def _graph_grads(net, layer, x, u):
    xn = mx.nd.array(x, dtype=x.dtype)
    xn.attach_grad()
    with mx.autograd.record():
        y = net(xn)
    y.backward(mx.nd.array(u, dtype=x.dtype))
    grads = {"x": xn.grad.asnumpy(), "W": layer.W.grad().asnumpy(), "D": layer.D.grad().asnumpy()}
    if layer.bias is not None:
        grads["bias"] = layer.bias.grad().asnumpy()
    return y.asnumpy(), grads


@pytest.mark.parametrize("first", ["inference", "recorded"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.id for c in KERNEL_CASES])
def test_recorded_calls_in_a_scope_compose_afresh_through_either_graph(case, first, h):
    """A hybridized parent's graph built in a scope by an inference call (it reads W') or by a recorded call (it
    composes): either gives the core's output, and the core's gradients of x, W, D and bias to a recorded call;
    after the scope, inference follows ``set_data``."""
    layer, params = h.build(case, "float64", seed=5)
    x = case.input(5, np.float64)
    u = np.random.default_rng(6).normal(size=case.config.output_shape(x.shape))
    want_out, want_grads = h.reference(case, params, x, u)
    net = gluon.nn.HybridSequential()
    net.add(layer)
    net.hybridize(static_alloc=True, static_shape=True)
    with cached(net):
        for call in ([first] + [c for c in ("inference", "recorded") if c != first]) * 2:
            if call == "inference":
                doconv.assert_close(net(h.nd(x, "float64")).asnumpy(), want_out, "float64", f"{case.id} inference")
                continue
            out, grads = _graph_grads(net, layer, x, u)
            doconv.assert_close(out, want_out, "float64", f"{case.id} recorded output")
            for name, grad in grads.items():
                doconv.assert_close(grad, want_grads[name], "float64", f"{case.id} d{name}")
        assert bool(_kernel_inputs(net)) == (first == "inference")
    params.D = params.D + 0.25
    set_params(layer, params)
    doconv.assert_close(net(h.nd(x, "float64")).asnumpy(), doconv.forward(x, params, case.config), "float64",
                        f"{case.id} inference after the scope and D.set_data")


@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
def test_a_scope_composes_once_per_context(hybridize, counted):
    net = two_layer_net(hybridize, ctx=(0, 1))
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    with cached(net):
        for ctx in (mx.cpu(0), mx.cpu(1), mx.cpu(0), mx.cpu(1)):
            check(net, x, str(ctx), ctx)
    assert sorted(counted) == sorted(2 * [layer.name for layer in net])


@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
def test_the_first_call_of_a_deferred_net_may_be_inside_a_scope(hybridize, counted):
    net = gluon.nn.HybridSequential()
    net.add(DOConv2D(6, 3, padding=1, groups=2, d_init="random"), gluon.nn.Activation("relu"),
            DOConv2D(5, (3, 1), padding=(1, 0), use_bias=False, D_mul=6, d_init="random"))
    net.initialize(mx.init.Uniform(0.5))
    if hybridize:
        net.hybridize()
    x = np.random.default_rng(0).normal(size=(2, 4, 7, 6)).astype("float32")
    with cached(net):
        out = net(mx.nd.array(x)).asnumpy()
        net(mx.nd.array(x))
    assert [b.in_channels for b in (net[0], net[2])] == [4, 6]
    want = doconv.forward(np.maximum(doconv.forward(x, get_params(net[0]), net[0].config), 0), get_params(net[2]),
                          net[2].config)
    doconv.assert_close(out, want, "float32", "deferred, first call in a scope")
    assert counted == [net[0].name, net[2].name]


def test_a_layer_shared_at_two_paths_and_a_params_sharer(counted):
    a = DOConv2D(4, 3, padding=1, in_channels=4)
    b = DOConv2D(4, 3, padding=1, in_channels=4, params=a.params)
    net = gluon.nn.HybridSequential()
    net.add(a, a, b)
    net.initialize()
    a.D.set_data(mx.nd.array(np.random.default_rng(0).normal(0, 0.3, size=a.D.shape)))
    net.hybridize()
    x = np.random.default_rng(1).normal(size=(1, 4, 5, 5)).astype("float32")
    params = get_params(a)
    want = x
    for _ in range(3):
        want = doconv.forward(want, params, a.config)
    with cached(net):
        doconv.assert_close(net(mx.nd.array(x)).asnumpy(), want, "float32", "in a scope")
    assert sorted(counted) == sorted([a.name, b.name])  # once per layer, not per path


def test_a_deep_copy_made_inside_a_scope_carries_no_kernel():
    """(Gluon cannot deep-copy a hybridized net that has run: its CachedOp holds ctypes pointers.)"""
    import copy
    net = two_layer_net(hybridize=False)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    with cached(net):
        check(net, x, "in the scope")
        twin = copy.deepcopy(net)
        check(twin, x, "the copy, in the scope")
        _slice_assign(twin, x)
        check(twin, x, "the copy after a raw write, in the scope (the copy is held by none)")
    _in_place(twin, x)
    check(twin, x, "the copy after the scope and another raw write")
    check(net, x, "the original")


@pytest.mark.filterwarnings("ignore:Cannot decide type for the following arguments:UserWarning")
def test_export_inside_a_scope_writes_the_composing_graph(tmp_path):
    net = two_layer_net(hybridize=True)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    prefix = str(tmp_path / "net")
    with cached(net):
        check(net, x, "in the scope")
        net.export(prefix)
    assert not any("cached_kernel" in name for name in mx.nd.load(prefix + "-0000.params"))
    loaded = gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    doconv.assert_close(loaded(mx.nd.array(x)).asnumpy(), core_output(net, x), "float32", "exported in a scope")


def test_cached_refuses_what_is_no_block():
    with pytest.raises(TypeError, match=r"model must be a mxnet.gluon.Block .*, but got list"):
        with cached([DOConv2D(4, 3)]):
            pass


# ---- what the layer exposes ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*is already initialized, ignoring:UserWarning")
def test_a_converted_resnet_exposes_W_D_and_bias_only_in_and_out_of_a_scope(tmp_path, counted):
    gluoncv = pytest.importorskip("gluoncv")
    mx.random.seed(0)
    net = gluoncv.model_zoo.get_model("resnet18_v1b")  # no pretrained weights: nothing downloaded
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net.hybridize()
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, 32, 32)))
    net(x)
    plain = {name for name in net.collect_params()}
    net, _ = convert(net)
    rng = np.random.default_rng(1)
    layers = [b for b in _blocks(net) if isinstance(b, DOConv2D)]
    for layer in layers:
        layer.D.set_data(mx.nd.array(rng.normal(0, 0.05, size=layer.D.shape)))
    assert len(layers) == 17

    def exposed():
        params = net.collect_params()
        want = {layer.prefix + key for layer in layers for key in ("W", "D")}  # (resnet's convs have no bias)
        assert set(params) - plain == want, sorted((set(params) - plain) ^ want)
        assert plain - set(params) == {layer.prefix + "weight" for layer in layers}  # BN, dense, 1x1 convs: kept
        assert all(params[layer.prefix + key] is getattr(layer, key) for layer in layers for key in ("W", "D"))
        net.save_parameters(str(tmp_path / "net.params"))
        saved = mx.nd.load(str(tmp_path / "net.params"))
        assert len(saved) == len(params.keys()) and not any("cached" in key or "kernel" in key for key in saved)

    default = net(x).asnumpy()
    exposed()
    with cached(net):
        scoped = net(x).asnumpy()
        net(x)
        exposed()
        trainer = gluon.Trainer(net.collect_params(), "sgd")
        assert not any("cached" in p.name for p in trainer._params)
    exposed()
    assert sorted(counted) == sorted(layer.name for layer in layers)
    doconv.assert_close(scoped, default, "float32", "resnet18_v1b in a scope vs default")


def _blocks(block):
    yield block
    for child in block._children.values():
        yield from _blocks(child)


@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
def test_sharers_of_an_auto_layer_that_chose_feature_are_fresh_in_and_out_of_a_scope(hybridize):
    """An 'auto' layer that chose feature composition (a small input) shares W and D with layers that convolve
    with W': every one of them gives the core's output, in a scope too, also after D.set_data."""
    a = DOConv2D(8, 3, in_channels=3, composition="auto", prefix="shared_")
    kernel = DOConv2D(8, 3, in_channels=3, params=a.params)
    auto = DOConv2D(8, 3, in_channels=3, composition="auto", params=a.params)
    a.initialize()
    rng = np.random.default_rng(0)
    for param in (a.W, a.D, a.bias):
        param.set_data(mx.nd.array(rng.normal(0, 0.5, size=param.shape)))
    small, large = (np.random.default_rng(s).normal(size=shape).astype("float32")
                    for s, shape in ((1, (1, 3, 3, 3)), (2, (2, 3, 16, 16))))
    for layer in (a, kernel, auto):
        if hybridize:
            layer.hybridize()
    for step in ("first calls", "after D.set_data", "in a scope"):
        params = get_params(a)
        with contextlib.ExitStack() as scopes:
            if step == "in a scope":
                for layer in (a, kernel, auto):
                    scopes.enter_context(cached(layer))
            for layer, x in ((a, small), (kernel, large), (auto, large), (a, small)):
                doconv.assert_close(layer(mx.nd.array(x)).asnumpy(), doconv.forward(x, params, a.config), "float32",
                                    f"{step}: {layer.name}")
        assert (a._auto, auto._auto) == ("feature", "kernel")
        a.D.set_data(a.D.data() + 0.3)


@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("scoped", [False, True], ids=["no-scope", "scope"])
def test_load_parameters_casting_to_the_saved_dtype(tmp_path, hybridize, scoped):
    """``load_parameters(cast_dtype=True, dtype_source='saved')`` sets W's and D's dtype to the file's: the next
    call computes in it, also after a float32 call inside a scope."""
    saved = DOConv2D(4, 3, in_channels=2, prefix="layer_")
    saved.initialize()
    saved.cast("float64")
    rng = np.random.default_rng(3)
    for param in (saved.W, saved.D, saved.bias):
        param.set_data(mx.nd.array(rng.normal(0, 0.5, size=param.shape), dtype="float64"))
    saved.save_parameters(str(tmp_path / "f64.params"))
    layer = DOConv2D(4, 3, in_channels=2, prefix="layer_")
    layer.initialize()
    if hybridize:
        layer.hybridize()
    x = np.random.default_rng(4).normal(size=(1, 2, 6, 5))
    with cached(layer) if scoped else contextlib.nullcontext():
        layer(mx.nd.array(x, dtype="float32"))
    layer.load_parameters(str(tmp_path / "f64.params"), cast_dtype=True, dtype_source="saved")
    out = layer(mx.nd.array(x, dtype="float64"))
    assert out.dtype == np.float64
    doconv.assert_close(out.asnumpy(), doconv.forward(x, get_params(saved), layer_config(saved)), "float64", "loaded")


@pytest.mark.parametrize("hybridize", MODES, ids=MODE_IDS)
def test_set_params_drops_a_scope_kernel(hybridize):
    """A write made through doconv reaches the next call even inside a scope (several checkpoints, one scope)."""
    net, other = two_layer_net(hybridize), two_layer_net(hybridize, seed=5)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 7)).astype("float32")
    with cached(net):
        net(mx.nd.array(x))
        for layer, source in zip(net, other):
            set_params(layer, get_params(source))
        check(net, x, "set_params inside a scope")


def test_export_after_a_scope_writes_the_composing_graph(tmp_path):
    """A hybridized net first called inside a scope exports after it (one call rebuilds its graph, as after
    ``hybridize()``), with W, D and bias, as a plain net would."""
    net = two_layer_net(True)
    x = np.random.default_rng(2).normal(size=(2, 4, 7, 7)).astype("float32")
    with cached(net):
        want = net(mx.nd.array(x)).asnumpy()
    check(net, x, "the net's next call")
    net.export(str(tmp_path / "net"))
    block = gluon.SymbolBlock.imports(str(tmp_path / "net-symbol.json"), ["data"], str(tmp_path / "net-0000.params"))
    doconv.assert_close(block(mx.nd.array(x)).asnumpy(), want, "float32", "exported after the scope")


def test_convert_refuses_D_mul_below_M_N_saying_why():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3))
    with pytest.raises(ValueError, match=r"D_mul must be >= M\*N = 9 .*convert keeps each convolution's"):
        convert(net, D_mul=4)
