"""doconv.mxnet.model: convert / fold (report, copy semantics, sharing, initializers, Trainers) on small nets
and the GluonCV models of the issue (small inputs), including a canonical file of a converted GluonCV net.

Each model is built once (Xavier init, seeded), run once before conversion, once converted (identity init:
W' = the conv's kernel exactly) and once folded back. Faster R-CNN keeps 8 proposals instead of 300 so that its
ROI head (a ResNet stage per proposal) stays cheap; the converted layers are the same.
"""

import threading
import warnings

import numpy as np
import pytest

import doconv
from doconv.contract import ConversionReport
from doconv.mxnet import (DOConv2D, cached, convert, export_canonical, fold, get_params, import_canonical,
                          import_official, named_blocks, set_params)
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
    convs = [(path, type(b), b._kwargs["kernel"]) for path, b, _, _ in named_blocks(net)
             if isinstance(b, (gluon.nn.Conv2D, gluon.nn.Conv2DTranspose))]
    converted, report = convert(net)
    assert converted is not net and n_params(net) == count  # a copy: the model itself is untouched
    assert [(r.path, r.kind.split()[0]) for r in report] == [(p, t.__name__) for p, t, _ in convs]  # every conv
    for row, (_, kind, kernel) in zip(report, convs):
        want = "kept" if kernel == (1, 1) or kind is gluon.nn.Conv2DTranspose else "converted"
        assert row.action == want, row
    kinds = {r.layer.split("(")[0] for r in report.rows("converted")}
    assert kinds == MODELS[name][2] and all(not r.reason for r in report.rows("converted"))
    assert all(r.reason == "pointwise: DO-Conv has no D" and r.kind == "Conv2D 1x1" for r in report.rows("kept"))
    assert not any(type(b) is gluon.nn.Conv2D and b._kwargs["kernel"] != (1, 1)
                   for _, b, _, _ in named_blocks(converted))
    assert str(report).startswith("| path | kind | action |") and f"{len(report.rows('converted'))} converted" \
        in str(report)
    assert_same(outputs(converted, x), base, f"{name} converted")  # the copy builds its own graphs
    assert n_params(converted) > count  # D and the wider W
    assert_same(outputs(net, x), base, f"{name} original, after convert")
    folded, fold_report = fold(converted)
    assert n_params(folded) == count and n_params(converted) > count
    assert [r.path for r in fold_report] == [r.path for r in report.rows("converted")]
    assert {r.action for r in fold_report} == {"folded"} and \
        sum(r.params_after for r in fold_report) == sum(r.params_before for r in report.rows("converted"))
    assert_same(outputs(folded, x), base, f"{name} folded")


