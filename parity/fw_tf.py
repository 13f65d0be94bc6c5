"""Keras 3 adapters: ``doconv.tf`` on each Keras backend (TensorFlow, PyTorch, JAX), every rank, in
``channels_last`` and ``channels_first`` (JAX: ``channels_last``, see :class:`KerasJax`).

One layer, three backends: :class:`KerasFramework` holds everything that is Keras (building the layer in a
``keras.Sequential``, layouts, inference ``model(x, training=False)``, ``keras.optimizers.SGD``, fold and
the canonical file, all backend-neutral through ``keras.ops``); a thin subclass per backend adds only what
Keras leaves to the backend: autograd (``tf.GradientTape``, ``torch.autograd``, ``jax.grad`` over
``stateless_call``) and a write past ``keras.Variable.assign`` (the backend variable itself).

Keras picks its backend once per process, at import (``KERAS_BACKEND``, else ``~/.keras/keras.json``,
else TensorFlow): a process runs Keras on one backend, so ``tf``, ``keras/torch`` and ``keras/jax`` each
need a process of their own (``nox -s parity`` chains them through an exchange folder, as it chains
MXNet). A Keras framework selected while Keras runs on another backend is reported missing, with the
command that runs it; when nothing has imported Keras yet and ``KERAS_BACKEND`` is unset, the first
Keras framework selected sets it.

Inputs and outputs are converted from and to channels-first here (:mod:`doconv.layouts`, any rank).
The layer's Keras name is what ``export_canonical`` writes.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import sys
import tempfile

import numpy as np

from doconv.layouts import depthwise_hwcm_to_oihw, hwio_to_oihw, nchw_to_nhwc, nhwc_to_nchw

from .frameworks import KNOWN, Framework, Layer, Missing, import_backend

DATA_FORMATS = ("channels_last", "channels_first")
LABELS = {"channels_last": "NHWC", "channels_first": "NCHW"}  # row labels (every rank: channels last / first)


def import_keras_backend(name: str, framework_module: str, keras_backend: str):
    """``doconv.tf`` with Keras running on ``keras_backend``; :class:`Missing` when the framework is absent or
    Keras already runs on another backend in this process (it cannot switch)."""
    hint = KNOWN[name][1]
    try:
        importlib.import_module(framework_module)  # first: a missing framework must not claim KERAS_BACKEND
    except ImportError as err:
        raise Missing(name, f"{framework_module} is not installed ({err})", hint) from None
    if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
        os.environ["KERAS_BACKEND"] = keras_backend
    backend = import_backend(name, framework_module, "doconv.tf")
    import keras
    running = keras.config.backend()
    if running != keras_backend:
        chosen = os.environ.get("KERAS_BACKEND")
        raise Missing(name, f"Keras runs on {running!r} in this process ("
                            f"{f'KERAS_BACKEND={chosen}' if chosen else 'KERAS_BACKEND unset'}) and picks its "
                            f"backend once, at import", hint)
    return backend


class KerasFramework(Framework):
    """``doconv.tf`` on the Keras backend ``keras_backend``; subclasses give its autograd and raw write."""

    official_flavour = "tf"
    #: The selection name (:data:`doconv.parity.frameworks.KNOWN`), the Keras backend, and the module whose
    #: absence means the backend's framework is not installed.
    family = keras_backend = framework_module = "?"
    #: The data formats checked: one row (adapter) each.
    data_formats = DATA_FORMATS

    def __init__(self, data_format: str):
        self.backend = import_keras_backend(self.family, self.framework_module, self.keras_backend)
        import keras
        self.keras, self.ops = keras, keras.ops
        self.data_format = data_format
        self.name = f"{self.family}/{LABELS[data_format]}"
        self.unsupported = frozenset(self.backend.UNSUPPORTED_FEATURES)
        layers = keras.layers
        self.plain_convs = (layers.Conv1D, layers.Conv2D, layers.Conv3D)
        self.plain_depthwise = (layers.DepthwiseConv1D, layers.DepthwiseConv2D)

    # ---- channels-first NumPy <-> the layer's layout, as backend tensors ---------------------------------------
    def _in(self, a, layer: Layer):
        a = np.asarray(a, dtype=layer.dtype)
        return self.ops.convert_to_tensor(nchw_to_nhwc(a) if self.data_format == "channels_last" else a)

    def _out(self, t) -> np.ndarray:
        a = self.ops.convert_to_numpy(t)
        return nhwc_to_nchw(a) if self.data_format == "channels_last" else a

    def build(self, config, dtype, composition="kernel") -> Layer:
        # Every check sets the parameters it compares, so W's initial values are never read: zeros spare JAX
        # compiling a random generator per shape (the folded conv inherits the initializer, and builds too).
        conv = self.backend.layer_from_config(config, dtype=dtype, composition=composition,
                                              data_format=self.data_format, kernel_initializer="zeros")
        spatial, c = (None,) * config.rank, config.in_channels
        shape = (*spatial, c) if self.data_format == "channels_last" else (c, *spatial)
        model = self.keras.Sequential([self.keras.Input(shape=shape, dtype=dtype), conv])
        return Layer(model, conv, config, dtype)

    def forward(self, layer, x, *, training=True):
        with contextlib.nullcontext() if training else self._inference():
            return self._out(layer.obj(self._in(x, layer), training=training))

    def _vars(self, layer):
        # Keyed by position and local name: a Keras variable's path starts with its layer's unique name.
        return {f"{i}:{getattr(v, 'path', v.name).rsplit('/', 1)[-1]}": v
                for i, v in enumerate(layer.layer.trainable_weights)}

    def trainables(self, layer):
        return {name: self.ops.convert_to_numpy(v) for name, v in self._vars(layer).items()}

    # ---- what each backend does itself ---------------------------------------------------------------------------
    def _grads(self, layer, x, u, variables, with_x: bool):
        """``(d/dx or None, [d/dv for v in variables])`` of ``sum(u * model(x, training=True))``, backend tensors
        (None where a variable does not reach the output)."""
        raise NotImplementedError

    def _raw_add(self, variable, delta) -> None:
        """``variable += delta`` on the backend variable itself, past ``keras.Variable.assign``."""
        raise NotImplementedError

    def _inference(self):
        """The context of an inference call as the backend's ``model.predict`` makes it (nothing recorded)."""
        return contextlib.nullcontext()

    # ---- the harness's calls, backend-neutral ----------------------------------------------------------------
    def gradients(self, layer, x, u):
        variables = self._vars(layer)
        dx, grads = self._grads(layer, self._in(x, layer), self._in(u, layer), list(variables.values()), True)
        return self._out(dx), {n: self.ops.convert_to_numpy(g) for n, g in zip(variables, grads) if g is not None}

    def perturb(self, layer, deltas):
        for name, v in self._vars(layer).items():
            v.assign_add(self.ops.convert_to_tensor(deltas[name], dtype=v.dtype))

    def raw_write(self, layer, deltas):
        for name, v in self._vars(layer).items():
            self._raw_add(v, self.ops.convert_to_tensor(deltas[name], dtype=v.dtype))

    def sgd(self, layer, x, u, lr, steps):
        optimizer = self.keras.optimizers.SGD(learning_rate=lr)
        xt, ut, variables = self._in(x, layer), self._in(u, layer), list(self._vars(layer).values())
        for _ in range(steps):
            _, grads = self._grads(layer, xt, ut, variables, False)
            optimizer.apply_gradients(zip(grads, variables))

    def fold(self, layer):
        folded, _ = self.backend.fold(layer.obj)
        convs = [l for l in folded.layers if isinstance(l, self.plain_convs + self.plain_depthwise)]
        if len(convs) != 1 or type(convs[0]).__module__.startswith("doconv"):
            raise TypeError(f"fold gave layers {[type(l).__name__ for l in folded.layers]}, expected one plain "
                            f"Conv1D/2D/3D or DepthwiseConv1D/2D")
        plain = convs[0]
        kernel = self.ops.convert_to_numpy(plain.kernel)
        kernel = depthwise_hwcm_to_oihw(kernel) if isinstance(plain, self.plain_depthwise) else hwio_to_oihw(kernel)
        bias = None if plain.bias is None else self.ops.convert_to_numpy(plain.bias)
        return kernel, bias, lambda x: self._out(folded(self._in(x, layer), training=False))


