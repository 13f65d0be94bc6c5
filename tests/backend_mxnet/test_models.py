"""convert / fold on the GluonCV models of the issue (small inputs), and the canonical interchange file.

Each model is built once (Xavier init, seeded), run once before conversion, once converted (identity init:
W' = the conv's kernel exactly) and once folded back. Faster R-CNN keeps 8 proposals instead of 300 so that its
ROI head (a ResNet stage per proposal) stays cheap; the converted layers are the same.
"""

import numpy as np
import pytest

import doconv
from doconv.mxnet import DOConv2D, convert, export_canonical, fold, get_params, import_canonical, set_params
from doconv.mxnet._mx import gluon, mx

gluoncv = pytest.importorskip("gluoncv")
model_zoo = gluoncv.model_zoo


def few_proposals(net):
    net._rpn_test_post_nms = net.rpn._test_post_nms = 8
    net.rpn._test_pre_nms = 100
    return net


MODELS = {  # name: (builder, input size, kinds of layer the conversion must produce)
    "resnet18_v1b": (lambda: model_zoo.get_model("resnet18_v1b"), 32, {"DO-Conv"}),
    "resnet50_v1b": (lambda: model_zoo.get_model("resnet50_v1b"), 32, {"DO-Conv"}),
    "resnet50_v2": (lambda: model_zoo.get_model("resnet50_v2"), 32, {"DO-Conv"}),
    "mobilenetv2_1.0": (lambda: model_zoo.get_model("mobilenetv2_1.0"), 32, {"DO-Conv", "DO-DConv"}),
    "resnext50_32x4d": (lambda: model_zoo.get_model("resnext50_32x4d"), 32, {"DO-Conv", "DO-GConv"}),
    "deeplab_resnet50_voc": (lambda: model_zoo.get_deeplab(dataset="pascal_voc", backbone="resnet50", pretrained=False,
                                                           pretrained_base=False, crop_size=128), 128, {"DO-Conv"}),
    "faster_rcnn_resnet50_v1b_voc": (lambda: few_proposals(model_zoo.get_model(
        "faster_rcnn_resnet50_v1b_voc", pretrained=False, pretrained_base=False)), 128, {"DO-Conv"}),
}


def outputs(net, x):
    out = net(x)
    return [o.asnumpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


def n_params(net):
    return sum(int(np.prod(p.shape)) for p in net.collect_params().values())


def built(name):
    mx.random.seed(0)
    builder, size, _ = MODELS[name]
    net = builder()
    net.initialize(mx.init.Xavier(magnitude=2.0), force_reinit=True)
    net.hybridize()
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, size, size)))
    return net, x


def initialised(name):
    """A built model after one forward (GluonCV defers its shapes until then) and that forward's outputs."""
    net, x = built(name)
    return net, x, outputs(net, x)


def assert_same(got, want, what):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        doconv.assert_close(g, w, "float32", what)


@pytest.mark.filterwarnings("ignore:.*is already initialized, ignoring:UserWarning")
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_then_fold_keeps_outputs_and_parameter_count(name):
    net, x, base = initialised(name)
    count = n_params(net)
    net, report = convert(net)
    kinds = {row.kind for row in report}
    assert kinds == MODELS[name][2] and all(row.weights == "kept" for row in report)
    assert not any(type(b) is gluon.nn.Conv2D and b._kwargs["kernel"] != (1, 1)
                   for _, b in net._children.items())
    assert str(report).startswith("| layer |") and f"{len(report)} layer(s)" in str(report)
    assert_same(outputs(net, x), base, f"{name} converted")  # no re-hybridize: convert drops stale graphs
    assert n_params(net) > count  # D and the wider W
    net = fold(net)
    assert n_params(net) == count
    assert_same(outputs(net, x), base, f"{name} folded")


def _randomise_D(net, seed):
    rng = np.random.default_rng(seed)
    for layer in (b for b in net.collect_params().values() if b.name.endswith("_D")):
        layer.set_data(mx.nd.array(rng.normal(0, 0.1, size=layer.shape)))


