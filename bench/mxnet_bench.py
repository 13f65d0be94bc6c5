"""DOConv2D vs gluon.nn.Conv2D: 4 stacked 3x3 layers, hybridized, median of interleaved repeats; a Markdown table.

    /tmp/envs/mx/bin/python bench/mxnet_bench.py [--repeats 21]

Rows (the issue's protocol): batch-1 inference with the *unfolded* layer, and a full training step (forward,
backward, SGD update through gluon.Trainer) at batch 8. Each net is fresh, so its graph is built by its first
call: an inference graph (W' read from the layer's kernel cache) for the inference row, a training graph (W'
composed inside the CachedOp) for the training rows -- see doconv/mxnet/layer.py. Each repeat times the
baseline and DO-Conv back to back, so machine load hits both alike; the ratio is of the medians.
"""

import argparse
import statistics
import time

import numpy as np

from doconv.mxnet import DOConv2D
from doconv.mxnet._mx import gluon, mx

SCENARIOS = [  # (label, mode, batch, channels, size, target ratio)
    ("inference, batch 1, unfolded", "infer", 1, 256, 14, 1.05),
    ("training step, batch 8", "train", 8, 256, 14, 1.08),
    ("training step, batch 8", "train", 8, 512, 7, 1.20),
]


def stack(kind, channels):
    net = gluon.nn.HybridSequential()
    for _ in range(4):
        layer = gluon.nn.Conv2D if kind == "conv" else DOConv2D
        net.add(layer(channels, 3, padding=1, in_channels=channels))
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def step_fn(net, mode, x):
    if mode == "infer":
        return lambda: net(x).wait_to_read()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1e-3})

    def step():
        with mx.autograd.record():
            loss = net(x).square().mean()
        loss.backward()
        trainer.step(x.shape[0])
        mx.nd.waitall()
    return step


def measure(mode, batch, channels, size, repeats, warmup=3):
    x = mx.nd.array(np.random.default_rng(0).normal(size=(batch, channels, size, size)).astype("float32"))
    fns = {kind: step_fn(stack(kind, channels), mode, x) for kind in ("conv", "doconv")}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {kind: [] for kind in fns}
    for _ in range(repeats):
        for kind, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(t) for kind, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="interleaved repeats (median of these; >= 15)")
    args = parser.parse_args()
    if args.repeats < 15:
        parser.error(f"--repeats must be >= 15, but got --repeats={args.repeats}")
    print(f"mxnet {mx.__version__}, {args.repeats} interleaved repeats, median, 4 x Conv 3x3 stride 1 pad 1, "
          f"float32, CPU, hybridized (static_alloc)\n")
    print("| scenario | C | HxW | Conv2D ms | DOConv2D ms | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    for label, mode, batch, channels, size, target in SCENARIOS:
        t = measure(mode, batch, channels, size, args.repeats)
        ratio = t["doconv"] / t["conv"]
        print(f"| {label} | {channels} | {size}x{size} | {t['conv'] * 1e3:.2f} | {t['doconv'] * 1e3:.2f} | "
              f"{ratio:.3f} | <= {target:.2f} |", flush=True)


if __name__ == "__main__":
    main()
