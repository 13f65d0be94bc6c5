"""Freshness by construction and the explicit ``doconv.tf.cached`` scope.

Every call outside a scope composes W' from the variables as they are; a scope composes once per layer
for eager calls without a gradient and drops the kernel when it closes. Each write path is checked
against ``doconv.forward`` of the parameters read back (``get_params``), with D randomised, after every
kind of call an implicit cache would have filled (eager, ``predict``, a traced ``tf.function``, a scope).
TensorFlow's own write paths and compiled functions are here; what every Keras backend shares (``fit``
between ``predict`` calls, ``stateless_call``, the torch backend's writes) is in tests/backend_keras.
"""

import copy
import pickle
import zipfile

import numpy as np
import pytest
from doconv_tf_testing import check_forward_and_grads, config_case, from_layout, keras_testing, make_layer, to_layout

import doconv
import doconv.tf as dtf
import keras
import tensorflow as tf
from doconv import cases, layouts

X_SHAPE = (4, 6, 6, 3)


def _randomise(layer, seed, scale=0.3):
    """W and D' drawn afresh (D = I_fill + noise, never the identity)."""
    rng = np.random.default_rng(seed)
    layer.W.assign(rng.normal(size=tuple(layer.W.shape)).astype("float32") * 0.5)
    layer.D.assign(rng.normal(size=tuple(layer.D.shape)).astype("float32") * scale)


def _model(seed=0):
    """Two DO-Conv layers (DO-Conv, then DO-GConv with D_mul > MN) with random W and D, data to fit."""
    model = keras.Sequential([keras.Input(X_SHAPE[1:]), dtf.DOConv2D(6, 3, padding="same", name="a"),
                              dtf.DOConv2D(6, 3, groups=3, D_mul=12, padding="same", name="b")])
    for i, layer in enumerate(_doconv_layers(model)):
        _randomise(layer, seed + i)
    rng = np.random.default_rng(seed + 10)
    x = rng.normal(size=X_SHAPE).astype("float32")
    y = rng.normal(size=(*X_SHAPE[:3], 6)).astype("float32")
    return model, x, y


def _doconv_layers(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, dtf.DOConv2D)]


def _reference(model, x):
    """The core's forward of every DO-Conv layer of the chain, from the parameters read back now."""
    y = layouts.nhwc_to_nchw(np.asarray(x, np.float64))
    for layer in _doconv_layers(model):
        y = doconv.forward(y, dtf.get_params(layer).astype(np.float64), layer.doconv_config)
    return layouts.nchw_to_nhwc(y)


def _params(model):
    return [(p.W.copy(), p.D.copy()) for p in map(dtf.get_params, _doconv_layers(model))]


@pytest.fixture
def compositions(monkeypatch):
    """Counts of W' compositions per layer name (``Compositions`` of the backend-neutral suite)."""
    return keras_testing().Compositions(monkeypatch)


def _fill(model, x, infer):
    """Every call an implicit cache would fill: eager, ``predict``, a traced function, a cached() scope."""
    model(x, training=False)
    model.predict(x, verbose=0)
    infer(x)
    with dtf.cached(model):
        model(x, training=False)


def _check_fresh(model, x, infer, compositions, what):
    """Default eager, ``predict`` and a function traced earlier equal the core on the parameters as they
    are; a cached() scope composes each layer once, equal to that; outside it every call composes."""
    want = _reference(model, x)
    doconv.assert_close(model(x, training=False), want, "float32", f"{what}: eager")
    doconv.assert_close(model.predict(x, verbose=0), want, "float32", f"{what}: predict")
    doconv.assert_close(infer(x), want, "float32", f"{what}: tf.function traced before the write")
    compositions.take()
    with dtf.cached(model):
        first, second = model(x, training=False), model(x, training=False)
        assert compositions.take() == {"a": 1, "b": 1}, f"{what}: one composition per layer in the scope"
    doconv.assert_close(first, want, "float32", f"{what}: in the scope")
    np.testing.assert_array_equal(np.asarray(second), np.asarray(first))
    model(x, training=False)
    model(x)
    assert compositions.take() == {"a": 2, "b": 2}, f"{what}: outside the scope every call composes"