def test_canonical_export_import_on_a_converted_model(tmp_path):
    net, x, _ = initialised("resnet18_v1b")
    net, report = convert(net, include="layer*", exclude="layer4.*")
    assert report and all(r.name.startswith(("layer1", "layer2", "layer3")) for r in report)
    _randomise_D(net, 1)
    path = tmp_path / "resnet18.safetensors"
    export_canonical(net, path)
    stored = doconv.load(path)
    assert sorted(stored) == sorted(r.name for r in report)
    name = report[0].name
    np.testing.assert_array_equal(stored[name][1].D, get_params(dict(net._children)["layer1"][0].conv1).D)

    other, _, _ = initialised("resnet18_v1b")
    other, _ = convert(other, include="layer*", exclude="layer4.*")
    for p_src, p_dst in zip(net.collect_params().values(), other.collect_params().values()):
        if not p_src.name.endswith(("_W", "_D")):  # everything but the DO-Conv layers from the net itself
            p_dst.set_data(p_src.data())
    before = outputs(other, x)
    import_canonical(other, path)
    want = outputs(net, x)
    assert doconv.max_error(before[0], want[0]) > 1e-3  # randomised D really changed the outputs
    assert_same(outputs(other, x), want, "imported")

    partial, _ = convert(initialised("resnet18_v1b")[0], include="layer1.*")
    with pytest.raises(ValueError, match="does not match the model"):
        import_canonical(partial, path)
    wider, _ = convert(initialised("resnet18_v1b")[0], include="layer*", exclude="layer4.*", D_mul=10)
    with pytest.raises(ValueError, match="the model.s layer is"):
        import_canonical(wider, path)


def test_convert_an_uninitialised_net_gives_deferred_layers():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(8, 3, padding=1), gluon.nn.Conv2D(4, 1), gluon.nn.Conv2D(6, 3, groups=2))
    net, report = convert(net, D_mul=12)
    assert [r.weights for r in report] == ["deferred", "deferred"] and [r.name for r in report] == ["0", "2"]
    assert [r.kind for r in report] == ["DO-Conv", "DO-GConv or DO-DConv (C_in deferred)"]  # C_in unknown
    net.initialize()
    net.hybridize()
    out = net(mx.nd.ones((1, 3, 6, 6)))
    assert out.shape == (1, 6, 4, 4) and net[0].W.shape == (8, 3, 12) and net[2].D.shape == (4, 9, 12)
    x = np.ones((1, 3, 6, 6), dtype="float32")
    for block in net:
        x = doconv.forward(x, get_params(block), block.config) if isinstance(block, DOConv2D) else \
            doconv.conv2d(x, block.weight.data().asnumpy(), block.bias.data().asnumpy())
    doconv.assert_close(out.asnumpy(), x, "float32", "deferred converted net")


def test_set_params_rejects_a_wrong_shape_with_the_layer_name():
    net, _ = convert(initialised("resnet18_v1b")[0], include="layer1.0.*")
    layer = net.layer1[0].conv1
    bad = get_params(layer)
    bad.W = bad.W[:, :-1]
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1.*W has shape \(64, 63, 9\)"):
        set_params(layer, bad, name="layer1.0.conv1")


@pytest.mark.parametrize("padding, dilation", [("same", (1, 1)), ("same", (2, 1)), ("valid", (1, 1))])
def test_import_canonical_accepts_string_padding_resolved_to_gluon_pads(tmp_path, padding, dilation):
    """A torch/keras file may record padding='same'/'valid': it is the Gluon layer with the equal explicit pads."""
    written = doconv.DOConvConfig(6, 4, 3, padding=padding, dilation=dilation, bias=True)
    params = doconv.init_params(written, rng=np.random.default_rng(3))
    params.D = params.D + np.random.default_rng(4).normal(0, 0.2, size=params.D.shape)
    path = tmp_path / "keras.safetensors"
    doconv.save(path, {doconv.ROOT_NAME: (written, params)})  # a bare layer, as torch and keras write it
    layer = DOConv2D(4, 3, padding=(0, 0) if padding == "valid" else dilation, dilation=dilation, in_channels=6)
    layer.initialize()
    import_canonical(layer, path)
    x = np.random.default_rng(5).normal(size=(2, 6, 9, 8)).astype("float32")
    got = layer(mx.nd.array(x)).asnumpy()
    doconv.assert_close(got, doconv.forward(x, params, written), "float32")

    shifted = DOConv2D(4, 3, padding=(1, 0), dilation=dilation, in_channels=6)
    shifted.initialize()
    with pytest.raises(ValueError, match="the model's layer is"):
        import_canonical(shifted, path)


