"""Whole 1-D and 3-D models: ``convert`` / ``fold`` of Conv1D and Conv3D nets, and the tiny TCN and C3D of the
benchmark (bench/mxnet_models.py's own builders) converted, trained, folded and exported.

Every model is compared with itself before the change (convert at identity init: the same outputs; fold: the
trained twin's outputs) and, layer by layer, with the core (``doconv.forward`` / ``doconv.compose`` of the
parameters read back, D randomised or trained away from the identity). BatchNorm statistics and affine
parameters are randomised first: identity-like BatchNorm hides errors (the DiverseBranchBlock lesson).
"""

import numpy as np
import pytest

import doconv
from doconv.mxnet import DOConv1D, DOConv2D, DOConv3D, convert, doconv_layers, fold, get_params, named_blocks
from doconv.mxnet._mx import gluon, mx

DO_LAYERS = {1: DOConv1D, 2: DOConv2D, 3: DOConv3D}
SPATIAL = {1: (9,), 2: (6, 6), 3: (4, 5, 6)}


def _core_chain(net, x):
    """The core's output of a HybridSequential: DO-Conv layers by ``doconv.forward``, other blocks by Gluon."""
    for block in net:
        if isinstance(block, tuple(DO_LAYERS.values())):
            x = doconv.forward(x, get_params(block), block.config)
        else:
            x = block(mx.nd.array(x)).asnumpy()
    return x


@pytest.mark.parametrize("rank", [1, 3])
def test_convert_and_fold_a_conv_net_of_each_rank(rank, h):
    """Conv1D / Conv3D nets convert as Conv2D nets do: each non-pointwise conv (shared at two paths: one layer)
    becomes a DOConv1D / DOConv3D, the single-tap conv and the transposed conv are kept, a subclass skipped;
    outputs are unchanged at identity init, follow the core once D is randomised, and fold back exactly."""
    conv = getattr(gluon.nn, f"Conv{rank}D")
    net = h.small_net(hybridize=True, rank=rank)
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, 3, *SPATIAL[rank])))
    before = net(x).asnumpy()
    twin, report = convert(net)
    single = "x".join(["1"] * rank)
    assert [(r.path, r.kind, r.action, r.reason, r.shared_with) for r in report] == [
        ("0", f"Conv{rank}D", "converted", "", ""),
        ("1", f"Conv{rank}D", "converted", "", ""),
        ("2", f"Conv{rank}D {single}", "kept", "pointwise: DO-Conv has no D", ""),
        ("3", f"Conv{rank}DTranspose", "kept", "transposed convolution", ""),
        ("4", "MyConv", "skipped", f"gluon.nn.Conv{rank}D subclass: its hybrid_forward may differ", ""),
        ("6", f"Conv{rank}D", "converted", "same block as '1' (shared)", "1")]
    first = report[0]
    assert first.layer.startswith(f"DO-Conv(3, 4, kernel_size={(3,) * rank}") and first.D_mul == 3 ** rank
    assert (first.params_before, first.params_after) == (4 * 3 * 3 ** rank + 4, 4 * 3 * 3 ** rank + 3 * 9 ** rank + 4)
    assert [type(b) for b in twin][:3] == [DO_LAYERS[rank], DO_LAYERS[rank], conv] and twin[1] is twin[6]
    doconv.assert_close(twin(x).asnumpy(), before, "float32", "converted, identity init")

    h.randomise_D(twin, 4)
    want = _core_chain(twin, x.asnumpy())
    assert doconv.max_error(want, before) > 1e-2  # D is no identity any more
    doconv.assert_close(twin(x).asnumpy(), want, "float32", "converted, randomised D")
    folded, fold_report = fold(twin)
    assert [(r.path, r.kind, r.layer, r.shared_with) for r in fold_report] == [
        ("0", f"DOConv{rank}D", f"Conv{rank}D", ""), ("1", f"DOConv{rank}D", f"Conv{rank}D", ""),
        ("6", f"DOConv{rank}D", f"Conv{rank}D", "1")]
    assert [type(b) for b in folded][:3] == [conv] * 3 and folded[1] is folded[6]
    doconv.assert_close(folded(x).asnumpy(), want, "float32", "folded")


