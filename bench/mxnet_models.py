"""Whole-model benchmark of doconv.mxnet on CPU: each plain network against its DO-Conv twin.

Networks (GluonCV's by ``gluoncv.model_zoo.get_model``, no pretrained weights; the 1-D and 3-D ones defined
here, :func:`tcn` and :func:`c3d`; Xavier init), at the sizes people train them:

==================  ===========================================  =====  ==========  ==============================
name                network                                      batch  input       --tiny (net, batch, input)
==================  ===========================================  =====  ==========  ==============================
cifar_resnet20_v1   CIFAR ResNet-v1-20 (16-64 channels)           128    32x32       same net, 2, 16x16
resnet18_v1b        ResNet-18 v1b (ImageNet stem), 64-512         32     64x64       same net, 1, 32x32
mobilenetv2_1.0     MobileNetV2 1.0 (depthwise 3x3 -> DO-DConv)   32     64x64       mobilenetv2_0.25, 1, 32x32
resnet50_v1b        ResNet-50 v1b, ImageNet stem                  4      224x224     same net, 1, 32x32
tcn                 1-D TCN, 40 MFCC channels, 64 wide, d 1-8     32     40 x 128    16 wide, d 1-2, 2, 40 x 32
c3d                 C3D-style 3-D stack, 16-64 channels           8      3 x 8x32x32 8-16 wide, 1, 3 x 4x16x16
==================  ===========================================  =====  ==========  ==============================

The twin is ``doconv.mxnet.convert(plain)`` (a deep copy with the plain net's weights; every non-pointwise
Conv1D / Conv2D / Conv3D becomes a DOConv1D / 2D / 3D) with every D drawn from N(0, 0.05), never the
identity. Every net is hybridized with
``static_alloc=True, static_shape=True``. All arms of a scenario live in one process and run interleaved, one
call each per round in an order shuffled per round; a row gives the median time per call and the median of the
*per-round* ratios to the plain net with their 25th-75th percentile, so load that changes between rounds hits
both sides of a ratio. "extra ms per layer" is (arm - plain) median ms over the twin's DO-Conv layers.

Scenarios (``--scenarios``):

- ``train``: ``autograd.record()``, softmax cross-entropy on random labels, ``backward()``, ``Trainer.step`` (SGD,
  momentum 0.9), ``mx.nd.waitall()``: the plain net, a second copy of it (its ratio is the noise floor) and the
  twin (its graph composes every W' = D^T o W inside the CachedOp).
- ``eval``: inference outside ``autograd.record()`` at the training batch: the plain net, its copy, the twin as
  it is (composes every call, in the graph), the twin inside ``doconv.mxnet.cached(twin)`` (composed once; the
  scope stays open for the run) and ``doconv.mxnet.fold(twin)[0]`` (plain convolutions).
- ``memory``: peak resident memory of a training step, each arm alone in its own process under
  ``/usr/bin/time -v`` (MXNet's CPU allocations have no peak counter): the plain net and the twin built alike
  (converted before initialisation, so the steps allocate everything: parameters, graph, activations), and the
  twin converted from a net that has run (what a user converting a trained net holds). Columns: the peak, and
  the peak minus the resident size before the first step (what the steps added).
- ``--profile``: MXNet's aggregate profiler over a few training steps of the plain net and of the twin; per
  operator, what the twin adds per step and per DO-Conv layer (where the composition's cost shows).

Usage::

    python bench/mxnet_models.py                        # all networks and scenarios
    python bench/mxnet_models.py --quick                # CIFAR ResNet-20 only, few rounds
    python bench/mxnet_models.py --tiny                 # small nets at tiny batches: a smoke test
    python bench/mxnet_models.py --models resnet18_v1b --scenarios train --reps 10 --json out.json
    python bench/mxnet_models.py --models tcn,c3d --scenarios train     # the 1-D and 3-D networks
    python bench/mxnet_models.py --scenarios "" --profile   # where the twin's extra training time goes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

import doconv.mxnet as dm
import harness  # timing, ratios and memory children, shared with the other whole-model scripts
from doconv.mxnet._mx import gluon, mx

# ---- the 1-D and 3-D networks (the same architectures as the other frameworks' benchmarks) -------------

class _BatchNorm(gluon.HybridBlock):
    """``gluon.nn.BatchNorm`` over the channel axis of a 3-D or 5-D input, run on its 4-D view (N, C, rest, 1):
    the same statistics, parameters and outputs. mxnet 1.9.1's oneDNN BatchNorm backward fails on 3-D and 5-D
    data coming from a convolution ("Check failed: !is_view", apache/mxnet#20858), in plain Conv1D / Conv3D nets
    as in their twins; on 4-D data it runs."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.bn = gluon.nn.BatchNorm(in_channels=channels)

    def hybrid_forward(self, F, x):
        return F.reshape_like(self.bn(F.reshape(x, (0, 0, -1, 1))), x)


class _TemporalBlock(gluon.HybridBlock):
    """One residual block of :func:`tcn`: two dilated 3-tap Conv1D + BatchNorm (ReLU between), the identity
    added, ReLU."""

    def __init__(self, width: int, dilation: int, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = gluon.nn.HybridSequential()
            for last in (False, True):
                self.body.add(gluon.nn.Conv1D(width, 3, padding=dilation, dilation=dilation, use_bias=False,
                                              in_channels=width), _BatchNorm(width))
                if not last:
                    self.body.add(gluon.nn.Activation("relu"))

    def hybrid_forward(self, F, x):
        return F.relu(x + self.body(x))


def tcn(channels: int = 40, width: int = 64, classes: int = 12, dilations: Sequence[int] = (1, 2, 4, 8)):
    """A keyword-spotting / TCN-style 1-D net on (N, channels, time): a 3-tap Conv1D stem + BatchNorm + ReLU,
    one :class:`_TemporalBlock` per dilation, global average pooling over time, a Dense classifier."""
    net = gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(gluon.nn.Conv1D(width, 3, padding=1, use_bias=False, in_channels=channels),
                _BatchNorm(width), gluon.nn.Activation("relu"))
        net.add(*(_TemporalBlock(width, d) for d in dilations))
        net.add(gluon.nn.GlobalAvgPool1D(), gluon.nn.Dense(classes, in_units=width))
    return net


def c3d(channels: int = 3, widths: Sequence[int] = (16, 32, 32, 64, 64), strides: Sequence[int] = (1, 2, 1, 2, 1),
        classes: int = 10):
    """A C3D-style 3-D net on (N, channels, frames, height, width): per width a 3x3x3 Conv3D (padding 1, its
    stride) + BatchNorm + ReLU, then global average pooling and a Dense classifier."""
    net = gluon.nn.HybridSequential()
    with net.name_scope():
        for cin, cout, stride in zip((channels, *widths), widths, strides):
            net.add(gluon.nn.Conv3D(cout, 3, strides=stride, padding=1, use_bias=False, in_channels=cin),
                    _BatchNorm(cout), gluon.nn.Activation("relu"))
        net.add(gluon.nn.GlobalAvgPool3D(), gluon.nn.Dense(classes, in_units=widths[-1]))
    return net


def _zoo(name: str) -> Callable[[], gluon.HybridBlock]:
    def build():
        from gluoncv import model_zoo
        return model_zoo.get_model(name)  # pretrained=False: nothing downloaded
    return build


@dataclasses.dataclass(frozen=True)
class Model:
    """A benchmarked network: its builder and input shape (batch first), and those of its ``--tiny`` form."""

    build: Callable[[], gluon.HybridBlock]
    shape: Tuple[int, ...]
    tiny_build: Callable[[], gluon.HybridBlock]
    tiny_shape: Tuple[int, ...]


MODELS: Dict[str, Model] = {
    "cifar_resnet20_v1": Model(_zoo("cifar_resnet20_v1"), (128, 3, 32, 32), _zoo("cifar_resnet20_v1"), (2, 3, 16, 16)),
    "resnet18_v1b": Model(_zoo("resnet18_v1b"), (32, 3, 64, 64), _zoo("resnet18_v1b"), (1, 3, 32, 32)),
    "mobilenetv2_1.0": Model(_zoo("mobilenetv2_1.0"), (32, 3, 64, 64), _zoo("mobilenetv2_0.25"), (1, 3, 32, 32)),
    "resnet50_v1b": Model(_zoo("resnet50_v1b"), (4, 3, 224, 224), _zoo("resnet50_v1b"), (1, 3, 32, 32)),
    "tcn": Model(tcn, (32, 40, 128), lambda: tcn(width=16, dilations=(1, 2)), (2, 40, 32)),
    "c3d": Model(c3d, (8, 3, 8, 32, 32), lambda: c3d(widths=(8, 16, 16), strides=(1, 2, 1)), (1, 3, 4, 16, 16)),
}
SCENARIOS = ("train", "eval", "memory")
TRAIN_ARMS = ("plain", "plain copy", "DO-Conv twin")
EVAL_ARMS = ("plain", "plain copy", "DO-Conv default", "DO-Conv in cached()", "DO-Conv folded")


def shape_of(name: str, tiny: bool) -> Tuple[int, ...]:
    """The input shape, batch first."""
    return MODELS[name].tiny_shape if tiny else MODELS[name].shape


def shape_text(shape: Tuple[int, ...]) -> str:
    """The tables' "batch, input" cell: the batch and the spatial size (``128, 32x32``; ``32, 128`` in 1-D)."""
    return f"{shape[0]}, {'x'.join(map(str, shape[2:]))}"


def unbuilt(name: str, tiny: bool) -> gluon.HybridBlock:
    """The plain net, not initialised yet."""
    return (MODELS[name].tiny_build if tiny else MODELS[name].build)()


def build(name: str, tiny: bool, seed: int = 0) -> gluon.HybridBlock:
    """The plain net, initialised (GluonCV defers shapes: one call at the benchmark's input settles them)."""
    mx.random.seed(seed)
    net = unbuilt(name, tiny)
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net(mx.nd.zeros((1, *shape_of(name, tiny)[1:])))
    return net


def randomise_D(net, seed: int = 1) -> int:
    """Draw every DO-Conv layer's D from N(0, 0.05); the number of layers."""
    rng = np.random.default_rng(seed)
    layers = dm.doconv_layers(net)
    for layer in layers.values():
        layer.D.set_data(mx.nd.array(rng.normal(0, 0.05, size=layer.D.shape)))
    return len(layers)


def copy_of(plain, twin: bool):
    """A deep copy of ``plain`` (same weights): converted (D randomised) when ``twin``."""
    if twin:
        net, _ = dm.convert(plain)
        randomise_D(net)
        return net
    net, _ = dm.convert(plain, exclude=lambda path, block: True)  # convert's deep copy, nothing swapped
    return net


def hybridized(net):
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def data(name: str, tiny: bool, net, seed: int = 2):
    shape = shape_of(name, tiny)
    rng = np.random.default_rng(seed)
    classes = net(mx.nd.zeros((1, *shape[1:]))).shape[1]
    return (mx.nd.array(rng.normal(size=shape).astype("float32")),
            mx.nd.array(rng.integers(0, classes, size=shape[0]).astype("float32")))


def training_step(net, x, y) -> Callable[[], None]:
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1e-3, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def step():
        with mx.autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(x.shape[0])
        mx.nd.waitall()
    return step


def inference(net, x) -> Callable[[], None]:
    def run():
        net(x).wait_to_read()
    return run


def summarise(times: Dict[str, List[float]], layers: int) -> Dict[str, dict]:
    """:func:`harness.summarise` against the plain net, with the extra ms per DO-Conv layer of each DO arm."""
    out = harness.summarise(times, "plain")
    for name, row in out.items():
        row["extra_ms_per_layer"] = ((row["median_ms"] - out["plain"]["median_ms"]) / layers
                                     if name.startswith("DO") else None)
    return out


def train_rows(name: str, tiny: bool, reps: int, warmup: int):
    plain = build(name, tiny)
    nets = {"plain": plain, "plain copy": copy_of(plain, False), "DO-Conv twin": copy_of(plain, True)}
    layers = len(dm.doconv_layers(nets["DO-Conv twin"]))
    x, y = data(name, tiny, plain)
    steps = {k: training_step(hybridized(n), x, y) for k, n in nets.items()}
    return summarise(harness.interleaved(steps, reps, warmup), layers), layers


def eval_rows(name: str, tiny: bool, reps: int, warmup: int):
    plain = build(name, tiny)
    twin = copy_of(plain, True)
    nets = {"plain": plain, "plain copy": copy_of(plain, False), "DO-Conv default": twin,
            "DO-Conv in cached()": copy_of(plain, True), "DO-Conv folded": dm.fold(twin)[0]}
    layers = len(dm.doconv_layers(twin))
    x, _ = data(name, tiny, plain)
    for net in nets.values():
        hybridized(net)
    with dm.cached(nets["DO-Conv in cached()"]):
        times = harness.interleaved({k: inference(n, x) for k, n in nets.items()}, reps, warmup)
    return summarise(times, layers), layers


# ---- memory: one process per arm -------------------------------------------------------------------

def memory_child(name: str, arm: str, tiny: bool, steps: int) -> None:
    """Build one arm, note the resident size, run ``steps`` training steps; print a JSON line.

    ``plain`` and ``twin`` are built alike: the net (converted first for the twin, its layers deferred),
    initialised and hybridized before any call, so that nothing but the training steps allocates. ``twin-after``
    converts an initialised net that has run once, as a user converts a trained net: it adds what the
    conversion itself leaves resident (the allocator keeps the freed temporaries of computing W from each kernel).
    """
    mx.random.seed(0)
    if arm == "twin-after":
        net, _ = dm.convert(build(name, tiny), inplace=True)
    else:
        net = unbuilt(name, tiny)
        if arm == "twin":
            net, _ = dm.convert(net, inplace=True)
        net.initialize(mx.init.Xavier(magnitude=2.0))
    shape = shape_of(name, tiny)
    rng = np.random.default_rng(2)
    x = mx.nd.array(rng.normal(size=shape).astype("float32"))
    y = mx.nd.zeros((shape[0],))  # class 0: a valid label whatever the number of classes
    step = training_step(hybridized(net), x, y)
    mx.nd.waitall()
    built = harness.rss_bytes()
    for i in range(steps):
        step()
        if i == 0 and arm != "plain":
            randomise_D(net)  # shapes are known after the first call; the values change no allocation
    harness.report_child(built)


MEMORY_ARMS = (("plain", "plain"), ("DO-Conv twin", "twin"), ("DO-Conv twin, converted after a call", "twin-after"))


def memory_rows(name: str, tiny: bool, steps: int = 2) -> Dict[str, dict]:
    """Peak RSS of a training step per arm, each in its own process (:func:`harness.memory_rows`)."""
    return harness.memory_rows(__file__, name, MEMORY_ARMS, ["--steps", str(steps)] + (["--tiny"] if tiny else []),
                               python_flags=("-W", "ignore"))


# ---- profile ------------------------------------------------------------------------------------

def _op_ms(net, x, y, steps: int) -> Dict[str, tuple]:
    """{operator: (calls per step, ms per step)} from MXNet's aggregate profiler over ``steps`` training steps."""
    import tempfile
    step = training_step(hybridized(net), x, y)
    step()
    with tempfile.TemporaryDirectory() as tmp:
        mx.profiler.set_config(profile_symbolic=True, profile_imperative=True, aggregate_stats=True,
                               filename=os.path.join(tmp, "profile.json"))
        mx.profiler.dumps(reset=True)
        mx.profiler.set_state("run")
        for _ in range(steps):
            step()
        mx.profiler.set_state("stop")
        stats = json.loads(mx.profiler.dumps(reset=True, format="json"))
    out = {}
    for domain, ops in stats.get("Time", {}).items():
        if "operator" not in domain.lower():
            continue
        for op, row in ops.items():
            calls, total = out.get(op, (0.0, 0.0))
            out[op] = (calls + row["Count"] / steps, total + row["Total"] / steps)
    return out


def profile(name: str, tiny: bool, steps: int = 3, top: int = 12) -> str:
    """Per operator, ms per training step in the plain net and the twin, sorted by what the twin adds:
    where MXNet's composition cost shows (Markdown). Bulk execution is switched off for the profiled nets (it
    fuses a segment of operators into one profiler row), so operators are timed one by one."""
    os.environ["MXNET_EXEC_BULK_EXEC_TRAIN"] = "0"  # read when a CachedOp is first run: set before the nets run
    plain = build(name, tiny)
    twin = copy_of(plain, True)
    layers = len(dm.doconv_layers(twin))
    x, y = data(name, tiny, plain)
    base, ours = _op_ms(plain, x, y, steps), _op_ms(twin, x, y, steps)
    total_base, total_ours = sum(v[1] for v in base.values()), sum(v[1] for v in ours.values())
    rows = sorted(set(base) | set(ours), key=lambda op: -(ours.get(op, (0, 0))[1] - base.get(op, (0, 0))[1]))
    lines = [f"\n{name}: operator ms per training step ({steps} profiled steps, {layers} DO-Conv layers; operator "
             f"total {total_base:.1f} plain, {total_ours:.1f} twin); the {top} operators the twin adds most to:\n",
             "| operator | calls plain | calls twin | ms plain | ms twin | twin - plain | per DO layer |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for op in rows[:top]:
        (cb, mb), (co, mo) = base.get(op, (0, 0.0)), ours.get(op, (0, 0.0))
        lines.append(f"| {op} | {cb:.0f} | {co:.0f} | {mb:.2f} | {mo:.2f} | {mo - mb:+.2f} | "
                     f"{(mo - mb) / layers:+.3f} |")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_run_arguments(parser, MODELS, SCENARIOS, quick="CIFAR ResNet-20 only, 5 rounds",
                              tiny="small nets at tiny batches and inputs (smoke test)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile training steps per operator (MXNet's aggregate profiler)")
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child, args.tiny, args.steps)
        return
    # empty_scenarios: --scenarios "" --profile runs the profile alone
    models, scenarios, reps, warmup = harness.plan(parser, args, MODELS, SCENARIOS, "cifar_resnet20_v1",
                                                   empty_scenarios=True)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"mxnet {mx.__version__}, float32, CPU ({os.cpu_count()} cores, OMP_NUM_THREADS {threads}), hybridized "
          f"(static_alloc, static_shape), {reps} interleaved rounds after {warmup} warm-up"
          f"{' (tiny: mobilenetv2_1.0 runs as mobilenetv2_0.25)' if args.tiny else ''}; load average (1/5/15 min) "
          f"{harness.load()}", flush=True)
    result = {"mxnet": mx.__version__, "reps": reps, "tiny": args.tiny,
              "train": {}, "eval": {}, "memory": {}, "load": {"start": harness.load()}}
    header = ("| model | batch, input | DO layers | arm | median ms | ratio to plain | ratio p25-p75 | "
              "extra ms per layer | load |")
    layers = {}  # DO-Conv layers per model, a column of the timing tables

    def counted(rows_of: Callable) -> Callable[[str], Dict[str, dict]]:
        def measure(name: str) -> Dict[str, dict]:
            found, layers[name] = rows_of(name, args.tiny, reps, warmup)
            return found
        return measure

    def row(name: str, arm: str, r: dict) -> str:
        extra = "" if r["extra_ms_per_layer"] is None else f"{r['extra_ms_per_layer']:.2f}"
        return (f"| {name} | {shape_text(shape_of(name, args.tiny))} | {layers[name]} | {arm} | {r['median_ms']:.1f} "
                f"| {r['ratio']:.3f} | {r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} | {extra} |")
    harness.timing_tables(result, models, scenarios,
                          (("train", counted(train_rows),
                            "SGD training step (autograd.record, backward, Trainer.step):"),
                           ("eval", counted(eval_rows), "Eval inference, training batch:")), header, row)
    if "memory" in scenarios:
        harness.memory_table(result, models, lambda name: memory_rows(name, args.tiny, args.steps),
                             lambda name: shape_text(shape_of(name, args.tiny)), f"{args.steps} steps")
    if args.profile:
        harness.print_profiles(models, lambda name: profile(name, args.tiny))
    harness.finish(result, args.json)


if __name__ == "__main__":
    main()