def test_a_bare_layer_is_named_root_in_canonical_files(tmp_path):
    """A bare layer's Gluon name comes from a global counter; files name it doconv.ROOT_NAME, as PyTorch does."""
    a = DOConv2D(4, 3, in_channels=3)
    a.initialize()
    a.D.set_data(mx.nd.array(np.random.default_rng(0).normal(0, 0.3, size=a.D.shape)))
    export_canonical(a, tmp_path / "bare.safetensors")
    assert list(doconv.load(tmp_path / "bare.safetensors")) == [doconv.ROOT_NAME]
    b = DOConv2D(4, 3, in_channels=3)  # another name (doconv2dN+1) in the same process
    b.initialize()
    import_canonical(b, tmp_path / "bare.safetensors")
    x = mx.nd.array(np.random.default_rng(1).normal(size=(1, 3, 6, 6)))
    np.testing.assert_array_equal(b(x).asnumpy(), a(x).asnumpy())


def test_import_canonical_into_a_model_without_doconv_layers_says_convert_first(tmp_path):
    """The plain model a file was exported from a converted twin of: refused (naming convert) and left as it was;
    converted, it loads the file's W' exactly."""
    def plain():
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv2D(4, 3, padding=1, in_channels=3), gluon.nn.Conv2D(5, 3, in_channels=4))
        net.initialize(mx.init.Xavier())
        return net
    twin, _ = convert(plain())
    _randomise_D(twin, 0)
    export_canonical(twin, tmp_path / "twin.safetensors")
    net = plain()
    before = [p.data().asnumpy() for p in net.collect_params().values()]
    with pytest.raises(ValueError, match=r"model has no DOConv2D layer .*HybridSequential.*: convert it first "
                                         r"\(doconv.mxnet.convert\(model\)\)"):
        import_canonical(net, tmp_path / "twin.safetensors")
    for p, b in zip(net.collect_params().values(), before):
        np.testing.assert_array_equal(p.data().asnumpy(), b)
    with pytest.raises(ValueError, match="convert it first"):
        import_canonical(gluon.nn.Conv2D(4, 3, in_channels=3), tmp_path / "twin.safetensors")
    convert(net)
    import_canonical(net, tmp_path / "twin.safetensors")
    x = mx.nd.array(np.random.default_rng(1).normal(size=(1, 3, 6, 6)))
    np.testing.assert_array_equal(net(x).asnumpy(), twin(x).asnumpy())
    doconv.assert_close(net(x).asnumpy(), _core_chain(net, x.asnumpy()), "float32", "converted, then imported")


class _ListOfChildren(gluon.HybridBlock):
    """Gluon 1.x's idiom for a list of children: a list attribute plus register_child."""

    def __init__(self):
        super().__init__()
        with self.name_scope():
            self.convs = [gluon.nn.Conv2D(4, 3, padding=1, in_channels=4) for _ in range(2)]
            for conv in self.convs:
                self.register_child(conv)

    def hybrid_forward(self, F, x):
        for conv in self.convs:
            x = conv(x)
        return x


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_convert_and_fold_reach_children_kept_in_a_list(hybridize):
    net = _ListOfChildren()
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 4, 6, 6)))
    before = net(x).asnumpy()
    net, report = convert(net)
    assert len(report) == 2 and all(type(c) is DOConv2D for c in net.convs)  # what forward runs
    _randomise_D(net, 2)
    want = x.asnumpy()
    for conv in net.convs:
        want = doconv.forward(want, get_params(conv), conv.config)
    doconv.assert_close(net(x).asnumpy(), want, "float32", "converted, D randomised")
    assert doconv.max_error(want, before) > 1e-3
    net = fold(net)
    assert all(type(c) is gluon.nn.Conv2D for c in net.convs)
    doconv.assert_close(net(x).asnumpy(), want, "float32", "folded")


def test_convert_selectors_are_checked():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), gluon.nn.Conv2D(4, 3, in_channels=4))
    net.initialize()
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) \['2'\] match no block path"):
        convert(net, exclude="2")  # a typo must not convert the layer it meant to keep
    with pytest.raises(TypeError, match=r"include must be None, a glob pattern.*include=3"):
        convert(net, include=3)
    _, report = convert(net, include=lambda path, block: path == "1")
    assert [r.name for r in report] == ["1"] and type(net[0]) is gluon.nn.Conv2D and type(net[1]) is DOConv2D
    with pytest.raises(TypeError, match="return_report must be True or False, but got return_report='no'"):
        fold(net, return_report="no")
    assert type(net[1]) is DOConv2D  # checked before anything is folded


