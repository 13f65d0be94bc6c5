"""DOConv2D against the NumPy core on the shared case table (randomised D), and its Gluon life cycle."""

import contextlib

import numpy as np
import pytest
import doconv
from doconv.mxnet import UNSUPPORTED_FEATURES, DOConv1D, DOConv2D, DOConv3D, get_params, layer_from_config
from doconv.mxnet._mx import gluon, mx
from doconv.selfcheck import layer_vjp

GLUON_CASES = doconv.cases.select(UNSUPPORTED_FEATURES)
IDS = [c.id for c in GLUON_CASES]
LAYERS = {1: DOConv1D, 2: DOConv2D, 3: DOConv3D}
RANKS = [1, 2, 3]
#: A spatial input size per rank for the nets below.
SPATIAL = {1: (7,), 2: (7, 6), 3: (5, 7, 6)}


def test_the_gluon_case_selection_is_what_we_expect():
    # 'same' at stride 1 and symmetric explicit padding stay; per-side (causal included), non-zero modes and
    # strided 'same' go; every rank is covered.
    ids = set(IDS)
    assert {"k3-same", "k3-valid", "dw-x3-k5-same", "k3-s2-d2", "k5-s2-2MN", "g3-k3-s2-Dmul+3"} <= ids
    assert not ids & {"k3-reflect", "k3-zeros-asym", "k3-s2-same", "k2x2-same", "g2-k3-reflect-asym"}
    assert {"k3-dsep-Dmul4", "g2-k3-dsep-Dmul5"} <= ids
    assert {"1d-k3-d4-same", "1d-dw-x2-k5-s2", "1d-k3-dsep-Dmul2", "3d-k1x3x3-s2", "3d-k2-valid-2MN", "3d-g2-k3-s2",
            "3d-dw-x2-k3"} <= ids
    assert not ids & {"1d-k3-causal-d2", "1d-k4-same", "1d-k3-s2-same", "1d-k3-reflect", "3d-k2-same",
                      "3d-k3-reflect-asym", "3d-k3-circular"}
    assert [sum(c.rank == r for c in GLUON_CASES) for r in (1, 2, 3)] == [10, 26, 10]


