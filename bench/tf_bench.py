"""Benchmark of doconv.tf.DOConv2D against keras.layers.Conv2D (TensorFlow backend, CPU).

Every section runs all its variants in one process, 2 threads (``tf.config.threading``), warmed up,
then timed round-robin (interleaved) ``--repeats`` times, so that load on the machine hits every
variant alike; the tables give the median time and the ratio to the plain convolution.

- ``eager``: the inference cost of an unfolded model. 4 x (3x3 conv, BatchNorm, ReLU), 64 channels,
  32x32, eager ``model(x, training=False)`` at batch 1 and 32: the plain ``Conv2D`` model, the DO-Conv
  model as it is by default (W' composed at every call), the same inside ``doconv.tf.cached(model)``
  (composed once, on the first call of the scope) and ``doconv.tf.fold(model)``. The ratio is the
  median over rounds of (variant / plain) within a round.
- ``graph`` (shared with the PyTorch benchmark): a stack of 4 layers (3x3, 'same', ReLU between), every
  variant compiled once with ``tf.function`` (and again with ``jit_compile=True``). Inference batch 1
  (DO-Conv unfolded composes at every call; traced functions never read a ``cached()`` scope's kernel)
  and folded; training batch 8: one SGD step (forward, backward, update) under a GradientTape. Ratio:
  median of the variant over median of Conv2D.

Run: ``python bench/tf_bench.py [--repeats 15] [--sections eager graph]``; prints Markdown tables.
"""

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import doconv.tf as dtf  # noqa: E402

SHAPES = ((256, 14), (512, 7))


def stack(layer_cls, channels, size):
    inputs = keras.Input((size, size, channels))
    x = inputs
    for i in range(4):
        x = layer_cls(channels, 3, padding="same", name=f"conv{i}")(x)
        if i < 3:
            x = keras.layers.ReLU()(x)
    return keras.Model(inputs, x)


def variants(channels, size, jit):
    keras.utils.set_random_seed(0)
    base = stack(keras.layers.Conv2D, channels, size)
    do, _ = dtf.convert(base)
    folded, _ = dtf.fold(do)
    x1 = tf.constant(np.random.default_rng(0).normal(size=(1, size, size, channels)).astype("float32"))
    x8 = tf.constant(np.random.default_rng(1).normal(size=(8, size, size, channels)).astype("float32"))

    def infer(model):
        return tf.function(lambda: model(x1, training=False), jit_compile=jit)

    def train(model):
        optimizer = keras.optimizers.SGD(1e-4)
        optimizer.build(model.trainable_variables)

        @tf.function(jit_compile=jit)
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(model(x8, training=True) ** 2)
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss
        return step

    return {
        "inference b1": {"Conv2D": infer(base), "DO-Conv unfolded": infer(do), "DO-Conv folded": infer(folded)},
        "training b8": {"Conv2D": train(base), "DO-Conv": train(do)},
    }


def timings(fns, repeats, warmup=3):
    """Seconds per call of every variant, ``repeats`` interleaved rounds (every variant once per round)."""
    for fn in fns.values():
        for _ in range(warmup):
            np.asarray(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            np.asarray(fn())
            times[name].append(time.perf_counter() - start)
    return times


def measure(fns, repeats, warmup=3):
    return {name: statistics.median(t) * 1e3 for name, t in timings(fns, repeats, warmup).items()}


def block_model(conv_cls, channels=64, size=32, blocks=4):
    """4 x (3x3 conv, BatchNorm, ReLU): the shape of a small inference network."""
    inputs = keras.Input((size, size, channels))
    x = inputs
    for i in range(blocks):
        x = conv_cls(channels, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, x)


def eager_section(repeats):
    keras.utils.set_random_seed(0)
    plain = block_model(keras.layers.Conv2D)
    default, _ = dtf.convert(plain, d_init="random")  # D not the identity: the timing does not depend on it
    scoped = keras.models.clone_model(default)
    scoped.set_weights(default.get_weights())
    folded, _ = dtf.fold(default)
    print("\n### Eager inference: 4 x (conv 3x3, BN, ReLU), 64 channels, 32x32\n")
    print("| batch | variant | median ms | ratio to plain (median of paired) |")
    print("|---|---|---|---|")
    with contextlib.ExitStack() as stack:
        stack.enter_context(dtf.cached(scoped))  # open for the whole run: composed once, on the first call
        for batch in (1, 32):
            x = tf.constant(np.random.default_rng(batch).normal(size=(batch, 32, 32, 64)).astype("float32"))
            want = np.asarray(folded(x, training=False))
            for model in (default, scoped):
                np.testing.assert_allclose(np.asarray(model(x, training=False)), want, rtol=1e-4, atol=1e-4)
            fns = {name: (lambda m=model: m(x, training=False)) for name, model in
                   (("Conv2D (plain)", plain), ("DO-Conv, default (composes per call)", default),
                    ("DO-Conv in cached(model)", scoped), ("DO-Conv folded", folded))}
            times = timings(fns, repeats)
            base = times["Conv2D (plain)"]
            for name, t in times.items():
                ratio = statistics.median(a / b for a, b in zip(t, base))
                print(f"| {batch} | {name} | {statistics.median(t) * 1e3:.2f} | {ratio:.3f} |", flush=True)


def graph_section(repeats):
    print("\n### Compiled (tf.function / XLA): 4 x conv 3x3 with ReLU\n")
    print("| task | C, HxW | compile | variant | median ms | ratio |")
    print("|---|---|---|---|---|---|")
    for jit in (False, True):
        for channels, size in SHAPES:
            for task, fns in variants(channels, size, jit).items():
                medians = measure(fns, repeats)
                for name, ms in medians.items():
                    print(f"| {task} | {channels}, {size}x{size} | {'XLA' if jit else 'tf.function'} | {name} | "
                          f"{ms:.2f} | {ms / medians['Conv2D']:.3f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sections", nargs="+", choices=("eager", "graph"), default=["eager", "graph"])
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, 2 threads, {args.repeats} interleaved rounds")
    if "eager" in args.sections:
        eager_section(args.repeats)
    if "graph" in args.sections:
        graph_section(args.repeats)


if __name__ == "__main__":
    main()