def test_convert_and_fold_keep_sharing():
    """One Conv2D at two paths stays one block; Conv2Ds sharing parameters (params=) keep sharing W, D, bias."""
    a = gluon.nn.Conv2D(4, 3, padding=1, in_channels=4)
    b = gluon.nn.Conv2D(4, 3, padding=1, in_channels=4, params=a.params)
    net = gluon.nn.HybridSequential()
    net.add(a, gluon.nn.Activation("relu"), a, b)
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 4, 6, 6)))
    before = net(x).asnumpy()
    net, report = convert(net)
    assert net[0] is net[2] and type(net[0]) is DOConv2D and net[3].W is net[0].W and net[3].D is net[0].D
    assert [r.weights for r in report] == ["kept", "shared with '0'", "tied to '0' (shared parameters)"]
    assert sorted(net.collect_params().keys()) == [f"{net[0].prefix}{k}" for k in ("D", "W", "bias")]  # once
    assert_same([net(x).asnumpy()], [before], "converted")
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    with mx.autograd.record():
        loss = net(x).square().sum()
    loss.backward()
    trainer.step(1)
    params = get_params(net[0])
    want = x.asnumpy()
    for i, block in enumerate(net):
        want = np.maximum(want, 0) if i == 1 else doconv.forward(want, params, net[0].config)
    doconv.assert_close(net(x).asnumpy(), want, "float32", "after a step, all three uses share W and D")
    folded = fold(net)
    assert folded[0] is folded[2] and type(folded[0]) is gluon.nn.Conv2D
    doconv.assert_close(folded(x).asnumpy(), want, "float32", "folded")


def _core_chain(net, x):
    for block in net:
        x = doconv.forward(x, get_params(block), block.config)
    return x


def _plain_deferred_net(**kwargs):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(6, 3, padding=1, **kwargs), gluon.nn.Conv2D(4, 3, groups=2, **kwargs))
    return net


@pytest.mark.parametrize("init", ["xavier", "constant"])
def test_a_converted_deferred_net_is_initialised_as_its_convs_would_be(init):
    """GluonCV's convs are still deferred after ``net.initialize(init)``: the converted layers draw W' with the
    initializer passed to initialize() -- the very kernel the conv would have drawn (same seed), also with
    D_mul > M*N, where W and W' differ in shape -- and bias as the conv's."""
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 4, 6, 6)))
    chosen = {"xavier": mx.init.Xavier(magnitude=2.0), "constant": mx.init.Constant(0.5)}[init]
    mx.random.seed(3)
    plain = _plain_deferred_net()
    plain.initialize(chosen)
    plain(x)
    mx.random.seed(3)
    net = _plain_deferred_net()
    net.initialize(chosen)
    convert(net, D_mul=12)
    net(x)
    for conv, layer in zip(plain, net):
        np.testing.assert_array_equal(doconv.compose(get_params(layer), layer.config), conv.weight.data().asnumpy())
        np.testing.assert_array_equal(layer.bias.data().asnumpy(), conv.bias.data().asnumpy())
    _randomise_D(net, 1)
    doconv.assert_close(net(x).asnumpy(), _core_chain(net, x.asnumpy()), "float32", "randomised D")


@pytest.mark.parametrize("when", ["initialised", "deferred", "never-initialised"])
def test_convert_keeps_each_convs_own_initializers(when):
    """A conv's weight_initializer / bias_initializer pass on: W' and bias as the conv would draw them, also at
    a later initialize() with another (global) initializer, as for the conv."""
    own = dict(weight_initializer=mx.init.Constant(0.25), bias_initializer=mx.init.Constant(3.0))
    net = _plain_deferred_net(**own) if when != "initialised" else gluon.nn.HybridSequential()
    if when == "initialised":
        net.add(gluon.nn.Conv2D(6, 3, padding=1, in_channels=4, **own), gluon.nn.Conv2D(4, 3, groups=2, **own))
    if when != "never-initialised":
        net.initialize(mx.init.Xavier())
    convert(net, D_mul=12)
    if when == "never-initialised":
        net.initialize(mx.init.Xavier())
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype("float32")
    net(mx.nd.array(x))
    for _ in range(2):
        for layer in net:
            kernel = doconv.compose(get_params(layer), layer.config)
            np.testing.assert_array_equal(kernel, np.full(kernel.shape, 0.25, "float32"))
            np.testing.assert_array_equal(layer.bias.data().asnumpy(), np.full(layer.bias.shape, 3.0, "float32"))
        net.initialize(mx.init.Uniform(), force_reinit=True)  # the convs' own initializers win, as in Gluon
    _randomise_D(net, 2)
    doconv.assert_close(net(mx.nd.array(x)).asnumpy(), _core_chain(net, x), "float32", "randomised D")


