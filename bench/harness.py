"""What every whole-model benchmark shares, framework-free (the MXNet environment has no torch, the modern one
no MXNet): interleaved timing, paired ratios, the load average, peak-memory children, Markdown tables.

Protocol: every arm of a scenario runs in one process, one call each per round in an order shuffled per round
(seeded), so a load change hits every arm alike; a ratio is the median of the per-round ratios to the base arm,
with their 25th-75th percentile. Peak memory is measured per arm in a process of its own (``/usr/bin/time -v``'s
maximum resident set size where that tool exists, else the child's ``getrusage``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union


def load() -> str:
    """The 1/5/15-minute load average, printed beside every measurement (the machine may be shared)."""
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _seconds(task: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    task()
    return time.perf_counter() - t0


def interleaved(tasks: Dict[str, Callable[[], None]], reps: int, warmup: int, seed: int = 0,
                timed: Callable[[Callable[[], None]], float] = _seconds) -> Dict[str, List[float]]:
    """Seconds per call of each task over ``reps`` rounds (after ``warmup``), order shuffled per round.

    ``timed(task)`` runs a task and returns its seconds; the default reads the wall clock around one call, and
    the GPU script passes CUDA events over several calls."""
    times = {k: [] for k in tasks}
    order, rng = list(tasks), random.Random(seed)
    for r in range(warmup + reps):
        rng.shuffle(order)
        for name in order:
            t = timed(tasks[name])
            if r >= warmup:
                times[name].append(t)
    return times


def summarise(times: Dict[str, List[float]], base: Union[str, Mapping[str, str]] = "plain") -> Dict[str, dict]:
    """Median ms and the median / p25 / p75 of the per-round ratios of each arm to its base arm: ``base`` names
    one arm for all, or maps each arm to its own (e.g. a compiled arm to the compiled plain model)."""
    out = {}
    for name, ts in times.items():
        against = base if isinstance(base, str) else base[name]
        ratios = sorted(t / b for t, b in zip(ts, times[against]))
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = {"median_ms": statistics.median(ts) * 1e3, "ratio": statistics.median(ratios),
                     "ratio_p25": q[0], "ratio_p75": q[2], "rounds": len(ts), "base": against}
    return out


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def report_child(built: int, **extra) -> None:
    """What a memory child prints last: its resident size once the model was built, and its peak."""
    import resource
    print(json.dumps({"built": built, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      **extra}))


def memory_rows(script: str, name: str, arms: Sequence[Tuple[str, str]], child_args: Sequence[str],
                python_flags: Sequence[str] = ()) -> Dict[str, dict]:
    """Peak RSS of a training step per arm: ``script --memory-child name arm *child_args`` in a process of its own
    per ``(label, arm)``. Rows give MiB (peak, once built, the steps' share) and ratios to the first arm; what the
    child reported beyond ``built`` / ``ru_maxrss`` is kept under ``child``."""
    out = {}
    timer = os.path.exists("/usr/bin/time")
    for label, arm in arms:
        cmd = [sys.executable, *python_flags, os.path.abspath(script), "--memory-child", name, arm, *child_args]
        if timer:
            cmd = ["/usr/bin/time", "-v"] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"memory arm {name}/{arm} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = child.pop("ru_maxrss")
        built = child.pop("built")
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        if found:
            peak = int(found.group(1)) * 1024
        out[label] = {"peak_MiB": peak / 2**20, "built_MiB": built / 2**20, "step_MiB": (peak - built) / 2**20,
                      "source": "/usr/bin/time -v" if found else "getrusage", "child": child}
    base = out[arms[0][0]]
    for row in out.values():
        row["peak_ratio"] = row["peak_MiB"] / base["peak_MiB"]
        row["step_ratio"] = row["step_MiB"] / base["step_MiB"] if base["step_MiB"] > 0 else float("nan")
    return out


def table(title: str, header: str, rows: List[str]) -> str:
    return "\n".join([f"\n{title}\n", header, "|" + "---|" * (header.count("|") - 1)] + rows)


def check_choices(parser: argparse.ArgumentParser, **chosen: Tuple[Sequence[str], Sequence[str]]) -> None:
    """A usage error (exit 2) naming the flag, what it allows and what it got, for ``flag=(values, known)``."""
    for flag, (values, known) in chosen.items():
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"--{flag} must be drawn from {', '.join(known)}, but got {', '.join(unknown)}")


def add_run_arguments(parser: argparse.ArgumentParser, models: Sequence[str], scenarios: Sequence[str], *,
                      quick: str, tiny: str, warmup: Optional[str] = None) -> None:
    """The flags every whole-model script takes (read back by :func:`plan`): ``--models``, ``--scenarios``,
    ``--reps``, ``--warmup``, ``--quick``, ``--tiny``, ``--steps``, ``--json`` and the memory children's hidden
    ``--memory-child``. ``quick``, ``tiny`` and ``warmup`` are the script's help for those flags."""
    parser.add_argument("--models", default=",".join(models), help=f"comma-separated, from {', '.join(models)}")
    parser.add_argument("--scenarios", default=",".join(scenarios), help=f"comma-separated, from {scenarios}")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds per scenario (default 9; --quick 5; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=2, help=warmup)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--tiny", action="store_true", help=tiny)
    parser.add_argument("--steps", type=int, default=2, help="training steps per memory arm")
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "ARM"), help=argparse.SUPPRESS)