# ---- the write paths: each returns the write, prepared (compiled, checkpointed) beforehand -------------

def _assign(model, data, tmp_path):
    a, b = _doconv_layers(model)
    return lambda: (a.W.assign(a.W * 1.5), b.D.assign_add(tf.fill(b.D.shape, 0.2)),
                    a.D.assign_sub(a.D * 0.5))


def _set_weights(model, data, tmp_path):
    other, _, _ = _model(seed=5)
    return lambda: model.set_weights(other.get_weights())


def _set_params(model, data, tmp_path):
    a, b = _doconv_layers(model)
    other = [config_case(layer.name, layer.doconv_config, (1, layer.doconv_config.in_channels, 6, 6))
             .params(7, "float32") for layer in (a, b)]
    return lambda: [dtf.set_params(layer, p) for layer, p in zip((a, b), other)]


def _backend_variable(model, data, tmp_path):
    a, b = _doconv_layers(model)
    return lambda: (a.W.value.assign(a.W.value * -1.0), b.D.value.assign_add(tf.ones_like(b.D.value)),
                    a.D.value.scatter_nd_update([[0, 0, 0]], [5.0]))


def _raw_op(model, data, tmp_path):
    a, _ = _doconv_layers(model)
    return lambda: tf.raw_ops.AssignVariableOp(resource=a.D.value.handle, value=a.D.value + 0.4)


def _assign_in_tf_function(model, data, tmp_path):
    a, b = _doconv_layers(model)
    return tf.function(lambda: (a.W.value.assign(a.W.value * 2.0), b.D.assign(b.D * -1.0)))


def _apply_gradients(jit):
    def prepare(model, data, tmp_path):
        x, y = data
        optimizer = keras.optimizers.Adam(0.05)

        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return step if jit is None else tf.function(step, jit_compile=jit)
    return prepare


def _fit(**optimizer_kwargs):
    def prepare(model, data, tmp_path):
        model.compile(keras.optimizers.SGD(0.01, **optimizer_kwargs), "mse")
        return lambda: model.fit(*data, epochs=2, batch_size=2, verbose=0)
    return prepare


def _restore(raw):
    def prepare(model, data, tmp_path):
        before = model.get_weights()
        model.set_weights(_model(seed=6)[0].get_weights())
        variables = [v.value for v in model.weights] if raw else model
        checkpoint = tf.train.Checkpoint(model=variables)  # the Keras model, or its backend tf.Variables
        path = checkpoint.save(str(tmp_path / "ckpt"))
        model.set_weights(before)
        return lambda: checkpoint.restore(path).assert_consumed()
    return prepare


def _load_weights(model, data, tmp_path):
    other, _, _ = _model(seed=8)
    other.save_weights(tmp_path / "other.weights.h5")
    return lambda: model.load_weights(tmp_path / "other.weights.h5")


WRITES = {
    "assign": _assign, "set_weights": _set_weights, "set_params": _set_params,
    "backend-variable": _backend_variable, "raw-AssignVariableOp": _raw_op,
    "assign-in-tf.function": _assign_in_tf_function,
    "apply_gradients": _apply_gradients(None), "apply_gradients-tf.function": _apply_gradients(False),
    "apply_gradients-xla": _apply_gradients(True),
    "fit": _fit(), "fit-use_ema": _fit(use_ema=True, ema_momentum=0.5),
    "checkpoint-restore": _restore(raw=False), "checkpoint-restore-backend-variables": _restore(raw=True),
    "load_weights": _load_weights,
}


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_every_write_path_is_seen_by_the_next_call(write, compositions, tmp_path):
    model, x, y = _model()
    write = write(model, (x, y), tmp_path)
    infer = tf.function(lambda x: model(x, training=False))
    _fill(model, x, infer)
    before = _params(model)
    write()
    moved = max(doconv.max_error(new, old) for pair in zip(_params(model), before) for new, old in zip(*pair))
    assert moved > 1e-3, "the write must change W or D"
    _check_fresh(model, x, infer, compositions, "after the write")


