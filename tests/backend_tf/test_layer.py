"""DOConv2D on TensorFlow: tf.function / XLA, checkpoints, initialisers, arguments (the eager forward, gradients,
.keras files and mixed precision on every Keras backend are in tests/backend_keras)."""

import json

import numpy as np
import pytest
from doconv_tf_testing import (DTYPES, SUBSET, TF_CASES, check_forward_and_grads, config_case, from_layout, layer_grads,
                               make_layer, to_layout)

import doconv
import doconv.tf as dtf
import keras
import tensorflow as tf
from doconv import cases
from doconv.compose import COMPOSE_EINSUM


def test_unsupported_features_are_what_keras_refuses():
    assert dtf.UNSUPPORTED_FEATURES <= set(cases.FEATURES)
    assert {"same_strided", "same_even_kernel"}.isdisjoint(dtf.UNSUPPORTED_FEATURES)  # TF's own 'same' rule
    assert len(TF_CASES) >= 15
    # every rank is covered: 1-D (causal padding too) and 3-D cases are in the table Keras runs
    assert {"conv1d", "conv3d", "causal_padding"}.isdisjoint(dtf.UNSUPPORTED_FEATURES)
    assert {c.rank for c in TF_CASES} == {1, 2, 3}
    assert any("causal_padding" in c.features for c in TF_CASES)
    skipped = [c for c in cases.CASES if c not in TF_CASES]
    assert all(c.features & dtf.UNSUPPORTED_FEATURES for c in skipped)
    with pytest.raises(ValueError, match="dilation_rate"):  # Keras itself refuses stride > 1 with dilation > 1
        keras.layers.Conv2D(2, 3, strides=2, dilation_rate=2)


def test_einsum_is_the_core_composition_in_keras_layout():
    assert COMPOSE_EINSUM == "gcms,gjcs->gjcm"  # the string KERAS_COMPOSE_EINSUM relabels
    for case in TF_CASES:
        if case.config.has_D:
            layer, params = make_layer(case, "float64")
            kernel = np.asarray(layer.kernel)  # HWIO
            doconv.assert_close(doconv.layouts.hwio_to_oihw(kernel), doconv.compose(params, case.config),
                                "float64", case.id)
            c, g = case.config, case.config.groups
            einsum = np.einsum(dtf.KERAS_COMPOSE_EINSUM, np.asarray(layer._full_D()).reshape(c.MN, c.S, g, -1),
                               np.asarray(layer.W).reshape(c.in_per_group, c.S, g, -1))
            doconv.assert_close(einsum.reshape(kernel.shape), kernel, "float64", case.id)


def _graph_runner(jit_compile):
    def run(layer, x, u):
        @tf.function(jit_compile=jit_compile)
        def step(x, u):
            return layer_grads(layer, x, u)
        return step(tf.constant(x), tf.constant(u))
    return run


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SUBSET, ids=str)
def test_forward_and_gradients_in_graph(case, dtype, jit_compile):
    check_forward_and_grads(case, dtype, "channels_last", _graph_runner(jit_compile))


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
def test_compiled_inference_follows_every_weight_update(jit_compile):
    """A compiled inference function composes from the variables at every call: it follows training
    steps, Keras assignments and writes of the tf.Variable itself, down to a raw AssignVariableOp."""
    case = cases.case("g3-k3")
    layer, params = make_layer(case)
    x = to_layout(case.input(0, "float32"), "channels_last")
    infer = tf.function(lambda x: layer(x, training=False), jit_compile=jit_compile)
    optimizer = keras.optimizers.SGD(0.5)

    @tf.function(jit_compile=jit_compile)
    def train(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))

    def check(what):
        doconv.assert_close(from_layout(infer(x), "channels_last"),
                            doconv.forward(case.input(0), dtf.get_params(layer), case.config), "float32", what)

    outputs = []
    for step in range(2):
        check(f"before step {step}")
        outputs.append(np.asarray(infer(x)))
        train(x)
    assert doconv.max_error(np.asarray(infer(x)), outputs[-1]) > 1e-3
    dtf.set_params(layer, case.params(5, "float32"))
    check("after set_params")
    for update in (lambda: layer.W.assign(layer.W * 2.0), lambda: layer.D.assign_add(layer.D + 0.1),
                   lambda: layer.set_weights([w * 0.5 for w in layer.get_weights()]),
                   lambda: layer.W.value.assign(layer.W * 2.0),
                   lambda: tf.raw_ops.AssignVariableOp(resource=layer.W.value.handle, value=layer.W * 2.0)):
        update()
        check("after a write")


