"""convert / fold across model structures: every convolution-like layer in the report, ``SeparableConv2D``
(an Xception-like model), subclassed models and custom layers (walked through their attributes)."""

import numpy as np
import pytest
from doconv_tf_testing import randomise_batchnorm, randomise_D

import doconv
import doconv.tf as dtf
import keras

rng = np.random.default_rng(0)


def _randomise_D(model, scale=0.3):
    randomise_D(model, rng, scale)


def _core_forward(layer, x_nhwc):
    """What the core computes for a DOConv2D with its parameters read back (channels_last)."""
    y = doconv.forward(np.asarray(x_nhwc).transpose(0, 3, 1, 2), dtf.get_params(layer), layer.doconv_config)
    return y.transpose(0, 2, 3, 1)


def test_every_convolution_like_layer_is_in_the_report():
    class MyDepthwise(keras.layers.DepthwiseConv2D):
        pass

    image, sequence, volume = keras.Input((8, 8, 3)), keras.Input((8, 3)), keras.Input((4, 4, 4, 3))
    outputs = [keras.layers.Conv2DTranspose(2, 3, name="up")(image),
               dtf.DOConv2D(2, 3, name="do")(image),
               MyDepthwise(3, name="mine")(image),
               keras.layers.Conv1D(2, 3, name="c1")(sequence),
               keras.layers.SeparableConv1D(2, 3, name="s1")(sequence),
               keras.layers.Conv1D(2, 1, name="pw1")(sequence),
               keras.layers.Conv3D(2, 3, name="c3")(volume),
               keras.layers.Conv3DTranspose(2, 3, name="up3")(volume),
               keras.layers.Conv2D(2, 1, name="pw")(image),
               keras.layers.Conv2D(2, 3, name="c2")(image)]
    model = keras.Model([image, sequence, volume], outputs)
    _, report = dtf.convert(model)
    rows = {row.path: (row.kind, row.action, row.reason) for row in report}
    assert rows == {
        "up": ("Conv2DTranspose", "kept", "transposed convolution: DO-Conv over-parameterizes forward convolutions"),
        "do": ("DOConv2D", "kept", "already DO-Conv"),
        "mine": ("MyDepthwise", "skipped", "DepthwiseConv2D subclass: its call may differ"),
        "c1": ("Conv1D", "converted", ""),
        "s1": ("SeparableConv1D", "converted", ""),
        "pw1": ("Conv1D 1", "kept", "pointwise: DO-Conv has no D"),
        "c3": ("Conv3D", "converted", ""),
        "up3": ("Conv3DTranspose", "kept", "transposed convolution: DO-Conv over-parameterizes forward convolutions"),
        "pw": ("Conv2D 1x1", "kept", "pointwise: DO-Conv has no D"),
        "c2": ("Conv2D", "converted", ""),
    }
    assert all(row.params_before == row.params_after for row in report if row.action != "converted")


def _xception_like(data_format="channels_last"):
    """Xception's pattern, small: a strided stem, then blocks of SeparableConv2D + BatchNorm with a strided
    1x1 Conv2D shortcut, and a last SeparableConv2D with a depth multiplier and an activation."""
    keras.utils.set_random_seed(3)
    L = keras.layers
    kw = dict(data_format=data_format)
    axis = -1 if data_format == "channels_last" else 1
    inputs = keras.Input((16, 16, 3) if data_format == "channels_last" else (3, 16, 16))
    x = L.Conv2D(8, 3, strides=2, use_bias=False, name="stem", **kw)(inputs)
    x = L.ReLU()(L.BatchNormalization(axis=axis)(x))
    for i, width in enumerate((16, 24)):
        shortcut = L.Conv2D(width, 1, strides=2, padding="same", name=f"shortcut{i}", **kw)(x)
        x = L.SeparableConv2D(width, 3, padding="same", use_bias=False, name=f"block{i}_sep1", **kw)(x)
        x = L.ReLU()(L.BatchNormalization(axis=axis)(x))
        x = L.SeparableConv2D(width, 3, padding="same", name=f"block{i}_sep2", **kw)(x)
        x = L.MaxPooling2D(3, strides=2, padding="same", **kw)(x)
        x = L.Add()([x, shortcut])
    x = L.SeparableConv2D(12, 3, depth_multiplier=2, dilation_rate=2, padding="same", activation="relu",
                          name="exit_sep", **kw)(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D(data_format=data_format)(x))
    randomise_batchnorm(model, rng)
    for layer in model.layers:
        if isinstance(layer, L.SeparableConv2D) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape))
    return model


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_an_xception_like_model_converts_every_separable_conv(data_format):
    model = _xception_like(data_format)
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    if data_format == "channels_first":
        x = x.transpose(0, 3, 1, 2)
    before = np.asarray(model(x, training=False))
    separable = [layer.name for layer in model.layers if isinstance(layer, keras.layers.SeparableConv2D)]
    converted, report = dtf.convert(model)
    assert len(separable) == 5 and [row.path for row in report.rows("converted")] == ["stem", *separable]
    assert all(row.layer.startswith("DO-DConv(") and row.layer.endswith(" + Conv2D 1x1")
               for row in report.rows("converted")[1:])
    assert not any(isinstance(layer, keras.layers.SeparableConv2D) for layer in converted._flatten_layers())
    doconv.assert_close(converted(x, training=False), before, "float32", "identity init")
    np.testing.assert_array_equal(model(x, training=False), before)  # the original is untouched
    _randomise_D(converted)
    trained = np.asarray(converted(x, training=False))
    assert doconv.max_error(trained, before) > 1e-3
    # each DO-DConv computes what the core computes from its parameters
    depthwise = converted.get_layer("block0_sep1").layers[0]
    assert depthwise.groups == depthwise.doconv_config.in_channels == 8 and depthwise.doconv_config.kind == "DO-DConv"
    folded, folded_report = dtf.fold(converted)
    assert [row.path for row in folded_report] == ["stem"] + [f"{name}.{name}_depthwise" for name in separable]
    assert not any(isinstance(layer, dtf.DOConv2D) for layer in folded._flatten_layers())
    assert folded.count_params() == model.count_params()
    doconv.assert_close(folded(x, training=False), trained, "float32", "folded")


