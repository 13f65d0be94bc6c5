"""``python -m doconv``: run the specification's self-check over the shared case table and print a summary."""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .cases import CASES
from .selfcheck import CHECKS, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m doconv", description=__doc__)
    parser.add_argument("-k", dest="keyword", help="only cases whose id contains this text")
    parser.add_argument("--dtype", choices=("float32", "float64"), action="append",
                        help="dtypes to check (default: both)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.keyword is None or args.keyword in c.id]
    if not cases:
        parser.error(f"no case id contains {args.keyword!r}")
    start = time.perf_counter()
    results = run(cases, tuple(args.dtype or ("float64", "float32")))
    rows = []
    for check in CHECKS:
        mine = [r for r in results if r.check == check]
        failed = [r for r in mine if not r.passed]
        worst = max(mine, key=lambda r: r.error)
        rows.append((check, str(len(mine)), f"{worst.error:.2e}", f"{worst.tolerance:.0e}",
                     "PASS" if not failed else f"FAIL ({len(failed)})"))
    title = (f"doconv {__version__} core self-check: {len(cases)} cases, "
             f"{len(results)} checks in {time.perf_counter() - start:.1f} s")
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(title=title)
        for col in ("check", "runs", "worst error", "tolerance", "result"):
            table.add_column(col)
        for row in rows:
            table.add_row(*row, style=None if row[-1] == "PASS" else "bold red")
        Console().print(table)
    except ImportError:
        print(title)
        for row in (("check", "runs", "worst error", "tolerance", "result"), *rows):
            print(f"{row[0]:<16}{row[1]:>6}{row[2]:>14}{row[3]:>11}  {row[4]}")
    for r in results:
        if not r.passed:
            print(f"FAILED {r.case} {r.check}: error {r.error:.3g} > {r.tolerance:g}", file=sys.stderr)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