@pytest.mark.parametrize("case_id", ["g3-k3", "k3-same", "dw-x2-k3"])
def test_checkpoint_restore_is_seen_by_inference(case_id, tmp_path):
    """``tf.train.Checkpoint.restore`` writes the tf.Variables themselves, not through Keras' assign."""
    case = cases.case(case_id)
    layer, params = make_layer(case)  # D randomised
    c = case.config
    x = to_layout(case.input(0, "float32"), "channels_last")
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    want = doconv.forward(case.input(0), params, c)
    checkpoint = tf.train.Checkpoint(model=model)
    path = checkpoint.write(str(tmp_path / "model"))
    raw = tf.train.Checkpoint(**{name: getattr(layer, name).value for name in ("W", "D", "bias")
                                 if getattr(layer, name) is not None})  # the backend tf.Variables themselves
    raw_path = raw.write(str(tmp_path / "raw"))
    infer = tf.function(lambda x: layer(x, training=False))
    for restore in (lambda: checkpoint.restore(path), lambda: raw.restore(raw_path)):
        other = case.params(3, "float32")
        dtf.set_params(layer, other)
        for _ in range(2):
            doconv.assert_close(from_layout(model.predict(x, verbose=0), "channels_last"),
                                doconv.forward(case.input(0), other, c), "float32", "other weights")
        with dtf.cached(model):
            doconv.assert_close(from_layout(model(x, training=False), "channels_last"),
                                doconv.forward(case.input(0), other, c), "float32", "other weights, scope")
        restore()
        doconv.assert_close(from_layout(model.predict(x, verbose=0), "channels_last"), want, "float32", "restored")
        doconv.assert_close(from_layout(infer(x), "channels_last"), want, "float32", "restored, tf.function")
        doconv.assert_close(dtf.get_params(layer).D, params.D, "float32", "restored D")


def test_checkpoint_restore_matches_conv2d(tmp_path):
    """The repro of the defect: after a restore, DOConv2D predicts as before, as Conv2D does."""
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    outputs = {}
    for cls in (keras.layers.Conv2D, dtf.DOConv2D):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8, 8, 3)), cls(4, 3, bias_initializer="random_normal")])
        checkpoint = tf.train.Checkpoint(model=model)
        path = checkpoint.write(str(tmp_path / cls.__name__))
        before = model.predict(x, verbose=0)
        model.set_weights([np.full_like(w, 0.5) for w in model.get_weights()])
        model.predict(x, verbose=0)
        checkpoint.restore(path)
        outputs[cls.__name__] = (before, model.predict(x, verbose=0))
    for before, after in outputs.values():
        np.testing.assert_allclose(after, before, atol=1e-5)
    np.testing.assert_allclose(outputs["DOConv2D"][0], outputs["Conv2D"][0], atol=1e-5)  # identity init: W' = W


def test_training_false_under_a_tape_still_trains_W_and_D():
    """The fine-tuning recipe ``base(x, training=False)`` inside a tape composes, also in a cached() scope."""
    case = cases.case("k3-same")
    layer, _ = make_layer(case, "float64")
    x = to_layout(case.input(0, "float64"), "channels_last")
    u = np.ones(layer.compute_output_shape(x.shape))
    with dtf.cached(layer):
        layer(x, training=False)  # the scope holds the kernel
        _, frozen = layer_grads(layer, x, u, training=False)
        _, trained = layer_grads(layer, x, u, training=True)
    for name in trained:
        assert frozen[name] is not None
        doconv.assert_close(frozen[name], trained[name], "float64", name)


