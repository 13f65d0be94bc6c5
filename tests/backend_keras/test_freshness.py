"""Freshness on every backend: each write to W or D is seen by the next call, ``stateless_call`` computes
with the values it is given, and the explicit ``doconv.tf.cached`` scope composes once per layer where the
backend serves it (TensorFlow and torch eager inference; on JAX every call composes)."""

import contextlib

import numpy as np
import pytest
from doconv_keras_testing import SCOPE_SERVES_EAGER, inference, to_numpy

import doconv
import doconv.tf as dtf
import keras
from doconv import cases, layouts

X_SHAPE = (4, 6, 6, 3)


def _model(seed=0):
    """Two DO-Conv layers (DO-Conv, then DO-GConv with D_mul > MN) with random W and D, data to fit."""
    model = keras.Sequential([keras.Input(X_SHAPE[1:]), dtf.DOConv2D(6, 3, padding="same", name="a"),
                              dtf.DOConv2D(6, 3, groups=3, D_mul=12, padding="same", name="b")])
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        layer.W.assign(rng.normal(size=tuple(layer.W.shape)).astype("float32") * 0.5)
        layer.D.assign(rng.normal(size=tuple(layer.D.shape)).astype("float32") * 0.3)
    x = rng.normal(size=X_SHAPE).astype("float32")
    y = rng.normal(size=(*X_SHAPE[:3], 6)).astype("float32")
    return model, x, y


def _reference(model, x, values=None):
    """The core's forward through the model's DO-Conv layers, from their parameters as they are now (or from
    ``values``, the trainable values of the model in order, as ``stateless_call`` takes them)."""
    y = layouts.nhwc_to_nchw(np.asarray(x, np.float64))
    for i, layer in enumerate(model.layers):
        if values is None:
            params = dtf.get_params(layer)
        else:
            twin = dtf.layer_from_config(layer.doconv_config)
            twin.set_weights([to_numpy(v) for v in values[3 * i:3 * i + 3]])
            params = dtf.get_params(twin)
        y = doconv.forward(y, params.astype(np.float64), layer.doconv_config)
    return layouts.nchw_to_nhwc(y)


def _fill(model, x):
    """Every call an implicit cache would fill: eager inference, ``predict``, a cached() scope."""
    with inference():
        model(x, training=False)
    model.predict(x, verbose=0)
    with dtf.cached(model), inference():
        model(x, training=False)


def _check_fresh(model, x, compositions, what):
    """Eager calls and ``predict`` equal the core on the parameters as they are; a cached() scope composes each
    layer once where the backend serves it (else at every call), equal to that; outside it every call composes."""
    want = _reference(model, x)
    with inference():
        doconv.assert_close(to_numpy(model(x, training=False)), want, "float32", f"{what}: eager inference")
    doconv.assert_close(to_numpy(model(x, training=False)), want, "float32", f"{what}: eager")
    doconv.assert_close(model.predict(x, verbose=0), want, "float32", f"{what}: predict")
    compositions.take()
    with dtf.cached(model), inference():
        first, second = to_numpy(model(x, training=False)), to_numpy(model(x, training=False))
        per_layer = 1 if SCOPE_SERVES_EAGER else 2
        assert compositions.take() == {"a": per_layer, "b": per_layer}, f"{what}: compositions in the scope"
    doconv.assert_close(first, want, "float32", f"{what}: in the scope")
    np.testing.assert_array_equal(second, first)
    with inference():
        model(x, training=False)
    assert compositions.take() == {"a": 1, "b": 1}, f"{what}: outside the scope every call composes"


# ---- the write paths: each returns the write, prepared (compiled, saved) beforehand ----------------------

def _assign(model, data, tmp_path):
    a, b = model.layers
    return lambda: (a.W.assign(a.W * 1.5), b.D.assign_add(keras.ops.full(b.D.shape, 0.2)), a.D.assign_sub(a.D * 0.5))


def _set_weights(model, data, tmp_path):
    other, _, _ = _model(seed=5)
    return lambda: model.set_weights(other.get_weights())


def _layer_set_weights(model, data, tmp_path):
    other, _, _ = _model(seed=5)
    return lambda: [layer.set_weights(source.get_weights()) for layer, source in zip(model.layers, other.layers)]


def _set_params(model, data, tmp_path):
    other = [cases.Case(layer.name, {k: v for k, v in layer.doconv_config.to_dict().items() if k != "rank"},
                        (1, layer.doconv_config.in_channels, 6, 6)).params(7, "float32") for layer in model.layers]
    return lambda: [dtf.set_params(layer, p) for layer, p in zip(model.layers, other)]


