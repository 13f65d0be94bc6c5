"""DOConv2D vs gluon.nn.Conv2D in MXNet Gluon, side by side in one process: Markdown tables.

    .nox/tests-mxnet/bin/python bench/mxnet_bench.py [--repeats 21] [--sections models stacks]

``models``: eval inference of a GluonCV ``resnet18_v1b`` (no pretrained weights; Xavier init) against its
DO-Conv twin (``doconv.mxnet.convert``, D randomised), every net hybridized with ``static_alloc``. Arms: the
plain net; a second copy of it (its ratio is the noise floor); the twin by default (every call composes each
W' inside the graph); the twin inside ``doconv.mxnet.cached(twin)`` (one W' per layer, composed on the scope's
first call; the scope stays open for the whole run); the twin folded (``doconv.mxnet.fold``: plain
convolutions). Each repeat runs every arm ``inner`` calls back to back, in a shuffled order; the table gives
each arm's median time per call and the median (and interquartile range) of its per-repeat ratio to the plain
net, so machine load hits the arms alike.

``stacks``: the micro-benchmark, 4 stacked 3x3 layers (C channels, stride 1, pad 1): the same four inference
arms at batch 1, and a full training step (forward, backward, SGD through ``gluon.Trainer``) at batch 8.
"""

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import numpy as np

import doconv
from doconv.mxnet import DOConv2D, cached, convert, fold
from doconv.mxnet._mx import gluon, mx

ARMS = ("plain", "DO default", "DO cached()", "DO folded")
MODEL_ARMS = ("plain", "plain copy") + ARMS[1:]  # the copy (same weights) shows the noise floor of a ratio
TARGETS = {"DO cached()": 1.05, "DO folded": 1.05}  # the opt-in path and the folded net must cost what the conv does
MODEL_SHAPES = [(1, 64), (32, 64), (1, 224)]  # (batch, H = W)
STACK_SHAPES = [(256, 14), (512, 7)]  # (C, H = W)


def interleaved(fns, repeats, inner, seed=0, warmup=3):
    """{arm: [seconds per call, one entry per repeat]}: all arms each repeat, in a shuffled order."""
    rng = np.random.default_rng(seed)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for _ in range(repeats):
        for name in rng.permutation(names):
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def ratio_stats(times, arm, base="plain"):
    ratios = sorted(t / b for t, b in zip(times[arm], times[base]))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


def table_rows(label, times, errors=None):
    rows = []
    for arm in times:
        ms = statistics.median(times[arm]) * 1e3
        if arm == "plain":
            ratio = "1"
        else:
            median, q1, q3 = ratio_stats(times, arm)
            ratio = f"**{median:.3f}** ({q1:.3f}-{q3:.3f})"
        target = f"<= {TARGETS[arm]:.2f}" if arm in TARGETS else ""
        err = "" if errors is None or arm not in errors else f"{errors[arm]:.1e}"
        rows.append(f"| {label} | {arm} | {ms:.2f} | {ratio} | {target} | {err} |")
    return rows


def _randomise_D(net, seed):
    rng = np.random.default_rng(seed)
    for param in net.collect_params().values():
        if param.name.endswith("_D"):
            param.set_data(mx.nd.array(rng.normal(0, 0.05, size=param.shape)))


def resnet_arms(tmp):
    """plain, its copy, default twin, twin for the cached() scope, folded twin: one set of weights (and one D),
    all hybridized."""
    from gluoncv import model_zoo

    def build():
        net = model_zoo.get_model("resnet18_v1b")  # pretrained=False: nothing downloaded
        net.initialize(mx.init.Xavier(magnitude=2.0))
        net(mx.nd.zeros((1, 3, 64, 64)))  # GluonCV defers its shapes until a first call
        return net
    mx.random.seed(0)
    plain = build()
    path = os.path.join(tmp, "resnet18_v1b.params")
    plain.save_parameters(path)
    nets = {"plain": plain}
    for arm in MODEL_ARMS[1:]:
        net = build()
        net.load_parameters(path)
        if arm != "plain copy":
            net, _ = convert(net, inplace=True)
            _randomise_D(net, 1)
        nets[arm] = fold(net)[0] if arm == "DO folded" else net
    for net in nets.values():
        net.hybridize(static_alloc=True, static_shape=True)
    return nets