def test_kernel_cannot_be_set_and_says_why():
    layer = dtf.DOConv2D(4, 3, name="conv")
    layer.build((None, 5, 5, 2))
    with pytest.raises(AttributeError, match=r"composed kernel W' = D\^T o W.*layer.W / layer.D.*fold.*'conv'"):
        layer.kernel = np.zeros((3, 3, 2, 4), "float32")


def test_weights_order_names_and_shapes():
    layer = dtf.DOConv2D(6, 3, groups=2, D_mul=12)
    layer.build((None, 8, 8, 4))
    assert [w.name for w in layer.weights] == ["W", "D", "bias"]
    assert [tuple(w.shape) for w in layer.weights] == [(2, 12, 6), (9, 12, 4), (6,)]
    assert [w.trainable for w in layer.weights] == [True, True, True]
    assert layer.count_params() == 12 * 2 * 6 + 9 * 12 * 4 + 6
    np.testing.assert_array_equal(np.asarray(layer.D), 0.0)  # identity init: D' = 0
    pointwise = dtf.DOConv2D(5, 1, use_bias=False)
    pointwise.build((None, 3, 3, 4))
    assert [w.name for w in pointwise.weights] == ["W"]
    doconv.assert_close(doconv.layouts.hwio_to_oihw(np.asarray(pointwise.kernel)),
                        dtf.get_params(pointwise).W.reshape(5, 4, 1, 1), "float32")


