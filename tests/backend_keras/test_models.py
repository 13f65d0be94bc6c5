"""convert / fold / doconv_layers / canonical files on the model forms Keras users write, on every backend:
a subclassed model holding convolutions in attributes and in a list, and a functional model around a custom
layer that holds one. (On torch a Keras layer is a ``torch.nn.Module``, whose attributes live elsewhere.)"""

import numpy as np
import pytest
from doconv_keras_testing import to_numpy

import doconv.tf as dtf
import keras


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Conv2D(8, 3, padding="same")
        self.blocks = [keras.layers.Conv2D(8, 3, padding="same"), keras.layers.DepthwiseConv2D(3, padding="same")]
        self.head = keras.layers.Dense(2)

    def call(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(keras.ops.mean(x, axis=(1, 2)))


class Holder(keras.layers.Layer):
    """A custom layer holding a convolution in an attribute."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(6, 3, padding="same")

    def call(self, x):
        return keras.ops.relu(self.conv(x))


def _functional():
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Conv2D(4, 1)(Holder(name="holder")(inputs)))


@pytest.mark.parametrize("build, paths", [(Subclassed, {"stem", "blocks.0", "blocks.1"}),
                                          (_functional, {"holder.conv"})], ids=["subclassed", "custom-layer"])
def test_convert_fold_and_canonical_files_reach_attributes(build, paths, tmp_path):
    keras.utils.set_random_seed(0)
    model = build()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    before = to_numpy(model(x))
    converted, report = dtf.convert(model)
    assert {r.path for r in report if r.action == "converted"} == paths
    np.testing.assert_allclose(to_numpy(converted(x)), before, rtol=1e-4, atol=1e-5)
    rng = np.random.default_rng(1)
    layers = dtf.doconv_layers(converted)
    assert set(layers) == paths
    for layer in layers.values():
        layer.D.assign(rng.normal(0, 0.2, size=tuple(layer.D.shape)).astype("float32"))
    trained = to_numpy(converted(x))
    assert np.abs(trained - before).max() > 1e-3  # D moved the outputs
    dtf.export_canonical(converted, tmp_path / "m.safetensors")
    folded, report = dtf.fold(converted)
    assert {r.path for r in report} == paths and not dtf.doconv_layers(folded)
    np.testing.assert_allclose(to_numpy(folded(x)), trained, rtol=1e-4, atol=1e-5)
    again, _ = dtf.convert(folded)  # the folded model's kernels back into a DO-Conv twin, from the file's D and W
    dtf.import_canonical(again, tmp_path / "m.safetensors")
    np.testing.assert_allclose(to_numpy(again(x)), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_a_kernel_constraint_with_axes_keeps_its_meaning_on_W(rank):
    """``MaxNorm(axis=[kernel positions..., C_in])``, Keras' per-filter idiom for a conv kernel, bounds each filter of
    W (C_in/g, D_mul, filters) too: the kernel positions map to D_mul, C_in and filters keep their axes. The layer's
    config and its fold keep the constraint as the user gave it (kernel axes)."""
    axes = list(range(rank + 1))
    conv = getattr(dtf, f"DOConv{rank}D")(4, 3, padding="same", kernel_constraint=keras.constraints.MaxNorm(1.0, axes),
                                          kernel_initializer=keras.initializers.RandomNormal(stddev=3.0))
    conv.build((None, *(6,) * rank, 3))
    constrained = to_numpy(conv.W.constraint(conv.W))
    norms = np.sqrt((constrained ** 2).sum(axis=(0, 1)))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # each filter clipped to norm 1 (the initial norms are ~30)
    assert conv.get_config()["kernel_constraint"]["config"]["axis"] == axes
    folded = conv.fold()
    assert folded.kernel_constraint.axis == axes


def test_a_kernel_constraint_axis_outside_the_kernel_is_named():
    conv = dtf.DOConv2D(4, 3, kernel_constraint=keras.constraints.MaxNorm(1.0, [0, 4]))
    with pytest.raises(ValueError, match=r"kernel_constraint=MaxNorm\(axis=\[0, 4\]\) names an axis outside a 4-D"):
        conv.build((None, 6, 6, 3))
