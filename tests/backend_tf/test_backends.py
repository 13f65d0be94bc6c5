"""What needs a fresh interpreter: MirroredStrategy over two logical CPUs (set before TensorFlow initialises).

The layer on the other Keras backends (torch, JAX) is tested by the backend-neutral suite in
tests/backend_keras, run once per backend (``nox -s tests``, ``nox -s tests-keras-jax``).
"""

from doconv_tf_testing import run_python


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
