"""Whole-model benchmark of doconv.torch on CPU: each plain network against its DO-Conv twin.

Networks (built in :mod:`torch_zoo`, beside this file), at the sizes people train them:

=============  ===========================================  =====  =======
name           network                                      batch  input
=============  ===========================================  =====  =======
resnet20       CIFAR ResNet-v1-20 (16-64 channels)           128    32x32
resnet18       ResNet-18, CIFAR stem (3x3, no pool), 64-512  32     32x32
mobilenet_v2   MobileNetV2 1.0 (depthwise 3x3 -> DO-DConv)   32     64x64
resnet50       ResNet-50, ImageNet stem                      4      224x224
=============  ===========================================  =====  =======

The twin is ``doconv.torch.convert(plain)`` with every D randomised (no identity shortcut can help it).
All arms of a scenario live in one process and run interleaved, one call each per round in an order
shuffled per round; a row gives the median time and the median of the *per-round* ratios to the plain
model with their 25th-75th percentile, so load that changes between rounds hits both sides of a ratio.

Scenarios (``--scenarios``):

- ``train``: an SGD (momentum 0.9) step, cross-entropy on random labels; twins with W stored ``c-major``
  (the default: at stride 1 the layer trains through ``conv_transpose2d``) and ``contiguous``.
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
    python bench/torch_models.py --tiny                # 1/8-width networks, tiny batches: a smoke test
    python bench/torch_models.py --models resnet18 --scenarios train --reps 10 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_zoo as zoo  # noqa: E402  (the builders beside this file)

import doconv.torch as dt  # noqa: E402

#: name -> (builder(tiny), batch, image size, tiny batch, tiny image size)
MODELS: Dict[str, tuple] = {
    "resnet20": (lambda tiny: zoo.cifar_resnet20(2 if tiny else 16), 128, 32, 4, 16),
    "resnet18": (lambda tiny: zoo.resnet(18, "cifar", 8 if tiny else 64, 10), 32, 32, 2, 16),
    "mobilenet_v2": (lambda tiny: zoo.mobilenet_v2(0.125 if tiny else 1.0, 10), 32, 64, 2, 32),
    "resnet50": (lambda tiny: zoo.resnet(50, "imagenet", 8 if tiny else 64, 1000), 4, 224, 1, 64),
}
SCENARIOS = ("train", "eval", "memory")
TRAIN_ARMS = ("plain", "DO-Conv c-major", "DO-Conv contiguous")
EVAL_ARMS = ("plain", "DO-Conv default", "DO-Conv in cached()", "DO-Conv folded")


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def shape_of(name: str, tiny: bool):
    _, batch, size, tiny_batch, tiny_size = MODELS[name]
    return (tiny_batch, tiny_size) if tiny else (batch, size)


def build(name: str, tiny: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0](tiny)


def data(name: str, tiny: bool, model: nn.Module, seed: int = 1):
    batch, size = shape_of(name, tiny)
    g = torch.Generator().manual_seed(seed)
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)


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


def interleaved(tasks: Dict[str, Callable[[], None]], reps: int, warmup: int, seed: int = 0) -> Dict[str, List[float]]:
    """Seconds per call of each task over ``reps`` rounds (after ``warmup``), order shuffled per round."""
    times = {k: [] for k in tasks}
    order, rng = list(tasks), random.Random(seed)
    for r in range(warmup + reps):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            tasks[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: Dict[str, List[float]], base: str = "plain") -> Dict[str, dict]:
    """Median ms and the median / p25 / p75 of the per-round ratios to ``base``."""
    out = {}
    for name, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, times[base]))
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = {"median_ms": statistics.median(ts) * 1e3, "ratio": statistics.median(ratios),
                     "ratio_p25": q[0], "ratio_p75": q[2], "rounds": len(ts)}
    return out


def train_rows(name: str, tiny: bool, reps: int, warmup: int) -> Dict[str, dict]:
    plain = build(name, tiny)
    models = {"plain": plain, "DO-Conv c-major": zoo.twin(plain, "c-major"),
              "DO-Conv contiguous": zoo.twin(plain, "contiguous")}
    x, y = data(name, tiny, plain)
    return summarise(interleaved({k: training_step(m, x, y) for k, m in models.items()}, reps, warmup))


def eval_rows(name: str, tiny: bool, reps: int, warmup: int) -> Dict[str, dict]:
    plain = build(name, tiny).eval()
    twin = zoo.twin(plain).eval()
    scoped = zoo.twin(plain).eval()
    models = {"plain": plain, "DO-Conv default": twin, "DO-Conv in cached()": scoped,
              "DO-Conv folded": dt.fold(twin)[0].eval()}
    x, _ = data(name, tiny, plain)
    with dt.cached(scoped):
        times = interleaved({k: inference(m, x) for k, m in models.items()}, reps, warmup)
    return summarise(times)


# ---- memory: one process per arm -------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(name: str, arm: str, tiny: bool, steps: int) -> None:
    """Build one arm, note the resident size, run ``steps`` training steps; print a JSON line."""
    model = build(name, tiny)
    if arm != "plain":
        dt.convert(model, W_storage=arm, inplace=True)
        zoo.randomise_D(model)
    x, y = data(name, tiny, model)
    step = training_step(model, x, y)
    gc.collect()
    built = _rss_bytes()
    for _ in range(steps):
        step()
    import resource
    print(json.dumps({"built": built, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def memory_rows(name: str, tiny: bool, threads: int, steps: int = 2) -> Dict[str, dict]:
    """Peak RSS of a training step per arm, each in its own process (under /usr/bin/time -v when present)."""
    out = {}
    timer = os.path.exists("/usr/bin/time")
    for label, arm in (("plain", "plain"), ("DO-Conv c-major", "c-major"), ("DO-Conv contiguous", "contiguous")):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, arm, "--threads", str(threads),
               "--steps", str(steps)] + (["--tiny"] if tiny else [])
        if timer:
            cmd = ["/usr/bin/time", "-v"] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"memory arm {name}/{arm} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = child["ru_maxrss"]
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        if found:
            peak = int(found.group(1)) * 1024
        out[label] = {"peak_MiB": peak / 2**20, "built_MiB": child["built"] / 2**20,
                      "step_MiB": (peak - child["built"]) / 2**20,
                      "source": "/usr/bin/time -v" if found else "getrusage"}
    base = out["plain"]
    for row in out.values():
        row["peak_ratio"] = row["peak_MiB"] / base["peak_MiB"]
        row["step_ratio"] = row["step_MiB"] / base["step_MiB"] if base["step_MiB"] > 0 else float("nan")
    return out


# ---- profile --------------------------------------------------------------------------------------

#: profiler categories of self CPU time, matched in order on the op's name (composition: any op under it)
CATEGORIES = (("optimizer", ("Optimizer.",)), ("conv backward", ("convolution_backward",)),
              ("conv forward", ("conv",)), ("batch norm", ("batch_norm",)))


def _category(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith(("ComposeCMajor", "ComposeKernel")):
            return "composition"
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    for label, keys in CATEGORIES:
        if any(key in event.name for key in keys):
            return label
    return "other"


def profile(name: str, tiny: bool, steps: int = 3, top: int = 8) -> str:
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

def _table(title: str, header: str, rows: List[str]) -> str:
    return "\n".join([f"\n{title}\n", header, "|" + "---|" * (header.count("|") - 1)] + rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {SCENARIOS}")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds per scenario (default 9; --quick 5; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, 5 rounds (about a minute)")
    parser.add_argument("--tiny", action="store_true", help="1/8-width networks at tiny batches (smoke test)")
    parser.add_argument("--profile", action="store_true", help="also profile training steps of each network")
    parser.add_argument("--steps", type=int, default=2, help="training steps per memory arm")
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.tiny, args.steps)
        return
    models = ["resnet20"] if args.quick and args.models == parser.get_default("models") else args.models.split(",")
    scenarios = args.scenarios.split(",")
    for value, known, flag in ((models, MODELS, "models"), (scenarios, SCENARIOS, "scenarios")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"--{flag} must be drawn from {', '.join(known)}, but got {', '.join(unknown)}")
    reps = args.reps or (2 if args.tiny else 5 if args.quick else 9)
    warmup = 1 if args.tiny else args.warmup
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} interleaved rounds after {warmup} "
          f"warm-up{', tiny networks' if args.tiny else ''}; load average (1/5/15 min) {load()}")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": reps, "tiny": args.tiny,
              "train": {}, "eval": {}, "memory": {}, "load": {"start": load()}}
    header = "| model | batch, input | arm | median ms | ratio to plain | ratio p25-p75 | load |"
    for scenario, rows_of, title in (("train", train_rows, "SGD training step"),
                                     ("eval", eval_rows, "Eval inference (no_grad), training batch")):
        if scenario not in scenarios:
            continue
        rows = []
        for name in models:
            batch, size = shape_of(name, args.tiny)
            result[scenario][name] = found = rows_of(name, args.tiny, reps, warmup)
            now = load()
            for arm, r in found.items():
                r["load"] = now
                rows.append(f"| {name} | {batch}, {size}x{size} | {arm} | {r['median_ms']:.1f} | {r['ratio']:.3f} | "
                            f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} | {now} |")
        print(_table(title + ":", header, rows), flush=True)
    if "memory" in scenarios:
        rows = []
        for name in models:
            batch, size = shape_of(name, args.tiny)
            result["memory"][name] = found = memory_rows(name, args.tiny, args.threads, args.steps)
            for arm, r in found.items():
                rows.append(f"| {name} | {batch}, {size}x{size} | {arm} | {r['peak_MiB']:.0f} | "
                            f"{r['peak_ratio']:.3f} | {r['step_MiB']:.0f} | {r['step_ratio']:.3f} |")
        print(_table(f"Training-step peak memory (max RSS, {args.steps} steps, each arm in its own process):",
                     "| model | batch, input | arm | peak MiB | peak ratio | peak - built MiB | ratio |", rows),
              flush=True)
    if args.profile:
        for name in models:
            print(profile(name, args.tiny), flush=True)
            print(f"(load average {load()})", flush=True)
    result["load"]["end"] = load()
    print(f"\nload average at the end: {result['load']['end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
