"""Channels-last Gluon convolutions ('NHWC', 'NDHWC') through convert, fold, the ``weight`` idioms and the files.

Gluon orders a convolution's weight as its data: channels-last, (C_out, *kernel_size, C_in/g). W, D and every
kernel the core sees are channels-first (C_out, C_in/g, *kernel_size) whatever the layout, so each test compares
with the core through :mod:`doconv.layouts` (``nhwc_to_nchw`` moves the weight's channel axis back, as an input's),
with D randomised where the path keeps D. MXNet's CPU Convolution cannot run a channels-last layout at all, so these
tests check kernels, not outputs. ``gluon.nn.Conv1D`` takes 'NCW' only (and so does DOConv1D): no 1-D cases.

The cases take C_in equal to the last kernel size (an RGB 3x3 stem: a weight read channels-first looks plausible
and gives a wrong kernel silently) and C_in different from it, grouped.
"""

import numpy as np
import pytest

import doconv
from doconv.layouts import nchw_to_nhwc, nhwc_to_nchw
from doconv.mxnet import (DOConv2D, DOConv3D, convert, export_canonical, fold, get_params, import_canonical,
                          import_official)
from doconv.mxnet._mx import gluon, mx

LAST = {2: "NHWC", 3: "NDHWC"}
LAYERS = {2: DOConv2D, 3: DOConv3D}
SPATIAL = {2: (5, 6), 3: (4, 5, 6)}
#: (rank, kernel_size, in_channels, groups)
CASES = [(2, (3, 3), 3, 1), (2, (3, 2), 4, 2), (3, (3, 3, 3), 3, 1), (3, (1, 3, 2), 4, 2)]
IDS = [f"{LAST[r]}-k{'x'.join(map(str, k))}-cin{c}-g{g}" for r, k, c, g in CASES]
case = pytest.mark.parametrize("rank, kernel, cin, groups", CASES, ids=IDS)


def plain_conv(rank, kernel, cin, groups, **kwargs):
    return getattr(gluon.nn, f"Conv{rank}D")(6, kernel, padding=1, groups=groups, layout=LAST[rank],
                                             in_channels=cin, **kwargs)


def plain_net(*args, **kwargs):
    net = gluon.nn.HybridSequential()
    net.add(plain_conv(*args, **kwargs))
    return net


def initialised_net(rank, kernel, cin, groups, ctx=None):
    net = plain_net(rank, kernel, cin, groups)
    net.initialize(mx.init.Normal(1.0), ctx=ctx)
    return net


def first_call(net, x):
    """The first call of a hybridized net: it infers the deferred shapes and draws the deferred parameters, then
    fails as MXNet's CPU Convolution does on a channels-last layout (not with a shape inconsistency)."""
    net.hybridize()
    with pytest.raises(mx.base.MXNetError) as info:
        net(x).wait_to_read()
    assert "Shape inconsistent" not in str(info.value)


@case
def test_convert_reads_the_channels_last_weight(rank, kernel, cin, groups):
    """The converted layer takes C_in from the weight's last axis and starts at the conv's kernel moved to the
    canonical layout (W' equal to it exactly, bias as the conv's); the report shows that C_in."""
    net = initialised_net(rank, kernel, cin, groups)
    weight, bias = (p.data().asnumpy() for p in (net[0].weight, net[0].bias))
    converted, report = convert(net)
    layer = converted[0]
    assert (type(layer), layer.in_channels, layer.layout) == (LAYERS[rank], cin, LAST[rank])
    params = get_params(layer)
    np.testing.assert_array_equal(doconv.compose(params, layer.config), nhwc_to_nchw(weight))
    np.testing.assert_array_equal(params.bias, bias)
    [row] = report.rows("converted")
    assert row.layer.startswith(f"{layer.config.kind}({cin}, 6, kernel_size={kernel}")
    after = sum(int(np.prod(p.shape)) for p in layer.collect_params().values())
    assert (row.params_before, row.params_after) == (weight.size + bias.size, after)


@case
def test_fold_writes_the_channels_last_weight(rank, kernel, cin, groups, h):
    """The folded conv has the layer's layout and holds the core's folded kernel (randomised D) in that layout's
    weight order, the shape a Gluon conv of that layout has; converting it back gives the same W'."""
    layer = LAYERS[rank](6, kernel, padding=1, groups=groups, in_channels=cin, layout=LAST[rank])
    layer.initialize(mx.init.Normal(1.0))
    h.randomise_D(layer, 3)
    kernel_want, bias_want = doconv.fold(get_params(layer), layer.config)
    conv, report = fold(layer)
    assert type(conv) is layer.plain and conv._kwargs["layout"] == LAST[rank]
    assert conv.weight.shape == plain_conv(rank, kernel, cin, groups).weight.shape
    np.testing.assert_array_equal(conv.weight.data().asnumpy(), nchw_to_nhwc(kernel_want))
    np.testing.assert_array_equal(conv.bias.data().asnumpy(), bias_want)
    assert [(r.action, r.layer) for r in report] == [("folded", layer.plain.__name__)]
    back, _ = convert(conv)
    np.testing.assert_array_equal(doconv.compose(get_params(back), back.config), kernel_want)


