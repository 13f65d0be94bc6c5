"""Whole-model benchmark of doconv.tf (Keras 3, TensorFlow backend) on CPU: each plain network against its
DO-Conv twin. The Keras counterpart of ``bench/torch_models.py``.

Networks, at the sizes people train them (``keras.applications`` where Keras has the network, ``weights=None``;
the CIFAR ResNets are built in this file from ``keras.layers``, as ``bench/torch_zoo.py`` builds them):

=============  ===================================================  =====  =======
name           network                                              batch  input
=============  ===================================================  =====  =======
resnet20       CIFAR ResNet-v1-20 (16-64 channels; in this file)     128    32x32
resnet18       ResNet-18, CIFAR stem (3x3, no pool; in this file)    32     32x32
mobilenet_v2   keras.applications.MobileNetV2 1.0 (DepthwiseConv2D   32     64x64
               -> DO-DConv)
resnet50       keras.applications.ResNet50, ImageNet stem            4      224x224
tcn            1-D TCN / keyword spotting: Conv1D stem, 4 dilated    32     128 steps,
               residual blocks (d = 1, 2, 4, 8), 64 channels                40 MFCC
c3d            C3D-style 3-D network: five Conv3D + BN + ReLU        8      8x32x32,
               (16-64 channels, two stride-2), global pool                 3 channels
=============  ===================================================  =====  =======

``tcn`` and ``c3d`` are the two whole models of issue 15, the same architectures in every framework
(:func:`tcn`, :func:`c3d`).

The twin is ``doconv.tf.convert(plain)[0]`` with every D (the trainable delta D') drawn from N(0, 0.05), so
no layer computes its identity-initialised kernel. All arms of a scenario live in one process and run
interleaved, one call each per round in an order shuffled per round; a row gives the median time and the
median of the *per-round* ratios to its baseline arm, with their 25th-75th percentile.

Scenarios (``--scenarios``):

- ``train``: one SGD (momentum 0.9) step, sparse cross-entropy on random labels: forward under a
  ``tf.GradientTape``, gradients, ``optimizer.apply_gradients``, all inside one ``tf.function`` -- once
  plain (``jit_compile=False``) and once with XLA (``jit_compile=True``). Each twin's ratio is to the plain
  model compiled the same way.
- ``eval``: inference at the training batch. ``predict_on_batch`` (Keras' own ``tf.function``) of the plain
  model, of the twin as it is (composes every kernel on every call) and of the folded twin
  (``doconv.tf.fold``), ratios to plain ``predict_on_batch``; eager ``model(x, training=False)`` of the twin
  inside ``doconv.tf.cached(twin)`` (each kernel composed once), ratio to the plain model called eagerly.
- ``memory``: peak resident memory of a ``tf.function`` training step, each arm (plain, twin) alone in its
  own process under ``/usr/bin/time -v`` (max RSS; TensorFlow's CPU allocator has no peak counter). Once the
  model, data and step exist the child resets the kernel's high-water mark (``/proc/self/clear_refs``), so
  the max RSS is that of the training steps, not of ``convert`` copying the plain network (the build's own
  peak is a column of its own); also the peak minus the resident size after the build (what the steps added).

Usage::

    python bench/tf_models.py                      # all networks and scenarios
    python bench/tf_models.py --quick              # ResNet-20 only, few rounds
    python bench/tf_models.py --tiny               # narrow networks, tiny batches: a smoke test
    python bench/tf_models.py --models resnet18 --scenarios train --reps 9 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import os
from typing import Callable, Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
try:
    import tensorflow as tf  # noqa: E402
except ImportError:  # the JAX environment: keras_backends.py uses only the networks and twin() of this file
    tf = None
import keras  # noqa: E402
from keras import layers as L  # noqa: E402

import doconv.tf as dtf  # noqa: E402
import harness  # noqa: E402  (timing, ratios and memory children, shared with the other whole-model scripts)


# ---- networks -------------------------------------------------------------------------------------

def _conv_bn(x, filters, kernel, stride, name, relu=True):
    x = L.Conv2D(filters, kernel, stride, padding="same", use_bias=False, kernel_initializer="he_normal",
                 name=f"{name}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, stride, name):
    """conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN where the shape changes), ReLU: ResNet-v1."""
    out = _conv_bn(x, filters, 3, stride, f"{name}_a")
    out = _conv_bn(out, filters, 3, 1, f"{name}_b", relu=False)
    if stride != 1 or x.shape[-1] != filters:
        x = _conv_bn(x, filters, 1, stride, f"{name}_down", relu=False)
    return L.ReLU(name=f"{name}_out")(L.Add(name=f"{name}_add")([out, x]))


def cifar_resnet(blocks: int, width: int, stages: int, size: int, classes: int = 10, name: str = "resnet"):
    """ResNet-v1 for small images: 3x3 stem (no pool), ``stages`` stages of ``blocks`` basic blocks at widths
    ``width * 2**i`` (stride 2 from the second stage), global average pool, dense logits."""
    inputs = keras.Input((size, size, 3))
    x = _conv_bn(inputs, width, 3, 1, "stem")
    for stage in range(stages):
        for i in range(blocks):
            x = _basic_block(x, width * 2 ** stage, 2 if i == 0 and stage > 0 else 1, f"s{stage}b{i}")
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name=name)


def resnet20(tiny: bool, size: int):
    return cifar_resnet(3, 2 if tiny else 16, 3, size, name="resnet20")


def resnet18(tiny: bool, size: int):
    return cifar_resnet(2, 8 if tiny else 64, 4, size, name="resnet18")


def mobilenet_v2(tiny: bool, size: int):
    return keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35 if tiny else 1.0, weights=None,
                                          classes=10, classifier_activation=None)


def resnet50(tiny: bool, size: int):
    return keras.applications.ResNet50(input_shape=(size, size, 3), weights=None, classes=1000,
                                       classifier_activation=None)


def _conv_bn_relu(x, conv, axis, name, relu=True):
    x = L.BatchNormalization(axis=axis, name=f"{name}_bn")(conv(x))
    return L.ReLU(name=f"{name}_relu")(x) if relu else x


def tcn(tiny: bool = False, steps: int = 128, *, channels: int = None, features: int = 40, classes: int = 12,
        data_format: str = "channels_last"):
    """The 1-D network of issue 15 (keyword spotting / TCN style): a Conv1D(``channels``, 3) stem + BN + ReLU,
    four residual blocks of two dilated Conv1D(``channels``, 3) + BN (dilation 1, 2, 4, 8; ReLU between and
    after the identity add), global average pool over time, Dense(``classes``). Input (``steps``,
    ``features``) channels_last (``channels_first``: (``features``, ``steps``)). ``padding='same'`` is the
    PyTorch model's ``padding=d`` (identical at stride 1). 64 channels, 16 when ``tiny``."""
    channels = channels or (16 if tiny else 64)
    axis = -1 if data_format == "channels_last" else 1
    shape = (steps, features) if data_format == "channels_last" else (features, steps)

    def conv(d, name):
        return L.Conv1D(channels, 3, padding="same", dilation_rate=d, use_bias=False, data_format=data_format,
                        name=name)

    inputs = keras.Input(shape)
    x = _conv_bn_relu(inputs, conv(1, "stem_conv"), axis, "stem")
    for d in (1, 2, 4, 8):
        out = _conv_bn_relu(x, conv(d, f"block{d}_a_conv"), axis, f"block{d}_a")
        out = _conv_bn_relu(out, conv(d, f"block{d}_b_conv"), axis, f"block{d}_b", relu=False)
        x = L.ReLU(name=f"block{d}_out")(L.Add(name=f"block{d}_add")([out, x]))
    x = L.GlobalAveragePooling1D(data_format=data_format)(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="tcn")


