"""Shared helpers of the Keras / TensorFlow backend tests.

pytest runs in importlib mode (no test folder on sys.path), and the test modules need these helpers at
import time (for ``parametrize``), so this module registers itself as ``doconv_tf_testing`` in
``sys.modules``; pytest imports every conftest.py before the test modules of its folder.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import doconv.tf as dtf  # noqa: E402
from doconv import cases  # noqa: E402

#: The shared table minus what Keras cannot express (explicit/asymmetric pads, padding modes, stride+dilation).
TF_CASES = cases.select(dtf.UNSUPPORTED_FEATURES)
TF_CASE_IDS = [c.id for c in TF_CASES]
#: A representative subset for the slow modes (tf.function tracing, XLA compilation): 1x1, 'same' with
#: stride 2, D_mul > MN, depthwise with a multiplier, DO-GConv strided with 2MN, grouped dilated; in 1-D
#: causal and dilated, and depthwise; in 3-D 'same' with stride 2, and depthwise with a multiplier (Keras'
#: grouped Conv3D).
SUBSET = [cases.case(i) for i in ("k1x1-g2-s2", "k3-s2-same", "k5-Dmul+3", "dw-x2-k3", "g3-k3-s2-same-2MN",
                                  "g2-k5-d2-same", "1d-k3-causal-d2", "1d-dw-k3", "3d-k3-s2-same", "3d-dw-x2-k3")]
DTYPES = ("float32", "float64")
FORMATS = ("channels_last", "channels_first")


def config_case(id, config, input_shape):
    """A :class:`doconv.cases.Case` for ``config`` (its kwargs carry no rank: the input shape gives it)."""
    kwargs = {k: v for k, v in config.to_dict().items() if k != "rank"}
    case = cases.Case(id, kwargs, tuple(input_shape))
    assert case.config == config, (case.config, config)
    return case


def keras_testing():
    """tests/backend_keras/conftest.py, the helpers of the Keras tests on every backend (pytest registers it as
    ``doconv_keras_testing`` when it collects that folder; loaded here when tests/backend_tf runs alone)."""
    if "doconv_keras_testing" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "backend_keras" / "conftest.py"
        spec = importlib.util.spec_from_file_location("doconv_keras_testing", path)
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["doconv_keras_testing"]


#: Layouts and a layer holding a case's parameters, as every Keras backend's tests make them.
to_layout, from_layout, make_layer = (getattr(keras_testing(), n) for n in ("to_layout", "from_layout", "make_layer"))


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


def check_forward_and_grads(case, dtype, data_format, run):
    """``run(layer, x, u) -> (y, grads)``: the backend-neutral suite's comparison with the core's forward and
    VJP, here with TensorFlow's runners (eager tape, ``tf.function``, XLA)."""
    keras_testing().check_forward_and_grads(case, dtype, data_format, run=run)


def bench_models():
    """``bench/tf_models.py``, where the whole models of the benchmark (``tcn``, ``c3d``, ...) are defined once:
    the tests build the same networks, smaller."""
    bench = Path(__file__).resolve().parents[2] / "bench"
    if "tf_models" not in sys.modules:
        sys.path.insert(0, str(bench))  # tf_models imports its neighbour harness.py
        spec = importlib.util.spec_from_file_location("tf_models", bench / "tf_models.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["tf_models"] = module
    return sys.modules["tf_models"]


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