def test_use_ema_overwrite_at_the_end_of_fit_equals_the_ema_weights(compositions):
    """``use_ema=True`` writes the averages into W and D at the end of ``fit``: what the layer then serves."""
    model, x, y = _model()
    model.compile(keras.optimizers.SGD(0.01, use_ema=True, ema_momentum=0.5), "mse")
    model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    ema = [v.numpy() for v in model.optimizer._model_variables_moving_average]
    doconv.assert_close(np.concatenate([w.ravel() for w in model.get_weights()]),
                        np.concatenate([w.ravel() for w in ema]), "float32", "weights are the averages")
    _check_fresh(model, x, tf.function(lambda x: model(x, training=False)), compositions, "use_ema")


# ---- the scope: which calls read it, when it ends, what it leaves behind ----------------------------------

def test_scope_holds_every_doconv_layer_nested_in_custom_layers(compositions):
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = dtf.DOConv2D(3, 3, padding="same", name="inner")

        def call(self, x):
            return x + self.conv(x)

    inputs = keras.Input(X_SHAPE[1:])
    block = Block()
    model = keras.Model(inputs, dtf.DOConv2D(4, 3, name="outer")(block(inputs)))
    for layer in _doconv_layers(model):
        _randomise(layer, 1)
    x = np.random.default_rng(0).normal(size=X_SHAPE).astype("float32")
    want = np.asarray(dtf.fold(model)[0](x))
    compositions.take()
    with dtf.cached(model):
        for _ in range(3):
            doconv.assert_close(model(x, training=False), want, "float32", "model in the scope")
        assert compositions.take() == {"inner": 1, "outer": 1}
    with dtf.cached(block.conv):  # a DO-Conv layer itself
        block.conv(x, training=False), block.conv(x, training=False)
        model(x, training=False)
        assert compositions.take() == {"inner": 1, "outer": 1}


def test_scope_drops_its_kernels_on_exit_on_exception_and_when_the_outermost_nested_scope_ends(compositions):
    model, x, _ = _model()
    a, _ = _doconv_layers(model)
    with pytest.raises(RuntimeError, match="inside"):
        with dtf.cached(model):
            model(x, training=False)
            raise RuntimeError("inside")
    a.W.assign(a.W * -2.0)
    doconv.assert_close(model(x, training=False), _reference(model, x), "float32", "after an exception")
    compositions.take()
    with dtf.cached(model):
        model(x, training=False)
        with dtf.cached(model):
            model(x, training=False)
        model(x, training=False)  # the outer scope still holds the kernels
        assert compositions.take() == {"a": 1, "b": 1}
        with dtf.cached(a):
            model(x, training=False)
        assert compositions.take() == {}
    a.D.assign(a.D + 0.5)
    doconv.assert_close(model(x, training=False), _reference(model, x), "float32", "after nested scopes")
    assert dtf.cache._HELD == {}


def test_invalidate_cache_recomposes_inside_a_scope_and_is_a_no_op_outside(compositions):
    model, x, _ = _model()
    a, b = _doconv_layers(model)
    a.invalidate_cache()
    with dtf.cached(model):
        model(x, training=False)
        a.W.assign(a.W * 3.0)  # a write the promise rules out ...
        stale = np.asarray(model(x, training=False))
        assert doconv.max_error(stale, _reference(model, x)) > 1e-3
        a.invalidate_cache()  # ... unless the kernel is dropped
        compositions.take()
        doconv.assert_close(model(x, training=False), _reference(model, x), "float32", "invalidate_cache")
        assert compositions.take() == {"a": 1}