def test_canonical_export_import_on_a_converted_model(tmp_path, h):
    net, x, _ = initialised("resnet18_v1b")
    net, report = convert(net, include="layer*", exclude="layer4.*")
    done = report.rows("converted")
    assert done and all(r.path.startswith(("layer1", "layer2", "layer3")) for r in done)
    assert {r.reason for r in report.rows("kept")} >= {"not included", "excluded"}
    h.randomise_D(net, 1)
    path = tmp_path / "resnet18.safetensors"
    assert export_canonical(net, path) is None
    stored = doconv.load(path)
    assert sorted(stored) == sorted(r.path for r in done)
    name = done[0].path
    np.testing.assert_array_equal(stored[name][1].D, get_params(dict(net._children)["layer1"][0].conv1).D)

    other, _, _ = initialised("resnet18_v1b")
    other, _ = convert(other, include="layer*", exclude="layer4.*")
    for p_src, p_dst in zip(net.collect_params().values(), other.collect_params().values()):
        if not p_src.name.endswith(("_W", "_D")):  # everything but the DO-Conv layers from the net itself
            p_dst.set_data(p_src.data())
    before = outputs(other, x)
    assert import_canonical(other, path) == [r.path for r in done]
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
    assert [(r.path, r.action) for r in report] == [("0", "converted"), ("1", "kept"), ("2", "converted")]
    assert all(r.reason.startswith("in_channels deferred") for r in report.rows("converted"))
    assert [r.layer.split("(")[0] for r in report.rows("converted")] == ["DO-Conv", "DO-GConv or DO-DConv"]
    assert "in_channels deferred, out_channels=6" in report[2].layer and report[2].D_mul == 12
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
def test_convert_and_fold_reach_children_kept_in_a_list(hybridize, h):
    net = _ListOfChildren()
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 4, 6, 6)))
    before = net(x).asnumpy()
    net, report = convert(net)
    assert len(report.rows("converted")) == 2 and all(type(c) is DOConv2D for c in net.convs)  # what forward runs
    h.randomise_D(net, 2)
    want = x.asnumpy()
    for conv in net.convs:
        want = doconv.forward(want, get_params(conv), conv.config)
    doconv.assert_close(net(x).asnumpy(), want, "float32", "converted, D randomised")
    assert doconv.max_error(want, before) > 1e-3
    net, _ = fold(net)
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
    net, report = convert(net, include=lambda path, block: path == "1")
    assert [(r.path, r.action, r.reason) for r in report] == [("0", "kept", "not included"), ("1", "converted", "")]
    assert type(net[0]) is gluon.nn.Conv2D and type(net[1]) is DOConv2D
    with pytest.raises(TypeError, match="inplace must be True or False, but got inplace='no'"):
        fold(net, inplace="no")
    with pytest.raises(TypeError, match="inplace must be True or False, but got inplace='yes'"):
        convert(net, inplace="yes")
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
    assert [(r.path, r.action, r.reason, r.shared_with) for r in report if r.kind == "Conv2D"] == [
        ("0", "converted", "", ""), ("2", "converted", "same block as '0' (shared)", "0"),
        ("3", "converted", "W, D and bias tied to '0' (shared Parameters, params=)", "")]
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
    folded, report = fold(net)
    assert [(r.path, r.shared_with) for r in report] == [("0", ""), ("2", "0"), ("3", "")]
    assert folded[0] is folded[2] and type(folded[0]) is gluon.nn.Conv2D
    doconv.assert_close(folded(x).asnumpy(), want, "float32", "folded")


def _plain_deferred_net(**kwargs):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(6, 3, padding=1, **kwargs), gluon.nn.Conv2D(4, 3, groups=2, **kwargs))
    return net


@pytest.mark.parametrize("init", ["xavier", "constant"])
def test_a_converted_deferred_net_is_initialised_as_its_convs_would_be(init, h):
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
    net, _ = convert(net, D_mul=12)
    net(x)
    for conv, layer in zip(plain, net):
        np.testing.assert_array_equal(doconv.compose(get_params(layer), layer.config), conv.weight.data().asnumpy())
        np.testing.assert_array_equal(layer.bias.data().asnumpy(), conv.bias.data().asnumpy())
    h.randomise_D(net, 1)
    doconv.assert_close(net(x).asnumpy(), h.core_chain(net, x.asnumpy()), "float32", "randomised D")


@pytest.mark.parametrize("when", ["initialised", "deferred", "never-initialised"])
def test_convert_keeps_each_convs_own_initializers(when, h):
    """A conv's weight_initializer / bias_initializer pass on: W' and bias as the conv would draw them, also at
    a later initialize() with another (global) initializer, as for the conv."""
    own = dict(weight_initializer=mx.init.Constant(0.25), bias_initializer=mx.init.Constant(3.0))
    net = _plain_deferred_net(**own) if when != "initialised" else gluon.nn.HybridSequential()
    if when == "initialised":
        net.add(gluon.nn.Conv2D(6, 3, padding=1, in_channels=4, **own), gluon.nn.Conv2D(4, 3, groups=2, **own))
    if when != "never-initialised":
        net.initialize(mx.init.Xavier())
    net, _ = convert(net, D_mul=12)
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
    h.randomise_D(net, 2)
    doconv.assert_close(net(mx.nd.array(x)).asnumpy(), h.core_chain(net, x), "float32", "randomised D")


