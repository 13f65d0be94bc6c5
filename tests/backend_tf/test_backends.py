"""What needs a fresh interpreter: KERAS_BACKEND=torch, and MirroredStrategy over two logical CPUs."""

import pytest
from doconv_tf_testing import run_python

pytest.importorskip("torch")

TORCH_CHECK = """
    import numpy as np, keras, torch
    assert keras.backend.backend() == "torch"
    import doconv, doconv.tf as dtf
    from doconv import cases, layouts
    from doconv.selfcheck import layer_vjp
    for data_format in ("channels_last", "channels_first"):
        for id in ("k3-s2-same", "dw-x2-k3", "g3-k3-s2-same-2MN", "k1x1-g2-s2"):
            case = cases.case(id)
            c, x, p = case.config, case.input(0), case.params(0)
            layer = dtf.layer_from_config(c, dtype="float64", data_format=data_format)
            dtf.set_params(layer, p)
            to = layouts.nchw_to_nhwc if data_format == "channels_last" else (lambda a: a)
            back = layouts.nhwc_to_nchw if data_format == "channels_last" else (lambda a: a)
            xt = torch.tensor(to(x), requires_grad=True)
            y = layer(xt, training=True)
            u = np.random.default_rng(1).normal(size=y.shape)
            (y * torch.tensor(u)).sum().backward()
            want = doconv.forward(x, p, c)
            doconv.assert_close(back(y.detach().numpy()), want, "float64", id)
            grads = layer_vjp(back(u), x, p, c)
            doconv.assert_close(back(xt.grad.numpy()), grads["x"], "float64", id + " dx")
            dW = layer.W.value.grad.numpy().transpose(dtf.W_TO_CANONICAL)
            doconv.assert_close(dW, grads["W"], "float64", id + " dW")
            if c.has_D:
                doconv.assert_close(layer.D.value.grad.numpy().transpose(2, 0, 1), grads["D"], "float64", id)
            with torch.no_grad():
                with dtf.cached(layer):  # the first call composes, the second reads the held kernel
                    for _ in range(2):
                        doconv.assert_close(back(layer(to(x), training=False).numpy()), want, "float64", id + " cached")
                p2 = case.params(4)
                dtf.set_params(layer, p2)
                doconv.assert_close(back(layer(to(x), training=False).numpy()), doconv.forward(x, p2, c), "float64", id)
    print("torch backend ok")
"""


def test_layer_on_the_torch_backend():
    assert "torch backend ok" in run_python(TORCH_CHECK, env={"KERAS_BACKEND": "torch"})


TORCH_STATE_DICT_CHECK = """
    import numpy as np, keras, torch
    assert keras.backend.backend() == "torch"
    import doconv, doconv.tf as dtf
    from doconv import cases, layouts
    for id in ("g3-k3", "k3-same", "dw-x2-k3"):
        case = cases.case(id)
        c, x, p = case.config, case.input(0), case.params(0)  # D randomised
        layer = dtf.layer_from_config(c, dtype="float32")
        dtf.set_params(layer, p)
        model = keras.Sequential([keras.Input(layouts.nchw_to_nhwc(x).shape[1:]), layer])
        predict = lambda: layouts.nhwc_to_nchw(model.predict(layouts.nchw_to_nhwc(x), verbose=0))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        other = case.params(3)
        dtf.set_params(layer, other)
        for _ in range(2):
            doconv.assert_close(predict(), doconv.forward(x, other, c), "float32", id + " other")
        model.load_state_dict(state)  # Parameter.copy_() behind Keras' assign
        doconv.assert_close(predict(), doconv.forward(x, p, c), "float32", id + " load_state_dict")
        with torch.no_grad():  # any in-place write of the Parameters is seen
            layer.D.value.mul_(-1.0)
        doconv.assert_close(predict(), doconv.forward(x, dtf.get_params(layer), c), "float32", id + " in place")
    print("torch state_dict ok")
"""


def test_load_state_dict_and_in_place_writes_are_seen_on_the_torch_backend():
    assert "torch state_dict ok" in run_python(TORCH_STATE_DICT_CHECK, env={"KERAS_BACKEND": "torch"})


TORCH_NESTED_CHECK = """
    import warnings
    import numpy as np, keras, torch
    assert keras.backend.backend() == "torch"
    import doconv, doconv.tf as dtf

    class Block(keras.layers.Layer):  # no build(): Keras traces call() in a stateless scope to build it
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = dtf.DOConv2D(3, 3, padding="same")

        def call(self, x):
            return x + self.conv(x)

    class Subclassed(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = dtf.DOConv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 7, 3)).astype("float32")
    inputs = keras.Input((7, 7, 3))
    block = Block()
    model = keras.Model(inputs, block(inputs))
    assert [w.name for w in model.weights] == ["W", "D", "bias"], model.weights
    block.conv.D.assign(rng.normal(size=tuple(block.conv.D.shape)) * 0.3)
    want = x + keras.ops.convert_to_numpy(block.conv.fold()(x))
    doconv.assert_close(model.predict(x, verbose=0), want, "float32", "block")
    sub = Subclassed()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sub(x)
    assert len(sub.weights) == 3 and sub.count_params() == 3 * 9 * 4 + 81 * 3 + 4, sub.weights
    print("torch nested ok")
"""


def test_nested_layers_on_the_torch_backend():
    assert "torch nested ok" in run_python(TORCH_NESTED_CHECK, env={"KERAS_BACKEND": "torch"})


MIRRORED_CHECK = """
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, doconv, doconv.tf as dtf

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8, 8, 4)),
                                  dtf.DOConv2D(6, 3, padding="same", activation="relu", d_init="random"),
                                  dtf.DOConv2D(6, 3, groups=6, strides=2, padding="same", D_mul=12),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8, 8, 4)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")
    single = build()
    single.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        mirrored = build()
    mirrored.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)  # 8 examples per replica
    moved = 0
    for a, b, start in zip(single.get_weights(), mirrored.get_weights(), build().get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        moved += not np.allclose(a, start)
    assert moved == len(single.get_weights()), "every variable must have trained"
    out = mirrored.predict(x, batch_size=8, verbose=0)
    np.testing.assert_allclose(out, single.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    print("mirrored ok")
"""


def test_mirrored_strategy_matches_single_device_training():
    assert "mirrored ok" in run_python(MIRRORED_CHECK)