def test_a_pointwise_layer_reads_W_itself_inside_a_scope(compositions):
    """Without D (1x1 kernel) W' is W reshaped: the scope keeps nothing, so even a write inside it is seen."""
    case = cases.case("k1x1-g2-s2")
    layer, _ = make_layer(case)
    x = to_layout(case.input(0, "float32"), "channels_last")
    with dtf.cached(layer):
        layer(x, training=False)
        layer.W.value.assign(layer.W.value * -2.0)
        want = doconv.forward(case.input(0), dtf.get_params(layer), case.config)
        doconv.assert_close(from_layout(layer(x, training=False), "channels_last"), want, "float32", "1x1 in a scope")


def test_calls_that_need_a_gradient_or_training_compose_inside_a_scope(compositions):
    case = cases.case("g3-k3")
    layer, params = make_layer(case, "float64")
    x = to_layout(case.input(0, "float64"), "channels_last")
    u = np.random.default_rng(7).normal(size=layer.compute_output_shape(x.shape))
    with dtf.cached(layer):
        layer(x, training=False)
        compositions.take()
        layer.W.assign(layer.W * 2.0)  # so that reading the held kernel would show
        want = doconv.forward(case.input(0, "float64"), dtf.get_params(layer), case.config)
        for training in (False, None, True):
            with tf.GradientTape() as tape:
                y = layer(x, training=training)
                loss = tf.reduce_sum(y * u)
            doconv.assert_close(from_layout(y, "channels_last"), want, "float64", f"tape, training={training}")
            assert all(g is not None for g in tape.gradient(loss, [layer.W.value, layer.D.value]))
        doconv.assert_close(from_layout(layer(x, training=True), "channels_last"), want, "float64", "training=True")
        assert compositions.take() == {layer.name: 4}


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
def test_nothing_traced_in_a_scope_keeps_its_kernel(jit_compile, compositions):
    """``predict`` (its function is kept on the model), ``evaluate`` and a user's ``tf.function`` traced
    while a scope is open compose in the graph: fresh inside the scope and after it."""
    model, x, y = _model()
    a, b = _doconv_layers(model)
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit_compile)
    infer = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile)
    with dtf.cached(model):
        model(x, training=False)  # the scope holds both kernels
        a.W.assign(a.W * -1.5)  # against the promise, so that a graph reading the held kernel would show
        want = _reference(model, x)
        doconv.assert_close(infer(x), want, "float32", "tf.function traced in the scope")
        doconv.assert_close(model.predict(x, verbose=0), want, "float32", "predict in the scope")
        loss = model.evaluate(x, y, verbose=0)
        np.testing.assert_allclose(loss, np.mean((want - y) ** 2), rtol=1e-5)
    b.D.assign(b.D * -1.0)
    want = _reference(model, x)
    doconv.assert_close(infer(x), want, "float32", "tf.function after the scope")
    doconv.assert_close(model.predict(x, verbose=0), want, "float32", "predict after the scope")


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
@pytest.mark.parametrize("case", [cases.case("k3-same"), cases.case("g3-k3-s2-same-2MN"), cases.case("dw-x2-k3"),
                                  cases.case("k1x1-g2-s2")], ids=str)
def test_inference_function_traced_in_a_scope_then_differentiated(case, jit_compile):
    """A ``tf.function`` traced with training=False, no tape, inside a scope; run under a tape later, its
    gradients for x, W, D and bias are the composition's (the core's VJP)."""
    def run(layer, x, u):
        infer = tf.function(lambda x: layer(x, training=False), jit_compile=jit_compile)
        with dtf.cached(layer):
            layer(x, training=False)
            infer(tf.constant(x))
        x = tf.constant(x)
        variables = {k: v for k, v in {"W": layer.W, "D": layer.D, "bias": layer.bias}.items() if v is not None}
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = infer(x)
            loss = tf.reduce_sum(y * u)
        grads = tape.gradient(loss, [x] + [v.value for v in variables.values()])
        return y, dict(zip(["x"] + list(variables), grads))
    check_forward_and_grads(case, "float32", "channels_last", run)


