"""The inference kernel cache: never stale, never in the way of gradients, tracked for SavedModel.

Every comparison randomises D (D_delta) and checks against ``doconv.forward``, the core's VJP or the
folded ``keras.layers.Conv2D``.
"""

import numpy as np
import pytest
from doconv_tf_testing import check_forward_and_grads, from_layout, make_layer, to_layout

import doconv
import doconv.tf as dtf
import keras
import tensorflow as tf
from doconv import cases


def _randomise_D(layer, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    layer.D_delta.assign(rng.normal(size=tuple(layer.D_delta.shape)).astype(layer.D_delta.dtype) * scale)


def _close_to_fold(model, x, what):
    """``model.predict`` (the cached kernel) equals the folded model's, and the composing call."""
    want = dtf.fold(model).predict(x, verbose=0)
    doconv.assert_close(model.predict(x, verbose=0), want, "float32", f"{what}: predict vs fold")
    doconv.assert_close(model(x, training=False), want, "float32", f"{what}: eager training=False vs fold")


def test_auto_feature_training_step_then_cached_kernel_inference():
    """'auto' takes the feature path on small inputs: a training step there must stale the cached kernel."""
    layer = dtf.DOConv2D(4, 3, D_mul=8, depthwise_separable=True, composition="auto")
    rng = np.random.default_rng(0)
    small, large = (rng.normal(size=s).astype("float32") for s in ((1, 4, 4, 3), (8, 6, 6, 3)))
    layer(large)
    _randomise_D(layer)
    assert layer._resolve_composition(small) == "feature" and layer._resolve_composition(large) == "kernel"
    layer(large, training=False)  # fills the cache
    optimizer = keras.optimizers.SGD(0.5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(small, training=True) ** 2)
    optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))
    want = doconv.forward(large.transpose(0, 3, 1, 2), dtf.get_params(layer), layer.doconv_config)
    doconv.assert_close(from_layout(layer(large, training=False), "channels_last"), want, "float32", "after the step")
    doconv.assert_close(layer(large, training=False), layer.fold()(large), "float32", "vs fold")


def test_auto_fit_on_small_inputs_then_predict_on_large():
    inputs = keras.Input((None, None, 3))
    layer = dtf.DOConv2D(4, 3, D_mul=8, depthwise_separable=True, composition="auto")
    model = keras.Model(inputs, layer(inputs))
    _randomise_D(layer)
    rng = np.random.default_rng(1)
    small, target = rng.normal(size=(1, 4, 4, 3)).astype("float32"), rng.normal(size=(1, 2, 2, 4)).astype("float32")
    large = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    before = model.predict(large, verbose=0)  # fills the cache (kernel path)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(small, target, epochs=3, batch_size=1, verbose=0)  # feature path
    assert doconv.max_error(model.predict(large, verbose=0), before) > 1e-3
    _close_to_fold(model, large, "auto fit")


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
@pytest.mark.parametrize("case", [cases.case("k3-same"), cases.case("g3-k3-s2-same-2MN"), cases.case("dw-x2-k3"),
                                  cases.case("k1x1-g2-s2")], ids=str)
def test_inference_function_traced_without_a_tape_then_differentiated(case, jit_compile):
    """A ``tf.function`` traced with training=False and no tape reads the cache; run under a tape later,
    its gradients for x, W, D and bias must be the composition's (the core's VJP), not zeros."""
    def run(layer, x, u):
        infer = tf.function(lambda x: layer(x, training=False), jit_compile=jit_compile)
        infer(tf.constant(x))  # traced (and the cache filled) without a tape
        assert int(layer._cache.stale.numpy()) == 0
        x = tf.constant(x)
        variables = {k: v for k, v in {"W": layer.W, "D": layer.D_delta, "bias": layer.bias}.items() if v is not None}
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = infer(x)
            loss = tf.reduce_sum(y * u)
        grads = tape.gradient(loss, [x] + [v.value for v in variables.values()])
        return y, dict(zip(["x"] + list(variables), grads))
    check_forward_and_grads(case, "float32", "channels_last", run)


def test_inference_function_under_a_tape_trains_like_the_folded_conv2d():
    """The repro: the same pre-traced inference function in a training loop, then inference again."""
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


def _ema_model():
    inputs = keras.Input((6, 6, 3))
    layer = dtf.DOConv2D(4, 3)
    model = keras.Model(inputs, layer(inputs))
    _randomise_D(layer)
    return model


@pytest.mark.parametrize("swap", [False, True], ids=["finalize", "SwapEMAWeights"])
def test_ema_weights_written_at_the_end_of_fit_refresh_the_cache(swap):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(16, 6, 6, 3)).astype("float32"), rng.normal(size=(16, 4, 4, 4)).astype("float32")
    model = _ema_model()
    model.compile(keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5), "mse")
    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if swap else []
    model.fit(x, y, epochs=2, batch_size=8, validation_data=(x, y), verbose=0, callbacks=callbacks)
    _close_to_fold(model, x, "EMA")


def test_backend_variable_writes_refresh_the_cache():
    """Writes of the tf.Variable itself (optimizers, EMA, user code) are seen, eagerly and in graphs."""
    case = cases.case("g3-k3")
    layer, _ = make_layer(case)
    x = to_layout(case.input(0, "float32"), "channels_last")
    infer = tf.function(lambda x: layer(x, training=False))
    writes = [lambda: layer.W.value.assign(layer.W.value * 2.0),
              lambda: layer.D_delta.value.assign_add(tf.ones_like(layer.D_delta.value)),
              lambda: layer.W.value.assign_sub(tf.ones_like(layer.W.value) * 0.1),
              lambda: layer.D_delta.value.scatter_nd_update([[0, 0, 0]], [5.0]),
              lambda: tf.function(lambda: layer.W.value.assign(layer.W.value * -1.0))()]
    for i, write in enumerate(writes):
        for run in (infer, lambda x: layer(x, training=False)):
            run(x)  # fills the cache
            write()
            want = doconv.forward(case.input(0), dtf.get_params(layer), case.config)
            doconv.assert_close(from_layout(run(x), "channels_last"), want, "float32", f"write {i}")


def test_saved_model_of_an_unfolded_model(tmp_path):
    """``tf.saved_model.save`` needs the cache variables tracked; checkpoints and weights stay as they were."""
    inputs = keras.Input((6, 6, 3))
    layer = dtf.DOConv2D(4, 3, padding="same")
    model = keras.Model(inputs, layer(inputs))
    _randomise_D(layer)
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 3)).astype("float32")
    want = dtf.fold(model).predict(x, verbose=0)
    doconv.assert_close(model.predict(x, verbose=0), want, "float32", "predict")
    tf.saved_model.save(model, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    doconv.assert_close(list(loaded.signatures["serving_default"](tf.constant(x)).values())[0], want, "float32",
                        "SavedModel serving_default")
    model.export(str(tmp_path / "exported"), verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "exported"))
    doconv.assert_close(exported.serve(x), want, "float32", "model.export")
    assert [w.name for w in layer.weights] == ["W", "D_delta", "bias"]
    assert model.count_params() == 3 * 9 * 4 + 81 * 3 + 4
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    assert not [name for name, _ in tf.train.list_variables(path) if "cache" in name]
    inputs = keras.Input((6, 6, 3))
    restored = keras.Model(inputs, dtf.DOConv2D(4, 3, padding="same")(inputs))
    restored.predict(x, verbose=0)  # fills its cache with its own weights
    tf.train.Checkpoint(model=restored).read(path).assert_consumed()
    doconv.assert_close(restored.predict(x, verbose=0), want, "float32", "checkpoint restore")
