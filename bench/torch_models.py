"""Whole-model benchmark of doconv.torch on CPU: each plain network against its DO-Conv twin.

Networks (built in :mod:`torch_zoo`, beside this file), at the sizes people train them:

=============  ===========================================  =====  ===================
name           network                                      batch  input
=============  ===========================================  =====  ===================
resnet20       CIFAR ResNet-v1-20 (16-64 channels)           128    3 x 32x32
resnet18       ResNet-18, CIFAR stem (3x3, no pool), 64-512  32     3 x 32x32
mobilenet_v2   MobileNetV2 1.0 (depthwise 3x3 -> DO-DConv)   32     3 x 64x64
resnet50       ResNet-50, ImageNet stem                      4      3 x 224x224
tcn            1-D TCN, 64 channels, dilations 1-8 (Conv1d)  32     40 x 128 (MFCC x time)
c3d            C3D-style, 16-64 channels (Conv3d)            8      3 x 8x32x32 (frames)
=============  ===========================================  =====  ===================

The twin is ``doconv.torch.convert(plain)`` with every D randomised (no identity shortcut can help it).
All arms of a scenario live in one process and run interleaved, one call each per round in an order
shuffled per round; a row gives the median time and the median of the *per-round* ratios to the plain
model with their 25th-75th percentile, so load that changes between rounds hits both sides of a ratio.

Scenarios (``--scenarios``):

- ``train``: an SGD (momentum 0.9) step, cross-entropy on random labels; twins with W stored ``c-major``
  (the default: at stride 1, from 8 input channels on, a layer trains through ``conv_transpose{1,2,3}d``) and
  ``contiguous``.
- ``eval``: ``model.eval()`` under ``torch.no_grad()`` at the training batch: the twin as it is (every call
  composes), inside ``doconv.torch.cached(twin)`` (composed once) and folded (``doconv.torch.fold``).
- ``memory``: peak resident memory of a training step, each arm (plain, c-major, contiguous) alone in its
  own process under ``/usr/bin/time -v`` (CPU allocations have no peak counter in torch): the peak, and
  the peak minus the resident size once the model is built (what the steps added).
- ``--profile``: torch.profiler over a few training steps of the plain model and its c-major twin; the
  composition's share, per layer and step.

Usage::

    python bench/torch_models.py                       # all networks and scenarios (~10 min on 2 cores)
    python bench/torch_models.py --quick               # ResNet-20 only, few rounds (~1 min)
    python bench/torch_models.py --models tcn,c3d      # the 1-D (Conv1d) and 3-D (Conv3d) networks
    python bench/torch_models.py --tiny                # 1/8-width networks, tiny batches: a smoke test
    python bench/torch_models.py --models resnet18 --scenarios train --reps 10 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Callable, Dict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (timing, ratios and memory children, shared with the Keras and MXNet scripts)
import torch_zoo as zoo  # noqa: E402  (the builders beside this file)

import doconv.torch as dt  # noqa: E402

#: name -> (builder(tiny), batch, input shape (C, *spatial), tiny batch, tiny input shape)
MODELS: Dict[str, tuple] = {
    "resnet20": (lambda tiny: zoo.cifar_resnet20(2 if tiny else 16), 128, (3, 32, 32), 4, (3, 16, 16)),
    "resnet18": (lambda tiny: zoo.resnet(18, "cifar", 8 if tiny else 64, 10), 32, (3, 32, 32), 2, (3, 16, 16)),
    "mobilenet_v2": (lambda tiny: zoo.mobilenet_v2(0.125 if tiny else 1.0, 10), 32, (3, 64, 64), 2, (3, 32, 32)),
    "resnet50": (lambda tiny: zoo.resnet(50, "imagenet", 8 if tiny else 64, 1000), 4, (3, 224, 224), 1,
                 (3, 64, 64)),
    "tcn": (lambda tiny: zoo.tcn(8 if tiny else 64), 32, (40, 128), 2, (40, 32)),
    "c3d": (lambda tiny: zoo.c3d(2 if tiny else 16), 8, (3, 8, 32, 32), 2, (3, 4, 16, 16)),
}
SCENARIOS = ("train", "eval", "memory")
TRAIN_ARMS = ("plain", "DO-Conv c-major", "DO-Conv contiguous")
EVAL_ARMS = ("plain", "DO-Conv default", "DO-Conv in cached()", "DO-Conv folded")


def shape_of(name: str, tiny: bool):
    """``(batch, input shape (C, *spatial))`` of the network."""
    _, batch, shape, tiny_batch, tiny_shape = MODELS[name]
    return (tiny_batch, tiny_shape) if tiny else (batch, shape)


def input_label(name: str, tiny: bool) -> str:
    """``'32, 32x32'``: batch and spatial size, as the tables show them (channels omitted)."""
    batch, shape = shape_of(name, tiny)
    return f"{batch}, {'x'.join(map(str, shape[1:]))}"


def build(name: str, tiny: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0](tiny)


def data(name: str, tiny: bool, model: nn.Module, seed: int = 1):
    batch, shape = shape_of(name, tiny)
    g = torch.Generator().manual_seed(seed)
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    return torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)


def training_step(model: nn.Module, x, y) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def inference(model: nn.Module, x) -> Callable[[], None]:
    model.eval()

    def run():
        with torch.no_grad():
            model(x)
    return run


def train_rows(name: str, tiny: bool, reps: int, warmup: int) -> Dict[str, dict]:
    plain = build(name, tiny)
    models = {"plain": plain, "DO-Conv c-major": zoo.twin(plain, "c-major"),
              "DO-Conv contiguous": zoo.twin(plain, "contiguous")}
    x, y = data(name, tiny, plain)
    return harness.summarise(harness.interleaved({k: training_step(m, x, y) for k, m in models.items()}, reps, warmup))


def eval_rows(name: str, tiny: bool, reps: int, warmup: int) -> Dict[str, dict]:
    plain = build(name, tiny).eval()
    twin = zoo.twin(plain).eval()
    scoped = zoo.twin(plain).eval()
    models = {"plain": plain, "DO-Conv default": twin, "DO-Conv in cached()": scoped,
              "DO-Conv folded": dt.fold(twin)[0].eval()}
    x, _ = data(name, tiny, plain)
    with dt.cached(scoped):
        times = harness.interleaved({k: inference(m, x) for k, m in models.items()}, reps, warmup)
    return harness.summarise(times)


# ---- memory: one process per arm -------------------------------------------------------------------

def memory_child(name: str, arm: str, tiny: bool, steps: int) -> None:
    """Build one arm, note the resident size, run ``steps`` training steps; print a JSON line."""
    model = build(name, tiny)
    if arm != "plain":
        dt.convert(model, W_storage=arm, inplace=True)
        zoo.randomise_D(model)
    x, y = data(name, tiny, model)
    step = training_step(model, x, y)
    gc.collect()
    built = harness.rss_bytes()
    for _ in range(steps):
        step()
    harness.report_child(built)


def memory_rows(name: str, tiny: bool, threads: int, steps: int = 2) -> Dict[str, dict]:
    """Peak RSS of a training step per arm, each in its own process (:func:`harness.memory_rows`)."""
    args = ["--threads", str(threads), "--steps", str(steps)] + (["--tiny"] if tiny else [])
    return harness.memory_rows(__file__, name, (("plain", "plain"), ("DO-Conv c-major", "c-major"),
                                                ("DO-Conv contiguous", "contiguous")), args)


# ---- profile --------------------------------------------------------------------------------------

#: profiler categories of self CPU time, matched in order on the op's name (composition: any op under it)
CATEGORIES = (("optimizer", ("Optimizer.",)), ("conv backward", ("convolution_backward",)),
              ("conv forward", ("conv",)), ("batch norm", ("batch_norm",)))


def _category(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith("Compose"):  # ComposeTrain, ComposeCMajor, ComposeKernel and their backwards
            return "composition"
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    for label, keys in CATEGORIES:
        if any(key in event.name for key in keys):
            return label
    return "other"


def profile(name: str, tiny: bool, steps: int = 3, top: int = 14) -> str:
    """Where a training step's self CPU time goes (torch.profiler over ``steps`` steps), plain and both twins,
    as Markdown; then the top ops of the c-major twin."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    plain = build(name, tiny)
    models = {"plain": plain, "DO-Conv c-major": zoo.twin(plain, "c-major"),
              "DO-Conv contiguous": zoo.twin(plain, "contiguous")}
    x, y = data(name, tiny, plain)
    layers = zoo.count_layers(models["DO-Conv c-major"])
    columns = ("conv forward", "conv backward", "composition", "batch norm", "optimizer", "other")
    lines = [f"\n{name}: self CPU ms per training step by category ({steps} profiled steps; {layers} DO-Conv "
             f"layers; composition = everything under its forward and backward Functions):\n",
             "| arm | total | " + " | ".join(columns) + " | composition per layer |",
             "|---|" + "---:|" * (len(columns) + 2)]
    tops = []
    for label, model in models.items():
        step = training_step(model, x, y)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        spent = dict.fromkeys(columns, 0.0)
        for event in prof.events():
            spent[_category(event)] += event.self_cpu_time_total / steps / 1e3
        total = sum(spent.values())
        lines.append(f"| {label} | {total:.1f} | " + " | ".join(f"{spent[c]:.1f}" for c in columns) +
                     f" | {spent['composition'] / layers:.2f} |")
        if label == "DO-Conv c-major":
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
            tops = [f"\n{name}, {label}: top ops by self CPU\n", "| op | calls per step | self ms per step |",
                    "|---|---:|---:|"] + [f"| {e.key} | {e.count / steps:.0f} | "
                                         f"{e.self_cpu_time_total / steps / 1e3:.2f} |" for e in events]
    return "\n".join(lines + tops)


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_run_arguments(parser, MODELS, SCENARIOS, quick="ResNet-20 only, 5 rounds (about a minute)",
                              tiny="1/8-width networks at tiny batches (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile training steps of each network")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.tiny, args.steps)
        return
    models, scenarios, reps, warmup = harness.plan(parser, args, MODELS, SCENARIOS, "resnet20")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} interleaved rounds after {warmup} "
          f"warm-up{', tiny networks' if args.tiny else ''}; load average (1/5/15 min) {harness.load()}")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": reps, "tiny": args.tiny,
              "train": {}, "eval": {}, "memory": {}, "load": {"start": harness.load()}}
    header = "| model | batch, input | arm | median ms | ratio to plain | ratio p25-p75 | load |"
    harness.timing_tables(
        result, models, scenarios,
        (("train", lambda name: train_rows(name, args.tiny, reps, warmup), "SGD training step:"),
         ("eval", lambda name: eval_rows(name, args.tiny, reps, warmup), "Eval inference (no_grad), training batch:")),
        header, lambda name, arm, r: (f"| {name} | {input_label(name, args.tiny)} | {arm} | {r['median_ms']:.1f} | "
                                      f"{r['ratio']:.3f} | {r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} |"))
    if "memory" in scenarios:
        harness.memory_table(result, models, lambda name: memory_rows(name, args.tiny, args.threads, args.steps),
                             lambda name: input_label(name, args.tiny), f"{args.steps} steps")
    if args.profile:
        harness.print_profiles(models, lambda name: profile(name, args.tiny))
    harness.finish(result, args.json)


if __name__ == "__main__":
    main()