def test_inference_function_under_a_tape_trains_like_the_folded_conv2d():
    """The same pre-traced inference function in a training loop, then inference again."""
    case = cases.case("k3-same")
    layer, _ = make_layer(case)  # D randomised
    x = to_layout(case.input(0, "float32"), "channels_last")
    infer = tf.function(lambda x: layer(x, training=False))
    infer(x)
    optimizer = keras.optimizers.SGD(0.05)
    for _ in range(2):
        conv = layer.fold()
        with tf.GradientTape(persistent=True) as tape:
            y, y_conv = infer(x), conv(x, training=False)
            loss, loss_conv = tf.reduce_sum(y ** 2), tf.reduce_sum(y_conv ** 2)
        dkernel = tape.gradient(loss_conv, conv.kernel.value)  # dL/dW' of the folded Conv2D
        grads = tape.gradient(loss, layer.trainable_variables)
        with tf.GradientTape() as chain:  # dL/dW, dL/dD' = (dW'/d(W, D'))^T dL/dW'
            kernel = layer._compose()
        want = chain.gradient(kernel, layer.trainable_variables[:2], output_gradients=dkernel)
        for got, expected, name in zip(grads, [*want, tape.gradient(loss_conv, conv.bias.value)], ["W", "D", "bias"]):
            assert np.abs(np.asarray(got)).max() > 1e-3, name
            doconv.assert_close(got, expected, "float32", f"d{name}")
        optimizer.apply_gradients(zip(grads, layer.trainable_variables))
        doconv.assert_close(infer(x), layer.fold()(x), "float32", "inference after the step")


def test_auto_feature_training_step_then_inference():
    """'auto' takes the feature path on small inputs; a scope's calls use the kernel path."""
    layer = dtf.DOConv2D(4, 3, D_mul=8, depthwise_separable=True, composition="auto")
    rng = np.random.default_rng(0)
    small, large = (rng.normal(size=s).astype("float32") for s in ((1, 4, 4, 3), (8, 6, 6, 3)))
    layer(large)
    layer.D.assign(rng.normal(size=tuple(layer.D.shape)).astype("float32") * 0.3)
    assert layer._resolve_composition(small) == "feature" and layer._resolve_composition(large) == "kernel"
    layer(large, training=False)
    optimizer = keras.optimizers.SGD(0.5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(small, training=True) ** 2)
    optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))
    for x in (small, large):
        want = doconv.forward(x.transpose(0, 3, 1, 2), dtf.get_params(layer), layer.doconv_config)
        doconv.assert_close(from_layout(layer(x, training=False), "channels_last"), want, "float32", "after the step")
        with dtf.cached(layer):
            doconv.assert_close(from_layout(layer(x, training=False), "channels_last"), want, "float32", "scope")


def test_auto_fit_on_small_inputs_then_predict_on_large():
    inputs = keras.Input((None, None, 3))
    layer = dtf.DOConv2D(4, 3, D_mul=8, depthwise_separable=True, composition="auto")
    model = keras.Model(inputs, layer(inputs))
    layer.D.assign(np.random.default_rng(0).normal(size=tuple(layer.D.shape)).astype("float32") * 0.3)
    rng = np.random.default_rng(1)
    small, target = rng.normal(size=(1, 4, 4, 3)).astype("float32"), rng.normal(size=(1, 2, 2, 4)).astype("float32")
    large = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    before = model.predict(large, verbose=0)
    with dtf.cached(model):
        model(large, training=False)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(small, target, epochs=3, batch_size=1, verbose=0)  # feature path
    assert doconv.max_error(model.predict(large, verbose=0), before) > 1e-3
    want = dtf.fold(model)[0].predict(large, verbose=0)
    doconv.assert_close(model.predict(large, verbose=0), want, "float32", "predict vs fold")
    doconv.assert_close(model(large, training=False), want, "float32", "eager vs fold")


