"""Training on every backend: ``fit`` takes the core's gradient step, and a compiled ``fit`` compiles the
DO-Conv layers once per shape (torch.compile included: no recompilation past torch._dynamo's limit)."""

import logging

import numpy as np
import pytest
from doconv_keras_testing import BACKEND, make_layer, to_layout

import doconv
import doconv.tf as dtf
import keras
from doconv import cases
from doconv.selfcheck import layer_vjp


@pytest.mark.parametrize("case_id", ["g3-k3-s2-same-2MN", "dw-x2-k3", "1d-k3-causal-d2", "3d-k3-s2-same"])
def test_fit_takes_the_cores_gradient_step(case_id):
    """One full-batch SGD step of ``fit`` on the MSE moves W, D and bias by -lr times the core's VJP."""
    case = cases.case(case_id)
    layer, params = make_layer(case, "float32")
    c, lr = case.config, 0.5
    x = case.input(0, "float64")
    p64 = params.astype(np.float64)
    y = doconv.forward(x, p64, c)
    target = np.random.default_rng(5).normal(size=y.shape)
    model = keras.Sequential([keras.Input(to_layout(x, "channels_last").shape[1:]), layer])
    model.compile(keras.optimizers.SGD(lr), "mse")
    model.fit(to_layout(x, "channels_last").astype("float32"), to_layout(target, "channels_last").astype("float32"),
              batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    grads = layer_vjp(2 * (y - target) / y.size, x, p64, c)
    got = dtf.get_params(layer)
    for name in grads.keys() - {"x"}:
        want = getattr(p64, name) - lr * grads[name]
        assert doconv.max_error(getattr(got, name), getattr(params, name)) > 1e-3, f"{name} must move"
        doconv.assert_close(getattr(got, name), want, "float32", f"{case_id} {name} after the step")


def _doconv_model():
    """Four DO-Conv layers of different kinds and shapes (DO-Conv, DO-DConv, DO-GConv with D_mul > MN)."""
    return keras.Sequential([
        keras.Input((6, 6, 4)), dtf.DOConv2D(4, 3, padding="same", activation="relu"),
        dtf.DOConv2D(4, 3, groups=4, padding="same"), dtf.DOConv2D(8, 3, groups=2, D_mul=12, padding="same"),
        dtf.DOConv2D(6, 3, strides=2, padding="same"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_jit_compiled_fit_compiles_once(request, monkeypatch):
    """``model.compile(jit_compile=True)``, two ``fit`` epochs, then two more: the layers are traced when the
    train step is compiled, and no later step composes in Python (a retrace or a fallback to eager would).
    On torch, torch._dynamo must not hit its recompile limit (with the limit lowered to 4 so that a guard
    on each layer, which recompiles once per layer and grad mode, shows with a small model)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 4)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
    model = _doconv_model()
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=True)
    if BACKEND == "torch":
        import torch._dynamo
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 4)
        torch._dynamo.reset()
        records = _Records()
        logger = logging.getLogger("torch._dynamo")
        logger.addHandler(records)
        try:
            model.fit(x, y, epochs=2, batch_size=4, verbose=0)
            model.fit(x, y, epochs=2, batch_size=4, verbose=0)
        finally:
            logger.removeHandler(records)
            torch._dynamo.reset()
        assert not [m for m in records.messages if "recompile_limit" in m or "cache_size_limit" in m], records.messages
        return  # no composition spy on torch: dynamo traces into it, and its counting is a graph break
    compositions = request.getfixturevalue("compositions")
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert set(compositions.take()) == {layer.name for layer in dtf.doconv_layers(model).values()}
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert compositions.take() == {}, "a compiled train step composes nothing in Python"
