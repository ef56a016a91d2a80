"""`python -m bench` (through scripts/bench): see the package docstring."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import __doc__ as PACKAGE_DOC
from bench.config import RESULTS, SIZES, CorrectnessError, log
from bench.ingest import case_ingest, case_ingest_designs
from bench.learning import case_history, case_learning
from bench.many_twins import case_many_twins
from bench.outbox import case_outbox
from bench.rebuild import case_rebuild
from bench.report import git, machine, print_table, report_rows
from bench.worker_process import startup_seconds
from testkit.env import StackEnv, StackEnvMissing
from testkit.world import connect, make_twin, make_users, scalar

CASES: dict[str, Callable[[StackEnv, psycopg.Connection, dict[str, int]], dict[str, Any]]] = {
    # Many twins first, on a database no other case has filled (its drain runs `pfl serve`,
    # whose outbox poller would otherwise work through what the other cases leave).
    "many_twins": case_many_twins,
    # The outbox case runs before ingest, which leaves feedback pending in the outbox.
    "learning": case_learning,
    "history": case_history,
    "outbox": case_outbox,
    "ingest": case_ingest,
    "rebuild": case_rebuild,
}
# Run only when asked for (--cases ingest_designs): case 4 with three more tables, about 5 minutes.
BY_HAND = {"ingest_designs": case_ingest_designs}


def main(argv: list[str] | None = None) -> int:
    description = (PACKAGE_DOC or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="scripts/bench", description=description)
    parser.add_argument("--quick", action="store_true", help="CI smoke test (about 2 minutes)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench-results/bench-….json)")
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"a comma-separated subset of {','.join(CASES)}, or {','.join(BY_HAND)}",
    )
    args = parser.parse_args(argv)
    wanted = [c for c in args.cases.split(",") if c]
    if unknown := set(wanted) - set(CASES) - set(BY_HAND):
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    try:
        env = StackEnv.from_environ()
    except StackEnvMissing as exc:
        sys.exit(f"bench: {exc}; run scripts/bench (it starts a stack)")
    started = datetime.now(UTC)
    doc: dict[str, Any] = {
        "mode": mode,
        "started_at": started.isoformat(),
        "commit": git("rev-parse", "HEAD"),
        "worktree_dirty": bool(git("status", "--porcelain")),
        "machine": machine(),
        "sizes": sizes,
        "results": {},
    }
    failure: str | None = None
    with connect(env.database_url) as conn:
        doc["postgres"] = scalar(conn, "select version()")
        owner = make_users(conn, "idle")[0].id
        idle = make_twin(conn, owner, {"module_00": "intent_0"}, name="bench: idle")
        doc["results"]["worker_startup_seconds"] = round(startup_seconds(idle.id), 3)
        log(
            f"{mode} benchmark; worker start-up with nothing due: "
            f"{doc['results']['worker_startup_seconds']} s"
        )
        for name in wanted:
            try:
                doc["results"][name] = (CASES | BY_HAND)[name](env, conn, sizes)
            except CorrectnessError as exc:
                failure = f"{name}: {exc}"
                log(f"CORRECTNESS FAILURE in {failure}")
                break
    doc["finished_at"] = datetime.now(UTC).isoformat()
    doc["machine"]["loadavg_at_end"] = os.getloadavg()
    rows = report_rows(doc["results"], args.quick)
    doc["table"] = [asdict(r) for r in rows]
    doc["correctness_failure"] = failure
    out = args.out or RESULTS / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")

    m = doc["machine"]
    print(
        f"\n{mode} benchmark at {doc['commit'][:12]}"
        f"{' (uncommitted changes)' if doc['worktree_dirty'] else ''}: {m['cpu_count']} × "
        f"{m['cpu_model']}, {m['memory_gb']} GB, load {m['loadavg_at_start'][0]:.1f} → "
        f"{m['loadavg_at_end'][0]:.1f}; worker start-up "
        f"{doc['results']['worker_startup_seconds']:.2f} s is in every worker figure"
    )
    print_table(rows)
    print(f"\nfigures: {out}")
    if failure:
        print(f"FAILED: correctness: {failure}")
        return 1
    if failed := [r.case.strip() for r in rows if r.verdict == "FAIL"]:
        print("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
