"""convert / fold on keras.applications models (weights=None, 32x32 inputs) and small Sequential, functional
and subclassed models: the reports (one row per convolution-like layer) and the outputs against the core."""

import numpy as np
import pytest
from doconv_tf_testing import config_case, randomise_batchnorm, randomise_D

import doconv
import doconv.tf as dtf
from doconv import layouts
from doconv.contract import ConversionReport
import keras
import tensorflow as tf

rng = np.random.default_rng(0)
X = rng.normal(size=(2, 32, 32, 3)).astype("float32")


def _randomise_D(model, scale=0.3):
    randomise_D(model, rng, scale)


def _convs(model):
    return [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    randomise_batchnorm(model, rng)
    return model


def test_resnet50_convert_and_fold():
    keras.utils.set_random_seed(1)
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    before = np.asarray(model(X, training=False))
    converted, report = dtf.convert(model)
    assert isinstance(report, ConversionReport)
    assert len(report) == len(_convs(model)) == 53
    assert {(row.action, row.reason) for row in report} == {("converted", ""), ("kept", "pointwise: DO-Conv has no D")}
    assert len(report.rows("converted")) == 17
    assert all(row.layer.startswith("DO-Conv(") for row in report.rows("converted"))
    assert {row.D_mul for row in report.rows("converted")} == {9, 49}  # M*N of the 3x3 convs and of the 7x7 stem
    assert "17 converted, 36 kept" in str(report)
    assert sum(isinstance(layer, dtf.DOConv2D) for layer in converted.layers) == 17
    doconv.assert_close(converted(X, training=False), before, "float32", "convert at identity init")
    _randomise_D(converted)
    after = np.asarray(converted(X, training=False))
    assert doconv.max_error(after, before) > 1e-3
    folded, report = dtf.fold(converted)
    assert [(row.action, row.layer) for row in report] == [("folded", "Conv2D")] * 17
    assert [row.path for row in report] == [row.path for row in dtf.convert(model)[1].rows("converted")]
    assert not any(isinstance(layer, dtf.DOConv2D) for layer in folded.layers)
    assert folded.count_params() == model.count_params()
    doconv.assert_close(folded(X, training=False), after, "float32", "fold")


def test_mobilenetv2_depthwise_convert_fold_save_and_export(mobilenet, tmp_path):
    model = mobilenet
    before = np.asarray(model(X, training=False))
    converted, report = dtf.convert(model)
    kinds = [row.layer.split("(")[0] for row in report.rows("converted")]
    assert kinds.count("DO-DConv") == 17 and kinds.count("DO-Conv") == 1
    depthwise = [layer for layer in converted.layers if isinstance(layer, dtf.DOConv2D) and layer.groups > 1]
    assert len(depthwise) == 17 and all(layer.groups == layer.filters for layer in depthwise)
    doconv.assert_close(converted(X, training=False), before, "float32", "convert at identity init")
    _randomise_D(converted)
    after = np.asarray(converted(X, training=False))
    folded, _ = dtf.fold(converted)
    assert sum(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in folded.layers) == 17
    assert folded.count_params() == model.count_params()
    doconv.assert_close(folded(X, training=False), after, "float32", "fold")
    folded.save(tmp_path / "folded.keras")
    reloaded = keras.saving.load_model(tmp_path / "folded.keras")
    np.testing.assert_array_equal(np.asarray(reloaded(X, training=False)), np.asarray(folded(X, training=False)))
    folded.export(str(tmp_path / "saved_model"), verbose=False)
    artifact = tf.saved_model.load(str(tmp_path / "saved_model"))  # keep it referenced while serving
    served = artifact.serve(tf.constant(X))
    doconv.assert_close(served, after, "float32", "SavedModel")


def test_convert_include_exclude_and_random_init(mobilenet):
    names = [row.path for row in dtf.convert(mobilenet)[1].rows("converted")]
    _, report = dtf.convert(mobilenet, include=names[:3])
    assert [row.path for row in report.rows("converted")] == names[:3]
    _, report = dtf.convert(mobilenet, exclude=lambda path, layer: isinstance(layer, keras.layers.DepthwiseConv2D))
    assert [row.layer.split("(")[0] for row in report.rows("converted")] == ["DO-Conv"]
    converted, report = dtf.convert(mobilenet, D_mul=12, include=names[:1])
    assert report.rows("converted")[0].D_mul == 12 and converted.get_layer(names[0]).D_mul == 12
    doconv.assert_close(converted(X, training=False), mobilenet(X, training=False), "float32", "D_mul > MN")
    converted, _ = dtf.convert(mobilenet, d_init="random", include=names[:1])
    fresh, original = converted.get_layer(names[0]), mobilenet.get_layer(names[0])
    assert fresh.d_init == "random" and doconv.max_error(fresh.kernel, original.kernel) > 1e-2
    # the trained kernel and bias stay (W[..., :MN] = kernel), only D is drawn: Table 7's random init
    trained = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c")])
    trained.get_layer("c").kernel.assign(rng.normal(size=(3, 3, 3, 4)))
    trained.get_layer("c").bias.assign(rng.normal(size=4))
    kept = dtf.get_params(dtf.convert(trained, d_init="random")[0].get_layer("c"))
    np.testing.assert_array_equal(kept.W[..., :9].reshape(4, 3, 3, 3),
                                  layouts.hwio_to_oihw(np.asarray(trained.get_layer("c").kernel)))
    np.testing.assert_array_equal(kept.bias, np.asarray(trained.get_layer("c").bias))
    assert abs(kept.D - np.broadcast_to(doconv.identity_fill(9, 9), kept.D.shape)).max() > 0.1
    with pytest.raises(ValueError, match=r"d_init must be one of \('identity', 'random'\), but got d_init='eye'"):
        dtf.convert(mobilenet, d_init="eye")
    with pytest.raises(TypeError, match="include=3"):
        dtf.convert(mobilenet, include=3)


def _three_convs():
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 3, name="conv1"),
                             keras.layers.ReLU(name="act"), keras.layers.Conv2D(4, 3, name="conv2"),
                             keras.layers.Conv2D(4, 5, name="head", bias_initializer="random_normal")])