# ---- nothing of a scope is saved, copied or counted ------------------------------------------------------

def test_nothing_of_the_scope_in_weights_files_saved_models_or_copies(tmp_path, compositions):
    model, x, _ = _model()
    a, b = _doconv_layers(model)
    n_weights, n_params = len(model.weights), model.count_params()
    with dtf.cached(model):
        model(x, training=False)
        a.W.assign(a.W * -1.0)  # against the promise: the held kernel now differs from W, D
        want = _reference(model, x)
        assert doconv.max_error(model(x, training=False), want) > 1e-3
        assert [w.name for w in a.weights] == ["W", "D", "bias"] and len(model.weights) == n_weights
        assert model.count_params() == n_params
        model.save(tmp_path / "model.keras")
        tf.saved_model.save(model, str(tmp_path / "saved"))
        model.export(str(tmp_path / "exported"), verbose=False)
        ckpt = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
        twins = {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model))}
        compositions.take()
        for name, twin in twins.items():
            doconv.assert_close(twin(x, training=False), want, "float32", name)
            twin(x, training=False)
        assert compositions.take() == {"a": 4, "b": 4}, "copies are not held by the scope"
    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        archive.extract("model.weights.h5", tmp_path)
    import h5py
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        arrays = []
        weights.visititems(lambda name, obj: arrays.append(name) if isinstance(obj, h5py.Dataset) else None)
    assert len(arrays) == n_weights, arrays
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    doconv.assert_close(loaded(x, training=False), want, "float32", ".keras")
    saved = tf.saved_model.load(str(tmp_path / "saved"))
    stored = [name for name, _ in tf.train.list_variables(str(tmp_path / "saved" / "variables" / "variables"))
              if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert len(stored) == n_weights, stored
    doconv.assert_close(list(saved.signatures["serving_default"](tf.constant(x)).values())[0], want, "float32",
                        "tf.saved_model.save")
    exported = tf.saved_model.load(str(tmp_path / "exported"))
    assert len(exported.variables) == n_weights
    doconv.assert_close(exported.serve(x), want, "float32", "model.export")
    assert len(tf.train.list_variables(ckpt)) == n_weights + 1  # + the save counter
    assert not [name for name, _ in tf.train.list_variables(ckpt) if "cache" in name or "kernel" in name]


def test_cached_refuses_what_is_not_a_layer():
    with pytest.raises(TypeError, match="^model must be a keras Model or Layer, but got list$"):
        with dtf.cached([1, 2]):
            pass


@pytest.mark.parametrize("write", ["set_params", "layer.set_weights", "load_weights"])
def test_doconv_and_layer_writers_drop_a_scope_kernel(write, tmp_path):
    """Writes made through doconv or the layer itself reach the next call even inside a scope (evaluating
    several checkpoints in one ``with cached(model)``)."""
    model, x, _ = _model(seed=0)
    other, _, _ = _model(seed=5)
    other.save_weights(str(tmp_path / "other.weights.h5"))
    with dtf.cached(model):
        model(x, training=False)
        if write == "set_params":
            for layer, source in zip(_doconv_layers(model), _doconv_layers(other)):
                dtf.set_params(layer, dtf.get_params(source))
        elif write == "layer.set_weights":
            for layer, source in zip(_doconv_layers(model), _doconv_layers(other)):
                layer.set_weights(source.get_weights())
        else:
            model.load_weights(str(tmp_path / "other.weights.h5"))
        doconv.assert_close(model(x, training=False), _reference(model, x), "float32", f"{write} in a scope")


def test_convert_refuses_D_mul_below_M_N_saying_why():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c")])
    with pytest.raises(ValueError, match=r"layer 'c'.*D_mul must be >= M\*N = 9 .*convert keeps each convolution's"):
        dtf.convert(model, D_mul=4)
