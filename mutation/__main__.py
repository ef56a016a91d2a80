"""scripts/mutation [python|sql|all] [--only NAME ...] [--out DIR]

Prints killed / survived per file, writes JSON to --out (mutation-results/) and exits 1 when a
mutant survived that docs/mutation.md does not list as equivalent, or a SQL mutant is stale.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mutation import python, sql
from mutation.common import ROOT


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutation", description=__doc__)
    parser.add_argument("which", nargs="?", choices=("python", "sql", "all"), default="all")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="python: mutmut name patterns; sql: mutant ids"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "mutation-results")
    args = parser.parse_args()
    start = time.monotonic()
    reports = []
    if args.which in ("python", "all"):
        reports.append(python.run(args.out, args.only if args.which == "python" else None))
    if args.which in ("sql", "all"):
        reports.append(sql.run(args.out, args.only if args.which == "sql" else None))
    failed = False
    for report in reports:
        report.print()
        written = report.write(args.out).resolve()
        print(f"wrote {written.relative_to(ROOT) if written.is_relative_to(ROOT) else written}")
        failed = failed or bool(report.failures())
    print(
        f"\nscripts/mutation {args.which}: {time.monotonic() - start:.0f} s, "
        f"{'FAILED: see the mutants above' if failed else 'every mutant killed or equivalent'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
