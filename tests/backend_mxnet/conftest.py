"""Shared helpers of the MXNet backend tests (run in the mxnet environment: numpy<1.24, no torch).

mxnet 1.9.1 and gluoncv 0.10.5 raise DeprecationWarnings at import under numpy 1.23 (NEP 32 financial
functions, the ``np.bool`` alias, distutils' LooseVersion). Those messages, from those modules only, are
filtered below, and so is mxnet's use of SciPy's deprecated ``scipy.sparse.csr`` namespace in
``mx.nd.array``; every other warning still shows.
"""

import importlib
import os
import sys

import numpy as np
import pytest

IMPORT_WARNINGS = [
    r"ignore:In accordance with NEP 32:DeprecationWarning:mxnet\.numpy\.fallback",
    r"ignore:`np\.bool` is a deprecated alias:DeprecationWarning:mxnet\.numpy\.utils",
    r"ignore:distutils Version classes are deprecated:DeprecationWarning:mxnet\.numpy_dispatch_protocol",
    r"ignore:distutils Version classes are deprecated:DeprecationWarning:gluoncv\.check",
    # not at import: mxnet.nd.array(numpy) checks scipy.sparse.csr.csr_matrix, deprecated in SciPy 1.8
    # gluoncv 0.10.5's RPN anchors use the np.float alias (deprecated in NumPy 1.20) when a detector is built
    r"ignore:`np\.float` is a deprecated alias:DeprecationWarning:gluoncv\.model_zoo\.rcnn\.rpn\.anchor",
    r"ignore:Please import `csr_matrix` from the `scipy.sparse` namespace:DeprecationWarning:mxnet\.ndarray\.utils",
]


def pytest_configure(config):
    for line in IMPORT_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


import doconv  # noqa: E402
from doconv.selfcheck import layer_vjp  # noqa: E402
from doconv.mxnet import UNSUPPORTED_FEATURES, get_params, layer_from_config, set_params  # noqa: E402
from doconv.mxnet._mx import gluon, mx  # noqa: E402

#: The shared cases Gluon can express ('same' at stride 1 / 'valid' become symmetric ints in layer_from_config).
GLUON_CASES = doconv.cases.select(UNSUPPORTED_FEATURES)


def build(case, dtype="float32", seed=0, **kwargs):
    """A layer for ``case`` holding ``case.params(seed)`` (randomised D), and those canonical params."""
    params = case.params(seed, dtype)
    layer = layer_from_config(case.config, dtype=dtype, **kwargs)
    set_params(layer, params)
    return layer, params


def run_with_grads(layer, x, cotangent):
    """Forward under autograd, backward with ``cotangent``: (output, {x, W, D, bias} gradients) as NumPy."""
    xn = mx.nd.array(x, dtype=x.dtype)
    xn.attach_grad()
    with mx.autograd.record():
        y = layer(xn)
    y.backward(mx.nd.array(cotangent, dtype=x.dtype))
    grads = {"x": xn.grad.asnumpy(), "W": layer.W.grad().asnumpy()}
    if layer.D is not None:
        grads["D"] = layer.D.grad().asnumpy()
    if layer.bias is not None:
        grads["bias"] = layer.bias.grad().asnumpy()
    return y.asnumpy(), grads


def reference(case, params, x, cotangent):
    """The core's output and gradients (D' gets D's gradient: D = I_fill + D')."""
    return doconv.forward(x, params, case.config), layer_vjp(cotangent, x, params, case.config)


def nd(x, dtype="float32"):
    return mx.nd.array(np.asarray(x), dtype=dtype)


def randomise_D(net, seed):
    """Every D' of ``net`` (Parameters named ``*_D``) drawn from N(0, 0.1): a D that is no identity."""
    rng = np.random.default_rng(seed)
    for layer in (b for b in net.collect_params().values() if b.name.endswith("_D")):
        layer.set_data(mx.nd.array(rng.normal(0, 0.1, size=layer.shape)))


def core_chain(net, x):
    """The core's output of a Sequential of DO-Conv layers, from their parameters as they are."""
    for block in net:
        x = doconv.forward(x, get_params(block), block.config)
    return x


def small_net(hybridize=True, rank=2):
    """Every kind of convolution-like block of one rank: a 3-tap conv at two paths, a single-tap one, a
    transposed conv, a subclass (in 2-D: 3x3, 1x1, Conv2DTranspose, a Conv2D subclass)."""
    conv, transposed = getattr(gluon.nn, f"Conv{rank}D"), getattr(gluon.nn, f"Conv{rank}DTranspose")

    class MyConv(conv):
        pass
    shared = conv(4, 3, padding=1, in_channels=4)
    net = gluon.nn.HybridSequential()
    net.add(conv(4, 3, padding=1, in_channels=3), shared, conv(4, 1, in_channels=4),
            transposed(4, 3, padding=1, in_channels=4), MyConv(4, 3, padding=1, in_channels=4),
            gluon.nn.BatchNorm(in_channels=4), shared)
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    return net


def bench_module(name):
    """A script of bench/ as a module (its directory on sys.path, as when it runs): the benchmarked networks
    are the ones the whole-model tests check."""
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


@pytest.fixture
def tmp_prefix(tmp_path):
    return str(tmp_path / "net")


@pytest.fixture
def h():
    """The helpers above, for test modules (importlib mode: a conftest is not importable by name)."""
    import types
    return types.SimpleNamespace(build=build, run_with_grads=run_with_grads, reference=reference, nd=nd,
                                 randomise_D=randomise_D, core_chain=core_chain, small_net=small_net,
                                 bench_module=bench_module)
