"""The two whole models of issue 15 in Keras, small: the 1-D TCN (dilated residual Conv1D stack) and the 3-D C3D
(Conv3D + BN + ReLU, two stride-2), built by ``bench/tf_models.py`` (the networks it benchmarks).

Each is converted (outputs identical at identity init), trained a few SGD steps with ``fit`` (every D moves),
folded (outputs identical to the trained twin), exported as a SavedModel (``model.export``) and reloaded, and
round-tripped through ``.keras``, the outputs compared at every stage."""

import numpy as np
import pytest
from doconv_tf_testing import bench_models, randomise_batchnorm

import doconv
import doconv.tf as dtf
import keras
import tensorflow as tf

WHOLE = {  # name -> (build(data_format), number of converted convolutions)
    "tcn": (lambda data_format: bench_models().tcn(True, 24, channels=8, features=6, data_format=data_format), 9),
    "c3d": (lambda data_format: bench_models().c3d(True, 8, frames=4, data_format=data_format), 5),
}


@pytest.mark.parametrize("name, data_format", [("tcn", "channels_last"), ("tcn", "channels_first"),
                                               ("c3d", "channels_last"), ("c3d", "channels_first")])
def test_convert_train_fold_export(name, data_format, tmp_path):
    build, converted_count = WHOLE[name]
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    plain = build(data_format)
    randomise_batchnorm(plain, rng)
    x = rng.normal(size=(4, *plain.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, plain.output_shape[-1], size=4)
    before = np.asarray(plain(x, training=False))

    twin, report = dtf.convert(plain)
    assert len(report.rows("converted")) == converted_count == len(dtf.doconv_layers(twin))
    assert {row.layer.split("(")[0] for row in report.rows("converted")} == {"DO-Conv"}
    doconv.assert_close(twin(x, training=False), before, "float32", f"{name}: convert at identity init")

    start = {path: np.asarray(layer.D) for path, layer in dtf.doconv_layers(twin).items()}
    twin.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = twin.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    moved = {path: float(np.abs(np.asarray(layer.D) - start[path]).max())
             for path, layer in dtf.doconv_layers(twin).items()}
    assert min(moved.values()) > 1e-5, moved  # every D trained, from its identity init
    trained = np.asarray(twin(x, training=False))
    assert doconv.max_error(trained, before) > 1e-3

    folded, fold_report = dtf.fold(twin)
    assert len(fold_report) == converted_count
    assert not any(isinstance(sub, dtf.BaseDOConv) for sub in folded._flatten_layers())
    assert folded.count_params() == plain.count_params()
    doconv.assert_close(folded(x, training=False), trained, "float32", f"{name}: fold")

    folded.export(str(tmp_path / "saved_model"), verbose=False)
    artifact = tf.saved_model.load(str(tmp_path / "saved_model"))  # keep it referenced while serving
    doconv.assert_close(artifact.serve(tf.constant(x)), trained, "float32", f"{name}: SavedModel")

    twin.save(tmp_path / "twin.keras")
    np.testing.assert_array_equal(np.asarray(keras.saving.load_model(tmp_path / "twin.keras")(x, training=False)),
                                  trained)