class KerasTF(KerasFramework):
    """Keras on TensorFlow (the ``tf`` rows): ``tf.GradientTape``; the raw write goes to the ``tf.Variable``."""

    family, keras_backend, framework_module = "tf", "tensorflow", "tensorflow"

    def __init__(self, data_format: str):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        super().__init__(data_format)
        import tensorflow as tf
        self.tf = tf

    def _grads(self, layer, x, u, variables, with_x):
        with self.tf.GradientTape() as tape:
            if with_x:
                tape.watch(x)
            loss = self.tf.reduce_sum(layer.obj(x, training=True) * u)
        head = [x] if with_x else []
        grads = tape.gradient(loss, head + variables)
        return (grads[0] if head else None), grads[len(head):]

    def _raw_add(self, variable, delta):
        variable.value.assign_add(delta)


class KerasTorch(KerasFramework):
    """Keras on PyTorch (``keras/torch``): ``torch.autograd.grad``; the raw write goes through the backing
    ``torch.nn.Parameter``'s ``.data``, which bumps no version counter."""

    family, keras_backend, framework_module = "keras/torch", "torch", "torch"

    def __init__(self, data_format: str):
        super().__init__(data_format)
        import torch
        self.torch = torch

    def _grads(self, layer, x, u, variables, with_x):
        x = x.detach().requires_grad_(with_x)
        loss = (layer.obj(x, training=True) * u).sum()
        head = [x] if with_x else []
        grads = self.torch.autograd.grad(loss, head + [v.value for v in variables], allow_unused=True)
        return (grads[0] if head else None), list(grads[len(head):])

    def _raw_add(self, variable, delta):
        variable.value.data.add_(delta)

    def _inference(self):
        return self.torch.no_grad()


