"""Shared helpers of the Keras / TensorFlow backend tests.

pytest runs in importlib mode (no test folder on sys.path), and the test modules need these helpers at
import time (for ``parametrize``), so this module registers itself as ``doconv_tf_testing`` in
``sys.modules``; pytest imports every conftest.py before the test modules of its folder.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import doconv  # noqa: E402
import doconv.tf as dtf  # noqa: E402
from doconv import cases, layouts  # noqa: E402
from doconv.selfcheck import layer_vjp  # noqa: E402

#: The shared table minus what Keras cannot express (explicit/asymmetric pads, padding modes, stride+dilation).
TF_CASES = cases.select(dtf.UNSUPPORTED_FEATURES)
TF_CASE_IDS = [c.id for c in TF_CASES]
#: A representative subset for the slow modes (tf.function tracing, XLA compilation): 1x1, 'same' with
#: stride 2, D_mul > MN, depthwise with a multiplier, DO-GConv strided with 2MN, grouped dilated.
SUBSET = [cases.case(i) for i in ("k1x1-g2-s2", "k3-s2-same", "k5-Dmul+3", "dw-x2-k3", "g3-k3-s2-same-2MN",
                                  "g2-k5-d2-same")]
DTYPES = ("float32", "float64")
FORMATS = ("channels_last", "channels_first")


def to_layout(x_nchw, data_format):
    return layouts.nchw_to_nhwc(x_nchw) if data_format == "channels_last" else np.ascontiguousarray(x_nchw)


def from_layout(y, data_format):
    y = np.asarray(y)
    return layouts.nhwc_to_nchw(y) if data_format == "channels_last" else y


def make_layer(case, dtype="float32", data_format="channels_last", composition="kernel", seed=0):
    """A built layer holding ``case.params(seed)`` (D randomised), with those params."""
    params = case.params(seed, dtype)
    layer = dtf.layer_from_config(case.config, dtype=dtype, data_format=data_format, composition=composition)
    dtf.set_params(layer, params)
    return layer, params


def layer_grads(layer, x, u, training=True):
    """(y, {x, W, D, bias}) of <u, layer(x)> with a GradientTape, gradients in canonical layout."""
    x = tf.convert_to_tensor(x)
    variables = {"W": layer.W, "D": layer.D, "bias": layer.bias}
    variables = {k: v for k, v in variables.items() if v is not None}
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(y * u)
    grads = tape.gradient(loss, [x] + [v.value for v in variables.values()])
    return y, dict(zip(["x"] + list(variables), grads))


def canonical_grads(grads, data_format):
    out = {"x": from_layout(grads["x"], data_format), "W": np.asarray(grads["W"]).transpose(dtf.W_TO_CANONICAL)}
    if "D" in grads:
        out["D"] = np.asarray(grads["D"]).transpose(2, 0, 1)
    if "bias" in grads:
        out["bias"] = np.asarray(grads["bias"])
    return out


def check_forward_and_grads(case, dtype, data_format, run):
    """``run(layer, x, u) -> (y, grads)``: compare with the core's forward and :func:`layer_vjp`."""
    layer, params = make_layer(case, dtype, data_format)
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


sys.modules["doconv_tf_testing"] = sys.modules[__name__]


def run_python(code, env=None, timeout=300):
    """Run ``code`` in a fresh interpreter (for settings that must precede TF's initialisation)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def randomise_D(model, rng, scale=0.3):
    """Move every D of ``model`` away from the identity, so that fold has to compose for real."""
    layers = dtf.doconv_layers(model).values()
    assert layers
    for layer in layers:
        if layer.D is not None:
            layer.D.assign(rng.normal(0, scale / np.sqrt(layer.D_mul), layer.D.shape))


def randomise_batchnorm(model, rng):
    """BatchNorm statistics away from (0, 1): converting or folding must carry them over to be seen."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