def test_convert_keeps_frozen_convs_frozen_and_their_multipliers(h):
    """grad_req, lr_mult, wd_mult of a conv's weight go to W and D, those of its bias to bias: a frozen
    backbone stays frozen through a Trainer step."""
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(6, 3, padding=1, in_channels=4), gluon.nn.Conv2D(4, 3, in_channels=6))
    net.initialize(mx.init.Xavier())
    net[0].collect_params().setattr("grad_req", "null")
    net[1].weight.lr_mult, net[1].weight.wd_mult, net[1].bias.lr_mult, net[1].bias.wd_mult = 0.5, 2.0, 3.0, 0.0
    net, _ = convert(net)
    frozen, trained = net
    assert [(p.grad_req, p.lr_mult, p.wd_mult) for p in (frozen.W, frozen.D, frozen.bias)] == [("null", 1.0, 1.0)] * 3
    assert [(p.lr_mult, p.wd_mult) for p in (trained.W, trained.D, trained.bias)] == [(0.5, 2.0), (0.5, 2.0),
                                                                                      (3.0, 0.0)]
    assert trained.W.grad_req == trained.D.grad_req == "write"
    h.randomise_D(net, 3)
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
    doconv.assert_close(net(x).asnumpy(), h.core_chain(net, x.asnumpy()), "float32", "after a step")


def test_a_failed_convert_changes_nothing_and_names_the_block_path():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), gluon.nn.Conv2D(4, 5, in_channels=4))
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, 9, 9)))
    before = net(x).asnumpy()
    with pytest.raises(ValueError, match=r"cannot convert layer '1': D_mul must be >= M\*N = 25 .*nothing was "
                                         r"converted"):
        convert(net, D_mul=12, inplace=True)
    assert [type(b) for b in net] == [gluon.nn.Conv2D] * 2
    np.testing.assert_array_equal(net(x).asnumpy(), before)


@pytest.mark.parametrize("flaw", ["shape-not-inferred", "never-initialised"])
def test_a_failed_fold_changes_nothing_and_names_the_block_path(flaw, h):
    net = gluon.nn.HybridSequential()
    net.add(DOConv2D(4, 3, in_channels=3), DOConv2D(4, 3, in_channels=0 if flaw == "shape-not-inferred" else 4))
    if flaw == "shape-not-inferred":
        net.initialize()
        match = r"cannot fold layer '1': in_channels is not known yet .*nothing was folded"
    else:
        net[0].initialize()
        match = r"cannot fold layer '1': its parameters are not initialised .*nothing was folded"
    for inplace in (False, True):
        with pytest.raises(ValueError, match=match):
            fold(net, inplace=inplace)
    assert [type(b) for b in net] == [DOConv2D] * 2
    if flaw == "never-initialised":
        net[1].initialize()
    x = np.random.default_rng(0).normal(size=(1, 3, 9, 9)).astype("float32")
    net(mx.nd.array(x))
    h.randomise_D(net, 1)
    want = h.core_chain(net, x)
    folded, _ = fold(net, inplace=True)
    assert folded is net and [type(b) for b in net] == [gluon.nn.Conv2D] * 2
    doconv.assert_close(net(mx.nd.array(x)).asnumpy(), want, "float32", "folded once foldable")


def test_a_gluoncv_net_converted_after_initialize_is_the_one_initialize_would_give(h):
    """resnet18_v1b's convs have no in_channels: still deferred after ``net.initialize(Xavier)`` when converted,
    they draw the same kernels as the plain net would (same seed), so the outputs are the plain net's."""
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, 32, 32)))
    nets = []
    for converted in (False, True):
        mx.random.seed(7)
        net = model_zoo.get_model("resnet18_v1b")
        net.initialize(mx.init.Xavier(magnitude=2.0))
        if converted:
            net, report = convert(net)
            assert len(report.rows("converted")) == 17 and len(report.rows("kept")) == 3
            assert all(r.reason.startswith("in_channels deferred") for r in report.rows("converted"))
        nets.append((net, net(x).asnumpy()))
    (_, plain), (net, ours) = nets
    np.testing.assert_array_equal(ours, plain)
    h.randomise_D(net, 5)
    want = net(x).asnumpy()
    assert doconv.max_error(want, plain) > 1e-3
    doconv.assert_close(fold(net)[0](x).asnumpy(), want, "float32", "folded, randomised D")


# ---- one API: copies, the report, wrong arguments ---------------------------------------------------------

