"""convert / fold of 1-D and 3-D Keras models (Sequential and functional, both data formats): Conv1D (causal,
dilated, grouped), DepthwiseConv1D, SeparableConv1D and Conv3D become DO-Conv layers computing the same outputs
at identity init, and fold back into the plain layers computing what the trained DO-Conv layers compute."""

import numpy as np
import pytest
from doconv_tf_testing import FORMATS, randomise_batchnorm, randomise_D

import doconv
import doconv.tf as dtf
import keras

L = keras.layers
rng = np.random.default_rng(0)


def _axis(data_format):
    return -1 if data_format == "channels_last" else 1


def sequential_1d(data_format):
    # 17 steps: no layer's output length equals its channel count, where Keras' own channels_first layers on
    # TensorFlow add the bias along the length (doconv.tf.folded.plain_layer): the plain model would be wrong
    shape = (17, 4) if data_format == "channels_last" else (4, 17)
    common = dict(data_format=data_format, bias_initializer="random_normal")
    return keras.Sequential([
        keras.Input(shape),
        L.Conv1D(8, 3, padding="causal", dilation_rate=2, activation="relu", name="causal", **common),
        L.DepthwiseConv1D(3, depth_multiplier=2, padding="same", name="depthwise", **common),
        L.BatchNormalization(axis=_axis(data_format), name="bn"),
        L.SeparableConv1D(6, 5, padding="same", depth_multiplier=1, name="separable", **common),
        L.Conv1D(6, 3, strides=2, groups=2, name="grouped", **common),
        L.Conv1D(4, 1, name="pointwise", **common),
    ], name="seq1d")


def functional_3d(data_format):
    shape = (4, 6, 5, 3) if data_format == "channels_last" else (3, 4, 6, 5)
    common = dict(data_format=data_format, bias_initializer="random_normal")
    inputs = keras.Input(shape)
    x = L.Conv3D(6, 3, strides=2, padding="same", name="stem", **common)(inputs)
    x = L.BatchNormalization(axis=_axis(data_format), name="bn")(x)
    a = L.Conv3D(6, 3, padding="same", groups=3, activation="relu", name="grouped", **common)(x)
    b = L.Conv3D(6, (3, 1, 1), padding="same", use_bias=False, name="temporal", **common)(x)
    x = L.Conv3D(4, 1, name="pointwise", **common)(L.Add()([a, b]))
    outputs = L.GlobalAveragePooling3D(data_format=data_format)(x)
    return keras.Model(inputs, outputs, name="func3d")


MODELS = {
    "sequential_1d": (sequential_1d, {"causal": "DO-Conv", "depthwise": "DO-DConv", "separable": "DO-DConv",
                                      "grouped": "DO-GConv"}, {"Conv1D": 4, "DepthwiseConv1D": 2}),
    "functional_3d": (functional_3d, {"stem": "DO-Conv", "grouped": "DO-GConv", "temporal": "DO-Conv"},
                      {"Conv3D": 4}),
}


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_and_fold(name, data_format, tmp_path):
    build, kinds, folded_types = MODELS[name]
    keras.utils.set_random_seed(1)
    model = build(data_format)
    randomise_batchnorm(model, rng)
    x = rng.normal(size=(2, *model.inputs[0].shape[1:])).astype("float32")
    before = np.asarray(model(x, training=False))
    converted, report = dtf.convert(model)
    assert {row.path: row.layer.split("(")[0] for row in report.rows("converted")} == kinds
    assert [(row.path, row.reason) for row in report.rows("kept")] == [("pointwise", "pointwise: DO-Conv has no D")]
    do_layers = dtf.doconv_layers(converted)
    rank = 1 if name.endswith("1d") else 3
    assert {type(layer) for layer in do_layers.values()} == {dtf.LAYERS[rank]}
    if rank == 1:
        assert do_layers["causal"].padding == "causal"
    doconv.assert_close(converted(x, training=False), before, "float32", "convert at identity init")

    randomise_D(converted, rng)
    after = np.asarray(converted(x, training=False))
    assert doconv.max_error(after, before) > 1e-3
    folded, fold_report = dtf.fold(converted)
    assert [row.path for row in fold_report] == list(do_layers)
    assert not any(isinstance(sub, dtf.BaseDOConv) for sub in folded._flatten_layers())
    plain = [type(sub).__name__ for sub in folded._flatten_layers() if isinstance(sub, dtf.model.CONV_LIKE)]
    for kind, count in folded_types.items():
        assert plain.count(kind) == count, plain
    assert folded.count_params() == model.count_params()
    doconv.assert_close(folded(x, training=False), after, "float32", "fold")
    np.testing.assert_array_equal(model(x, training=False), before)  # the original is untouched

    converted.save(tmp_path / "converted.keras")
    reloaded = keras.saving.load_model(tmp_path / "converted.keras")
    np.testing.assert_array_equal(np.asarray(reloaded(x, training=False)), after)
    folded.save(tmp_path / "folded.keras")
    doconv.assert_close(keras.saving.load_model(tmp_path / "folded.keras")(x, training=False), after, "float32")


def test_each_converted_1d_layer_is_the_core_layer():
    """The converted layers hold the plain kernels exactly (W[..., :K] = kernel, D = I), as the core says."""
    keras.utils.set_random_seed(2)
    model = sequential_1d("channels_last")
    converted, _ = dtf.convert(model)
    layer = converted.get_layer("causal")
    params = dtf.get_params(layer)
    want = doconv.params_for_kernel(doconv.layouts.hwio_to_oihw(np.asarray(model.get_layer("causal").kernel)),
                                    dtf.layer_config(layer), np.asarray(model.get_layer("causal").bias))
    for field in ("W", "D", "bias"):
        np.testing.assert_array_equal(getattr(params, field), getattr(want, field).astype("float32"))
    x = rng.normal(size=(2, 17, 4)).astype("float32")
    want = doconv.forward(doconv.layouts.nhwc_to_nchw(x), params, dtf.layer_config(layer))
    doconv.assert_close(layer(x), np.maximum(doconv.layouts.nchw_to_nhwc(want), 0), "float32", "causal, ReLU")


def test_convert_options_and_include_reach_1d_and_3d_layers():
    keras.utils.set_random_seed(3)
    model = functional_3d("channels_last")
    converted, report = dtf.convert(model, D_mul=30, include=["stem", "grouped"])
    assert [row.D_mul for row in report.rows("converted")] == [30, 30]
    assert converted.get_layer("stem").D_mul == 30 and not isinstance(converted.get_layer("temporal"), dtf.DOConv3D)
    with pytest.raises(ValueError, match=r"layer 'stem' \(Conv3D\): D_mul must be >= M\*N = 27"):
        dtf.convert(model, D_mul=12)


def test_bare_conv1d_and_conv3d_convert_and_fold():
    for conv, shape in ((L.Conv1D(4, 3, padding="causal", name="c1"), (2, 9, 3)),
                        (L.Conv3D(4, 3, strides=2, name="c3"), (2, 5, 6, 7, 3))):
        x = rng.normal(size=shape).astype("float32")
        want = np.asarray(conv(x))
        layer, report = dtf.convert(conv)
        assert type(layer) is dtf.LAYERS[len(shape) - 2] and [row.action for row in report] == ["converted"]
        doconv.assert_close(layer(x), want, "float32", "converted")
        randomise_D(layer, rng)
        plain, report = dtf.fold(layer)
        assert type(plain) is type(conv) and [row.kind for row in report] == [type(layer).__name__]
        doconv.assert_close(plain(x), layer(x), "float32", "folded")
