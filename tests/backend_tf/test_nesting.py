"""DOConv2D built inside a parent's traced ``call`` (Keras' stateless scope): subclassed models, custom
layers without ``build()``, functional models of them and ``load_model``. (torch backend: test_backends.py.)
"""

import warnings

import numpy as np
import pytest

import doconv
import doconv.tf as dtf
import keras


def _randomise_D(layer, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    layer.D.assign(rng.normal(size=tuple(layer.D.shape)).astype(layer.D.dtype) * scale)


class Subclassed(keras.Model):
    def __init__(self, cls=dtf.DOConv2D, **kwargs):
        super().__init__(**kwargs)
        self.conv = cls(4, 3, padding="same")

    def call(self, x, training=None):
        return self.conv(x, training=training)


@keras.saving.register_keras_serializable("doconv_tests")
class Block(keras.layers.Layer):
    """A residual block without ``build()``: Keras builds it by tracing ``call`` in a stateless scope."""

    def __init__(self, conv="DOConv2D", **kwargs):
        super().__init__(**kwargs)
        self.conv_name = conv
        self.conv = (dtf.DOConv2D if conv == "DOConv2D" else keras.layers.Conv2D)(3, 3, padding="same")
        self.act = keras.layers.ReLU()

    def call(self, x):
        return x + self.act(self.conv(x))

    def get_config(self):
        return {**super().get_config(), "conv": self.conv_name}


def test_subclassed_model_has_the_layers_weights_only_and_trains_them():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 7, 7, 3)).astype("float32"), rng.normal(size=(8, 7, 7, 4)).astype("float32")
    reference = Subclassed(keras.layers.Conv2D)
    reference(x[:1])
    model = Subclassed()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "Gradients do not exist" (orphan variables), no unbuilt state
        model(x[:1])
        assert [w.name for w in model.weights] == ["W", "D", "bias"]
        assert len(model.weights) == len(reference.weights) + 1
        assert model.count_params() == model.conv.count_params() == 3 * 9 * 4 + 81 * 3 + 4
        _randomise_D(model.conv)
        before = [keras.ops.convert_to_numpy(w) for w in model.weights]
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert all(np.abs(np.asarray(w) - b).max() > 1e-4 for w, b in zip(model.weights, before))
    doconv.assert_close(model.predict(x, verbose=0), model.conv.fold()(x), "float32", "predict vs fold")


def test_subclassed_model_built_by_fit():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 7, 7, 3)).astype("float32"), rng.normal(size=(8, 7, 7, 4)).astype("float32")
    model = Subclassed()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert len(model.weights) == 3 and len(model.trainable_weights) == 3
    _randomise_D(model.conv)
    before = [keras.ops.convert_to_numpy(w) for w in model.weights]
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert all(np.abs(np.asarray(w) - b).max() > 1e-4 for w, b in zip(model.weights, before))
    doconv.assert_close(model.predict(x, verbose=0), model.conv.fold()(x), "float32", "predict vs fold")


@pytest.mark.parametrize("conv", ["Conv2D", "DOConv2D"])
def test_custom_layer_without_build_in_a_functional_model(conv, tmp_path):
    x = np.random.default_rng(2).normal(size=(2, 7, 7, 3)).astype("float32")
    inputs = keras.Input((7, 7, 3))
    block = Block(conv)
    model = keras.Model(inputs, block(inputs))
    assert len(model.weights) == (3 if conv == "DOConv2D" else 2)
    if conv == "Conv2D":
        return  # the baseline: it works with Conv2D
    _randomise_D(block.conv)
    want = x + np.maximum(np.asarray(block.conv.fold()(x)), 0)
    doconv.assert_close(model.predict(x, verbose=0), want, "float32", "predict")
    model.save(tmp_path / "block.keras")
    loaded = keras.saving.load_model(tmp_path / "block.keras")
    assert [w.name for w in loaded.weights] == ["W", "D", "bias"]
    doconv.assert_close(loaded.predict(x, verbose=0), want, "float32", "loaded")
