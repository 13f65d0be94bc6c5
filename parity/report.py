"""The report: one row per (framework, check) with runs, worst error per dtype, tolerance and verdict.

The same data goes to the terminal (a rich table, plain text without rich) and to ``--json PATH``
(every single comparison plus the summary rows), so CI and people read one source.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

from doconv.cases import CASES
from doconv.interchange import replacing

from .checks import CHECK_ORDER, Result
from .frameworks import KNOWN, Missing, family_of

DTYPES = ("float64", "float32")
FORMAT, VERSION = "doconv-parity-report", 1


def _framework_key(name: str):
    order = ["core", "numpy", *(n for n in KNOWN if n != "core")]  # the core's rows, then KNOWN's order
    src, _, dst = name.partition("→")
    rank = lambda n: order.index(family_of(n)) if family_of(n) in order else len(order)  # noqa: E731
    return (bool(dst), rank(src), src, rank(dst) if dst else 0, dst)


def _check_key(name: str):
    return (CHECK_ORDER.index(name) if name in CHECK_ORDER else -1, name)


#: Each case's rank (1-D, 2-D, 3-D), so the report shows that every dimension was run.
_RANK_OF = {c.id: c.rank for c in CASES}


def _ranks(case_names: Iterable[str]) -> Dict[str, int]:
    """Distinct cases per rank (``'1d'``, ``'2d'``, ``'3d'``); a name outside the case table counts in none."""
    ranks = [_RANK_OF.get(name.split("[")[0]) for name in set(case_names)]
    return {f"{rank}d": ranks.count(rank) for rank in (1, 2, 3)}


def summarize(results: Sequence[Result]) -> List[dict]:
    """One dict per (framework, check): runs, failures, worst error per dtype, tolerances."""
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        groups.setdefault((r.framework, r.check), []).append(r)
    rows = []
    for (framework, check) in sorted(groups, key=lambda k: (_framework_key(k[0]), _check_key(k[1]))):
        mine = groups[(framework, check)]
        worst = {d: max((r.error for r in mine if r.dtype == d), default=None) for d in DTYPES}
        rows.append({"framework": framework, "check": check, "runs": len(mine),
                     "cases": len({r.case for r in mine}), "cases_by_rank": _ranks(r.case for r in mine),
                     "failed": sum(not r.passed for r in mine), "worst": worst,
                     "tolerance": {d: max((r.tolerance for r in mine if r.dtype == d), default=None) for d in DTYPES}})
    return rows


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.1e}" if math.isfinite(value) else str(value)


def _tol(row: dict) -> str:
    return "/".join(f"{row['tolerance'][d]:g}" for d in DTYPES if row["tolerance"][d] is not None)


def environment() -> dict:
    import numpy
    out = {"python": platform.python_version(), "numpy": numpy.__version__, "platform": platform.platform()}
    for module in ("torch", "tensorflow", "keras", "jax", "mxnet"):
        mod = sys.modules.get(module)
        if mod is not None:
            out[module] = getattr(mod, "__version__", "?")
    if "keras" in sys.modules:
        out["keras_backend"] = sys.modules["keras"].config.backend()
    return out


def to_json(results: Sequence[Result], *, missing: Sequence[dict], skipped: Dict[str, dict], meta: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, **meta, "environment": environment(),
            "passed": all(r.passed for r in results), "missing": list(missing), "skipped": skipped,
            "summary": summarize(results), "results": [r.to_dict() for r in results]}


def json_path_problem(path: str) -> Optional[str]:
    """Why a report could not be written to ``path`` (None when it can): checked before a run, so that a
    typo never costs the run. The parent folder must exist (it is never created) and take a new file;
    ``path`` itself must not be a folder or anything but a regular file."""
    if not path:
        return "the path is empty"
    if os.path.isdir(path):
        return "is a directory"
    if os.path.lexists(path) and not os.path.isfile(path):
        return "exists and is not a regular file"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        return f"the directory {folder!r} does not exist"
    if not os.path.isdir(folder):
        return f"{folder!r} is not a directory"
    try:  # os.access says yes to root everywhere, even in /proc: try it for real
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".doconv-parity-", suffix=".tmp")
    except OSError as err:
        return f"cannot create a file in {folder!r}: {err.strerror or err}"
    os.close(fd)
    os.unlink(probe)
    return None


def write_json(path: str, data: dict, *, make_parents: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (the core's :func:`doconv.interchange.replacing`); on any
    failure the temporary file is removed and the OSError propagates. The parent folder is created only
    with ``make_parents``."""
    path = os.path.abspath(path)
    if make_parents:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1)


