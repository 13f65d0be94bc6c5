"""The Keras DO-Conv layers against the core on the shared case table, on the backend KERAS_BACKEND names:
forward (kernel and feature composition, training and inference, in a ``cached()`` scope), gradients, fold,
``.keras`` files and mixed precision."""

import numpy as np
import pytest
from doconv_keras_testing import (BACKEND, DTYPES, FORMATS, KERAS_CASE_IDS, KERAS_CASES, check_forward_and_grads,
                                  from_layout, inference, make_layer, to_layout, to_numpy)

import doconv
import doconv.tf as dtf
import keras
from doconv import cases


def test_the_backend_is_the_one_asked_for():
    import os
    assert BACKEND == os.environ.get("KERAS_BACKEND", BACKEND)
    assert {c.rank for c in KERAS_CASES} == {1, 2, 3}


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KERAS_CASES, ids=KERAS_CASE_IDS)
def test_forward(case, dtype, data_format):
    """Training and inference outputs, kernel and feature composition, and inside a cached() scope
    (its second call reads the held kernel where the backend serves the scope), vs the core."""
    c, x = case.config, case.input(0, dtype)
    for composition in ("kernel", "feature"):
        layer, params = make_layer(case, dtype, data_format, composition)
        want = doconv.forward(x, params, c)
        with dtf.cached(layer), inference():
            outputs = [(training, layer(to_layout(x, data_format), training=training))
                       for training in (True, False, False)]
        outputs.append((False, layer(to_layout(x, data_format), training=False)))
        for training, y in outputs:
            assert keras.backend.standardize_dtype(y.dtype) == dtype
            doconv.assert_close(from_layout(y, data_format), want, dtype, f"{case.id} {composition} {training}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KERAS_CASES, ids=KERAS_CASE_IDS)
def test_gradients(case, dtype):
    check_forward_and_grads(case, dtype, "channels_last")


@pytest.mark.parametrize("composition", ["kernel", "feature"])
@pytest.mark.parametrize("case_id", ["g3-k3", "dw-x2-k3", "1d-k3-causal-d2", "3d-dw-x2-k3"])
def test_gradients_channels_first_and_feature(case_id, composition):
    check_forward_and_grads(cases.case(case_id), "float64", "channels_first", composition)
    check_forward_and_grads(cases.case(case_id), "float64", "channels_last", composition)


@pytest.mark.parametrize("case", KERAS_CASES, ids=KERAS_CASE_IDS)
def test_fold_matches_the_core(case):
    layer, params = make_layer(case, "float64")
    x = case.input(0, "float64")
    folded = layer.fold()
    assert not isinstance(folded, dtf.BaseDOConv)
    doconv.assert_close(from_layout(folded(to_layout(x, "channels_last")), "channels_last"),
                        doconv.forward(x, params, case.config), "float64", case.id)


@pytest.mark.parametrize("case_id", ["g3-k3-s2-same-2MN", "1d-k3-causal-d2", "3d-k3-s2-same"])
def test_keras_file_round_trip_without_custom_objects(case_id, tmp_path):
    """Importing doconv.tf registers the layers: ``load_model`` needs no ``custom_objects``."""
    case = cases.case(case_id)
    x = to_layout(case.input(0, "float32"), "channels_last")
    inputs = keras.Input(x.shape[1:])
    conv = dtf.layer_from_config(case.config)
    second = dtf.LAYERS[case.rank](4, 3, padding="same", name="second")
    model = keras.Model(inputs, keras.layers.ReLU()(second(conv(inputs))))
    dtf.set_params(conv, case.params(0, "float32"))
    second.D.assign(np.random.default_rng(1).normal(size=tuple(second.D.shape)) * 0.3)
    before = to_numpy(model(x, training=False))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert [type(layer) for layer in loaded.layers[1:3]] == [type(conv), type(second)]
    for training in (False, True):
        np.testing.assert_array_equal(to_numpy(loaded(x, training=training)), before)
    model.save_weights(tmp_path / "w.weights.h5")
    loaded.layers[1].W.assign(np.zeros(loaded.layers[1].W.shape))
    loaded.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(to_numpy(loaded(x, training=False)), before)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("case_id", ["g3-k3-s2-same-2MN", "1d-k3-same-nobias", "3d-dw-x2-k3"])
def test_mixed_precision(case_id, policy):
    """float32 variables, outputs in the compute dtype, within its tolerance of the core in float64."""
    case = cases.case(case_id)
    compute = policy.split("_")[1]
    layer = dtf.layer_from_config(case.config, dtype=policy)
    params = case.params(0, "float32")
    dtf.set_params(layer, params)
    assert keras.backend.standardize_dtype(layer.W.dtype) == "float32" and layer.compute_dtype == compute
    x = to_layout(case.input(0, "float32"), "channels_last")
    want = doconv.forward(case.input(0, "float64"), params.astype("float64"), case.config)
    with dtf.cached(layer), inference():
        outputs = [layer(x, training=training) for training in (True, False, False)]
    for y in outputs:
        assert keras.backend.standardize_dtype(y.dtype) == compute
        doconv.assert_close(from_layout(keras.ops.cast(y, "float32"), "channels_last"), want, compute, case_id)


class _Block(keras.layers.Layer):  # no build(): Keras traces call() in a stateless scope to build it
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = dtf.DOConv2D(3, 3, padding="same")

    def call(self, x):
        return x + self.conv(x)


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = dtf.DOConv2D(4, 3)

    def call(self, x):
        return self.conv(x)


def test_nested_layers_build_their_variables_once():
    import warnings
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 7, 3)).astype("float32")
    inputs = keras.Input((7, 7, 3))
    block = _Block()
    model = keras.Model(inputs, block(inputs))
    assert [w.name for w in model.weights] == ["W", "D", "bias"], model.weights
    block.conv.D.assign(rng.normal(size=tuple(block.conv.D.shape)) * 0.3)
    want = x + to_numpy(block.conv.fold()(x))
    doconv.assert_close(model.predict(x, verbose=0), want, "float32", "block")
    sub = _Subclassed()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sub(x)
    assert len(sub.weights) == 3 and sub.count_params() == 3 * 9 * 4 + 81 * 3 + 4, sub.weights


LOAD_IN_A_FRESH_INTERPRETER = """
import sys, keras
try:
    keras.saving.load_model(sys.argv[1])
except TypeError as error:
    print("without the import:", error)
import doconv.tf
print("with the import:", type(keras.saving.load_model(sys.argv[1]).layers[0]).__name__)
"""


def test_importing_doconv_tf_is_what_registers_the_layers_for_loading(tmp_path):
    """A new process loads a ``.keras`` file with DO-Conv layers after ``import doconv.tf`` (no
    ``custom_objects``); without the import Keras cannot locate the class."""
    import os
    import subprocess
    import sys
    model = keras.Sequential([keras.Input((6, 6, 3)), dtf.DOConv2D(4, 3)])
    model.save(tmp_path / "m.keras")
    out = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_INTERPRETER, str(tmp_path / "m.keras")],
                         capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": BACKEND}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "without the import: " in out.stdout and "Could not locate class 'DOConv2D'" in out.stdout, out.stdout
    assert "with the import: DOConv2D" in out.stdout, out.stdout
