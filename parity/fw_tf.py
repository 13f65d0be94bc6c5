"""Keras 3 / TensorFlow adapter: ``doconv.tf`` in ``channels_last`` and ``channels_first``.

Inputs and outputs are converted from and to NCHW here (:mod:`doconv.layouts`); everything else is the
backend's contract (``layer_from_config(config, data_format=...)``, ``get_params``/``set_params`` in
canonical layout, ``fold``, the canonical file, ``import_official`` with the official TF variables).
Gradients come from ``tf.GradientTape``, training from ``keras.optimizers.SGD``; inference is
``model(x, training=False)``. The layer lives in a ``keras.Sequential`` (the model-level functions take
a model); its Keras layer name is what ``export_canonical`` writes.
"""

from __future__ import annotations

import os

import numpy as np

from doconv.layouts import depthwise_hwcm_to_oihw, hwio_to_oihw, nchw_to_nhwc, nhwc_to_nchw

from .frameworks import Framework, Layer, import_backend

DATA_FORMATS = ("channels_last", "channels_first")


class KerasFramework(Framework):
    family = "tf"
    official_flavour = "tf"

    def __init__(self, data_format: str):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.backend = import_backend("tf", "tensorflow", "doconv.tf")
        import keras
        import tensorflow as tf
        self.tf, self.keras = tf, keras
        self.data_format = data_format
        self.name = "tf/NHWC" if data_format == "channels_last" else "tf/NCHW"
        self.unsupported = frozenset(self.backend.UNSUPPORTED_FEATURES)

    # NCHW <-> the layer's layout
    def _in(self, a, layer: Layer):
        a = np.asarray(a, dtype=layer.dtype)
        return self.tf.constant(nchw_to_nhwc(a) if self.data_format == "channels_last" else a)

    def _out(self, t) -> np.ndarray:
        a = np.asarray(t)
        return nhwc_to_nchw(a) if self.data_format == "channels_last" else a

    def build(self, config, dtype, composition="kernel") -> Layer:
        conv = self.backend.layer_from_config(config, dtype=dtype, composition=composition,
                                              data_format=self.data_format)
        c = config.in_channels
        shape = (None, None, c) if self.data_format == "channels_last" else (c, None, None)
        model = self.keras.Sequential([self.keras.Input(shape=shape, dtype=dtype), conv])
        return Layer(model, conv, config, dtype)

    def forward(self, layer, x, *, training=True):
        return self._out(layer.obj(self._in(x, layer), training=training))

    def _vars(self, layer):
        # Keyed by position and local name: a Keras variable's path starts with its layer's unique name.
        return {f"{i}:{getattr(v, 'path', v.name).rsplit('/', 1)[-1]}": v
                for i, v in enumerate(layer.layer.trainable_weights)}

    def trainables(self, layer):
        return {name: np.array(v) for name, v in self._vars(layer).items()}

    def _grads(self, layer, x, u, with_x: bool):
        xt, ut = self._in(x, layer), self._in(u, layer)
        variables = self._vars(layer)
        with self.tf.GradientTape() as tape:
            if with_x:
                tape.watch(xt)
            loss = self.tf.reduce_sum(layer.obj(xt, training=True) * ut)
        grads = tape.gradient(loss, ([xt] if with_x else []) + list(variables.values()))
        return grads, variables

    def gradients(self, layer, x, u):
        (dx, *grads), variables = self._grads(layer, x, u, True)
        return self._out(dx), {n: np.array(g) for n, g in zip(variables, grads) if g is not None}

    def perturb(self, layer, deltas):
        for name, v in self._vars(layer).items():
            v.assign(v + deltas[name])

    def raw_write(self, layer, deltas):
        for name, v in self._vars(layer).items():
            v.value.assign(v.value + deltas[name])  # the backend tf.Variable itself, past keras.Variable.assign

    def sgd(self, layer, x, u, lr, steps):
        optimizer = self.keras.optimizers.SGD(learning_rate=lr)
        for _ in range(steps):
            grads, variables = self._grads(layer, x, u, False)
            optimizer.apply_gradients(zip(grads, variables.values()))

    def fold(self, layer):
        folded, _ = self.backend.fold(layer.obj)
        convs = [l for l in folded.layers if isinstance(l, self.keras.layers.Conv2D)
                 or isinstance(l, self.keras.layers.DepthwiseConv2D)]
        if len(convs) != 1 or type(convs[0]).__module__.startswith("doconv"):
            raise TypeError(f"fold gave layers {[type(l).__name__ for l in folded.layers]}, expected one plain "
                            f"Conv2D / DepthwiseConv2D")
        plain = convs[0]
        kernel = np.array(plain.kernel)
        kernel = (depthwise_hwcm_to_oihw(kernel) if isinstance(plain, self.keras.layers.DepthwiseConv2D)
                  else hwio_to_oihw(kernel))
        bias = None if plain.bias is None else np.array(plain.bias)
        return kernel, bias, lambda x: self._out(folded(self._in(x, layer), training=False))


def frameworks():
    return [KerasFramework(fmt) for fmt in DATA_FORMATS]