def test_convert_keeps_frozen_convs_frozen_and_their_multipliers():
    """grad_req, lr_mult, wd_mult of a conv's weight go to W and D, those of its bias to bias: a frozen
    backbone stays frozen through a Trainer step."""
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(6, 3, padding=1, in_channels=4), gluon.nn.Conv2D(4, 3, in_channels=6))
    net.initialize(mx.init.Xavier())
    net[0].collect_params().setattr("grad_req", "null")
    net[1].weight.lr_mult, net[1].weight.wd_mult, net[1].bias.lr_mult, net[1].bias.wd_mult = 0.5, 2.0, 3.0, 0.0
    convert(net)
    frozen, trained = net
    assert [(p.grad_req, p.lr_mult, p.wd_mult) for p in (frozen.W, frozen.D, frozen.bias)] == [("null", 1.0, 1.0)] * 3
    assert [(p.lr_mult, p.wd_mult) for p in (trained.W, trained.D, trained.bias)] == [(0.5, 2.0), (0.5, 2.0),
                                                                                      (3.0, 0.0)]
    assert trained.W.grad_req == trained.D.grad_req == "write"
    _randomise_D(net, 3)
    before = {name: p.data().asnumpy() for name, p in net.collect_params().items()}
    x = mx.nd.array(np.random.default_rng(4).normal(size=(2, 4, 6, 6)))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    with mx.autograd.record():
        loss = net(x).square().sum()
    loss.backward()
    trainer.step(1)
    for p in (frozen.W, frozen.D, frozen.bias):
        np.testing.assert_array_equal(p.data().asnumpy(), before[p.name])
    assert all(np.abs(p.data().asnumpy() - before[p.name]).max() > 0 for p in (trained.W, trained.D))
    doconv.assert_close(net(x).asnumpy(), _core_chain(net, x.asnumpy()), "float32", "after a step")


def test_a_failed_convert_changes_nothing_and_names_the_block_path():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), gluon.nn.Conv2D(4, 5, in_channels=4))
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, 9, 9)))
    before = net(x).asnumpy()
    with pytest.raises(ValueError, match=r"cannot convert layer '1': D_mul must be >= M\*N = 25 .*nothing was "
                                         r"converted"):
        convert(net, D_mul=12)
    assert [type(b) for b in net] == [gluon.nn.Conv2D] * 2
    np.testing.assert_array_equal(net(x).asnumpy(), before)


@pytest.mark.parametrize("flaw", ["shape-not-inferred", "never-initialised"])
def test_a_failed_fold_changes_nothing_and_names_the_block_path(flaw):
    net = gluon.nn.HybridSequential()
    net.add(DOConv2D(4, 3, in_channels=3), DOConv2D(4, 3, in_channels=0 if flaw == "shape-not-inferred" else 4))
    if flaw == "shape-not-inferred":
        net.initialize()
        match = r"cannot fold layer '1': in_channels is not known yet .*nothing was folded"
    else:
        net[0].initialize()
        match = r"cannot fold layer '1': its parameters are not initialised .*nothing was folded"
    with pytest.raises(ValueError, match=match):
        fold(net)
    assert [type(b) for b in net] == [DOConv2D] * 2
    if flaw == "never-initialised":
        net[1].initialize()
    x = np.random.default_rng(0).normal(size=(1, 3, 9, 9)).astype("float32")
    net(mx.nd.array(x))
    _randomise_D(net, 1)
    want = _core_chain(net, x)
    doconv.assert_close(fold(net)(mx.nd.array(x)).asnumpy(), want, "float32", "folded once foldable")
    assert [type(b) for b in net] == [gluon.nn.Conv2D] * 2


def test_a_gluoncv_net_converted_after_initialize_is_the_one_initialize_would_give():
    """resnet18_v1b's convs have no in_channels: still deferred after ``net.initialize(Xavier)`` when converted,
    they draw the same kernels as the plain net would (same seed), so the outputs are the plain net's."""
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, 32, 32)))
    nets = []
    for converted in (False, True):
        mx.random.seed(7)
        net = model_zoo.get_model("resnet18_v1b")
        net.initialize(mx.init.Xavier(magnitude=2.0))
        if converted:
            _, report = convert(net)
            assert len(report) == 17 and {r.weights for r in report} == {"deferred"}
        nets.append((net, net(x).asnumpy()))
    (_, plain), (net, ours) = nets
    np.testing.assert_array_equal(ours, plain)
    _randomise_D(net, 5)
    want = net(x).asnumpy()
    assert doconv.max_error(want, plain) > 1e-3
    doconv.assert_close(fold(net)(x).asnumpy(), want, "float32", "folded, randomised D")