def test_initialisation_matches_conv2d_and_d_init_random():
    layer = dtf.DOConv2D(64, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    layer.build((None, 8, 8, 32))
    reference = keras.layers.Conv2D(64, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    reference.build((None, 8, 8, 32))
    # identity init: W' = W, drawn with Conv2D's fan-in and fan-out
    np.testing.assert_allclose(np.std(np.asarray(layer.kernel)), np.std(np.asarray(reference.kernel)), rtol=0.05)
    random = dtf.DOConv2D(8, 3, d_init="random", D_mul=18)
    random.build((None, 5, 5, 40))
    D = dtf.get_params(random).D
    np.testing.assert_allclose(np.std(D), np.sqrt(2 / 9), rtol=0.1)  # He init of a depthwise kernel (fan-in MN)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_initializer_numpy_callable_and_conv2d_kernel(dtype):
    """Drop-in: a callable returning float64 NumPy, and ``Constant(kernel)`` of Conv2D's kernel shape."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 8, 8, 3)).astype(dtype)
    kernel = rng.normal(size=(3, 3, 3, 4))

    def ramp(shape, dtype=None):  # float64 NumPy whatever dtype is asked for; row-major, so W' = W is Conv2D's
        return np.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape)

    for init in (ramp, keras.initializers.Constant(kernel)):
        layer = dtf.DOConv2D(4, 3, kernel_initializer=init, dtype=dtype)
        reference = keras.layers.Conv2D(4, 3, kernel_initializer=init, dtype=dtype)
        y, want = layer(x), reference(x)
        assert layer.W.dtype == dtype and np.asarray(want).std() > 0.1
        doconv.assert_close(y, want, dtype, f"{init} output")
        doconv.assert_close(layer(x, training=False), want, dtype, f"{init} inference output")
    # with d_init='random', W still holds the kernel (W[s = i*N + j] = kernel[i, j]) and W' = D^T o W
    layer = dtf.DOConv2D(4, 3, kernel_initializer=keras.initializers.Constant(kernel), d_init="random",
                         dtype=dtype)
    layer.build(x.shape)
    params = dtf.get_params(layer)
    doconv.assert_close(params.W, doconv.layouts.hwio_to_oihw(kernel).reshape(4, 3, 9), dtype, "W")
    doconv.assert_close(layer.kernel, doconv.layouts.oihw_to_hwio(doconv.compose(params, layer.doconv_config)), dtype)
    assert doconv.max_error(layer.kernel, kernel) > 0.1
    w_shaped = rng.normal(size=(12, 3, 4))  # W's own shape (D_mul, C_in/g, filters) is taken as it is
    layer = dtf.DOConv2D(4, 3, kernel_initializer=keras.initializers.Constant(w_shaped), D_mul=12, dtype=dtype)
    layer.build(x.shape)
    doconv.assert_close(np.asarray(layer.W).transpose(1, 0, 2), w_shaped, dtype, "W-shaped constant")


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_initializer=keras.initializers.Constant(np.ones((3, 3, 3, 4))), D_mul=12),
     r"`kernel_initializer`.*\(12, 3, 4\) \(a Conv2D kernel of shape \(3, 3, 3, 4\) maps onto W only when "
     r"D_mul = M\*N\), but it produced shape \(3, 3, 3, 4\)"),
    (dict(kernel_initializer=keras.initializers.Constant(np.ones((3, 3, 2, 4)))),
     r"`kernel_initializer`.*\(9, 3, 4\) or Conv2D's kernel shape \(3, 3, 3, 4\), but it produced shape "
     r"\(3, 3, 2, 4\)"),
    (dict(kernel_initializer=lambda shape, dtype=None: np.zeros((5, 5))), r"`kernel_initializer`.*shape \(5, 5\)"),
], ids=["conv-shape-with-D_mul", "wrong-conv-shape", "callable-wrong-shape"])
def test_kernel_initializer_of_the_wrong_shape_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dtf.DOConv2D(4, 3, **kwargs).build((None, 8, 8, 3))


def test_regularizers_apply_to_W_only_unless_D_has_its_own():
    layer = dtf.DOConv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1.0))
    layer.build((None, 5, 5, 2))
    layer.D.assign(np.ones(layer.D.shape))
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), np.sum(np.asarray(layer.W) ** 2), rtol=1e-5)
    layer = dtf.DOConv2D(4, 3, D_regularizer=keras.regularizers.L2(1.0))
    layer.build((None, 5, 5, 2))
    layer.D.assign(np.full(layer.D.shape, 0.5))
    np.testing.assert_allclose(float(layer.losses[0]), 0.25 * np.prod(layer.D.shape), rtol=1e-5)


def test_config_round_trip():
    layer = dtf.DOConv2D(6, (3, 5), strides=2, padding="same", data_format="channels_first", groups=3,
                         activation="relu", use_bias=False, kernel_regularizer="l2", D_mul=20, d_init="random",
                         composition="auto", D_constraint="non_neg", name="block_conv")
    config = layer.get_config()
    assert {k: config[k] for k in ("D_mul", "d_init", "composition", "groups", "padding", "depthwise_separable")} == \
        dict(D_mul=20, d_init="random", composition="auto", groups=3, padding="same", depthwise_separable=False)
    clone = dtf.DOConv2D.from_config(json.loads(json.dumps(config)))
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "doconv>DOConv2D"
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


def test_keras_files_store_the_variables_by_position_so_the_D_rename_keeps_old_files_loading(tmp_path):
    """``.keras`` / ``.weights.h5`` files hold a layer's variables as ``vars/0``, ``vars/1``, ... (no variable
    names): a file saved when D was named ``D_delta`` has the same keys and loads into W, D, bias."""
    import io
    import zipfile

    h5py = pytest.importorskip("h5py")
    case = cases.case("k3-same")
    layer = dtf.layer_from_config(case.config)
    params = case.params(0, "float32")  # D randomised
    dtf.set_params(layer, params)
    model = keras.Sequential([keras.Input((None, None, case.config.in_channels)), layer])
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
            [key] = weights["layers"]  # the layer, keyed by its class (snake case)
            stored = {name: array[()] for name, array in weights[f"layers/{key}/vars"].items()}
    assert sorted(stored) == ["0", "1", "2"]  # positions only: the variable's name is in no key
    np.testing.assert_array_equal(stored["1"], np.asarray(layer.D))
    loaded = keras.saving.load_model(tmp_path / "m.keras").layers[0]
    x = case.input(0, "float32")
    doconv.assert_close(from_layout(loaded(to_layout(x, "channels_last")), "channels_last"),
                        doconv.forward(x, params, case.config), "float32", "loaded")

@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_the_layer_it_deploys(policy):
    """W' is composed in float32 (the variables' dtype) and cast once, as the folded Conv2D casts its
    kernel: the unfolded output equals the folded one far inside the compute dtype's tolerance (composing
    in the compute dtype moved a 64-channel layer with outputs of RMS 6 by 6e-4 in float16 and 7e-3 in
    bfloat16, above tolerance / 20). Feature composition runs its two convolutions in the compute dtype
    (rounding the intermediate D o P): within the compute dtype's tolerance of the fold."""
    compute = policy.split("_")[1]
    rng = np.random.default_rng(0)
    c = doconv.DOConvConfig(64, 64, 3, padding="same")
    x = rng.normal(size=(2, 64, 16, 16)).astype("float32")  # NCHW
    W = rng.normal(size=(64, 64, 9)).astype("float32")
    D = (doconv.identity_fill(9, 9)[None] + 0.3 * rng.normal(size=(64, 9, 9))).astype("float32")
    params = doconv.DOConvParams(W, D, rng.normal(size=64).astype("float32"))
    scale = 6.0 / np.sqrt(np.mean(doconv.forward(x, params, c) ** 2))
    params = doconv.DOConvParams(W * scale, D, params.bias * scale)
    x = to_layout(x, "channels_last")
    as_float = lambda y: np.asarray(keras.ops.cast(y, "float32"))  # noqa: E731
    for composition, bound in (("kernel", doconv.tolerance(compute) / 20), ("feature", doconv.tolerance(compute))):
        layer = dtf.layer_from_config(c, dtype=policy, composition=composition)
        dtf.set_params(layer, params)
        assert layer.W.dtype == layer.D.dtype == "float32" and layer.compute_dtype == compute
        assert keras.backend.standardize_dtype(layer.kernel.dtype) == "float32"
        folded = as_float(layer.fold()(x))
        assert np.sqrt(np.mean(folded ** 2)) == pytest.approx(6.0, rel=0.05)
        outputs = {"inference": layer(x, training=False), "training": layer(x, training=True)}
        with dtf.cached(layer):
            outputs["cached() scope"] = layer(x, training=False)
        for name, y in outputs.items():
            assert keras.backend.standardize_dtype(y.dtype) == compute
            err = doconv.max_error(as_float(y), folded)
            assert err <= bound, f"{composition} {name}: unfolded vs folded {err:.3g} > {bound:.3g}"