def c3d(tiny: bool = False, size: int = 32, *, frames: int = None, widths=None, classes: int = 10,
        data_format: str = "channels_last"):
    """The 3-D network of issue 15 (C3D style): Conv3D(3x3x3) + BN + ReLU five times at widths 16, 32, 32, 64,
    64 (stride 2 in the second and fourth), global average pool, Dense(``classes``). Input (``frames``,
    ``size``, ``size``, 3) channels_last. Every conv is ``padding='same'``: the PyTorch model's ``padding=1``
    at stride 1; at stride 2 TensorFlow's SAME puts the odd pad at the end (PyTorch pads both sides and drops
    the last row), the same output size with shifted windows, which is the same for the plain model and its
    twin. 8 frames; ``tiny``: 4 frames and widths 4, 8, 8, 8, 8."""
    frames = frames or (4 if tiny else 8)
    widths = widths or ((4, 8, 8, 8, 8) if tiny else (16, 32, 32, 64, 64))
    axis = -1 if data_format == "channels_last" else 1
    shape = (frames, size, size, 3) if data_format == "channels_last" else (3, frames, size, size)
    x = inputs = keras.Input(shape)
    for i, (width, stride) in enumerate(zip(widths, (1, 2, 1, 2, 1))):
        conv = L.Conv3D(width, 3, stride, padding="same", use_bias=False, data_format=data_format, name=f"conv{i}")
        x = _conv_bn_relu(x, conv, axis, f"layer{i}")
    x = L.GlobalAveragePooling3D(data_format=data_format)(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="c3d")


