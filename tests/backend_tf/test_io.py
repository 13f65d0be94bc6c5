"""Canonical interchange files and official TensorFlow checkpoints."""

import numpy as np
import pytest
from doconv_tf_testing import TF_CASES, from_layout, make_layer, to_layout

import doconv
import doconv.tf as dtf
import keras
from doconv import cases
from doconv.compose import identity_fill


def _model(seed):
    inputs = keras.Input((9, 9, 6))
    x = dtf.DOConv2D(9, 3, groups=3, padding="same", D_mul=12, name="a")(inputs)
    x = dtf.DOConv2D(4, 3, strides=2, name="b")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="head")(x))
    for i, layer in enumerate(model.layers[1:3]):
        dtf.set_params(layer, doconv.init_params(dtf.layer_config(layer), d_init="random", rng=seed + i))
    return model


def test_canonical_round_trip(tmp_path):
    source, target = _model(0), _model(10)
    target.get_layer("head").set_weights(source.get_layer("head").get_weights())
    x = np.random.default_rng(1).normal(size=(2, 9, 9, 6)).astype("float32")
    path = tmp_path / "model.safetensors"
    dtf.export_canonical(source, path)
    assert set(doconv.load(path)) == {"a", "b"}
    assert doconv.max_error(target(x, training=False), source(x, training=False)) > 1e-3
    assert dtf.import_canonical(target, path) == ["a", "b"]
    doconv.assert_close(target(x, training=False), source(x, training=False), "float32")
    for name in ("a", "b"):
        want, got = dtf.get_params(source.get_layer(name)), dtf.get_params(target.get_layer(name))
        np.testing.assert_array_equal(got.W, want.W)
        np.testing.assert_allclose(got.D, want.D, atol=1e-7)


def test_canonical_file_from_explicit_padding_loads_into_same(tmp_path):
    """A PyTorch-style file (padding=1) loads into the Keras 'same' layer it equals."""
    config = doconv.DOConvConfig(3, 5, 3, padding=1)
    params = cases.case("k3").params(0, "float32")
    doconv.save(tmp_path / "torch.safetensors", {"conv": (config, params)})
    layer = dtf.DOConv2D(5, 3, padding="same", name="conv")
    layer.build((None, 7, 9, 3))
    dtf.import_canonical(layer, tmp_path / "torch.safetensors")
    np.testing.assert_array_equal(dtf.get_params(layer).W, params.W)


def test_canonical_errors(tmp_path):
    model = _model(0)
    path = tmp_path / "m.safetensors"
    dtf.export_canonical(model, path)
    other = keras.Sequential([keras.Input((9, 9, 6)), dtf.DOConv2D(9, 3, groups=3, padding="same", name="a")])
    with pytest.raises(ValueError, match=r"layers the model lacks \['b'\]"):
        dtf.import_canonical(other, path)
    wrong = keras.Sequential([keras.Input((9, 9, 6)), dtf.DOConv2D(9, 3, groups=3, padding="same", name="a"),
                              dtf.DOConv2D(4, 3, strides=2, padding="same", name="b")])
    with pytest.raises(ValueError, match="layer 'a': the file holds .*D_mul=12.* but the model's layer is"):
        dtf.import_canonical(wrong, path)
    extra = _model(0)
    dtf.export_canonical(extra.get_layer("a"), path)
    with pytest.raises(ValueError, match=r"model layers missing from the file \['b'\]"):
        dtf.import_canonical(extra, path)
    assert dtf.import_canonical(extra, path, strict=False) == ["a"]
    plain = keras.Sequential([keras.Input((3, 3, 1)), keras.layers.Conv2D(1, 1)])
    for function in (dtf.export_canonical, dtf.import_canonical):
        with pytest.raises(ValueError, match=r"model has no DO-Conv layer .*convert it first \(doconv.tf.convert"):
            function(plain, path)
    with pytest.raises(ValueError, match=r"model has no DO-Conv layer .*convert it first"):
        dtf.import_official(plain, {})
    for function in (dtf.export_canonical, dtf.import_canonical, dtf.import_official):
        with pytest.raises(TypeError, match="model must be a keras Model or Layer, but got int"):
            function(3, path)


def test_canonical_nonfinite_values_are_refused_unless_allowed(tmp_path):
    model = _model(0)
    layer = model.get_layer("b")
    layer.W.assign(np.where(np.arange(layer.W.shape[-1]) == 0, np.nan, np.asarray(layer.W)))
    path = tmp_path / "nan.safetensors"
    with pytest.raises(ValueError, match="allow_nonfinite"):
        dtf.export_canonical(model, path)
    dtf.export_canonical(model, path, allow_nonfinite=True)
    target = _model(5)
    with pytest.raises(ValueError, match="allow_nonfinite"):
        dtf.import_canonical(target, path)
    assert dtf.import_canonical(target, path, allow_nonfinite=True) == ["a", "b"]
    assert np.isnan(np.asarray(target.get_layer("b").W)[..., 0]).all()


