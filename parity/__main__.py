"""``doconv-parity`` (``python -m doconv.parity``): the cross-framework parity report.

Commands::

    doconv-parity [run]      every installed framework against the core, and against each other
    doconv-parity export DIR the same, and write the trained layers, inputs, outputs and results to DIR
                             (also checks every other environment's layers already in DIR)
    doconv-parity check DIR  read the layers other environments wrote to DIR into the frameworks here
                             (the pairs no earlier run in DIR checked), then print the combined report
                             of every environment that wrote to DIR

Frameworks that cannot share a process (MXNet's environment; Keras, which runs on one backend per
process: ``tf``, ``keras/torch``, ``keras/jax``) join through DIR: each environment exports, then every
one but the last checks (``nox -s parity`` runs that chain).

Exit status: 0 when every check passes, 1 on any failure (or, with ``--strict``, any missing
framework), 2 on bad usage (checked before the run) or when a report could not be written after it
(the table is printed all the same).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys
import tempfile
import time
import warnings
from typing import List, Sequence

from doconv import TOLERANCES, __version__
from doconv.cases import CASES

from . import checks, report
from .frameworks import DEFAULT, ENV_VAR, KNOWN, family_of, load_frameworks, selection

#: ``--quick``: one case per family of features, in each rank (a first look in seconds).
QUICK = ("k1x1", "k3", "k3-s2-same", "k5-Dmul+3", "dw-x2-k3", "g3-k3-s2-Dmul+3", "k3-reflect", "k3-zeros-asym",
         "1d-k3-causal-d2", "1d-k3-reflect", "3d-k3-s2-same", "3d-dw-x2-k3")


def seed_value(text: str) -> int:
    """``--seed``: a non-negative integer (NumPy's generators refuse negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a non-negative integer")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="doconv-parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("run", "export", "check"))
    p.add_argument("dir", nargs="?", help="exchange folder of export/check")
    p.add_argument("-f", "--frameworks", help=f"comma-separated subset of {','.join(KNOWN)} "
                                              f"(default: ${ENV_VAR} or {','.join(DEFAULT)})")
    p.add_argument("-k", dest="keyword", help="only cases whose id contains this text")
    p.add_argument("--dtype", action="append", choices=("float64", "float32"), help="repeatable (default: both)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of parameters, inputs and updates (default 0)")
    p.add_argument("--quick", action="store_true", help=f"only the cases {', '.join(QUICK)}")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--strict", action="store_true", help="a missing framework is a failure")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    return p


def run_tasks(tasks: List[checks.Task], description: str, show: bool) -> List[checks.Result]:
    """Run tasks under a rich progress bar (plain when rich is missing or --no-progress)."""
    results: List[checks.Result] = []
    progress = None
    if show and tasks:
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            progress = Progress(TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
        except ImportError:
            progress = None
    with progress if progress is not None else contextlib.nullcontext():
        task_id = progress.add_task(description, total=len(tasks)) if progress else None
        for task in tasks:
            if progress:
                progress.update(task_id, description=task.label[:48])
            results.extend(task.run())
            if progress:
                progress.advance(task_id)
    return results


def fresh_results(data: dict, exports: dict) -> List[dict]:
    """A report's results without its cross checks of artifacts that were exported again after it read them
    (``exports``: each framework's export_id in DIR now; a report records the ones it read)."""
    read = data.get("read", {})
    stale = {fw for fw, export_id in read.items() if exports.get(fw) != export_id}
    return [r for r in data["results"] if not (r["check"] == "cross" and r["framework"].split("→")[0] in stale)]


def result_files(folder: str) -> List[str]:
    return sorted(glob.glob(os.path.join(folder, "results", "*.json")))


def check_dir(p: argparse.ArgumentParser, command: str, folder: str) -> List[dict]:
    """Validate the exchange folder before the run (exit 2 on a problem; creates nothing); the reports
    already in it (check)."""
    if command == "check":
        if not os.path.exists(folder):
            p.error(f"check: DIR {folder!r} does not exist")
        if not os.path.isdir(folder):
            p.error(f"check: DIR {folder!r} is not a directory")
    elif os.path.lexists(folder) and not os.path.isdir(folder):
        p.error(f"export: DIR {folder!r} exists and is not a directory")
    try:
        checks.read_manifests(os.path.join(folder, "artifacts"))
        previous = [report.read_json(path) for path in result_files(folder)] if command == "check" else []
    except ValueError as err:
        p.error(f"{command}: {err} (remove it, or use another DIR)")
    if command == "check":
        exported = (glob.glob(os.path.join(folder, "results", "export-*.json"))
                    or glob.glob(os.path.join(folder, "artifacts", "*", "manifest.json")))
        if not exported:
            p.error(f"check: DIR {folder!r} holds no exported runs (run `doconv-parity export {folder}` first)")
    return previous


def prepare_dir(p: argparse.ArgumentParser, command: str, folder: str) -> None:
    """export creates its exchange folder (check never does); either must be able to write its results."""
    results = os.path.join(folder, "results")
    if command == "export":
        try:
            os.makedirs(results, exist_ok=True)
        except OSError as err:
            p.error(f"export: cannot create {results!r}: {err.strerror or err}")
    probe = results if os.path.isdir(results) else folder
    problem = report.json_path_problem(os.path.join(probe, f"{command}.json"))
    if problem:
        p.error(f"{command}: cannot write the results into DIR {folder!r}: {problem}")


def inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def main(argv: Sequence[str] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command in ("export", "check") and not args.dir:
        p.error(f"{args.command} needs a DIR")
    if args.command == "run" and args.dir:
        p.error(f"unexpected argument {args.dir!r} (did you mean 'export {args.dir}'?)")
    try:
        names = selection(args.frameworks)
    except ValueError as err:
        p.error(f"argument -f/--frameworks: {err}" if args.frameworks is not None else f"${ENV_VAR}: {err}")
    cases = [c for c in CASES if (args.keyword is None or args.keyword in c.id) and (not args.quick or c.id in QUICK)]
    if not cases:
        p.error(f"no case matches -k {args.keyword!r}{' with --quick' if args.quick else ''}")
    dtypes = tuple(dict.fromkeys(args.dtype or ("float64", "float32")))
    previous = check_dir(p, args.command, args.dir) if args.dir else []

    def check_json_path():
        problem = report.json_path_problem(args.json)
        if problem:
            p.error(f"argument --json: cannot write the report to {args.json!r}: {problem}")
    # --json inside the export DIR that export is about to create is checked once DIR exists
    json_in_new_dir = (args.json is not None and args.command == "export" and not os.path.exists(args.dir)
                       and inside(os.path.dirname(os.path.abspath(args.json)), args.dir))
    if args.json is not None and not json_in_new_dir:
        check_json_path()
    if args.dir:
        prepare_dir(p, args.command, args.dir)
    if json_in_new_dir:
        check_json_path()
    start = time.perf_counter()

    frameworks, missing = load_frameworks(names)
    missing = [report.missing_dict(m) for m in missing]
    for m in missing:
        warnings.warn(f"skipping {m['name']}: {m['reason']}; install: {m['hint']}", stacklevel=1)
    skipped = {fw.name: {"count": sum(bool(c.features & fw.unsupported) for c in cases),
                         "features": sorted(fw.unsupported)} for fw in frameworks}

    with tempfile.TemporaryDirectory(prefix="doconv-parity-") as tmp:
        root = os.path.join(args.dir, "artifacts") if args.dir else os.path.join(tmp, "artifacts")
        results: List[checks.Result] = []
        show = not args.no_progress
        if args.command != "check":
            tasks = checks.core_tasks(cases, dtypes) if "core" in names else []
            trained = []
            for fw in frameworks:
                fw_tasks, done = checks.framework_tasks(fw, cases, dtypes, args.seed, tmp, root)
                tasks += fw_tasks
                trained.append((fw, done))
            results += run_tasks(tasks, "against the core", show)
            for fw, done in trained:
                checks.write_manifest(root, fw, done, args.seed)
        manifests = checks.read_manifests(root)
        exports = {m["framework"]: m.get("export_id") for m in manifests}  # the artifacts in DIR now
        done_pairs = set()
        if args.command == "check":
            local = {fw.name for fw in frameworks}
            manifests = [m for m in manifests if m["framework"] not in local]
            # a pair an earlier run in DIR checked (an export reads what was there before it) is not run twice,
            # unless its source exported again since
            done_pairs = {r["framework"] for data in previous for r in fresh_results(data, exports)
                          if r["check"] == "cross"}
        cross = [t for fw in frameworks for t in checks.cross_tasks(
            fw, [m for m in manifests if f"{m['framework']}→{fw.name}" not in done_pairs], cases, dtypes)]
        results += run_tasks(cross, "across frameworks", show)

    elapsed = time.perf_counter() - start
    meta = {"command": args.command, "seed": args.seed, "dtypes": list(dtypes), "cases": [c.id for c in cases],
            "frameworks": [fw.name for fw in frameworks], "tolerances": TOLERANCES, "elapsed_s": round(elapsed, 1),
            "doconv": __version__, "read": exports}
    mine = report.to_json(results, missing=missing, skipped=skipped, meta=meta)
    writes = []  # (what, path, data): written after the table is printed, so that a failure loses nothing
    if args.dir:
        families = sorted({fw.family for fw in frameworks} | ({"core"} & set(names)))
        tag = "+".join(map(checks.dirname, families)) or "none"  # keras/torch -> keras_torch
        own = os.path.join(args.dir, "results", f"{args.command}-{tag}.json")
        writes.append((f"{args.command} DIR", own, mine))
    if args.command == "check":  # the combined report of every environment that wrote to DIR
        by_path = dict(zip(result_files(args.dir), previous))  # read (and validated) before the run
        by_path[own] = json.loads(json.dumps(mine))  # this run, as it will read back from its file
        everything = [by_path[path] for path in sorted(by_path)]
        results = [checks.Result.from_dict(r) for data in everything for r in fresh_results(data, exports)]
        rerun = {r.framework for r in results if r.check == "cross"}
        dropped = sorted({r["framework"] for data in everything for r in data["results"]
                          if r["check"] == "cross" and r["framework"] not in rerun})
        if dropped:
            warnings.warn(f"left out {', '.join(dropped)}: checked against artifacts exported again since; run "
                          f"`doconv-parity check {args.dir}` in the target framework's environment again",
                          stacklevel=1)
        ran = {fw.family for fw in frameworks} | {family_of(side) for r in results
                                                   for side in r.framework.split("→")}
        missing = [m for data in everything for m in data["missing"] if m["name"] not in ran]
        missing = list({m["name"]: m for m in missing}.values())
        skipped = {k: v for data in everything for k, v in data["skipped"].items()}
        mine = report.to_json(results, missing=missing, skipped=skipped, meta={**meta, "combined": len(everything)})
    if args.json:
        writes.append(("--json", args.json, mine))
    where = f" (combined from {mine.get('combined')} run(s) in {args.dir})" if args.command == "check" else ""
    title = (f"doconv {__version__} parity: {len(cases)} case(s), dtypes {'/'.join(dtypes)}, seed {args.seed}, "
             f"{len(results)} comparisons in {elapsed:.0f} s{where}")
    report.render(results, title=title, missing=missing, skipped=skipped)
    failed = not all(r.passed for r in results) or (args.strict and missing) or not results
    status = 1 if failed else 0
    for what, path, data in writes:
        try:
            report.write_json(path, data, make_parents=what != "--json")
        except OSError as err:
            print(f"{p.prog}: error: {what}: could not write the report to {path!r}: {err.strerror or err} "
                  f"(the table above is complete)", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