def read_json(path: str) -> dict:
    """A report written by :func:`write_json`; anything else (not JSON, another format, a damaged report) is
    a ValueError whose message names ``path``."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path!r} is not a readable {FORMAT} file: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"{path!r} is not a {FORMAT} version {VERSION} file")
    try:
        if not isinstance(data.get("results"), list) or not isinstance(data.get("missing"), list):
            raise ValueError("no 'results' or 'missing' list")
        for r in data["results"]:
            result = Result.from_dict(r)
            if not all(isinstance(getattr(result, k), str) for k in ("framework", "check", "case", "dtype", "note")):
                raise ValueError(f"result {r!r} has a non-text name")
        for m in data["missing"]:
            if not isinstance(m.get("name"), str):
                raise ValueError(f"missing entry {m!r} without a name")
        if not isinstance(data.get("skipped"), dict):
            raise ValueError("no 'skipped' table")
        for info in data["skipped"].values():
            if not isinstance(info.get("count"), int) or not isinstance(info.get("features"), list):
                raise ValueError(f"skipped entry {info!r} without count and features")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path!r} is a damaged {FORMAT} file: {err}") from None
    return data


def missing_dict(err: Missing) -> dict:
    return {"name": err.name, "reason": err.reason, "hint": err.hint}


def render(results: Sequence[Result], *, title: str, missing: Iterable[dict] = (), skipped: Dict[str, dict] = None,
           console=None, max_failures: int = 30) -> None:
    """Print the summary table, then the missing frameworks, skipped cases and failures (rich when available)."""
    rows = summarize(results)
    header = ("framework", "check", "runs", "cases 1D/2D/3D", "worst f64", "worst f32", "tol f64/f32", "result")
    lines = [(r["framework"], r["check"], str(r["runs"]), "/".join(map(str, r["cases_by_rank"].values())),
              _fmt(r["worst"]["float64"]), _fmt(r["worst"]["float32"]),
              _tol(r), "PASS" if not r["failed"] else f"FAIL {r['failed']}/{r['runs']}") for r in rows]
    notes = [f"missing {m['name']}: {m['reason']} -> {m['hint']}" for m in missing]
    notes += [f"{fw}: {info['count']} case(s) skipped, the framework cannot express {', '.join(info['features'])}"
              for fw, info in (skipped or {}).items() if info["count"]]
    failures = [r for r in results if not r.passed]
    fail_lines = [f"FAIL {r.framework} {r.check} {r.case} [{r.dtype}]: error {_fmt(r.error)} > {r.tolerance:g}"
                  + (f" -- {r.note}" if r.note else "") for r in failures[:max_failures]]
    if len(failures) > max_failures:
        fail_lines.append(f"... and {len(failures) - max_failures} more failures (see --json)")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(str(x[i])) for x in (header, *lines)) for i in range(len(header))]
        for line in (header, *lines):
            print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)))
        for text in notes + fail_lines:
            print(text)
        return
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
            console = Console(width=160)  # the widest row: a cross pair of two Keras backends
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(header):
        table.add_column(col, justify="right" if 2 <= i <= 6 else "left", no_wrap=True)
    previous = None
    for line in lines:
        if previous is not None and line[0] != previous:
            table.add_section()
        shown = line[0] if line[0] != previous else ""
        previous = line[0]
        table.add_row(shown, *line[1:], style=None if line[-1] == "PASS" else "bold red")
    console.print(table)
    for text in notes:
        console.print(text, style="yellow", markup=False, highlight=False)
    for text in fail_lines:
        console.print(text, style="red", markup=False, highlight=False)
