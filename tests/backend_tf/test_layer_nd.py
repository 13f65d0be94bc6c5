"""DOConv1D and DOConv3D as drop-ins for ``Conv1D`` / ``Conv3D``: signatures, the one base class under the three
layers, causal padding, grouped and depthwise-separable layers in both data formats, ``.keras`` files, and what
only the 1-D / 3-D layers refuse. (The case-driven tests of test_layer.py cover every rank's cases.)"""

import inspect
import json

import numpy as np
import pytest
from doconv_tf_testing import (FORMATS, check_forward_and_grads, config_case, from_layout, layer_grads, make_layer,
                               to_layout)

import doconv
import doconv.tf as dtf
import keras

DROP_INS = [(dtf.DOConv1D, keras.layers.Conv1D), (dtf.DOConv2D, keras.layers.Conv2D),
            (dtf.DOConv3D, keras.layers.Conv3D)]
RANK_IDS = ["1d", "2d", "3d"]
DO_CONV_KEYWORDS = ["D_mul", "d_init", "composition", "D_regularizer", "D_constraint", "depthwise_separable"]
rng = np.random.default_rng(0)


def _channels_last_input(rank, size=7, channels=4, batch=2):
    return rng.normal(size=(batch, *(size,) * rank, channels)).astype("float32")


def _in_format(x, data_format):
    return x if data_format == "channels_last" else np.ascontiguousarray(np.moveaxis(x, -1, 1))


@pytest.mark.parametrize("ours, theirs", DROP_INS, ids=RANK_IDS)
def test_signature_is_the_keras_layers_then_do_conv_keywords(ours, theirs):
    """Every argument of ``Conv{r}D``, in its positional order with its default, then DO-Conv's keyword-only ones."""
    mine = inspect.signature(ours).parameters
    plain = [p for p in inspect.signature(theirs).parameters.values()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert list(mine)[:len(plain)] == [p.name for p in plain]
    for p in plain:
        assert mine[p.name].default == p.default, (p.name, mine[p.name].default, p.default)
        assert mine[p.name].kind == p.POSITIONAL_OR_KEYWORD
    assert [name for name, p in mine.items() if p.kind == p.KEYWORD_ONLY] == DO_CONV_KEYWORDS


@pytest.mark.parametrize("ours, theirs", DROP_INS, ids=RANK_IDS)
def test_positional_arguments_mean_what_they_mean_for_keras(ours, theirs):
    args = (6, 3, 2, "same", "channels_first", 1, 2, "relu", False)
    a, b = ours(*args), theirs(*args)
    for name in ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "groups",
                 "use_bias", "activation"):
        assert getattr(a, name) == getattr(b, name), name


def test_the_three_layers_are_thin_subclasses_of_one_base():
    """All logic lives in BaseDOConv: each public class adds its rank and signature (``__init__``), nothing else."""
    assert dtf.LAYERS == {1: dtf.DOConv1D, 2: dtf.DOConv2D, 3: dtf.DOConv3D}
    for rank, cls in dtf.LAYERS.items():
        assert cls.__bases__ == (dtf.BaseDOConv,)
        own = set(vars(cls)) - {"__module__", "__doc__", "__firstlineno__", "__static_attributes__", "__qualname__",
                                "__annotations__"}  # Python's own; __annotations__ appears once something reads it
        assert own == {"__init__"}, (cls.__name__, own)
        assert cls(4, 3).rank == rank


