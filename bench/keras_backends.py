"""Whole-model training on each Keras 3 backend: a network of ``bench/tf_models.py`` (default ResNet-20 at
batch 128, 32x32) against its DO-Conv twin (``tf_models.twin``: ``doconv.tf.convert``, D randomised), one
``train_on_batch`` per arm per round, interleaved (``harness.interleaved``), SGD with momentum 0.9.

``train_on_batch`` is Keras' own compiled train step on the backend ``KERAS_BACKEND`` names: a
``tf.function`` on TensorFlow, ``jax.jit`` on JAX, eager torch on torch (``--jit`` asks Keras for
``jit_compile=True``: XLA on TensorFlow, ``torch.compile`` on torch). Run it once per backend::

    KERAS_BACKEND=torch .nox/tests/bin/python bench/keras_backends.py
    KERAS_BACKEND=jax .nox/tests-keras-jax/bin/python bench/keras_backends.py

Results: bench/tf_models_results.md.
"""

from __future__ import annotations

import argparse

import numpy as np

import harness  # framework-free timing and ratios
import keras
import tf_models  # the networks, shared with the TensorFlow benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20", help=f"one of {', '.join(tf_models.MODELS)}")
    parser.add_argument("--reps", type=int, default=9, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (tracing, compilation)")
    parser.add_argument("--jit", action="store_true", help="model.compile(jit_compile=True)")
    parser.add_argument("--tiny", action="store_true", help="narrow network, tiny batch (smoke test)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    harness.check_choices(parser, model=([args.model], list(tf_models.MODELS)))
    plain = tf_models.build(args.model, args.tiny)
    do = tf_models.twin(plain)
    batch, _ = tf_models.shape_of(args.model, args.tiny)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, *plain.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, plain.output_shape[-1], size=(batch,))
    for model in (plain, do):
        model.compile(keras.optimizers.SGD(1e-3, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True if args.jit else "auto")
    tasks = {"plain": lambda: plain.train_on_batch(x, y), "DO-Conv": lambda: do.train_on_batch(x, y)}
    backend = keras.backend.backend()
    print(f"Keras {keras.__version__} on {backend}, jit_compile={args.jit or 'auto'}, {args.reps} interleaved "
          f"rounds after {args.warmup} warm-up; load average {harness.load()}", flush=True)
    rows = harness.summarise(harness.interleaved(tasks, args.reps, args.warmup), "plain")
    now = harness.load()
    lines = [f"| {args.model} | {batch}, {tf_models.input_text(args.model, args.tiny)} | {backend} | {arm} | "
             f"{r['median_ms']:.1f} | {r['ratio']:.3f} | {r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} | {now} |"
             for arm, r in rows.items()]
    print(harness.table("train_on_batch (SGD, momentum 0.9):", "| model | batch, input | backend | arm | median ms "
                        "| ratio | ratio p25-p75 | load |", lines), flush=True)
    harness.finish({"keras": keras.__version__, "backend": backend, "jit": args.jit, "rows": rows,
                    "load": {"start": now}}, args.json)


if __name__ == "__main__":
    main()