class KerasJax(KerasFramework):
    """Keras on JAX (``keras/jax``): ``jax.grad`` of ``model.stateless_call``, jit-compiled as Keras' own JAX
    train step is; the raw write replaces the variable's array directly (``_direct_assign``, what ``assign``
    calls after its checks). float64 needs JAX's x64 mode, switched on here for this process. The backend's
    ``cached()`` scope serves no call on JAX (``doconv.tf.cache``), so the fresh-kernel check expects every
    call to compose."""

    family, keras_backend, framework_module = "keras/jax", "jax", "jax"
    scope_serves_inference = False  # doconv.tf.cached(): on JAX every call composes (a call may be traced)
    # XLA compiles every new shape, so each layout adds a full round of compiles to the run: Keras' default
    # layout here; channels_first, whose layer code is backend-neutral, runs on TensorFlow and torch.
    data_formats = ("channels_last",)

    def __init__(self, data_format: str):
        super().__init__(data_format)
        import jax
        jax.config.update("jax_enable_x64", True)  # else float64 arrays are silently float32
        if jax.config.jax_compilation_cache_dir is None:
            # XLA compiles each shape's computation anew, most of a JAX run's time; the checks build many
            # layers of one shape (the gradient of the sgd check's layer is the forward check's): a cache keyed
            # by the computation compiles each once.
            folder = tempfile.mkdtemp(prefix="doconv-parity-xla-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            jax.config.update("jax_compilation_cache_dir", folder)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.jax = jax

    def _grads(self, layer, x, u, variables, with_x):
        model = layer.obj
        if "grad" not in layer.state:  # one compiled forward and backward per layer, as fit's train step

            def loss(x, u, values, non_trainable):
                out, _ = model.stateless_call(values, non_trainable, x, training=True)
                return self.jax.numpy.sum(out * u)
            layer.state["grad"] = self.jax.jit(self.jax.grad(loss, argnums=(0, 2)))
        dx, dvalues = layer.state["grad"](x, u, [v.value for v in model.trainable_variables],
                                          [v.value for v in model.non_trainable_variables])
        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        return (dx if with_x else None), [dvalues[index[id(v)]] for v in variables]

    def _raw_add(self, variable, delta):
        variable._direct_assign(variable.value + delta)


def _formats(cls):
    return lambda: [cls(fmt) for fmt in cls.data_formats]


#: The factories :data:`doconv.parity.frameworks.KNOWN` names, one per Keras backend.
tf_frameworks = _formats(KerasTF)
keras_torch_frameworks = _formats(KerasTorch)
keras_jax_frameworks = _formats(KerasJax)
