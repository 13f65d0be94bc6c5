"""One API in three frameworks: the same calls on equivalent models give the same return shapes and report rows.

Each framework that is installed here (torch and Keras in the modern environment, MXNet in its own) builds the
same plain model -- a 3x3 stem, a 1x1 conv, a depthwise 3x3 and a grouped 3x3, channels-first semantics -- in 1,
2 and 3 spatial dimensions, and goes through ``convert``, inference (default and in ``cached``), ``fold``, the
canonical file and the model-argument checks. The expected report rows come from :class:`doconv.DOConvConfig` (parameter counts of W, D and bias), not
from any backend.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import doconv
from doconv import DOConvConfig
from doconv.contract import ConversionReport

#: The plain model, layer by layer: (in, out, kernel, groups). Every layer pads 'same' and has a bias.
LAYERS = ((3, 8, 3, 1), (8, 8, 1, 1), (8, 8, 3, 8), (8, 8, 3, 2))
#: A channels-first input per rank.
SPATIAL = {1: (11,), 2: (9, 9), 3: (5, 6, 7)}


def _config(cin, cout, k, g, rank):
    return DOConvConfig(cin, cout, k, padding="same", groups=g, rank=rank)


def expected_rows(rank):
    """(action, params before, params after, D_mul) per layer: converted unless 1x1 (kept, no D)."""
    rows = []
    for cin, cout, k, g in LAYERS:
        c = _config(cin, cout, k, g, rank)
        before = cout * cin // g * k ** rank + cout
        if k == 1:
            rows.append(("kept", before, before, None))
        else:
            rows.append(("converted", before, int(np.prod(c.W_shape) + np.prod(c.D_shape)) + cout, c.D_mul))
    return rows


class TorchKit:
    name = "torch"

    def __init__(self):
        self.torch = pytest.importorskip("torch")
        self.backend = importlib.import_module("doconv.torch")

    def plain(self, rank):
        nn = self.torch.nn
        self.torch.manual_seed(0)
        conv = getattr(nn, f"Conv{rank}d")
        return nn.Sequential(*[conv(cin, cout, k, padding="same", groups=g) for cin, cout, k, g in LAYERS]).eval()

    def run(self, model, x):
        with self.torch.no_grad():
            return model(self.torch.as_tensor(x)).numpy()

    def randomise_D(self, model):
        with self.torch.no_grad():
            for layer in self.backend.doconv_layers(model).values():
                layer.D.normal_(0, 0.2)

    def is_plain(self, model):
        return all(type(m) in (self.torch.nn.Conv1d, self.torch.nn.Conv2d, self.torch.nn.Conv3d) for m in model)


class KerasKit:
    name = "tf"

    def __init__(self):
        self.keras = pytest.importorskip("keras")
        pytest.importorskip("tensorflow")
        self.backend = importlib.import_module("doconv.tf")

    def plain(self, rank):
        keras = self.keras
        keras.utils.set_random_seed(0)
        layers = [keras.Input((None,) * rank + (3,))]  # named: canonical files match layers by name
        depthwise = getattr(keras.layers, f"DepthwiseConv{rank}D", None)  # Keras has no DepthwiseConv3D
        for i, (cin, cout, k, g) in enumerate(LAYERS):
            if g == cin and g > 1 and depthwise is not None:
                layers.append(depthwise(k, padding="same", name=f"conv{i}"))
            else:
                conv = getattr(keras.layers, f"Conv{rank}D")
                layers.append(conv(cout, k, padding="same", groups=g, name=f"conv{i}"))
        return keras.Sequential(layers)

    def run(self, model, x):
        return np.moveaxis(np.asarray(model(np.moveaxis(x, 1, -1), training=False)), -1, 1)

    def randomise_D(self, model):
        rng = np.random.default_rng(1)
        for layer in self.backend.doconv_layers(model).values():
            layer.D.assign(rng.normal(0, 0.2, size=tuple(layer.D.shape)).astype("float32"))

    def is_plain(self, model):
        return all(type(m).__module__.startswith("keras") for m in model.layers)


class GluonKit:
    name = "mxnet"

    def __init__(self):
        pytest.importorskip("mxnet")
        self.backend = importlib.import_module("doconv.mxnet")
        from doconv.mxnet._mx import gluon, mx
        self.mx, self.gluon = mx, gluon

    def plain(self, rank):
        self.mx.random.seed(0)
        net = self.gluon.nn.HybridSequential()
        conv = getattr(self.gluon.nn, f"Conv{rank}D")
        for cin, cout, k, g in LAYERS:
            net.add(conv(cout, k, padding=k // 2, groups=g, in_channels=cin))
        net.initialize(self.mx.init.Uniform(0.5))
        return net

    def run(self, model, x):
        return model(self.mx.nd.array(x)).asnumpy()

    def randomise_D(self, model):
        for layer in self.backend.doconv_layers(model).values():
            layer.D.set_data(self.mx.nd.random.normal(0, 0.2, shape=layer.D.shape))

    def is_plain(self, model):
        return all(type(m) in (self.gluon.nn.Conv1D, self.gluon.nn.Conv2D, self.gluon.nn.Conv3D) for m in model)


KITS = {"torch": TorchKit, "tf": KerasKit, "mxnet": GluonKit}


@pytest.fixture(params=list(KITS))
def kit(request):
    return KITS[request.param]()


@pytest.fixture(params=[1, 2, 3], ids=lambda rank: f"{rank}d")
def rank(request):
    return request.param


def _input(rank):
    return np.random.default_rng(0).normal(size=(2, 3, *SPATIAL[rank])).astype("float32")


def test_convert_returns_the_model_and_the_same_report_rows(kit, rank):
    plain, X = kit.plain(rank), _input(rank)
    before = kit.run(plain, X)
    converted, report = kit.backend.convert(plain)
    assert isinstance(report, ConversionReport)
    assert [(r.action, r.params_before, r.params_after, r.D_mul) for r in report] == expected_rows(rank)
    assert all(r.reason for r in report if r.action == "kept") and len({r.path for r in report}) == len(LAYERS)
    assert kit.is_plain(plain) and not kit.is_plain(converted)  # a copy: the plain model is untouched
    doconv.assert_close(kit.run(converted, X), before, "float32", "converted at identity init")
    doconv.assert_close(kit.run(plain, X), before, "float32", "the plain model afterwards")


def test_converting_a_converted_model_keeps_its_layers_and_says_so(kit, rank):
    converted, _ = kit.backend.convert(kit.plain(rank))
    kit.randomise_D(converted)
    X = _input(rank)
    trained = kit.run(converted, X)
    again, report = kit.backend.convert(converted)
    rows = [(r.action, r.params_before, r.params_after) for r in report]
    assert rows == [("kept", after, after) for _, _, after, _ in expected_rows(rank)]
    assert [r.reason for r in report] == ["already DO-Conv" if k > 1 else "pointwise: DO-Conv has no D"
                                          for _, _, k, _ in LAYERS]
    doconv.assert_close(kit.run(again, X), trained, "float32", "converted twice")


def test_fold_returns_the_model_and_a_row_per_folded_layer(kit, rank):
    converted, _ = kit.backend.convert(kit.plain(rank))
    X = _input(rank)
    kit.randomise_D(converted)
    trained = kit.run(converted, X)
    with kit.backend.cached(converted):
        doconv.assert_close(kit.run(converted, X), trained, "float32", "in a cached() scope")
    folded, report = kit.backend.fold(converted)
    assert isinstance(report, ConversionReport)
    assert [r.action for r in report] == ["folded"] * 3
    assert [(r.params_before, r.D_mul) for r in report] == [(after, D_mul) for action, _, after, D_mul
                                                            in expected_rows(rank) if action == "converted"]
    assert kit.is_plain(folded)
    doconv.assert_close(kit.run(folded, X), trained, "float32", "folded")


def test_canonical_files_and_convert_first(kit, rank, tmp_path):
    converted, _ = kit.backend.convert(kit.plain(rank))
    X = _input(rank)
    kit.randomise_D(converted)
    path = tmp_path / "m.safetensors"
    kit.backend.export_canonical(converted, path)
    names = list(doconv.load(path))
    assert len(names) == 3
    assert {c.rank for c, _ in doconv.load(path).values()} == {rank}
    target, _ = kit.backend.convert(kit.plain(rank))
    assert kit.backend.import_canonical(target, path) == names
    doconv.assert_close(kit.run(target, X), kit.run(converted, X), "float32", "imported")
    for function in (kit.backend.export_canonical, kit.backend.import_canonical):
        with pytest.raises(ValueError, match="convert it first"):
            function(kit.plain(rank), path)


@pytest.mark.parametrize("function", ["convert", "fold", "cached", "export_canonical", "import_canonical"])
def test_a_model_of_the_wrong_type_is_named(kit, function, tmp_path):
    args = (tmp_path / "m.safetensors",) if "canonical" in function else ()
    with pytest.raises(TypeError, match=r"model must be .*, but got int"):
        result = getattr(kit.backend, function)(3, *args)
        if function == "cached":
            result.__enter__()