@pytest.mark.parametrize("when", ["deferred", "never-initialised"])
@case
def test_an_uninitialised_channels_last_conv_converts_to_the_kernel_it_would_draw(rank, kernel, cin, groups, when):
    """A conv without in_channels stays deferred (its weight's unknown C_in/g is its last axis) until an input
    shows C_in on its channel axis; one never initialised knows C_in. Either way W' is the very kernel the conv
    would have drawn (same seed): Xavier's fans and the order of the draws follow the Gluon weight's shape."""
    given = 0 if when == "deferred" else cin
    x = mx.nd.ones((1, *SPATIAL[rank], cin))
    init = mx.init.Xavier(magnitude=2.0)
    mx.random.seed(3)
    theirs = plain_net(rank, kernel, given, groups)
    theirs.initialize(init)
    if when == "deferred":
        first_call(theirs, x)
    mx.random.seed(3)
    net = plain_net(rank, kernel, given, groups)
    if when == "deferred":
        net.initialize(init)
    ours, report = convert(net)
    layer = ours[0]
    assert layer.in_channels == given
    assert layer.weight.shape == plain_conv(rank, kernel, given, groups).weight.shape
    [row] = report.rows("converted")
    if when == "deferred":
        kind = "DO-Conv" if groups == 1 else "DO-GConv or DO-DConv"
        assert row.layer.startswith(f"{kind}(in_channels deferred, out_channels=6, kernel_size={kernel}")
    else:
        assert row.layer.startswith(f"{layer.config.kind}({cin}, 6, kernel_size={kernel}")
    if when == "deferred":
        first_call(ours, x)
    else:
        mx.random.seed(3)
        ours.initialize(init)
    assert layer.in_channels == cin
    np.testing.assert_array_equal(doconv.compose(get_params(layer), layer.config),
                                  nhwc_to_nchw(theirs[0].weight.data().asnumpy()))


@case
def test_the_conv_weight_idioms_give_the_gluon_layout_of_a_channels_last_layer(rank, kernel, cin, groups, h):
    """``net.<path>.weight`` of a converted channels-last net reads as the conv's weight did: its shape, W' in
    its order on every context (randomised D), and gradients of a function of it reach W and D as the core's
    compose_vjp says."""
    ctxs = [mx.cpu(0), mx.cpu(1)]
    net = initialised_net(rank, kernel, cin, groups, ctx=ctxs)
    original = net[0].weight.data(ctxs[0]).asnumpy()
    converted, _ = convert(net)
    layer = converted[0]
    assert layer.weight.shape == original.shape
    np.testing.assert_array_equal(layer.weight.data(ctxs[0]).asnumpy(), original)
    h.randomise_D(converted, 4)
    params = get_params(layer)
    want = nchw_to_nhwc(doconv.compose(params, layer.config))
    for ctx, data in zip(ctxs, layer.weight.list_data()):
        assert data.context == ctx
        doconv.assert_close(data.asnumpy(), want, "float32", str(ctx))
    cotangent = np.random.default_rng(5).normal(size=original.shape).astype("float32")
    with mx.autograd.record():
        loss = (layer.weight.data(ctxs[1]) * mx.nd.array(cotangent, ctx=ctxs[1])).sum()
    loss.backward()
    dW, dD = doconv.compose_vjp(nhwc_to_nchw(cotangent), params, layer.config)
    doconv.assert_close(layer.W.grad(ctxs[1]).asnumpy(), dW, "float32", "dW")
    doconv.assert_close(layer.D.grad(ctxs[1]).asnumpy(), dD, "float32", "dD")


@case
def test_canonical_files_of_a_converted_channels_last_net(rank, kernel, cin, groups, tmp_path):
    """export_canonical writes the conv's kernel in the canonical layout; import_canonical (randomised D) puts
    the file's W' into another channels-last net, whose weight reads it in the Gluon layout."""
    net = initialised_net(rank, kernel, cin, groups)
    original = net[0].weight.data().asnumpy()
    ours, _ = convert(net)
    path = str(tmp_path / "net.npz")
    export_canonical(ours, path)
    [(name, (config, params))] = doconv.load(path).items()
    assert name == "0" and config == ours[0].config
    np.testing.assert_array_equal(doconv.compose(params, config), nhwc_to_nchw(original))
    params.D = params.D + np.random.default_rng(6).normal(0, 0.1, size=params.D.shape).astype(params.D.dtype)
    doconv.save(path, {name: (config, params)})
    other, _ = convert(initialised_net(rank, kernel, cin, groups))
    assert import_canonical(other, path) == ["0"]
    doconv.assert_close(other[0].weight.data().asnumpy(), nchw_to_nhwc(doconv.compose(params, config)), "float32",
                        "imported")


def test_official_arrays_give_a_channels_last_layer_the_channels_first_layers_kernel():
    """The official GluonCV layer takes 'NCHW' only, so its arrays hold a channels-first weight whatever our
    layer's layout: an 'NHWC' DOConv2D loading them holds the W' an 'NCHW' one does, read in its own layout."""
    rng = np.random.default_rng(7)
    arrays = {"weight": rng.normal(size=(6, 2, 3, 3)), "D": rng.normal(0, 0.3, size=(9, 9, 4)),
              "bias": rng.normal(size=6)}
    first, last = (DOConv2D(6, 3, padding=1, groups=2, in_channels=4, layout=layout) for layout in ("NCHW", "NHWC"))
    for layer in (first, last):
        layer.initialize()
        import_official(layer, arrays)
    ours, theirs = get_params(last), get_params(first)
    for key in ("W", "D", "bias"):
        np.testing.assert_array_equal(getattr(ours, key), getattr(theirs, key))
    doconv.assert_close(last.weight.data().asnumpy(), nchw_to_nhwc(first.weight.data().asnumpy()), "float32",
                        "official")