def run_models(repeats):
    print("### Whole model: GluonCV resnet18_v1b, eval inference (converted twin: 17 DO-Conv layers)\n")
    print("| batch, HxW | arm | ms per call | ratio to plain: median of paired (IQR) | target | max err vs default |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as scope:
        nets = resnet_arms(tmp)
        scope.enter_context(cached(nets["DO cached()"]))
        for batch, size in MODEL_SHAPES:
            x = mx.nd.array(np.random.default_rng(2).normal(size=(batch, 3, size, size)).astype("float32"))
            want = nets["DO default"](x).asnumpy()
            errors = {arm: doconv.max_error(nets[arm](x).asnumpy(), want) for arm in ("DO cached()", "DO folded")}
            fns = {arm: (lambda net=nets[arm]: net(x).wait_to_read()) for arm in MODEL_ARMS}
            inner = 10 if batch * size * size <= 64 * 64 else 2
            times = interleaved(fns, repeats, inner)
            print("\n".join(table_rows(f"{batch}, {size}x{size}", times, errors)), flush=True)
    print()


def stack(kind, channels):
    net = gluon.nn.HybridSequential()
    for _ in range(4):
        net.add(gluon.nn.Conv2D(channels, 3, padding=1, in_channels=channels) if kind == "plain" else
                DOConv2D(channels, 3, padding=1, in_channels=channels))
    net.initialize(mx.init.Xavier())
    if kind != "plain":
        _randomise_D(net, 3)
    if kind == "DO folded":
        net, _ = fold(net)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def train_step(net, x):
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1e-3})

    def step():
        with mx.autograd.record():
            loss = net(x).square().mean()
        loss.backward()
        trainer.step(x.shape[0])
        mx.nd.waitall()
    return step


def run_stacks(repeats):
    print("### Micro-benchmark: 4 stacked 3x3 layers, C channels\n")
    print("| scenario | arm | ms per call | ratio to plain: median of paired (IQR) | target | |")
    print("|---|---|---|---|---|---|")
    for channels, size in STACK_SHAPES:
        x = mx.nd.array(np.random.default_rng(0).normal(size=(1, channels, size, size)).astype("float32"))
        nets = {arm: stack(arm, channels) for arm in ARMS}
        with cached(nets["DO cached()"]):
            times = interleaved({arm: (lambda net=net: net(x).wait_to_read()) for arm, net in nets.items()},
                                repeats, inner=5)
        print("\n".join(table_rows(f"inference, batch 1, C={channels}, {size}x{size}", times)), flush=True)
        x = mx.nd.array(np.random.default_rng(0).normal(size=(8, channels, size, size)).astype("float32"))
        steps = {arm: train_step(stack(arm, channels), x) for arm in ("plain", "DO default")}
        times = interleaved(steps, max(repeats // 2, 7), inner=1)
        print("\n".join(table_rows(f"training step, batch 8, C={channels}, {size}x{size}", times)), flush=True)
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="interleaved repeats (>= 7)")
    parser.add_argument("--sections", nargs="+", choices=("models", "stacks"), default=["models", "stacks"])
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error(f"--repeats must be >= 7, but got --repeats={args.repeats}")
    print(f"mxnet {mx.__version__}, float32, CPU ({os.cpu_count()} cores), hybridized (static_alloc, "
          f"static_shape), {args.repeats} interleaved repeats, load average {os.getloadavg()[0]:.1f}\n")
    start = time.perf_counter()
    if "models" in args.sections:
        run_models(args.repeats)
    if "stacks" in args.sections:
        run_stacks(args.repeats)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