@pytest.mark.parametrize("composition", ["kernel", "feature"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", GLUON_CASES, ids=IDS)
def test_forward_and_gradients_match_the_core(case, dtype, composition, h):
    layer, params = h.build(case, dtype, seed=11, composition=composition)
    x = case.input(11, dtype)
    u = np.random.default_rng(12).normal(size=case.config.output_shape(x.shape)).astype(dtype)
    out, grads = h.run_with_grads(layer, x, u)
    want_out, want_grads = h.reference(case, params, x, u)
    doconv.assert_close(out, want_out, dtype, f"{case.id} output")
    assert set(grads) == set(want_grads)
    for name, grad in grads.items():
        doconv.assert_close(grad, want_grads[name], dtype, f"{case.id} d{name}")


@pytest.mark.parametrize("case", GLUON_CASES, ids=IDS)
def test_hybridized_equals_imperative(case, h):
    layer, _ = h.build(case, "float64", seed=3)
    x = h.nd(case.input(3, np.float64), "float64")
    imperative = layer(x).asnumpy()
    layer.hybridize()
    hybrid = layer(x).asnumpy()
    doconv.assert_close(hybrid, imperative, "float64", case.id)
    assert layer._cached_op is not None  # really ran the cached graph


def test_random_d_init_draws_D_with_he_variance():
    layer = DOConv2D(8, 3, in_channels=64, d_init="random")
    layer.initialize()
    D = get_params(layer).D
    assert abs(D.std() - np.sqrt(2 / 9)) < 0.02 and abs(D.mean()) < 0.02


@pytest.mark.parametrize("cls, kwargs, match", [
    (DOConv2D, dict(padding="same"), "padding must be an int or 2 ints \\(Gluon pads symmetrically\\), but got "
                                     "padding='same'; use doconv.mxnet.layer_from_config"),
    (DOConv2D, dict(padding=((0, 1), (1, 1))), "padding must be an int or 2 ints .*per-side"),
    (DOConv2D, dict(D_mul=4), "D_mul must be >= M\\*N = 9"),
    (DOConv2D, dict(groups=4, in_channels=6), "in_channels must be divisible by groups"),
    (DOConv2D, dict(groups=5), "out_channels must be divisible by groups"),
    (DOConv2D, dict(in_channels=-1), "in_channels must be a positive int"),
    (DOConv2D, dict(groups=0), "groups must be a positive int, but got groups=0"),  # not in_channels (unknown)
    (DOConv2D, dict(groups=-2, in_channels=4), "groups must be a positive int, but got groups=-2"),
    (DOConv2D, dict(layout="NCW"), "layout must be one of \\('NCHW', 'NHWC'\\), but got layout='NCW'"),
    (DOConv2D, dict(composition="fast"), "composition must be one of"),
    (DOConv2D, dict(d_init="ones"), "d_init must be one of"),
    (DOConv2D, dict(strides=0), "stride must be >= 1"),
    (DOConv1D, dict(layout="NWC"), "layout must be one of \\('NCW',\\), but got layout='NWC'"),
    (DOConv1D, dict(padding=(1, 1)), "padding must be an int, but got padding=\\(1, 1\\) of length 2"),
    (DOConv1D, dict(padding="causal"), "padding must be an int .*but got padding='causal'"),
    (DOConv1D, dict(kernel_size=(3, 3)), "kernel_size must be an int, but got kernel_size=\\(3, 3\\)"),
    (DOConv1D, dict(D_mul=2), "D_mul must be >= M\\*N = 3"),
    (DOConv3D, dict(layout="NCHW"), "layout must be one of \\('NCDHW', 'NDHWC'\\), but got layout='NCHW'"),
    (DOConv3D, dict(padding=(1, 1)), "padding must be an int or 3 ints, but got padding=\\(1, 1\\) of length 2"),
    (DOConv3D, dict(strides=(1, 2)), "stride must be an int or 3 ints"),
    (DOConv3D, dict(D_mul=9), "D_mul must be >= M\\*N = 27"),
])
def test_bad_arguments_raise_clear_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**{"channels": 8, "kernel_size": 3, **kwargs})


def test_deferred_channels_not_divisible_by_groups():
    layer = DOConv2D(6, 3, groups=3)
    layer.initialize()
    with pytest.raises(ValueError, match="in_channels must be divisible by groups, but got in_channels=4"):
        layer(mx.nd.ones((1, 4, 5, 5)))


CHANNELS_LAST = {2: "NHWC", 3: "NDHWC"}


@pytest.mark.parametrize("rank", [2, 3])
def test_channels_last_on_cpu_is_a_clear_error(rank):
    layout = CHANNELS_LAST[rank]
    layer = LAYERS[rank](4, 3, layout=layout, in_channels=3)
    layer.initialize()
    with pytest.raises(ValueError, match=f"layout='{layout}' is not supported on cpu.*use layout='NC"):
        layer(mx.nd.ones((1, *SPATIAL[rank], 3)))


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("rank", [2, 3])
def test_channels_last_deferred_in_a_hybridized_parent_infers_c_in_from_the_channel_axis(rank, use_bias):
    """The graph's shape probe reads NHWC's (NDHWC's) last axis: shapes come out right, and the CPU then fails
    exactly as MXNet's own channels-last Conv2D / Conv3D does (not with a shape inconsistency)."""
    def run(block):
        net = gluon.nn.HybridSequential()
        net.add(block)
        net.initialize()
        net.hybridize()
        with pytest.raises(mx.base.MXNetError) as info:
            net(mx.nd.ones((1, *SPATIAL[rank], 3))).wait_to_read()
        return str(info.value).strip().splitlines()[0]
    ours = LAYERS[rank](4, 3, layout=CHANNELS_LAST[rank], use_bias=use_bias)
    theirs = getattr(gluon.nn, f"Conv{rank}D")(4, 3, layout=CHANNELS_LAST[rank], use_bias=use_bias)
    error = run(ours)
    assert error == run(theirs) and "Shape inconsistent" not in error
    mn = 3 ** rank
    assert (ours.in_channels, ours.W.shape, ours.D.shape) == (3, (4, 3, mn), (3, mn, mn))
    assert theirs.weight.shape == (4, 3) + (3,) * rank


def test_float16_fails_on_cpu_exactly_as_conv2d_does():
    def error(block):
        block.initialize()
        block.cast("float16")
        with pytest.raises(mx.base.MXNetError) as info:
            block(mx.nd.ones((1, 3, 6, 6), dtype="float16")).wait_to_read()
        return str(info.value)
    ours, theirs = error(DOConv2D(4, 3, in_channels=3)), error(gluon.nn.Conv2D(4, 3, in_channels=3))
    assert "FP16 gemm on cpu not implemented" in ours and "FP16 gemm on cpu not implemented" in theirs


#: The second layer of the nets below, per rank: a kernel with a 1-wide axis (2-D, 3-D) and D_mul = 2 M*N.
SECOND = {1: dict(kernel_size=2, padding=0, D_mul=4), 2: dict(kernel_size=(3, 1), padding=(1, 0), D_mul=6),
          3: dict(kernel_size=(3, 1, 2), padding=(1, 0, 0), D_mul=12)}


def _deferred_layers(rank, second_in_channels=0, **kwargs):
    """A grouped 3-tap layer and a layer with a 1-wide axis and ReLU, both with in_channels deferred."""
    cls = LAYERS[rank]
    return (cls(6, 3, padding=1, groups=2, **kwargs),
            cls(8, use_bias=False, activation="relu", in_channels=second_in_channels, **SECOND[rank], **kwargs))


def _deferred_net(hybridize, rank=2):
    net = gluon.nn.HybridSequential()
    net.add(*_deferred_layers(rank, d_init="random"))
    net.initialize(mx.init.Uniform(0.5))
    if hybridize:
        net.hybridize()
    return net


def _core_forward(net, x):
    for block in net:
        x = doconv.forward(x, get_params(block), block.config)
        x = np.maximum(x, 0) if block.act is not None else x
    return x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("recorded", [False, True], ids=["first-call-inference", "first-call-recorded"])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized-parent"])
@pytest.mark.parametrize("rank", RANKS)
def test_deferred_in_channels_inferred_from_first_input(rank, hybridize, recorded, dtype, h):
    """The first call may be a training step (the usual loop) and the net may be cast first."""
    net = _deferred_net(hybridize, rank)
    net.cast(dtype)
    x = np.random.default_rng(0).normal(size=(2, 4, *SPATIAL[rank])).astype(dtype)
    with mx.autograd.record() if recorded else contextlib.nullcontext():
        out = net(h.nd(x, dtype))
    if recorded:
        out.backward()
    out = out.asnumpy()
    mn, s = 3 ** rank, SECOND[rank]["D_mul"]
    assert [b.W.shape for b in net] == [(6, 2, mn), (8, 6, s)]
    assert [b.D.shape for b in net] == [(4, mn, mn), (6, s // 2, s)]
    doconv.assert_close(out, _core_forward(net, x), dtype, "deferred net")
    if recorded:  # the first graph (shape probe in it) trains W, D and bias as the core's VJPs say
        first, second = net
        hidden = doconv.forward(x, get_params(first), first.config)
        grads = layer_vjp((out > 0).astype(dtype), hidden, get_params(second), second.config)
        for block, want in ((second, grads), (first, layer_vjp(grads["x"], x, get_params(first), first.config))):
            for name in ("W", "D", "bias"):
                if name in want:
                    doconv.assert_close(getattr(block, name).grad().asnumpy(), want[name], dtype,
                                        f"first graph d{name} of {block.name}")
    net.hybridize()  # a graph built with known shapes (no shape probe) gives the same numbers
    doconv.assert_close(net(h.nd(x, dtype)).asnumpy(), out, dtype, "rebuilt graph")


@pytest.mark.parametrize("where", ["layer", "parent"], ids=["layer-hybridized", "in-hybridized-parent"])
@pytest.mark.parametrize("rank", RANKS)
def test_feature_composition_with_deferred_in_channels_hybridizes(rank, where):
    """composition='feature' with in_channels=0 and hybridize(): the layer infers C_in from its first NDArray
    before building its graph; a hybridized parent's first graph composes W' (C_in unknown), the next one,
    built with C_in known, composes features. Both give the core's outputs (randomised D)."""
    layer = LAYERS[rank](6, 3, padding=1, groups=2, composition="feature")
    net = layer if where == "layer" else gluon.nn.HybridSequential()
    if where == "parent":
        net.add(layer)
    net.initialize()
    net.hybridize()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, *SPATIAL[rank])).astype("float32")
    assert net(mx.nd.array(x)).shape == (2, 6, *SPATIAL[rank]) and layer.W.shape == (6, 2, 3 ** rank)
    for param in (layer.W, layer.D, layer.bias):
        param.set_data(mx.nd.array(rng.normal(0, 0.5, size=param.shape)))
    want = doconv.forward(x, get_params(layer), layer.config)
    doconv.assert_close(net(mx.nd.array(x)).asnumpy(), want, "float32", "first graph")
    net.hybridize()
    doconv.assert_close(net(mx.nd.array(x)).asnumpy(), want, "float32", "graph built with C_in known")


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("deferred", [False, True], ids=["in_channels", "deferred"])
def test_auto_composition_follows_the_cost_model(deferred, hybridize):
    wide = DOConv2D(64, 3, padding=1, in_channels=0 if deferred else 4, composition="auto")  # 4 positions < 64
    narrow = DOConv2D(4, 3, padding=1, in_channels=0 if deferred else 64, composition="auto")
    for layer, shape, want in ((wide, (1, 4, 2, 2), "feature"), (narrow, (8, 64, 16, 16), "kernel")):
        layer.initialize()
        if hybridize:
            layer.hybridize()
        x = np.random.default_rng(0).normal(size=shape).astype("float32")
        out = layer(mx.nd.array(x)).asnumpy()
        assert layer._auto == want == doconv.choose_composition(layer.config, shape)
        doconv.assert_close(out, doconv.forward(x, get_params(layer), layer.config), "float32", want)


@pytest.mark.parametrize("case_id", ["g3-k3-s2-Dmul+3", "1d-dw-x2-k5-s2", "3d-g2-k3-s2"])
def test_save_and_load_parameters_with_stable_names(tmp_path, case_id, h):
    case = doconv.cases.case(case_id)
    layer, params = h.build(case, "float32", seed=5)
    layer.save_parameters(str(tmp_path / "layer.params"))
    assert sorted(mx.nd.load(str(tmp_path / "layer.params"))) == ["D", "W"] + ["bias"] * case.config.bias
    other = layer_from_config(case.config)
    other.load_parameters(str(tmp_path / "layer.params"))
    x = h.nd(case.input(5, np.float32))
    np.testing.assert_array_equal(other(x).asnumpy(), layer(x).asnumpy())
    doconv.assert_close(other(x).asnumpy(), doconv.forward(case.input(5, np.float32), params, case.config),
                        "float32", "reloaded")


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("rank", RANKS)
def test_load_parameters_initialises_a_fresh_net(tmp_path, rank, hybridize, h):
    """Gluon's pattern: build, load_parameters (no initialize()), run -- deferred in_channels too."""
    saved = _deferred_net(hybridize=False, rank=rank)
    x = np.random.default_rng(0).normal(size=(2, 4, *SPATIAL[rank])).astype("float32")
    saved(h.nd(x))
    saved.save_parameters(str(tmp_path / "net.params"))
    fresh = gluon.nn.HybridSequential()
    fresh.add(*_deferred_layers(rank, second_in_channels=6))
    fresh.load_parameters(str(tmp_path / "net.params"), ctx=mx.cpu())
    if hybridize:
        fresh.hybridize()
    doconv.assert_close(fresh(h.nd(x)).asnumpy(), _core_forward(saved, x), "float32", "loaded")


@pytest.mark.filterwarnings("ignore:Cannot decide type for the following arguments:UserWarning")
@pytest.mark.parametrize("folded", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("rank", RANKS)
def test_export_and_symbolblock_imports(tmp_prefix, rank, folded, h):
    from doconv.mxnet import fold
    net = _deferred_net(hybridize=True, rank=rank)
    x = np.random.default_rng(1).normal(size=(2, 4, *SPATIAL[rank]))
    want = net(h.nd(x)).asnumpy()
    doconv.assert_close(want, _core_forward(net, x), "float32", "the net exported")
    x = h.nd(x)
    if folded:
        net, _ = fold(net)
        assert all(type(b) is getattr(gluon.nn, f"Conv{rank}D") for b in net)
        net.hybridize()
        net(x)
    net.export(tmp_prefix)
    loaded = gluon.SymbolBlock.imports(tmp_prefix + "-symbol.json", ["data"], tmp_prefix + "-0000.params")
    doconv.assert_close(loaded(x).asnumpy(), want, "float32", "SymbolBlock")
    if folded:
        second = int(np.prod(SECOND[rank]["kernel_size"]))
        assert sum(v.size for v in mx.nd.load(tmp_prefix + "-0000.params").values()) == \
            6 * 2 * 3 ** rank + 6 + 8 * 6 * second


@pytest.mark.parametrize("kvstore", ["local", "device"])
def test_trainer_over_two_contexts_matches_one(kvstore, h):
    case = doconv.cases.case("g2-k3")
    x = np.random.default_rng(7).normal(size=(4, *case.input_shape[1:])).astype("float32")
    target = np.random.default_rng(8).normal(size=case.config.output_shape(x.shape)).astype("float32")

    def train(ctxs, store):
        layer, _ = h.build(case, "float32", seed=9, ctx=ctxs)
        trainer = gluon.Trainer(layer.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9}, kvstore=store)
        for _ in range(3):
            xs = gluon.utils.split_and_load(h.nd(x), ctxs)
            ts = gluon.utils.split_and_load(h.nd(target), ctxs)
            with mx.autograd.record():
                losses = [((layer(a) - b) ** 2).sum() for a, b in zip(xs, ts)]
            mx.autograd.backward(losses)
            trainer.step(len(x))
        return {name: p.data(ctxs[-1]).asnumpy() for name, p in layer._reg_params.items()}

    one, two = train([mx.cpu(0)], kvstore), train([mx.cpu(0), mx.cpu(1)], kvstore)
    start = get_params(h.build(case, "float32", seed=9)[0])
    assert np.abs(one["D"]).max() > 0.1 and np.abs(one["W"] - start.W).max() > 1e-3  # it trained
    for name in one:
        doconv.assert_close(two[name], one[name], "float32", f"{kvstore} {name}")


@pytest.mark.parametrize("rank", RANKS)
def test_accepts_every_conv_argument_with_its_default(rank):
    """A drop-in: every parameter of gluon.nn.Conv1D / Conv2D / Conv3D is a parameter of DOConv1D / 2D / 3D,
    same position and default; the DO-Conv ones are keyword-only."""
    import inspect
    ours = list(inspect.signature(LAYERS[rank]).parameters.values())
    theirs = [p for p in inspect.signature(getattr(gluon.nn, f"Conv{rank}D")).parameters.values()
              if p.kind != p.VAR_KEYWORD]
    assert [(p.name, p.default) for p in ours[:len(theirs)]] == [(p.name, p.default) for p in theirs]
    assert [p.name for p in ours[len(theirs):] if p.kind == p.KEYWORD_ONLY] == \
        ["D_mul", "d_init", "composition", "depthwise_separable"]
    assert any(p.kind == p.VAR_KEYWORD for p in ours)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_params_sharing_as_gluon_does(hybridize, h):
    """``DOConv2D(..., params=other.params)`` shares W, D and bias (Gluon 1.x weight tying): one set of
    parameters, both uses add to its gradient, and inference after a step follows the update."""
    a = DOConv2D(4, 3, padding=1, in_channels=4)
    b = DOConv2D(4, 3, padding=1, in_channels=4, params=a.params)
    net = gluon.nn.HybridSequential()
    net.add(a, b)
    net.initialize(mx.init.Xavier())
    a.D.set_data(mx.nd.array(np.random.default_rng(0).normal(0, 0.3, size=a.D.shape)))
    assert (a.W, a.D, a.bias) == (b.W, b.D, b.bias)
    assert sorted(net.collect_params()) == [a.prefix + "D", a.prefix + "W", a.prefix + "bias"]
    if hybridize:
        net.hybridize()
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype("float32")
    params = get_params(a)
    doconv.assert_close(net(h.nd(x)).asnumpy(), doconv.forward(doconv.forward(x, params, a.config), params, a.config),
                        "float32", "shared twice")
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    with mx.autograd.record():
        loss = net(h.nd(x)).square().sum()
    loss.backward()
    trainer.step(1)
    params = get_params(a)
    doconv.assert_close(net(h.nd(x)).asnumpy(), doconv.forward(doconv.forward(x, params, a.config), params, a.config),
                        "float32", "after a step")
    with pytest.raises(ValueError, match=r"params: the shared parameter '.*_W'"):
        DOConv2D(4, 5, padding=1, in_channels=4, params=a.params)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("rank", RANKS)
def test_bad_inputs_name_the_channels(rank, hybridize):
    layer = LAYERS[rank](4, 3, in_channels=3)
    layer.initialize()
    if hybridize:
        layer.hybridize()
    spatial = (6,) * rank
    with pytest.raises(ValueError, match=rf"input has 5 channels but in_channels=3 \(input shape \(1, 5, 6"):
        layer(mx.nd.ones((1, 5, *spatial)))
    with pytest.raises(ValueError, match=rf"input must be {rank + 2}-D \({layer.layout}\), but got input shape "
                                         rf"\(3, 6"):
        layer(mx.nd.ones((3, *spatial)))
    assert layer(mx.nd.ones((1, 3, *spatial))).shape == (1, 4) + (4,) * rank


@pytest.mark.parametrize("rank", RANKS)
def test_groups_1_composes_from_W_as_stored(rank):
    """With groups=1 and C_in known, the graph's gemm2 reads the W parameter itself: a reshape of it would be a
    copy that a static-alloc training graph keeps for the backward (a kernel-sized buffer per layer)."""
    import json
    layer = LAYERS[rank](8, 3, in_channels=4)
    layer.initialize()
    graph = json.loads(layer(mx.sym.var("data")).tojson())
    nodes = graph["nodes"]
    gemms = [node for node in nodes if node["op"] == "_linalg_gemm2"]
    assert len(gemms) == 1
    assert nodes[gemms[0]["inputs"][0][0]]["name"] == layer.W.name
    x = np.random.default_rng(1).normal(size=(2, 4, *SPATIAL[rank])).astype("float32")
    layer.D.set_data(mx.nd.array(np.random.default_rng(2).normal(size=layer.D.shape)))
    doconv.assert_close(layer(mx.nd.array(x)).asnumpy(), doconv.forward(x, get_params(layer), layer.config),
                        "float32", "groups=1")


def test_summary_counts_W_D_and_bias_only(capsys):
    """``summary()`` and ``collect_params()`` see W, D and bias only (a sharer's once)."""
    a = DOConv2D(4, 3, padding=1, in_channels=4, prefix="a_")
    net = gluon.nn.HybridSequential()
    net.add(a, DOConv2D(4, 3, padding=1, in_channels=4, params=a.params))
    net.initialize()
    a.D.set_data(mx.nd.array(np.random.default_rng(0).normal(0, 0.3, size=a.D.shape)))
    x = np.random.default_rng(1).normal(size=(1, 4, 5, 5)).astype("float32")
    net.summary(mx.nd.array(x))
    lines = capsys.readouterr().out.splitlines()
    count = dict(line.strip().rsplit(": ", 1) for line in lines if ": " in line)
    own = 4 * 4 * 9 + 4 * 9 * 9 + 4
    assert (count["Total params"], count["Trainable params"], count["Unique parameters in model"]) == \
        (str(2 * own), str(2 * own), str(own))
    assert sorted(net.collect_params()) == ["a_D", "a_W", "a_bias"]
    params = get_params(a)
    doconv.assert_close(net(mx.nd.array(x)).asnumpy(), doconv.forward(doconv.forward(x, params, a.config), params,
                                                                      a.config), "float32", "shared twice")


# ---- weight: W', read-only -----------------------------------------------------------------------------

WEIGHT_CASES = ("k3-same", "g3-k3-s2-Dmul+3", "k1x1", "1d-k5-2MN", "1d-k1", "3d-k1x3x3-s2", "3d-k1")


@pytest.mark.parametrize("case", [doconv.cases.case(i) for i in WEIGHT_CASES], ids=WEIGHT_CASES)
def test_weight_is_the_kernel_composed_now(case, h):
    """``layer.weight.data()`` is doconv.compose of the parameters as they are at the read (randomised D),
    also after a raw in-place write; its shape, dtype and name are a Gluon convolution weight's."""
    layer, params = h.build(case, "float64", seed=5)
    c = case.config
    weight = layer.weight
    assert weight.shape == c.kernel_shape and np.dtype(weight.dtype) == np.float64
    assert weight.name == layer.prefix + "weight" and weight.list_ctx() == [mx.cpu()]
    doconv.assert_close(weight.data().asnumpy(), doconv.compose(params, c), "float64", case.id)
    layer.W.data()[:] = layer.W.data() * 2 + 0.5  # a write no Gluon hook sees
    if layer.D is not None:
        layer.D.data()[:] += mx.nd.array(np.random.default_rng(6).normal(0, 0.2, size=layer.D.shape), dtype="float64")
    now = get_params(layer)
    doconv.assert_close(weight.data(mx.cpu()).asnumpy(), doconv.compose(now, c), "float64", f"{case.id} after a write")
    assert doconv.max_error(doconv.compose(now, c), doconv.compose(params, c)) > 1e-3
    [only] = weight.list_data()
    doconv.assert_close(only.asnumpy(), doconv.compose(now, c), "float64", case.id)


def test_weight_is_no_parameter_and_cannot_be_written(h):
    layer, _ = h.build(doconv.cases.case("k3-same"), "float32", seed=1)
    assert sorted(k[len(layer.prefix):] for k in layer.collect_params()) == ["D", "W", "bias"]
    assert not any(p is layer.weight for p in layer.collect_params().values())
    with pytest.raises(ValueError, match=r"weight is the composed kernel W' = D\^T o W of a DOConv2D, not a "
                                         r"Parameter: set W and D .*or fold first \(doconv.mxnet.fold\)"):
        layer.weight.set_data(mx.nd.zeros(layer.weight.shape))
    with pytest.raises(AttributeError, match=r"weight is the composed kernel .*fold first"):
        layer.weight = gluon.Parameter("weight", shape=layer.weight.shape)
    assert sorted(k[len(layer.prefix):] for k in layer.collect_params()) == ["D", "W", "bias"]
    deferred = DOConv2D(6, 3, groups=2)
    assert deferred.weight.shape == (6, 0, 3, 3)


def test_the_conv_weight_idioms_read_W_prime_in_a_converted_net(h):
    """``net.<path>.weight.data()`` in a converted net, on two contexts, and differentiably: gradients of a
    function of W' reach W and D exactly as the core's vjp of compose says."""
    from doconv.mxnet import convert
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(6, 3, padding=1, in_channels=4, groups=2))
    net.initialize(mx.init.Xavier(), ctx=[mx.cpu(0), mx.cpu(1)])
    net, _ = convert(net)
    layer = net[0]
    layer.D.set_data(mx.nd.array(np.random.default_rng(2).normal(0, 0.3, size=layer.D.shape)))
    want = doconv.compose(get_params(layer), layer.config)
    for ctx, data in zip([mx.cpu(0), mx.cpu(1)], layer.weight.list_data()):
        assert data.context == ctx
        doconv.assert_close(data.asnumpy(), want, "float32", str(ctx))
    with mx.autograd.record():
        loss = (layer.weight.data(mx.cpu(1)) * 3).sum()
    loss.backward()
    g = layer.W.grad(mx.cpu(1)).asnumpy()
    assert np.abs(g).max() > 0
    eps, W = 1e-2, get_params(layer)
    bumped = get_params(layer)
    bumped.W = bumped.W.astype("float64")
    bumped.W[0, 0, 0] += eps
    W.W = W.W.astype("float64")
    numeric = 3 * (doconv.compose(bumped, layer.config) - doconv.compose(W, layer.config)).sum() / eps
    np.testing.assert_allclose(g[0, 0, 0], numeric, rtol=1e-3)