@pytest.mark.parametrize("cls, kwargs, error, match", [
    (dtf.DOConv2D, dict(padding="causal"), ValueError, "padding='causal' pads a 1-D layer only .*DOConv2D is 2-D"),
    (dtf.DOConv3D, dict(padding="Causal"), ValueError, "padding='causal' pads a 1-D layer only .*padding='Causal'"),
    (dtf.DOConv1D, dict(padding="full"), ValueError, r"one of \('valid', 'same', 'causal'\). Received: padding='full'"),
    (dtf.DOConv1D, dict(kernel_size=(3, 3)), ValueError, r"kernel_size=\(3, 3\) of length 2"),
    (dtf.DOConv3D, dict(kernel_size=(3, 3)), ValueError, r"kernel_size=\(3, 3\) of length 2"),
    (dtf.DOConv3D, dict(strides=(1, 2)), ValueError, r"strides=\(1, 2\) of length 2"),
    (dtf.DOConv1D, dict(strides=2, dilation_rate=2), ValueError, r"dilation_rate=\(2,\)"),
    (dtf.DOConv1D, dict(D_mul=2), ValueError, r"D_mul must be >= M\*N = 3 .*but got D_mul=2"),
    (dtf.DOConv3D, dict(D_mul=26), ValueError, r"D_mul must be >= M\*N = 27 .*but got D_mul=26"),
    (dtf.DOConv1D, dict(lora_rank=2), ValueError, "DOConv1D does not support LoRA.*lora_rank=2"),
], ids=["2d-causal", "3d-causal", "1d-full", "1d-kernel-pair", "3d-kernel-pair", "3d-strides-pair",
        "1d-stride-dilation", "1d-Dmul", "3d-Dmul", "1d-lora"])
def test_bad_arguments_name_argument_and_value(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**{"filters": 4, "kernel_size": 3, **kwargs})


