"""`python -m soak` (through scripts/soak): see the package docstring."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from soak import __doc__ as PACKAGE_DOC
from soak.checks import Check, Checks, harness_check, run_figures
from soak.clients import Clients
from soak.config import DEFAULT_SECONDS, LANGFUSE_PORT, RESULTS, SHORT_SECONDS, WORKERS, log
from soak.drain import drain
from soak.faults import Faults, plan_faults
from soak.processes import Workers, end_leftover_children, remember_child
from soak.world import create_world
from testkit.env import ROOT, StackEnv, StackEnvMissing, stack_dir
from testkit.standin_process import StandinProcess
from testkit.world import connect

GENERATION_ROTATION = ("v3", "cloud", "v4", "v4.59")

DESCRIPTION = (PACKAGE_DOC or "").split("\n\n")[0]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=DESCRIPTION)
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"how long clients write under faults (default {DEFAULT_SECONDS})")
    parser.add_argument("--short", action="store_true",
                        help=f"a CI-sized soak of {SHORT_SECONDS} seconds")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault plan and clients")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--drain-seconds", type=float, default=300,
                        help="deadline for everything to be learned and delivered afterwards")
    parser.add_argument("--max-requests", type=int, default=50_000,
                        help="at most this many requests per client")
    parser.add_argument("--langfuse-port", type=int, default=LANGFUSE_PORT)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = SHORT_SECONDS if args.short else DEFAULT_SECONDS
    if not 5 <= args.seconds <= 3600:
        parser.error("--seconds must be between 5 and 3600")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    return args


@contextlib.contextmanager
def running(standin: StandinProcess, workers: Workers, work_dir: Path) -> Iterator[None]:
    """Whatever happens (short of SIGKILL: see end_leftover_children), no process of the soak
    outlives it."""
    try:
        yield
    finally:
        workers.kill_all()
        with contextlib.suppress(Exception):
            standin.stop()
        end_leftover_children(work_dir)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        env = StackEnv.from_environ()
    except StackEnvMissing as exc:
        sys.exit(f"soak: {exc}; run it through scripts/soak")
    started_at = datetime.now(UTC)
    rng = random.Random(args.seed)
    plan = plan_faults(rng, args.seconds)
    log(f"seed {args.seed}: {args.seconds:.0f}s of writes under {len(plan)} planned fault events, "
        f"{args.workers} workers, Langfuse stand-in on :{args.langfuse_port}")
    work_dir = stack_dir() / "soak"
    work_dir.mkdir(parents=True, exist_ok=True)
    if leftovers := end_leftover_children(work_dir):
        log(f"ended processes an earlier soak left running: {leftovers}")
    for old in [*work_dir.glob("soak-w*.log"), *work_dir.glob("standin*")]:
        old.unlink()

    db = connect(env.database_url)
    world = create_world(db)
    # Each time Langfuse comes back after "down" it is another server generation: one soak
    # covers at least two (the plan always takes Langfuse down once).
    standin = StandinProcess(args.langfuse_port, state_dir=work_dir,
                             on_spawn=lambda proc: remember_child(work_dir, proc),
                             generation=GENERATION_ROTATION)
    workers = Workers(args.workers, env, standin.worker_env(), work_dir)
    clients = Clients(world, env, args.seed, args.seconds, args.max_requests)
    timings: dict[str, float] = {}
    with running(standin, workers, work_dir):
        standin.start()
        workers.ensure()
        t0 = time.monotonic()
        faults = Faults(plan, rng, workers, standin, t0)
        clients.start()
        faults.start()
        while (left := t0 + args.seconds - time.monotonic()) > 0:
            time.sleep(min(10.0, left))
            log(f"t={time.monotonic() - t0:.0f}s requests {clients.counts()}, "
                f"faults {faults.counts()}")
        clients.stop()
        faults.finish()
        timings["writes_s"] = round(time.monotonic() - t0, 1)
        for name in workers.ensure():
            log(f"worker {name} had exited by itself ({workers.exits[name]}); replaced")
        log(f"clients stopped: {clients.counts()}; draining")
        t1 = time.monotonic()
        drained, drain_s, drain_state = drain(env.database_url, workers, args.drain_seconds)
        timings["drain_s"] = round(drain_s, 1)
        log(f"drain {'complete' if drained else 'INCOMPLETE'} after {drain_s:.1f}s: {drain_state}")
        worker_exits = workers.stop()
        standin.stop()
        timings["stop_s"] = round(time.monotonic() - t1 - drain_s, 1)

    receipts, score_requests = standin.receipts()
    t2 = time.monotonic()
    db.close()
    db = connect(env.database_url)  # the first one saw a restart
    pauses = [(p, workers.logged_for(p.worker, p.run_id, p.attempt)) for p in faults.pauses]
    checks = Checks(db, clients.attempts, receipts, workers.permanent_failures(),
                    standin.duplicates(), args.workers, pauses).all()
    checks.insert(0, harness_check(drained, drain_s, drain_state, faults.errors, worker_exits))
    timings["checks_s"] = round(time.monotonic() - t2, 1)
    summary = {
        "seed": args.seed,
        "seconds": args.seconds,
        "started_at": started_at.isoformat(),
        "timings": timings,
        "fault_plan": plan,
        "faults": faults.counts(),
        "fault_log": [asdict(f) for f in faults.done],
        "requests": clients.counts(),
        "requests_by_kind": clients.counts_by_kind(),
        "runs": run_figures(db),
        "langfuse": {"score_requests_by_status": dict(score_requests),
                     "stand_in_instances": len(standin.instances),
                     "generations": standin.generations_run,
                     "scores_received": sum(len(v) for v in receipts.values())},
        "workers": {"spawned": workers.spawned, "exits": workers.exits,
                    "log_warnings": dict(workers.log_warnings())},
        "checks": [asdict(c) for c in checks],
        "passed": all(c.passed for c in checks),
    }
    print_summary(summary, checks)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"soak-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log(f"summary written to {out.relative_to(ROOT)}")
    return 0 if summary["passed"] else 1


def print_summary(summary: dict[str, Any], checks: list[Check]) -> None:
    print()
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}")
        for line in check.lines:
            print(f"      {line}")
    req = summary["requests"]
    print(f"\nseed {summary['seed']}, {summary['seconds']:.0f}s, timings {summary['timings']}")
    print(f"faults injected: {summary['faults']}")
    print(f"client requests: made {req['made']}, acknowledged {req['acked']}, "
          f"failed {req['failed']}, unknown {req['unknown']}  ({summary['requests_by_kind']})")
    runs = summary["runs"]
    print(f"runs: completed {runs['completed']}, taken over (attempts > 1) {runs['taken_over']}, "
          f"failed {runs['failed']}, published a spec {runs['published_a_spec']}")
    lf = summary["langfuse"]
    print(f"scores received: {lf['scores_received']} "
          f"(requests by status {lf['score_requests_by_status']}, "
          f"{lf['stand_in_instances']} stand-in processes: {', '.join(lf['generations'])})")
    print(f"worker warnings: {summary['workers']['log_warnings']}")
    print(f"\n{'PASSED' if summary['passed'] else 'FAILED'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