#: name -> (builder(tiny, size), batch, input size, tiny batch, tiny input size); the size is the image side,
#: the number of time steps (tcn) or the frame side (c3d).
MODELS: Dict[str, tuple] = {
    "resnet20": (resnet20, 128, 32, 4, 16),
    "resnet18": (resnet18, 32, 32, 2, 16),
    "mobilenet_v2": (mobilenet_v2, 32, 64, 2, 32),
    "resnet50": (resnet50, 4, 224, 1, 32),
    "tcn": (tcn, 32, 128, 2, 32),
    "c3d": (c3d, 8, 32, 1, 16),
}
SCENARIOS = ("train", "eval", "memory")
#: arm -> the arm its ratio is taken to
TRAIN_BASE = {"plain, tf.function": "plain, tf.function", "DO-Conv, tf.function": "plain, tf.function",
              "plain, XLA": "plain, XLA", "DO-Conv, XLA": "plain, XLA"}
EVAL_BASE = {"plain, predict_on_batch": "plain, predict_on_batch",
             "DO-Conv default, predict_on_batch": "plain, predict_on_batch",
             "DO-Conv folded, predict_on_batch": "plain, predict_on_batch",
             "plain, eager": "plain, eager", "DO-Conv in cached(), eager": "plain, eager"}


def shape_of(name: str, tiny: bool):
    _, batch, size, tiny_batch, tiny_size = MODELS[name]
    return (tiny_batch, tiny_size) if tiny else (batch, size)


def build(name: str, tiny: bool, seed: int = 0):
    keras.utils.set_random_seed(seed)
    return MODELS[name][0](tiny, shape_of(name, tiny)[1])


def randomise_D(model, seed: int = 0, std: float = 0.05):
    """Every DO-Conv layer's D' drawn from N(0, std): D is never the identity."""
    rng = np.random.default_rng(seed)
    for layer in dtf.doconv_layers(model).values():
        if layer.D is not None:
            layer.D.assign((rng.normal(size=tuple(layer.D.shape)) * std).astype("float32"))
    return model


def twin(plain, seed: int = 0):
    """A DO-Conv copy of ``plain`` (``doconv.tf.convert``), D randomised; ``plain`` is left as it is."""
    model, _ = dtf.convert(plain)
    return randomise_D(model, seed)


def input_text(name: str, tiny: bool) -> str:
    """One example's size for the tables: ``32x32`` (images), ``128 steps`` (tcn), ``8x32x32`` (c3d frames)."""
    _, size = shape_of(name, tiny)
    if name == "tcn":
        return f"{size} steps"
    return f"{4 if tiny else 8}x{size}x{size}" if name == "c3d" else f"{size}x{size}"


def data(name: str, tiny: bool, model, seed: int = 1):
    batch, _ = shape_of(name, tiny)
    rng = np.random.default_rng(seed)
    classes = model.output_shape[-1]
    return (tf.constant(rng.normal(size=(batch, *model.inputs[0].shape[1:])).astype("float32")),
            tf.constant(rng.integers(0, classes, size=(batch,)), dtype=tf.int32))


def training_step(model, x, y, jit: bool) -> Callable[[], None]:
    """One SGD step (momentum 0.9) in a ``tf.function`` (XLA if ``jit``); calling it runs and waits for it."""
    optimizer = keras.optimizers.SGD(1e-3, momentum=0.9)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    return lambda: step().numpy()


def train_rows(name: str, tiny: bool, reps: int, warmup: int) -> Dict[str, dict]:
    plain = build(name, tiny)
    do = twin(plain)
    plain_xla = keras.models.clone_model(plain)
    plain_xla.set_weights(plain.get_weights())
    do_xla = twin(plain)
    x, y = data(name, tiny, plain)
    tasks = {"plain, tf.function": training_step(plain, x, y, False),
             "DO-Conv, tf.function": training_step(do, x, y, False),
             "plain, XLA": training_step(plain_xla, x, y, True), "DO-Conv, XLA": training_step(do_xla, x, y, True)}
    return harness.summarise(harness.interleaved(tasks, reps, warmup), TRAIN_BASE)


def eval_rows(name: str, tiny: bool, reps: int, warmup: int) -> Dict[str, dict]:
    plain = build(name, tiny)
    default = twin(plain)
    scoped = twin(plain)
    folded = dtf.fold(default)[0]
    x, _ = data(name, tiny, plain)
    want = folded.predict_on_batch(x)
    got = default.predict_on_batch(x)
    scale = float(np.max(np.abs(want))) or 1.0
    if float(np.max(np.abs(got - want))) > 1e-3 * scale:  # a timing of a wrong network would mean nothing
        raise AssertionError(f"{name}: the folded twin disagrees with the twin by {np.max(np.abs(got - want))}")
    tasks = {"plain, predict_on_batch": lambda: plain.predict_on_batch(x),
             "DO-Conv default, predict_on_batch": lambda: default.predict_on_batch(x),
             "DO-Conv folded, predict_on_batch": lambda: folded.predict_on_batch(x),
             "plain, eager": lambda: plain(x, training=False).numpy(),
             "DO-Conv in cached(), eager": lambda: scoped(x, training=False).numpy()}
    with dtf.cached(scoped):
        times = harness.interleaved(tasks, reps, warmup)
    return harness.summarise(times, EVAL_BASE)