def _state(net):
    return {name: p.data().asnumpy() for name, p in net.collect_params().items()}


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized-and-run"])
def test_convert_and_fold_copy_unless_inplace(hybridize, h):
    """inplace=False changes a deep copy (own arrays, its own graph, trainable) and leaves the model as it was;
    inplace=True changes the model and returns it."""
    net = h.small_net(hybridize)
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, 3, 6, 6)))
    before, state, types = net(x).asnumpy(), _state(net), [type(b) for b in net]
    copy_, report = convert(net)
    assert copy_ is not net and [type(b) for b in net] == types
    assert [type(b).__name__ for b in copy_][:2] == ["DOConv2D"] * 2 and copy_[1] is copy_[6]
    h.randomise_D(copy_, 3)
    with mx.autograd.record():
        loss = copy_(x).square().sum()
    loss.backward()
    gluon.Trainer(copy_.collect_params(), "sgd", {"learning_rate": 0.1}).step(2)  # the copy trains on its own
    assert all(np.abs(copy_[0].W.grad().asnumpy()).max() > 0 for _ in [0])
    np.testing.assert_array_equal(net(x).asnumpy(), before)
    for name, value in _state(net).items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    want = _mixed_chain(copy_, x.asnumpy())
    doconv.assert_close(copy_(x).asnumpy(), want, "float32", "converted copy, trained, randomised D")

    folded, _ = fold(copy_)
    assert folded is not copy_ and type(copy_[0]) is DOConv2D and type(folded[0]) is gluon.nn.Conv2D
    doconv.assert_close(folded(x).asnumpy(), want, "float32", "folded copy")
    same, _ = convert(net, inplace=True)
    assert same is net and type(net[0]) is DOConv2D
    doconv.assert_close(net(x).asnumpy(), before, "float32", "converted in place")
    again, _ = fold(net, inplace=True)
    assert again is net and type(net[0]) is gluon.nn.Conv2D


def _mixed_chain(net, x):
    """The core's output of a HybridSequential of DO-Conv layers and plain blocks run by Gluon itself."""
    for block in net:
        if isinstance(block, DOConv2D):
            x = doconv.forward(x, get_params(block), block.config)
        else:
            x = block(mx.nd.array(x)).asnumpy()
    return x


def test_the_report_lists_every_convolution_like_block(h):
    net = h.small_net()
    converted, report = convert(net)
    assert isinstance(report, ConversionReport)
    rows = [(r.path, r.kind, r.action, r.reason, r.shared_with) for r in report]
    assert rows == [
        ("0", "Conv2D", "converted", "", ""),
        ("1", "Conv2D", "converted", "", ""),
        ("2", "Conv2D 1x1", "kept", "pointwise: DO-Conv has no D", ""),
        ("3", "Conv2DTranspose", "kept", "transposed convolution", ""),
        ("4", "MyConv", "skipped", "gluon.nn.Conv2D subclass: its hybrid_forward may differ", ""),
        ("6", "Conv2D", "converted", "same block as '1' (shared)", "1")]
    first = report[0]
    assert first.layer == "DO-Conv(3, 4, kernel_size=(3, 3), padding=((1, 1), (1, 1)))" and first.D_mul == 9
    assert (first.params_before, first.params_after) == (4 * 3 * 9 + 4, 4 * 3 * 9 + 3 * 9 * 9 + 4)
    assert report[2].params_before == report[2].params_after == 4 * 4 + 4
    assert report.to_dicts()[5]["shared_with"] == "1"
    assert "2 converted, 2 kept, 1 skipped" in str(report) and "1 more path(s)" in str(report)
    assert [type(b).__name__ for b in converted][2:5] == ["Conv2D", "Conv2DTranspose", "MyConv"]
    _, folded = fold(converted)
    assert [(r.path, r.kind, r.action, r.layer, r.shared_with) for r in folded] == [
        ("0", "DOConv2D", "folded", "Conv2D", ""), ("1", "DOConv2D", "folded", "Conv2D", ""),
        ("6", "DOConv2D", "folded", "Conv2D", "1")]
    assert (folded[0].params_before, folded[0].params_after) == (first.params_after, first.params_before)
    with pytest.raises(ValueError, match=r"the layer at '1' is also used at '6'.*select all of its paths"):
        convert(net, exclude="6")


