"""Shared helpers of the backend-neutral Keras tests: ``doconv.tf`` on whichever backend ``KERAS_BACKEND`` names.

The suite uses ``keras.ops`` and the small per-backend pieces below (a gradient, a no-gradient context), so
the same tests run on TensorFlow, torch and JAX. Keras reads ``KERAS_BACKEND`` once, at import: each backend
is a separate pytest run (``nox -s tests`` runs TensorFlow and torch, ``nox -s tests-keras-jax`` JAX). Like
``tests/backend_tf/conftest.py``, this module registers itself as ``doconv_keras_testing`` for the test
modules (pytest runs in importlib mode, no test folder on ``sys.path``).
"""

import collections
import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

import doconv  # noqa: E402
import doconv.tf as dtf  # noqa: E402
from doconv import cases, layouts  # noqa: E402
from doconv.selfcheck import layer_vjp  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND == "jax":
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 layers: JAX computes in float32 without it

#: The shared table minus what Keras cannot express (explicit/asymmetric pads, padding modes, stride+dilation).
KERAS_CASES = cases.select(dtf.UNSUPPORTED_FEATURES)
KERAS_CASE_IDS = [c.id for c in KERAS_CASES]
DTYPES = ("float32", "float64")
FORMATS = ("channels_last", "channels_first")
#: Whether an open ``doconv.tf.cached`` scope serves eager inference calls on this backend (on JAX every
#: call composes: its calls that matter are traced, see ``doconv.tf.cache``).
SCOPE_SERVES_EAGER = BACKEND in ("tensorflow", "torch")


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def to_layout(x_nchw, data_format):
    return layouts.nchw_to_nhwc(x_nchw) if data_format == "channels_last" else np.ascontiguousarray(x_nchw)


def from_layout(y, data_format):
    y = to_numpy(y)
    return layouts.nhwc_to_nchw(y) if data_format == "channels_last" else y


def make_layer(case, dtype="float32", data_format="channels_last", composition="kernel", seed=0):
    """A built layer of ``case.rank`` holding ``case.params(seed)`` (D randomised), with those params."""
    params = case.params(seed, dtype)
    layer = dtf.layer_from_config(case.config, dtype=dtype, data_format=data_format, composition=composition)
    dtf.set_params(layer, params)
    return layer, params


def inference():
    """The context of an inference call that needs no gradient: torch's ``no_grad`` (as ``predict`` runs);
    nothing on TensorFlow and JAX, whose eager calls record no gradient unless asked."""
    if BACKEND == "torch":
        import torch
        return torch.no_grad()
    return contextlib.nullcontext()


def _variables(layer):
    return {k: v for k, v in {"W": layer.W, "D": layer.D, "bias": layer.bias}.items() if v is not None}


def layer_grads(layer, x, u, training=True):
    """(y, {x, W, D, bias}) of <u, layer(x)>: the backend's own differentiation, gradients in layer layout.

    TensorFlow: a ``GradientTape``; torch: autograd (``backward``); JAX: ``jax.grad`` of the layer's
    ``stateless_call`` (JAX differentiates functions of values, not variables)."""
    variables = _variables(layer)
    if BACKEND == "tensorflow":
        import tensorflow as tf
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * u)
        grads = tape.gradient(loss, [x] + [v.value for v in variables.values()])
    elif BACKEND == "torch":
        import torch
        x = torch.tensor(x, requires_grad=True)
        for v in variables.values():
            v.value.grad = None
        y = layer(x, training=training)
        (y * torch.as_tensor(u, dtype=y.dtype)).sum().backward()
        grads = [x.grad] + [v.value.grad for v in variables.values()]
        y = y.detach()
    elif BACKEND == "jax":
        import jax.numpy as jnp
        assert [v.path for v in layer.trainable_variables] == [v.path for v in variables.values()]

        def loss(values, x):
            y, _ = layer.stateless_call(values, [v.value for v in layer.non_trainable_variables], x,
                                        training=training)
            return jnp.sum(y * u), y

        (dvalues, dx), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(
            [v.value for v in variables.values()], jnp.asarray(x))
        grads = [dx, *dvalues]
    else:
        pytest.skip(f"no gradient helper for the {BACKEND!r} backend")
    return y, dict(zip(["x"] + list(variables), (to_numpy(g) for g in grads)))


def canonical_grads(grads, data_format):
    grads = {k: to_numpy(v) for k, v in grads.items()}
    out = {"x": from_layout(grads["x"], data_format), "W": grads["W"].transpose(dtf.W_TO_CANONICAL)}
    if "D" in grads:
        out["D"] = grads["D"].transpose(2, 0, 1)
    if "bias" in grads:
        out["bias"] = grads["bias"]
    return out


def check_forward_and_grads(case, dtype, data_format, composition="kernel", run=layer_grads):
    """The layer's output and its gradients for x, W, D, bias against ``doconv.forward`` and the core's VJP;
    ``run(layer, x, u) -> (y, grads in layer layout)`` differentiates (tests/backend_tf passes its
    ``tf.function`` and XLA runners)."""
    layer, params = make_layer(case, dtype, data_format, composition)
    c = case.config
    x = case.input(0, dtype)
    u = np.random.default_rng(7).normal(size=c.output_shape(x.shape)).astype(dtype)
    y, grads = run(layer, to_layout(x, data_format), to_layout(u, data_format))
    doconv.assert_close(from_layout(y, data_format), doconv.forward(x, params, c), dtype, f"{case.id} forward")
    want = layer_vjp(u.astype(np.float64), x.astype(np.float64), params.astype(np.float64), c)
    got = canonical_grads(grads, data_format)
    assert sorted(got) == sorted(want)
    for name in want:
        doconv.assert_close(got[name], want[name], dtype, f"{case.id} d{name}")


class Compositions:
    """Counts ``BaseDOConv._compose`` calls per layer name (a spy on the class): how often W' was composed."""

    def __init__(self, monkeypatch):
        self.counts = collections.Counter()
        original = dtf.BaseDOConv._compose

        def spy(layer, *weights):
            self.counts[layer.name] += 1
            return original(layer, *weights)
        monkeypatch.setattr(dtf.BaseDOConv, "_compose", spy)

    def take(self):
        counts, self.counts = dict(self.counts), collections.Counter()
        return counts


@pytest.fixture
def compositions(monkeypatch):
    return Compositions(monkeypatch)


sys.modules["doconv_keras_testing"] = sys.modules[__name__]