def official_tf_forward(kernel, D, bias, config, x_nhwc):
    """The official TF layer, re-implemented from the issue's description of it (not from its code):
    D = D' + I_fill (MN, S, C_in); W = kernel (S, C_in/g, C_out) viewed as (S, C_in, C_out/g);
    DoW = einsum('msi,sio->mio', D, W) viewed as the HWIO kernel (M, N, C_in/g, C_out); then a
    conventional grouped conv (here: Keras' own Conv2D)."""
    mn, s = config.MN, config.S
    D = D + identity_fill(mn, s)[:, :, None]
    W = kernel.reshape(s, config.in_channels, config.out_channels // config.groups)
    hwio = np.einsum("msi,sio->mio", D, W).reshape(*config.kernel_size, config.in_per_group, config.out_channels)
    conv = keras.layers.Conv2D(config.out_channels, config.kernel_size, config.stride, config.padding,
                               dilation_rate=config.dilation, groups=config.groups, use_bias=bias is not None,
                               dtype="float64")
    conv.build(x_nhwc.shape)
    conv.set_weights([hwio] + ([bias] if bias is not None else []))
    return np.asarray(conv(x_nhwc))


OFFICIAL_CASES = [c for c in TF_CASES if c.config.has_D and c.rank == 2]  # official checkpoints are 2-D


@pytest.mark.parametrize("case", OFFICIAL_CASES, ids=[c.id for c in OFFICIAL_CASES])
def test_import_official_tf_checkpoint_gives_the_official_outputs(case):
    c = case.config
    rng = np.random.default_rng(3)
    arrays = {"kernel": rng.normal(size=(c.S, c.in_per_group, c.out_channels)),
              "D": rng.normal(0, 0.3, size=(c.MN, c.S, c.in_channels))}
    if c.bias:
        arrays["bias"] = rng.normal(size=c.out_channels)
    layer, _ = make_layer(case, "float64")
    dtf.import_official(layer, arrays)
    x = to_layout(case.input(0, "float64"), "channels_last")
    want = official_tf_forward(arrays["kernel"], arrays["D"], arrays.get("bias"), c, x)
    for training in (True, False):
        doconv.assert_close(layer(x, training=training), want, "float64", case.id)
    # the same numbers as the core's own statement of the official arithmetic
    from doconv.selfcheck import official_tf_kernel
    doconv.assert_close(from_layout(want, "channels_last"),
                        doconv.conv2d(case.input(0, "float64"), official_tf_kernel(arrays["kernel"], arrays["D"], c),
                                      arrays.get("bias"), stride=c.stride, padding=c.padding, dilation=c.dilation,
                                      groups=c.groups), "float64")


def test_import_official_into_a_model_takes_keys_prefixed_by_layer_path():
    model = _model(0)
    rng = np.random.default_rng(4)
    arrays, official = {}, {}
    for name in ("a", "b"):
        c = dtf.layer_config(model.get_layer(name))
        official[name] = {"kernel": rng.normal(size=(c.S, c.in_per_group, c.out_channels)),
                          "D": rng.normal(0, 0.3, size=(c.MN, c.S, c.in_channels)),
                          "bias": rng.normal(size=c.out_channels)}
        # a Keras variable path ('a/kernel') or a dotted one ('b.kernel')
        arrays.update({f"{name}{'/' if name == 'a' else '.'}{k}": v for k, v in official[name].items()})
    from doconv.selfcheck import official_tf_kernel
    assert dtf.import_official(model, arrays) == ["a", "b"]
    for name in ("a", "b"):
        layer = model.get_layer(name)
        c = dtf.layer_config(layer)
        want = official_tf_kernel(official[name]["kernel"], official[name]["D"], c)
        doconv.assert_close(doconv.compose(dtf.get_params(layer), c), want, "float32", name)
        doconv.assert_close(dtf.get_params(layer).bias, official[name]["bias"], "float32", name)
    with pytest.raises(ValueError, match=r"arrays has no entry for layer 'b' .*'b\.'"):
        dtf.import_official(model, {k: v for k, v in arrays.items() if not k.startswith("b")})


def test_import_official_errors():
    layer, _ = make_layer(cases.case("k3-same"))
    with pytest.raises(ValueError, match="missing 'D'"):
        dtf.import_official(layer, {"kernel": np.zeros((9, 4, 6)), "bias": np.zeros(6)})
    with pytest.raises(ValueError, match=r"'kernel' has shape \(9, 6, 4\), expected \(9, 4, 6\)"):
        dtf.import_official(layer, {"kernel": np.zeros((9, 6, 4)), "D": np.zeros((9, 9, 4)), "bias": np.zeros(6)})