def test_a_bare_conv_converts_and_a_bare_layer_folds():
    conv = gluon.nn.Conv2D(4, 3, padding=1, in_channels=3)
    conv.initialize(mx.init.Xavier())
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, 5, 5)))
    for inplace in (False, True):
        layer, report = convert(conv, inplace=inplace)
        assert type(layer) is DOConv2D and type(conv) is gluon.nn.Conv2D
        assert [(r.path, r.action) for r in report] == [("", "converted")]
    layer.D.set_data(mx.nd.array(np.random.default_rng(1).normal(0, 0.3, size=layer.D.shape)))
    want = doconv.forward(x.asnumpy(), get_params(layer), layer.config)
    plain, report = fold(layer)
    assert type(plain) is gluon.nn.Conv2D and type(layer) is DOConv2D and [r.path for r in report] == [""]
    doconv.assert_close(plain(x).asnumpy(), want, "float32", "a folded bare layer")


class _Locked(gluon.HybridBlock):
    """A block holding what deepcopy cannot copy (a lock)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        with self.name_scope():
            self.conv = gluon.nn.Conv2D(4, 3, in_channels=3)

    def hybrid_forward(self, F, x):
        return self.conv(x)


def test_a_net_that_cannot_be_copied_asks_for_inplace():
    net = _Locked()
    net.initialize()
    for function in (convert, fold):
        with pytest.raises(ValueError, match=r"cannot be deep-copied \(TypeError: .*lock.*\): pass inplace=True"):
            function(net)
    assert type(net.conv) is gluon.nn.Conv2D
    net, report = convert(net, inplace=True)
    assert type(net.conv) is DOConv2D and [r.path for r in report] == ["conv"]


@pytest.mark.parametrize("call", [
    lambda: convert(object()), lambda: fold(3), lambda: export_canonical([], "x.safetensors"),
    lambda: import_canonical("net", "x.safetensors"), lambda: import_official(None, {})],
    ids=["convert", "fold", "export_canonical", "import_canonical", "import_official"])
def test_a_model_that_is_no_block_is_a_type_error_naming_model(call):
    with pytest.raises(TypeError, match=r"^model must be a mxnet.gluon.Block .*, but got (object|int|list|str|"
                                        r"NoneType)$"):
        call()


def test_convert_checks_its_options_first(h):
    net = h.small_net()
    assert {b.composition for b in convert(net)[0] if isinstance(b, DOConv2D)} == {"kernel"}  # the default
    with pytest.raises(ValueError, match=r"composition must be one of \('kernel', 'feature', 'auto'\), but got "
                                         r"composition='fast'"):
        convert(net, composition="fast")
    with pytest.raises(ValueError, match=r"d_init must be one of \('identity', 'random'\), but got d_init='ones'"):
        convert(net, d_init="ones")
    with pytest.raises(ValueError, match=r"D_mul must be a positive int or None .*D_mul=0"):
        convert(net, D_mul=0)
    assert type(net[0]) is gluon.nn.Conv2D


def test_convert_inside_a_cached_scope_gives_a_copy_no_scope_holds(h):
    net, _ = convert(h.small_net())
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, 6, 6)))
    with cached(net):
        net(x)
        copy_, _ = convert(net)
        assert not any(m in vars(b) for b, in [(b,) for _, b, _, _ in named_blocks(copy_)] + [(copy_,)]
                       for m in ("_build_cache", "export"))
        h.randomise_D(copy_, 5)  # a write no scope promised away: the copy composes afresh
        doconv.assert_close(copy_(x).asnumpy(), _mixed_chain(copy_, x.asnumpy()), "float32", "copy in a scope")


# ---- a Trainer built before convert -----------------------------------------------------------------------

def _train_step(net, trainer, x, **kwargs):
    with mx.autograd.record():
        loss = net(x).square().mean()
    loss.backward()
    trainer.step(1, **kwargs)


def test_a_trainer_built_before_convert_warns_at_its_first_step(h):
    """Its Parameters are the replaced convs' weights: the DO-Conv layers' W and D stay untrained (silently,
    under ignore_stale_grad=True), so its first step after convert warns; a Trainer built after does not."""
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, 3, 6, 6)))
    net = h.small_net()
    old = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    _train_step(net, old, x)
    net, _ = convert(net, inplace=True)
    W = net[0].W.data().asnumpy()
    with pytest.warns(UserWarning, match=r"this gluon.Trainer holds .*conv.*_weight.* the weight of 2 "
                                         r"convolution\(s\) that doconv.mxnet.convert replaced.*Build the Trainer "
                                         r"after convert"):
        _train_step(net, old, x, ignore_stale_grad=True)
    np.testing.assert_array_equal(net[0].W.data().asnumpy(), W)  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _train_step(net, old, x, ignore_stale_grad=True)  # once only
        new = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
        _train_step(net, new, x)
    assert np.isfinite(W).all() and np.abs(net[0].W.data().asnumpy() - W).max() > 1e-4


def test_a_trainer_that_keeps_training_the_original_does_not_warn(h):
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, 3, 6, 6)))
    net = h.small_net()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    _train_step(net, trainer, x)
    converted, _ = convert(net)  # a copy to experiment with; net stays the one trained
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _train_step(net, trainer, x)
    assert all(p._trainer is None for p in converted.collect_params().values())  # the copy has no Trainer
    W = converted[0].W.data().asnumpy()
    _train_step(converted, gluon.Trainer(converted.collect_params(), "sgd", {"learning_rate": 0.1}), x)
    assert np.abs(converted[0].W.data().asnumpy() - W).max() > 1e-4


@pytest.mark.filterwarnings("ignore:Cannot decide type for the following arguments:UserWarning")
def test_a_net_holding_a_symbolblock_converts_as_a_copy(tmp_path, h):
    """A SymbolBlock's graph is its definition, not a cache: the copy keeps it (and the imported weights)."""
    inner = gluon.nn.HybridSequential()
    inner.add(gluon.nn.Conv2D(4, 3, in_channels=3))
    inner.initialize(mx.init.Xavier())
    inner.hybridize()
    x = mx.nd.array(np.random.default_rng(0).normal(size=(1, 3, 7, 7)))
    inner(x)
    inner.export(str(tmp_path / "inner"))
    imported = gluon.SymbolBlock.imports(str(tmp_path / "inner-symbol.json"), ["data"],
                                         str(tmp_path / "inner-0000.params"))
    net = gluon.nn.HybridSequential()
    net.add(imported, gluon.nn.Conv2D(5, 3, in_channels=4))
    net[1].initialize(mx.init.Xavier())
    net.hybridize()
    want = net(x).asnumpy()
    converted, report = convert(net)
    assert [(r.path, r.action) for r in report] == [("1", "converted")]
    h.randomise_D(converted, 1)
    middle = imported(x).asnumpy()
    doconv.assert_close(converted(x).asnumpy(), doconv.forward(middle, get_params(converted[1]), converted[1].config),
                        "float32", "after a SymbolBlock")
    np.testing.assert_array_equal(net(x).asnumpy(), want)


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_frees_the_replaced_convs_at_once(inplace, h):
    """A replaced Gluon block and its _BlockScope refer to each other: without a collection in convert, its weight
    (with its gradient, a kernel set of the net) would outlive the conversion until Python's cycle collector runs.
    Counted with the automatic collector off, on a net that has run (weights and gradients allocated): after
    convert, the Conv2D blocks alive are the model's (unless converted in place) and those the conversion kept,
    none of the replaced ones."""
    import gc

    def live_convs():
        return sum(isinstance(o, gluon.nn.Conv2D) for o in gc.get_objects())
    net = h.small_net(False)
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, 3, 6, 6)))
    with mx.autograd.record():
        net(x).sum().backward()
    gc.collect()
    before = live_convs()
    gc.disable()
    try:
        converted, report = convert(net, inplace=inplace)
        after = live_convs()
    finally:
        gc.enable()
    replaced = len(report.rows("converted"))
    assert replaced > 0 and type(converted[0]).__name__ == "DOConv2D"
    kept = before - replaced  # the single-tap conv and the subclass stay Conv2D blocks (in the copy too)
    assert after == (kept if inplace else before + kept), (before, after, replaced)
