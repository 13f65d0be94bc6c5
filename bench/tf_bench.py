"""Benchmark of doconv.tf.DOConv2D against keras.layers.Conv2D (TensorFlow backend, CPU).

Protocol (shared with the PyTorch benchmark): a stack of 4 layers (3x3, 'same', ReLU between),
2 threads (``tf.config.threading``), every variant compiled once with ``tf.function`` (and again with
``jit_compile=True``), warmed up, then timed round-robin (interleaved) ``--repeats`` times; the table
gives medians and the ratio to Conv2D measured in the same run.

- inference, batch 1: ``model(x, training=False)``. "unfolded" is the DO-Conv model with its inference
  kernel cache (composition once per weight change); "compose per call" forces the composition into
  every call (``training=None``, which composes) to show what the cache saves; "folded" is
  ``doconv.tf.fold(model)``.
- training, batch 8: one SGD step (forward, backward, update) under a GradientTape.

Run: ``python bench/tf_bench.py [--repeats 15]``; prints a Markdown table.
"""

import argparse
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
    do_per_call, _ = dtf.convert(base)  # its own variables: its calls must not mark ``do``'s cache stale
    folded = dtf.fold(do)
    x1 = tf.constant(np.random.default_rng(0).normal(size=(1, size, size, channels)).astype("float32"))
    x8 = tf.constant(np.random.default_rng(1).normal(size=(8, size, size, channels)).astype("float32"))

    def infer(model, training=False):
        return tf.function(lambda: model(x1, training=training), jit_compile=jit)

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
        "inference b1": {"Conv2D": infer(base), "DO-Conv unfolded": infer(do),
                         "DO-Conv compose per call": infer(do_per_call, None), "DO-Conv folded": infer(folded)},
        "training b8": {"Conv2D": train(base), "DO-Conv": train(do)},
    }


def measure(fns, repeats, warmup=3):
    for fn in fns.values():
        for _ in range(warmup):
            np.asarray(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: every variant once per round
            start = time.perf_counter()
            np.asarray(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, 2 threads, median of {args.repeats} "
          f"interleaved runs (ms); ratio to Conv2D in the same run\n")
    print("| task | C, HxW | compile | variant | median ms | ratio |")
    print("|---|---|---|---|---|---|")
    for jit in (False, True):
        for channels, size in SHAPES:
            for task, fns in variants(channels, size, jit).items():
                medians = measure(fns, args.repeats)
                for name, ms in medians.items():
                    print(f"| {task} | {channels}, {size}x{size} | {'XLA' if jit else 'tf.function'} | {name} | "
                          f"{ms:.2f} | {ms / medians['Conv2D']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