def _fit(**optimizer_kwargs):
    def prepare(model, data, tmp_path):
        model.compile(keras.optimizers.Adam(0.05, **optimizer_kwargs), "mse")
        return lambda: model.fit(*data, epochs=2, batch_size=2, verbose=0)
    return prepare


def _load_weights(model, data, tmp_path):
    other, _, _ = _model(seed=8)
    other.save_weights(tmp_path / "other.weights.h5")
    return lambda: model.load_weights(tmp_path / "other.weights.h5")


def _stateless_training_step(model, data, tmp_path):
    """A JAX-style step: gradients of ``stateless_call`` taken by the backend, new values assigned back."""
    from doconv_keras_testing import layer_grads

    def step():
        for layer in model.layers:
            x = np.asarray(data[0]) if layer.name == "a" else to_numpy(model.layers[0](data[0]))
            _, grads = layer_grads(layer, x, np.ones(layer.compute_output_shape(x.shape), "float32"))
            for name in ("W", "D", "bias"):
                variable = getattr(layer, name)
                variable.assign(to_numpy(variable) - 0.05 * grads[name])
    return step


WRITES = {
    "assign": _assign, "model.set_weights": _set_weights, "layer.set_weights": _layer_set_weights,
    "set_params": _set_params, "fit": _fit(), "fit-use_ema": _fit(use_ema=True, ema_momentum=0.5),
    "load_weights": _load_weights, "gradient-step-assigned": _stateless_training_step,
}


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_every_write_path_is_seen_by_the_next_call(write, compositions, tmp_path):
    model, x, y = _model()
    write = write(model, (x, y), tmp_path)
    _fill(model, x)
    before = [to_numpy(v) for v in model.trainable_variables]
    write()
    moved = max(doconv.max_error(to_numpy(v), old) for v, old in zip(model.trainable_variables, before))
    assert moved > 1e-3, "the write must change W or D"
    _check_fresh(model, x, compositions, "after the write")


def test_predict_between_fit_epochs(compositions):
    model, x, y = _model()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    seen = []

    class PredictEachEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            doconv.assert_close(model.predict(x, verbose=0), _reference(model, x), "float32", f"epoch {epoch}")
            seen.append(epoch)

    outputs = []
    for _ in range(2):
        model.fit(x, y, epochs=2, batch_size=2, verbose=0, callbacks=[PredictEachEpoch()])
        outputs.append(model.predict(x, verbose=0))
    assert seen == [0, 1, 0, 1] and doconv.max_error(outputs[1], outputs[0]) > 1e-3
    _check_fresh(model, x, compositions, "fit epochs")


@pytest.mark.parametrize("scoped", [False, True], ids=["outside-a-scope", "inside-a-scope"])
def test_stateless_call_uses_the_values_passed(scoped, compositions):
    model, x, _ = _model()
    a, _ = model.layers
    old = _reference(model, x)
    model.predict(x, verbose=0)
    rng = np.random.default_rng(3)
    new = [keras.ops.convert_to_tensor(to_numpy(v) * 2.0 + rng.normal(size=v.shape).astype("float32") * 0.1)
           for v in model.trainable_variables]
    with dtf.cached(model) if scoped else contextlib.nullcontext(), inference():
        model(x, training=False)  # in the scope: the held kernels of the variables
        y, _ = a.stateless_call(new[:3], [], x, training=False)
        want = _reference(keras.Sequential([a]), x, new[:3])
        doconv.assert_close(to_numpy(y), want, "float32", "layer.stateless_call")
        y, _ = model.stateless_call(new, [], x, training=False)
        doconv.assert_close(to_numpy(y), _reference(model, x, new), "float32", "model.stateless_call")
        doconv.assert_close(to_numpy(model(x, training=False)), old, "float32", "the variables are unchanged")
    doconv.assert_close(model.predict(x, verbose=0), old, "float32", "predict after")


def test_calls_with_training_compose_inside_a_scope(compositions):
    model, x, _ = _model()
    a, _ = model.layers
    with dtf.cached(model):
        with inference():
            model(x, training=False)
        a.W.assign(a.W * 2.0)  # against the scope's promise, so that reading a held kernel would show
        compositions.take()
        doconv.assert_close(to_numpy(model(x, training=True)), _reference(model, x), "float32", "training=True")
        assert compositions.take() == {"a": 1, "b": 1}


def test_the_scope_drops_its_kernels_on_exit(compositions):
    model, x, _ = _model()
    a, _ = model.layers
    with pytest.raises(RuntimeError, match="inside"):
        with dtf.cached(model), inference():
            model(x, training=False)
            raise RuntimeError("inside")
    a.W.assign(a.W * -2.0)
    with inference():
        doconv.assert_close(to_numpy(model(x, training=False)), _reference(model, x), "float32", "after the scope")
    assert dtf.cache._HELD == {}