def test_separable_conv_parts_match_the_core_and_keras():
    """The converted pair is (DO-DConv, 1x1 Conv2D); the DO-DConv equals the core's forward with D random,
    and at identity D the pair equals SeparableConv2D (the depth multiplier's channel order included)."""
    sep = keras.layers.SeparableConv2D(5, 3, strides=2, depth_multiplier=3, padding="same", name="s")
    x = rng.normal(size=(2, 9, 9, 4)).astype("float32")
    want = np.asarray(sep(x))
    sep.bias.assign(rng.normal(size=5))
    want = np.asarray(sep(x))
    model = keras.Sequential([keras.Input((9, 9, 4)), sep])
    converted, _ = dtf.convert(model)
    assert [type(layer).__name__ for layer in converted.layers] == ["DOConv2D", "Conv2D"]  # spliced flat
    doconv.assert_close(converted(x), want, "float32", "identity init")
    depthwise, pointwise = converted.layers
    _randomise_D(converted)
    hidden = _core_forward(depthwise, x)
    doconv.assert_close(depthwise(x), hidden, "float32", "DO-DConv vs the core")
    doconv.assert_close(converted(x), np.asarray(pointwise(hidden)), "float32", "pair")


class Block(keras.layers.Layer):
    """A custom layer holding convolutions in an attribute and in a list."""

    def __init__(self, width=4, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(width, 3, padding="same")
        self.stack = [keras.layers.DepthwiseConv2D(3, padding="same"), keras.layers.ReLU()]

    def call(self, x):
        return x + self.stack[1](self.stack[0](self.conv(x)))


class Net(keras.Model):
    def __init__(self, width=4, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Conv2D(width, 3, padding="same")
        self.block = Block(width)
        self.head = keras.Sequential([keras.layers.SeparableConv2D(6, 3, padding="same"), keras.layers.Conv2D(2, 1)])
        self.by_name = {"last": keras.layers.Conv2D(2, 3)}

    def call(self, x):
        return self.by_name["last"](self.head(self.block(self.stem(x))))


def test_a_subclassed_model_converts_trains_and_folds():
    model = Net()
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    before = np.asarray(model(x))
    converted, report = dtf.convert(model)
    head_sep = model.head.layers[0].name
    assert [(row.path, row.action) for row in report] == [
        ("stem", "converted"), ("block.conv", "converted"), ("block.stack.0", "converted"),
        (f"head.{head_sep}", "converted"), (f"head.{model.head.layers[1].name}", "kept"), ("by_name.last", "converted")]
    assert type(model.stem) is keras.layers.Conv2D and type(model.block.stack[0]) is keras.layers.DepthwiseConv2D
    assert isinstance(converted.stem, dtf.DOConv2D) and isinstance(converted.block.stack[0], dtf.DOConv2D)
    assert isinstance(converted.by_name["last"], dtf.DOConv2D)
    assert not any(isinstance(layer, keras.layers.Conv2D) and layer.kernel_size != (1, 1)
                   for layer in converted._flatten_layers())
    # every variable is tracked once, in order: the model's weights are the layers' (none of the old ones)
    assert len(converted.weights) == len({id(w) for w in converted.weights}) == sum(
        len(layer.weights) for layer in converted._flatten_layers(include_self=False) if not layer._layers)
    doconv.assert_close(converted(x), before, "float32", "identity init")
    doconv.assert_close(converted.stem(x), _core_forward(converted.stem, x), "float32", "stem vs core")
    _randomise_D(converted)
    converted.compile(keras.optimizers.SGD(0.05), "mse")
    D = np.asarray(converted.stem.D)
    converted.fit(x, np.zeros_like(before), epochs=2, batch_size=2, verbose=0)
    assert np.abs(np.asarray(converted.stem.D) - D).max() > 1e-5  # D trains
    trained = converted.predict(x, verbose=0)
    doconv.assert_close(converted.stem(x), _core_forward(converted.stem, x), "float32", "stem vs core, trained")
    folded, report = dtf.fold(converted)
    assert [row.path for row in report] == ["stem", "block.conv", "block.stack.0",
                                            f"head.{head_sep}_depthwise", "by_name.last"]
    assert not any(isinstance(layer, dtf.DOConv2D) for layer in folded._flatten_layers())
    assert folded.count_params() == model.count_params()
    doconv.assert_close(folded(x), trained, "float32", "folded")
    doconv.assert_close(converted(x), trained, "float32", "the converted model after fold")


def test_a_subclassed_model_its_config_cannot_rebuild_is_converted_in_place():
    class Fixed(keras.Model):  # no **kwargs: Keras cannot rebuild it from its config
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(3, 3)

        def call(self, x):
            return self.conv(x)

    model = Fixed()
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    before = np.asarray(model(x))
    with pytest.raises(ValueError, match=r"(?s)cannot copy layer '.*' \(Fixed\).*\*\*kwargs.* or pass inplace=True"):
        dtf.convert(model)
    same, report = dtf.convert(model, inplace=True)
    assert same is model and isinstance(model.conv, dtf.DOConv2D) and report[0].path == "conv"
    assert [w.path.rsplit("/", 1)[-1] for w in model.weights] == ["W", "D", "bias"]
    doconv.assert_close(model(x), before, "float32", "in place")
    _randomise_D(model)
    want = np.asarray(model(x))
    same, _ = dtf.fold(model, inplace=True)
    assert same is model and type(model.conv) is keras.layers.Conv2D and len(model.weights) == 2
    doconv.assert_close(model(x), want, "float32", "folded in place")


def test_a_layer_in_no_replaceable_attribute_is_named():
    class Nested(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.groups_of_layers = [[keras.layers.Conv2D(3, 3)]]  # a list in a list: not walked

        def call(self, x):
            return self.groups_of_layers[0][0](x)

    layer = Nested(name="nested")
    layer(rng.normal(size=(1, 6, 6, 3)).astype("float32"))
    inner = layer.groups_of_layers[0][0].name
    with pytest.raises(ValueError, match=rf"layer '{inner}' \(Conv2D\) in the model \(Nested\) holds convolutions "
                                         r"but is in no attribute .*hold it in an attribute"):
        dtf.convert(layer)


def test_a_shared_layer_becomes_one_doconv_layer():
    class Twice(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(3, 3, padding="same")
            self.again = self.conv

        def call(self, x):
            return self.again(self.conv(x))

    model = Twice()
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    before = np.asarray(model(x))
    converted, report = dtf.convert(model, inplace=True)
    assert [(row.path, row.shared_with) for row in report] == [("conv", ""), ("again", "conv")]
    assert converted.conv is converted.again and len(converted.weights) == 3
    doconv.assert_close(converted(x), before, "float32", "shared")


@keras.saving.register_keras_serializable("doconv_structure_tests")
class Residual(keras.layers.Layer):
    """A custom layer without ``build()`` (Keras builds it by running ``call``), in a functional model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(3, 3, padding="same")

    def call(self, x):
        return x + self.conv(x)


def test_a_custom_layer_in_a_functional_model_converts_and_folds():
    inputs = keras.Input((7, 7, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="head")(Residual(name="res")(inputs)))
    x = rng.normal(size=(2, 7, 7, 3)).astype("float32")
    before = np.asarray(model(x))
    converted, report = dtf.convert(model)
    assert [(row.path, row.action) for row in report] == [("res.conv", "converted"), ("head", "converted")]
    assert type(model.get_layer("res").conv) is keras.layers.Conv2D
    inner = converted.get_layer("res").conv
    assert isinstance(inner, dtf.DOConv2D) and len(converted.weights) == 6
    doconv.assert_close(converted(x), before, "float32", "identity init")
    _randomise_D(converted)
    hidden = x + _core_forward(inner, x)
    doconv.assert_close(converted(x), _core_forward(converted.get_layer("head"), hidden), "float32", "vs the core")
    folded, report = dtf.fold(converted)
    assert [row.path for row in report] == ["res.conv", "head"]
    assert type(folded.get_layer("res").conv) is keras.layers.Conv2D
    doconv.assert_close(folded(x), converted(x), "float32", "folded")