def plan(parser: argparse.ArgumentParser, args: argparse.Namespace, models: Sequence[str],
         scenarios: Sequence[str], quick: str, *,
         empty_scenarios: bool = False) -> Tuple[List[str], List[str], int, int]:
    """``(models, scenarios, reps, warmup)`` of a run from the flags of :func:`add_run_arguments`.

    ``--quick`` runs the model ``quick`` alone unless ``--models`` names others, and 5 rounds; ``--tiny`` 2
    rounds after 1 warm-up; otherwise 9 rounds, ``--reps`` and ``--warmup`` overriding. A model or scenario not
    in ``models`` / ``scenarios`` is a usage error naming the flag. ``empty_scenarios`` drops empty names,
    so ``--scenarios ""`` runs none (a script whose ``--profile`` can run alone). ``--reps`` below 1 is a usage
    error (0 would otherwise fall back to the default silently)."""
    chosen = [quick] if args.quick and args.models == parser.get_default("models") else args.models.split(",")
    ran = args.scenarios.split(",")
    if empty_scenarios:
        ran = [s for s in ran if s]
    check_choices(parser, models=(chosen, models), scenarios=(ran, scenarios))
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, but got --reps={args.reps}")
    reps = args.reps or (2 if args.tiny else 5 if args.quick else 9)
    warmup = 1 if args.tiny else args.warmup
    return chosen, ran, reps, warmup


def timing_tables(result: dict, models: Sequence[str], scenarios: Sequence[str],
                  sections: Sequence[Tuple[str, Callable[[str], Dict[str, dict]], str]], header: str,
                  row: Callable[[str, str, dict], str]) -> None:
    """One table per ``(scenario, measure, title)`` of ``sections`` that ``scenarios`` names: ``measure(name)``
    per model gives its arms' rows (:func:`summarise`), which are stamped with the load average then and kept in
    ``result[scenario][name]``; ``row(name, arm, r)`` is an arm's line but its last cell, the load. A line per
    model says it is done (a full run takes a while)."""
    for scenario, measure, title in sections:
        if scenario not in scenarios:
            continue
        rows = []
        for name in models:
            result[scenario][name] = found = measure(name)
            now = load()
            for arm, r in found.items():
                r["load"] = now
                rows.append(f"{row(name, arm, r)} {now} |")
            print(f"({name} {scenario} done, load {now})", flush=True)
        print(table(title, header, rows), flush=True)


def memory_table(result: dict, models: Sequence[str], measure: Callable[[str], Dict[str, dict]],
                 label: Callable[[str], str], steps: str, *, build_peak: bool = False) -> None:
    """Measure each model's memory arms (``measure(name)`` gives :func:`memory_rows`' rows), keep them in
    ``result["memory"]`` and print one table: model, ``label(name)`` (its batch and input), arm, peak MiB and
    ratio, peak minus built MiB and ratio, the load average. ``steps`` describes the measured steps ("2
    steps"); ``build_peak`` adds a column, before the peak, for the rows' ``build_peak_MiB``."""
    rows = []
    for name in models:
        result["memory"][name] = found = measure(name)
        now = load()
        for arm, r in found.items():
            build = f"{r['build_peak_MiB']:.0f} | " if build_peak else ""
            rows.append(f"| {name} | {label(name)} | {arm} | {build}{r['peak_MiB']:.0f} | {r['peak_ratio']:.3f} | "
                        f"{r['step_MiB']:.0f} | {r['step_ratio']:.3f} | {now} |")
    peaks = "build peak MiB | training peak MiB" if build_peak else "peak MiB"
    print(table(f"Training-step peak memory (max RSS, {steps}, each arm in its own process):",
                f"| model | batch, input | arm | {peaks} | peak ratio | peak - built MiB | ratio | load |", rows),
          flush=True)


def print_profiles(models: Sequence[str], profile: Callable[[str], str]) -> None:
    """Each model's profile (Markdown from ``profile(name)``), followed by the load average it was taken at."""
    for name in models:
        print(profile(name), flush=True)
        print(f"(load average {load()})", flush=True)


def finish(result: dict, json_path) -> None:
    """The closing load average, and the results as JSON where ``json_path`` asks for them."""
    result["load"]["end"] = load()
    print(f"\nload average at the end: {result['load']['end']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
