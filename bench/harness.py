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
from typing import Callable, Dict, List, Mapping, Sequence, Tuple, Union


def load() -> str:
    """The 1/5/15-minute load average, printed beside every measurement (the machine may be shared)."""
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


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


def finish(result: dict, json_path) -> None:
    """The closing load average, and the results as JSON where ``json_path`` asks for them."""
    result["load"]["end"] = load()
    print(f"\nload average at the end: {result['load']['end']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