# ---- the tiny TCN and C3D -----------------------------------------------------------------------------

#: name: (the tiny net from the benchmark's builder, input shape, rank, number of convolutions)
WHOLE = {
    "tcn": (lambda m: m.tcn(channels=6, width=8, classes=4, dilations=(1, 2)), (3, 6, 16), 1, 5),
    "c3d": (lambda m: m.c3d(channels=3, widths=(4, 6, 6), strides=(1, 2, 1), classes=5), (3, 3, 4, 8, 8), 3, 3),
}


def _randomise_batchnorm(net, rng):
    for name, param in net.collect_params().items():
        if name.endswith(("gamma", "running_var")):
            param.set_data(mx.nd.array(rng.uniform(0.5, 1.5, size=param.shape)))
        elif name.endswith(("beta", "running_mean")):
            param.set_data(mx.nd.array(rng.normal(0, 0.2, size=param.shape)))


def _export_and_import(net, x, prefix):
    """``net`` hybridized, run, exported and loaded back as a SymbolBlock: that block's output."""
    net.hybridize()
    net(x)
    net.export(prefix)
    return gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")(x).asnumpy()


@pytest.mark.filterwarnings("ignore:Cannot decide type for the following arguments:UserWarning")
@pytest.mark.parametrize("name", list(WHOLE))
def test_whole_model_converts_trains_folds_and_exports(name, tmp_prefix, h):
    builder, shape, rank, n_convs = WHOLE[name]
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    net = builder(h.bench_module("mxnet_models"))
    net.initialize(mx.init.Xavier(magnitude=2.0))
    _randomise_batchnorm(net, rng)
    x = mx.nd.array(rng.normal(size=shape))
    base = net(x).asnumpy()

    twin, report = convert(net)
    assert [(r.kind, r.action) for r in report] == [(f"Conv{rank}D", "converted")] * n_convs
    layers = doconv_layers(twin)
    assert len(layers) == n_convs and {type(layer) for layer in layers.values()} == {DO_LAYERS[rank]}
    doconv.assert_close(twin(x).asnumpy(), base, "float32", f"{name} converted at identity init")

    twin.hybridize()
    start = {path: get_params(layer) for path, layer in layers.items()}
    trainer = gluon.Trainer(twin.collect_params(), "sgd", {"learning_rate": 0.2, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    labels = mx.nd.array(rng.integers(0, base.shape[1], size=shape[0]))
    losses = []
    for _ in range(4):
        with mx.autograd.record():
            loss = loss_fn(twin(x), labels)
        loss.backward()
        trainer.step(shape[0])
        losses.append(float(loss.mean().asscalar()))
    assert losses[-1] < losses[0], losses
    for path, layer in layers.items():
        now = get_params(layer)
        assert doconv.max_error(now.D, start[path].D) > 1e-3, f"{path}: D did not move"
        assert doconv.max_error(now.W, start[path].W) > 1e-3, f"{path}: W did not move"
        doconv.assert_close(layer.weight.data().asnumpy(), doconv.compose(now, layer.config), "float32",
                            f"{name} {path} W' after training")
    trained = twin(x).asnumpy()
    assert doconv.max_error(trained, base) > 1e-2

    folded, _ = fold(twin)
    assert doconv_layers(folded) == {}
    kernels = {path: conv.weight.data().asnumpy() for path, conv in _convs(folded, rank).items()}
    assert sorted(kernels) == sorted(layers)
    for path, layer in layers.items():
        doconv.assert_close(kernels[path], doconv.fold(get_params(layer), layer.config)[0], "float32", path)
    doconv.assert_close(folded(x).asnumpy(), trained, "float32", f"{name} folded")
    doconv.assert_close(_export_and_import(folded, x, tmp_prefix + "-folded"), trained, "float32",
                        f"{name} folded, exported, SymbolBlock.imports")
    doconv.assert_close(_export_and_import(twin, x, tmp_prefix + "-twin"), trained, "float32",
                        f"{name} twin, exported, SymbolBlock.imports")


def _convs(net, rank):
    conv = getattr(gluon.nn, f"Conv{rank}D")
    return {path: block for path, block, _, _ in named_blocks(net) if type(block) is conv}