BAD_ARGUMENTS = [
    (dict(filters=0, kernel_size=3), ValueError, "filters=0"),
    (dict(filters=2.5, kernel_size=3), ValueError, "filters=2.5"),
    (dict(filters=6, kernel_size=3, groups=4), ValueError, "groups=4, filters=6"),
    (dict(filters=6, kernel_size=0), ValueError, "kernel_size"),
    (dict(filters=6, kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    (dict(filters=6, kernel_size="3"), TypeError, "kernel_size"),
    (dict(filters=6, kernel_size=3, strides=2, dilation_rate=2), ValueError, "dilation_rate=\\(2, 2\\)"),
    (dict(filters=6, kernel_size=3, padding="causal"), ValueError, "padding='causal'"),
    (dict(filters=6, kernel_size=3, padding=1), ValueError, "padding=1"),
    (dict(filters=6, kernel_size=3, data_format="NHWC"), ValueError, "data_format='NHWC'"),
    (dict(filters=6, kernel_size=3, D_mul=4), ValueError,
     "D_mul must be >= M\\*N = 9 for kernel_size=\\(3, 3\\), but got D_mul=4.*Pass depthwise_separable=True"),
    (dict(filters=6, kernel_size=1, D_mul=2), ValueError, "D_mul=2"),
    (dict(filters=6, kernel_size=3, d_init="zeros"), ValueError, "d_init='zeros'"),
    (dict(filters=6, kernel_size=3, composition="fast"), ValueError, "composition='fast'"),
    (dict(filters=6, kernel_size=3, lora_rank=2), ValueError, "does not support LoRA.*lora_rank=2"),
]


def test_accepts_every_conv2d_argument():
    """Every parameter of keras.layers.Conv2D is a parameter of DOConv2D (a drop-in), with the same default."""
    import inspect
    ours = inspect.signature(dtf.DOConv2D).parameters
    for name, p in inspect.signature(keras.layers.Conv2D).parameters.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        assert name in ours, name
        assert ours[name].default == p.default, (name, ours[name].default, p.default)
    dtf.DOConv2D(4, 3, lora_rank=None, lora_alpha=None)


@pytest.mark.parametrize("kwargs, error, match", BAD_ARGUMENTS, ids=[m for _, _, m in BAD_ARGUMENTS])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        dtf.DOConv2D(**kwargs)


def test_bad_inputs_at_build_and_call():
    with pytest.raises(ValueError, match="groups=2, but the input has 3 channels"):
        dtf.DOConv2D(4, 3, groups=2)(np.zeros((1, 5, 5, 3), "float32"))
    layer = dtf.DOConv2D(4, 3)
    layer(np.zeros((1, 5, 5, 3), "float32"))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer(np.zeros((1, 5, 5, 2), "float32"))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        dtf.DOConv2D(4, 3, dilation_rate=2)(np.zeros((1, 4, 4, 3), "float32"))
    with pytest.raises(ValueError, match="not built"):
        dtf.get_params(dtf.DOConv2D(4, 3))
    with pytest.raises(TypeError, match="DOConv1D, DOConv2D or DOConv3D, but got Conv2D"):
        dtf.get_params(keras.layers.Conv2D(4, 3))


def test_set_params_names_layer_array_and_shapes():
    case = cases.case("k3-same")
    layer = dtf.layer_from_config(case.config)
    wrong = case.params(0, "float32")
    wrong.D = wrong.D[:, :, :4]
    with pytest.raises(ValueError, match=r"layer 'do_conv2d.*': D has shape \(4, 9, 4\) but .* needs \(4, 9, 9\)"):
        dtf.set_params(layer, wrong)


def test_layer_from_config_maps_and_refuses_padding():
    c = doconv.DOConvConfig(3, 4, 3, padding=1)
    assert dtf.keras_padding(c) == "same" and dtf.keras_padding(doconv.DOConvConfig(3, 4, 3)) == "valid"
    assert dtf.layer_config(dtf.layer_from_config(c)).padding == "same"
    for bad in (doconv.DOConvConfig(3, 4, 3, padding=1, stride=2), doconv.DOConvConfig(3, 4, 3, padding=2),
                doconv.DOConvConfig(3, 4, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ValueError, match="padding"):
            dtf.layer_from_config(bad)
    for case in TF_CASES:  # the contract: a layer for every supported case, whose config is the case's
        layer = dtf.layer_from_config(case.config)
        assert dtf.layer_config(layer) == case.config
        dtf.set_params(layer, case.params(3, "float32"))
        params = dtf.get_params(layer)
        for name in ("W", "D", "bias"):
            want = getattr(case.params(3, "float32"), name)
            assert (want is None) == (getattr(params, name) is None)
            if want is not None:
                np.testing.assert_allclose(getattr(params, name), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_depthwise_separable_D_mul_below_MN(groups):
    """D_mul < M*N on purpose (``depthwise_separable=True``, as in the core, PyTorch and MXNet)."""
    config = doconv.DOConvConfig(4, 6, 3, padding="same", groups=groups, D_mul=4, depthwise_separable=True)
    layer = dtf.layer_from_config(config, dtype="float64")
    params = config_case("dsep", config, (2, 4, 6, 7)).params(0)
    dtf.set_params(layer, params)
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 7))
    got = np.transpose(np.asarray(layer(np.transpose(x, (0, 2, 3, 1)))), (0, 3, 1, 2))
    doconv.assert_close(got, doconv.forward(x, params, config), "float64", "depthwise separable")
    again = dtf.DOConv2D.from_config(layer.get_config())
    assert again.depthwise_separable and again.D_mul == 4