@pytest.mark.parametrize("ours, theirs", [DROP_INS[0], DROP_INS[2]], ids=["1d", "3d"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_output_shape_is_keras(ours, theirs, data_format):
    rank = 1 if ours is dtf.DOConv1D else 3
    paddings = ("valid", "same", "causal") if rank == 1 else ("valid", "same")
    for padding in paddings:
        for strides, size in ((1, 7), (2, 7), (2, 8), (3, 6)):
            x = _in_format(_channels_last_input(rank, size, 2), data_format)
            kwargs = dict(strides=strides, padding=padding, data_format=data_format)
            layer, plain = ours(3, 3, **kwargs), theirs(3, 3, **kwargs)
            want = plain.compute_output_shape(x.shape)
            assert layer.compute_output_shape(x.shape) == want, (padding, strides, size)
            assert tuple(layer(x).shape) == tuple(plain(x).shape) == want


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dilation, stride, groups", [(1, 1, 1), (3, 1, 1), (1, 2, 1), (2, 1, 2), (2, 1, 4)],
                         ids=["k3", "d3", "s2", "g2-d2", "dw-d2"])
def test_causal_padding_is_conv1d_s(data_format, dilation, stride, groups):
    """At identity init with Conv1D's kernel, DOConv1D(padding='causal') is Conv1D(padding='causal'); with D
    random it is the core's causal layer (left pad d * (k - 1)), and it folds into a causal convolution."""
    x = _in_format(_channels_last_input(1, 11, 4), data_format)
    kernel, bias = rng.normal(size=(3, 4 // groups, 8)), rng.normal(size=8)
    args = (8, 3, stride, "causal", data_format, dilation, groups)
    plain = keras.layers.Conv1D(*args, kernel_initializer=keras.initializers.Constant(kernel),
                                bias_initializer=keras.initializers.Constant(bias))
    layer = dtf.DOConv1D(*args, kernel_initializer=keras.initializers.Constant(kernel),
                         bias_initializer=keras.initializers.Constant(bias))
    doconv.assert_close(layer(x), plain(x), "float32", "identity init")
    config = dtf.layer_config(layer)
    assert config.padding == "causal" and config.rank == 1
    params = doconv.init_params(config, d_init="random", rng=1)
    dtf.set_params(layer, params)
    want = doconv.forward(from_layout(x, data_format).astype("float64"), params.astype("float64"), config)
    for composition in ("kernel", "feature"):
        layer.composition = composition
        doconv.assert_close(from_layout(layer(x), data_format), want, "float32", composition)
    folded = layer.fold()
    doconv.assert_close(from_layout(folded(x), data_format), want, "float32", "fold")
    conv = folded if data_format == "channels_last" else folded.layers[1]  # channels_first: between Permutes
    assert type(conv) is keras.layers.Conv1D and conv.padding == "causal"  # DepthwiseConv1D has no causal


GROUPED = [  # (id, config, input shape): what the shared table has only with explicit pads in 1-D and 3-D
    ("1d-g2-s2-same", doconv.DOConvConfig(4, 6, 3, stride=2, padding="same", groups=2, rank=1), (2, 4, 9)),
    ("1d-dsep", doconv.DOConvConfig(4, 6, 3, padding="same", D_mul=2, depthwise_separable=True, rank=1), (2, 4, 8)),
    ("1d-dw-x2-causal", doconv.DOConvConfig(3, 6, 3, padding="causal", groups=3, D_mul=5, rank=1), (2, 3, 7)),
    ("3d-g2-same", doconv.DOConvConfig(4, 6, (1, 3, 3), padding="same", groups=2, bias=False, rank=3),
     (2, 4, 3, 5, 4)),
    ("3d-dsep-g2", doconv.DOConvConfig(4, 4, 3, padding="valid", groups=2, D_mul=4, depthwise_separable=True,
                                       rank=3), (2, 4, 4, 4, 5)),
    ("3d-dw-s2", doconv.DOConvConfig(3, 3, 3, stride=2, padding="same", groups=3, rank=3), (2, 3, 4, 6, 5)),
]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case_id, config, shape", GROUPED, ids=[g[0] for g in GROUPED])
def test_grouped_and_depthwise_separable_against_the_core(case_id, config, shape, data_format):
    """Forward and gradients (kernel composition), the feature composition's forward and the fold, D random."""
    case = config_case(case_id, config, shape)
    check_forward_and_grads(case, "float64", data_format, layer_grads)
    layer, params = make_layer(case, "float64", data_format, composition="feature")
    x = case.input(0, "float64")
    want = doconv.forward(x, params, config)
    doconv.assert_close(from_layout(layer(to_layout(x, data_format)), data_format), want, "float64", "feature")
    doconv.assert_close(from_layout(layer.fold()(to_layout(x, data_format)), data_format), want, "float64", "fold")


@pytest.mark.parametrize("ours, theirs", [DROP_INS[0], DROP_INS[2]], ids=["1d", "3d"])
def test_kernel_initializer_takes_the_plain_layer_kernel(ours, theirs):
    rank = 1 if ours is dtf.DOConv1D else 3
    x = _channels_last_input(rank, 6, 3)
    kernel = rng.normal(size=(*(3,) * rank, 3, 4))
    init = keras.initializers.Constant(kernel)
    doconv.assert_close(ours(4, 3, kernel_initializer=init)(x), theirs(4, 3, kernel_initializer=init)(x), "float32")
    with pytest.raises(ValueError, match=rf"`kernel_initializer` for DOConv{rank}D.*Conv{rank}D's kernel shape"):
        ours(4, 3, kernel_initializer=keras.initializers.Constant(kernel[..., :2])).build(x.shape)


@pytest.mark.parametrize("cls, name", [(dtf.DOConv1D, "DOConv1D"), (dtf.DOConv3D, "DOConv3D")])
def test_config_round_trip_and_registered_name(cls, name):
    layer = cls(6, 3, strides=2, padding="same", data_format="channels_first", groups=3, activation="relu",
                use_bias=False, D_mul=40, d_init="random", composition="feature", name="block_conv")
    config = layer.get_config()
    assert "rank" not in config  # the class is the rank
    clone = cls.from_config(json.loads(json.dumps(config)))
    assert type(clone) is cls and clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"doconv>{name}"
    assert type(keras.saving.deserialize_keras_object(serialized)) is cls


@pytest.mark.parametrize("data_format", FORMATS)
def test_keras_file_round_trip_without_custom_objects(data_format, tmp_path):
    """A model with causal and strided DOConv1D layers and one with DOConv3D layers, D random, through ``.keras``."""
    for rank, layers in ((1, [dtf.DOConv1D(6, 3, padding="causal", dilation_rate=2, data_format=data_format),
                              dtf.DOConv1D(4, 3, strides=2, padding="same", groups=2, data_format=data_format)]),
                         (3, [dtf.DOConv3D(4, 3, padding="same", data_format=data_format),
                              dtf.DOConv3D(6, (1, 3, 3), strides=2, groups=2, data_format=data_format)])):
        x = _in_format(_channels_last_input(rank, 8, 3), data_format)
        model = keras.Sequential([keras.Input(x.shape[1:]), *layers])
        for layer in layers:
            layer.D.assign(rng.normal(0, 0.2, layer.D.shape))
        before = np.asarray(model(x, training=False))
        model.save(tmp_path / f"m{rank}.keras")
        loaded = keras.saving.load_model(tmp_path / f"m{rank}.keras")  # registered by `import doconv.tf`
        assert [type(layer) for layer in loaded.layers] == [dtf.LAYERS[rank]] * 2
        np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), before)


def test_layer_from_config_picks_the_class_by_rank_and_maps_causal_pads():
    for rank, cls in dtf.LAYERS.items():
        config = doconv.DOConvConfig(3, 4, 3, padding="same", groups=1, rank=rank)
        layer = dtf.layer_from_config(config)
        assert type(layer) is cls and dtf.layer_config(layer) == config
    explicit = doconv.DOConvConfig(3, 4, 3, dilation=2, padding=((4, 0),), rank=1)  # PyTorch's causal: pad the left
    assert dtf.keras_padding(explicit) == "causal"
    assert dtf.layer_from_config(explicit).padding == "causal"
    assert dtf.keras_padding(doconv.DOConvConfig(3, 4, 3, padding=1, rank=1)) == "same"
    for bad in (doconv.DOConvConfig(3, 4, 3, padding=((2, 1),), rank=1),
                doconv.DOConvConfig(3, 4, 3, padding=((1, 1), (1, 1), (0, 1)), rank=3)):
        with pytest.raises(ValueError, match=r"Keras padding is .* only; padding="):
            dtf.layer_from_config(bad)


@pytest.mark.parametrize("rank", [1, 3])
def test_official_checkpoints_stay_2d(rank):
    layer = dtf.LAYERS[rank](4, 3, name="conv")
    layer.build((None, *(None,) * rank, 3))
    c = dtf.layer_config(layer)
    arrays = {"kernel": np.zeros((c.S, c.in_per_group, c.out_channels)), "D": np.zeros((c.MN, c.S, c.in_channels)),
              "bias": np.zeros(4)}
    refused = rf"^layer 'conv' is a DOConv{rank}D: official DO-Conv checkpoints hold 2-D layers only .* rank={rank} "
    with pytest.raises(ValueError, match=refused):
        dtf.import_official(layer, arrays)
    model = keras.Sequential([keras.Input((*(6,) * rank, 3)), layer])
    with pytest.raises(ValueError, match=refused):
        dtf.import_official(model, {f"conv.{k}": v for k, v in arrays.items()})


def test_canonical_file_round_trip_of_1d_and_3d_layers(tmp_path):
    """export_canonical / import_canonical carry each layer's rank; a file's layer loads only into its rank."""
    def model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((9, 4)), dtf.DOConv1D(6, 3, padding="causal", name="a"),
                                 dtf.DOConv1D(4, 3, groups=2, name="b", d_init="random")])

    source, target = model(0), model(1)
    x = rng.normal(size=(2, 9, 4)).astype("float32")
    path = tmp_path / "one.safetensors"
    dtf.export_canonical(source, path)
    assert {name: c.rank for name, (c, _) in doconv.load(path).items()} == {"a": 1, "b": 1}
    assert doconv.max_error(target(x), source(x)) > 1e-3
    assert dtf.import_canonical(target, path) == ["a", "b"]
    doconv.assert_close(target(x), source(x), "float32", "imported")
    dtf.export_canonical(source.get_layer("a"), tmp_path / "a.safetensors")
    three = dtf.DOConv3D(6, 3, padding="same", name="a")
    three.build((None, None, None, None, 4))
    with pytest.raises(ValueError, match=r"layer 'a': the file holds .*rank=1\) but the model's layer is .*rank=3\)"):
        dtf.import_canonical(three, tmp_path / "a.safetensors")
    dtf.export_canonical(three, tmp_path / "three.safetensors")
    again = dtf.DOConv3D(6, 3, padding="same", name="a", d_init="random")
    again.build((None, None, None, None, 4))
    dtf.import_canonical(again, tmp_path / "three.safetensors")
    np.testing.assert_array_equal(dtf.get_params(again).D, dtf.get_params(three).D)