# ---- memory: one process per arm -------------------------------------------------------------------

def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_hwm() -> bool:
    """Reset the process's resident high-water mark (Linux >= 4.0), so that the peak measured afterwards (and
    the max RSS ``/usr/bin/time`` reports at exit) is the training steps', not the conversion's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(name: str, arm: str, tiny: bool, steps: int, jit: bool) -> None:
    """Build one arm, note the resident size and reset the peak, run ``steps`` training steps; print a JSON line."""
    # Both arms copy the network they train from a first one and drop that (convert makes the twin that way,
    # clone_model the plain copy), so the two processes have the same history of freed memory behind them.
    original = build(name, tiny)
    if arm == "plain":
        model = keras.models.clone_model(original)
        model.set_weights(original.get_weights())
    else:
        model = twin(original)
    del original
    keras.backend.clear_session(free_memory=True)
    x, y = data(name, tiny, model)
    step = training_step(model, x, y, jit)
    gc.collect()
    built, build_peak = harness.rss_bytes(), _hwm_bytes()
    reset = _reset_hwm()
    for _ in range(steps):
        step()
    harness.report_child(built, build_peak=build_peak, reset=reset, step_peak=_hwm_bytes())


def memory_rows(name: str, tiny: bool, threads: int, steps: int, jit: bool) -> Dict[str, dict]:
    """Peak RSS of a training step per arm, each in its own process (:func:`harness.memory_rows`), with the
    child's peak while it built the model."""
    args = ["--threads", str(threads), "--steps", str(steps)] + (["--tiny"] if tiny else []) + \
        (["--memory-xla"] if jit else [])
    out = harness.memory_rows(__file__, name, (("plain", "plain"), ("DO-Conv", "doconv")), args)
    for row in out.values():
        row["build_peak_MiB"] = row["child"]["build_peak"] / 2**20
        row["peak_reset_after_build"] = row["child"]["reset"]
    return out


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_run_arguments(parser, MODELS, SCENARIOS, quick="ResNet-20 only, 5 rounds",
                              tiny="narrow networks at tiny batches (smoke test)",
                              warmup="untimed rounds first (tracing, XLA compilation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-xla", action="store_true", help="memory arms compile their step with XLA")
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.memory_child:
        memory_child(*args.memory_child, args.tiny, args.steps, args.memory_xla)
        return
    models, scenarios, reps, warmup = harness.plan(parser, args, MODELS, SCENARIOS, "resnet20")
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__} ({keras.backend.backend()}), {args.threads} "
          f"threads, {reps} interleaved rounds after {warmup} warm-up{', tiny networks' if args.tiny else ''}; "
          f"load average (1/5/15 min) {harness.load()}", flush=True)
    result = {"tensorflow": tf.__version__, "keras": keras.__version__, "threads": args.threads, "reps": reps,
              "tiny": args.tiny, "train": {}, "eval": {}, "memory": {}, "load": {"start": harness.load()}}
    header = "| model | batch, input | arm | median ms | ratio | ratio p25-p75 | ratio to | load |"

    def label(name: str) -> str:
        return f"{shape_of(name, args.tiny)[0]}, {input_text(name, args.tiny)}"

    def cleared(rows_of: Callable) -> Callable[[str], Dict[str, dict]]:
        def measure(name: str) -> Dict[str, dict]:
            found = rows_of(name, args.tiny, reps, warmup)
            keras.backend.clear_session()  # each model's graphs and variables go before the next one is built
            gc.collect()
            return found
        return measure
    harness.timing_tables(
        result, models, scenarios,
        (("train", cleared(train_rows), "SGD training step (GradientTape in one tf.function):"),
         ("eval", cleared(eval_rows), "Eval inference, training batch:")),
        header, lambda name, arm, r: (f"| {name} | {label(name)} | {arm} | {r['median_ms']:.1f} | {r['ratio']:.3f} | "
                                      f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} | {r['base']} |"))
    if "memory" in scenarios:
        harness.memory_table(result, models, lambda name: memory_rows(name, args.tiny, args.threads, args.steps,
                                                                      args.memory_xla), label,
                             f"{args.steps} {'XLA' if args.memory_xla else 'tf.function'} steps", build_peak=True)
    harness.finish(result, args.json)


if __name__ == "__main__":
    main()