@pytest.mark.parametrize("include, exclude, converted", [
    (None, "conv*", ["head"]),
    (None, ["conv?", "act"], ["head"]),  # a pattern matching a non-convolution is allowed, as in doconv.torch
    ("conv*", "*2", ["conv1"]),
    (["head", "c*1"], None, ["conv1", "head"]),
    (None, "[ch]*", []),
])
def test_convert_include_exclude_take_glob_patterns(include, exclude, converted):
    model = _three_convs()
    x = rng.normal(size=(2, 12, 12, 3)).astype("float32")
    new, report = dtf.convert(model, include=include, exclude=exclude)
    assert [row.path for row in report.rows("converted")] == converted
    assert [layer.name for layer in new.layers if isinstance(layer, dtf.DOConv2D)] == converted
    kept = {(row.action, row.reason) for row in report if row.path not in converted}
    assert kept <= {("kept", "excluded"), ("kept", "not included")}, kept
    doconv.assert_close(new(x, training=False), model(x), "float32", "identity init")
    if converted:
        _randomise_D(new)  # the converted layers compute W' = D^T W for real: fold must match it
    doconv.assert_close(dtf.fold(new)[0](x), new(x, training=False), "float32", "fold")


@pytest.mark.parametrize("kwargs, match", [
    (dict(exclude="haed"), r"exclude pattern\(s\) \['haed'\] match no layer path.*'conv1', 'act', 'conv2', 'head'"),
    (dict(include=["conv*", "x*"]), r"include pattern\(s\) \['x\*'\] match no layer path"),
    (dict(include="conv1", exclude=["head", "Conv2"]), r"exclude pattern\(s\) \['Conv2'\]"),  # case-sensitive
])
def test_convert_refuses_patterns_that_match_no_layer(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dtf.convert(_three_convs(), **kwargs)
    with pytest.raises(TypeError, match=r"exclude=\[1\]"):
        dtf.convert(_three_convs(), exclude=[1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(D_mul=9), r"^layer 'head' \(Conv2D\): D_mul must be >= M\*N = 25 for kernel_size=\(5, 5\), but got D_mul=9"),
    (dict(D_mul=12, include="head"), r"^layer 'head' \(Conv2D\): D_mul must be >= M\*N = 25 .*but got D_mul=12"),
    (dict(composition="bad"),
     r"^composition must be one of \('kernel', 'feature', 'auto'\), but got composition='bad'$"),
    (dict(D_mul=0), r"^D_mul must be a positive int or None .*but got D_mul=0$"),
])
def test_convert_passes_layer_argument_errors_through(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        dtf.convert(_three_convs(), **kwargs)
    assert "cannot rebuild" not in str(info.value)


def test_sequential_channels_first_convert_fold_keeps_the_original_untouched():
    model = keras.Sequential([keras.Input((3, 9, 9)),
                              keras.layers.Conv2D(8, 3, strides=2, padding="same", data_format="channels_first",
                                                  activation="relu"),
                              keras.layers.Conv2D(8, 3, groups=4, data_format="channels_first"),
                              keras.layers.DepthwiseConv2D(3, depth_multiplier=2, data_format="channels_first",
                                                           padding="same")])
    x = rng.normal(size=(2, 3, 9, 9)).astype("float32")
    before = np.asarray(model(x))
    converted, report = dtf.convert(model)
    assert [row.layer.split("(")[0] for row in report] == ["DO-Conv", "DO-GConv", "DO-DConv"]
    doconv.assert_close(converted(x), before, "float32", "convert")
    _randomise_D(converted)
    folded, _ = dtf.fold(converted)
    doconv.assert_close(folded(x), converted(x, training=False), "float32", "fold")
    # channels_first folds to channels_last plain layers between Permutes (see doconv.tf.folded.plain_layer)
    assert [type(layer).__name__ for layer in folded.layers] == ["Permute", "Conv2D", "Permute"] * 2 + [
        "Permute", "DepthwiseConv2D", "Permute"]
    assert folded.count_params() == model.count_params()
    np.testing.assert_array_equal(model(x), before)  # convert and fold copy, never share variables


@pytest.mark.parametrize("function", [dtf.convert, dtf.fold, dtf.doconv_layers])
def test_model_arguments_of_the_wrong_type_or_unbuilt_are_named(function):
    with pytest.raises(TypeError, match="^model must be a keras Model or Layer, but got int$"):
        function(3)
    with pytest.raises(ValueError, match="not built"):
        function(keras.Sequential([keras.layers.Conv2D(3, 3)]))
    with pytest.raises(TypeError, match="^model must be a keras Model or Layer, but got str$"):
        dtf.cached("model").__enter__()


def test_a_bare_conv_layer_converts_to_a_doconv_layer_and_back():
    conv = keras.layers.Conv2D(4, 3, name="c")
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    want = np.asarray(conv(x))
    layer, report = dtf.convert(conv)
    assert isinstance(layer, dtf.DOConv2D) and [row.path for row in report] == ["c"]
    doconv.assert_close(layer(x), want, "float32", "converted")
    _randomise_D(layer)
    plain, report = dtf.fold(layer)
    assert type(plain) is keras.layers.Conv2D and [row.action for row in report] == ["folded"]
    doconv.assert_close(plain(x), doconv.layouts.nchw_to_nhwc(doconv.forward(
        x.transpose(0, 3, 1, 2), dtf.get_params(layer), layer.doconv_config)), "float32", "folded")
    with pytest.raises(ValueError, match="inplace=True is not possible for a bare layer"):
        dtf.convert(conv, inplace=True)


def test_inplace_is_refused_for_sequential_and_functional_models():
    model = _three_convs()
    for function in (dtf.convert, dtf.fold):
        with pytest.raises(ValueError, match=r"inplace=True is not possible for a Keras Sequential model "
                                             r".*use the returned model"):
            function(model, inplace=True)
    with pytest.raises(TypeError, match="inplace must be True or False, but got inplace='yes'"):
        dtf.convert(model, inplace="yes")


def test_default_composition_is_kernel():
    import inspect
    assert inspect.signature(dtf.convert).parameters["composition"].default == "kernel"
    assert inspect.signature(dtf.DOConv2D).parameters["composition"].default == "kernel"
    converted, _ = dtf.convert(_three_convs())
    assert {layer.composition for layer in dtf.doconv_layers(converted).values()} == {"kernel"}


@pytest.mark.parametrize("case_id, dtype", [("g3-k3", "float32"), ("g3-k3", "float64"), ("k3-same", "float64"),
                                            ("dw-x2-k3", "float32")])
def test_channels_first_fold_matches_the_core(case_id, dtype, tmp_path):
    """A channels_first fold equals the core's forward, in a Sequential and in a functional model.

    g3-k3 has 9 filters on a 9-pixel-wide input: a channels_first keras Conv2D adds its bias along
    the width there (Keras' TF ``ops.add`` bias heuristic), and float64 NCHW Conv2D cannot run on CPU.
    """
    case = doconv.cases.case(case_id)
    config, x = case.config, case.input(0, dtype)
    layer = dtf.layer_from_config(config, dtype=dtype, data_format="channels_first")
    params = case.params(0, dtype)
    dtf.set_params(layer, params)
    want = doconv.forward(x, params, config)
    inputs = keras.Input((config.in_channels, None, None), dtype=dtype)
    sequential = keras.Sequential([inputs, layer])
    functional = keras.Model(inputs, keras.layers.Activation("linear", dtype=dtype)(layer(inputs)))
    for model in (sequential, functional):
        folded, _ = dtf.fold(model)
        assert not any(isinstance(sub, dtf.DOConv2D) for sub in folded._flatten_layers())
        assert folded.count_params() == np.prod(config.kernel_size) * config.in_per_group * config.out_channels + (
            config.out_channels if config.bias else 0)
        doconv.assert_close(folded(x, training=False), want, dtype, f"{case_id} fold {type(model).__name__}")
    folded.save(tmp_path / "folded.keras")
    reloaded = keras.saving.load_model(tmp_path / "folded.keras")
    doconv.assert_close(reloaded(x, training=False), want, dtype, f"{case_id} fold reloaded")


def test_convert_reports_conv2d_subclasses_it_skips():
    class Custom(keras.layers.Conv2D):
        pass

    model = keras.Sequential([keras.Input((8, 8, 3)), Custom(4, 3, name="custom"), keras.layers.Conv2D(4, 3, name="plain")])
    converted, report = dtf.convert(model)
    rows = {row.path: (row.action, row.reason) for row in report}
    assert rows == {"custom": ("skipped", "Conv2D subclass: its call may differ"), "plain": ("converted", "")}
    assert type(converted.get_layer("custom")) is Custom and isinstance(converted.get_layer("plain"), dtf.DOConv2D)


def test_a_bare_layer_moves_to_torch_and_back(tmp_path):
    """A bare Keras layer is written under its name; a one-layer file loads into any bare layer."""
    torch = pytest.importorskip("torch")
    import doconv.torch as dt

    config = doconv.DOConvConfig(3, 4, 3, padding="same", groups=1)
    layer = dtf.layer_from_config(config, dtype="float64", name="my_conv")
    params = config_case("bare", config, (1, 3, 5, 5)).params(0)
    dtf.set_params(layer, params)
    dtf.export_canonical(layer, tmp_path / "bare.safetensors")
    assert list(doconv.load(tmp_path / "bare.safetensors")) == ["my_conv"]
    other = dt.layer_from_config(config, dtype="float64")
    dt.import_canonical(other, tmp_path / "bare.safetensors")
    x = np.random.default_rng(1).normal(size=(1, 3, 5, 5))
    doconv.assert_close(other(torch.tensor(x)).detach().numpy(), doconv.forward(x, params, config), "float64", "torch")
    dt.export_canonical(other, tmp_path / "from_torch.safetensors")  # named doconv.ROOT_NAME
    back = dtf.layer_from_config(config, dtype="float64", name="another_name")
    dtf.import_canonical(back, tmp_path / "from_torch.safetensors")
    np.testing.assert_array_equal(dtf.get_params(back).W, params.W)
    two = tmp_path / "two.safetensors"
    doconv.save(two, {"a": (config, params), "b": (config, params)})
    with pytest.raises(ValueError, match=r"layers the model lacks \['a', 'b'\]"):  # ambiguous: names must match
        dtf.import_canonical(back, two)


@pytest.mark.parametrize("groups", [1, 2, 4], ids=["DO-Conv", "DO-GConv", "DO-DConv"])
def test_fold_of_a_bfloat16_layer(groups):
    """NumPy's einsum refuses ml_dtypes' bfloat16: the fold composes in float32 and casts back."""
    x = rng.normal(size=(2, 7, 7, 4)).astype("float32")
    layer = dtf.DOConv2D(8, 3, groups=groups, dtype="bfloat16")
    layer.build(x.shape)
    layer.D.assign(rng.normal(0, 0.3, layer.D.shape))
    folded, _ = dtf.fold(keras.Sequential([keras.Input((7, 7, 4)), layer]))
    conv = folded.layers[-1]
    depthwise = groups == 4  # groups = C_in: DO-DConv folds into a DepthwiseConv2D
    assert type(conv) is (keras.layers.DepthwiseConv2D if depthwise else keras.layers.Conv2D)
    assert keras.backend.standardize_dtype(conv.kernel.dtype) == "bfloat16"
    params = dtf.get_params(layer).astype(np.float32)
    oihw = doconv.compose(params, layer.doconv_config)
    want = layouts.oihw_to_depthwise_hwcm(oihw, 4) if depthwise else layouts.oihw_to_hwio(oihw)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(conv.kernel, "float32")), want,
                               rtol=1e-2, atol=1e-2)  # bfloat16 keeps 8 bits of mantissa
    reference = doconv.forward(x.transpose(0, 3, 1, 2), params, layer.doconv_config).transpose(0, 2, 3, 1)
    for y in (folded(x), layer(x), layer(x, training=False)):
        y = keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))
        assert np.abs(y - reference).max() <= 0.05 * np.abs(reference).max()
