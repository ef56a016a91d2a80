"""The results table, its targets and verdicts, and what the run ran on."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import QUICK_SLACK
from bench.ingest import INGEST_DESIGNS, StackProcesses
from testkit.env import ROOT


@dataclass(frozen=True)
class Row:
    case: str
    measured: str
    floor: str
    ratio: float | None
    target: str
    verdict: str


# Targets missed at full size for a known, written-down reason, with where it is tracked: the
# quick smoke test in CI reports them as known misses instead of failing on them; a full-size run
# still fails. Remove an entry once its target holds again.
KNOWN_MISSES = {
    "1 learn": "known miss at quick size only: its floor is 0.3-0.6 s, against which each run's "
    "fixed cost (about 0.1 s: the claim, the completion and their round trips) weighs 2-3 times "
    "what it does at full size, which passes (docs/benchmarks.md, case 1)",
}


def judge(
    value: float, op: str, target: float, quick: bool, *, noisy: bool = True,
    known_miss: str | None = None,
) -> str:
    """`pass` or `FAIL`; in --quick mode a noisy figure missed by less than QUICK_SLACK is
    reported as a miss but does not fail the run, and neither does a `known_miss` (its reason)."""
    if value <= target if op == "<=" else value >= target:
        return "pass"
    if quick and noisy:
        limit = target * QUICK_SLACK if op == "<=" else target / QUICK_SLACK
        if value <= limit if op == "<=" else value >= limit:
            return "miss (within quick slack)"
        if known_miss:
            return known_miss
    return "FAIL"


def judged(
    case: str,
    measured: str,
    floor: str,
    value: float,
    op: str,
    target: float,
    quick: bool,
    *,
    unit: str = "",
    is_ratio: bool = True,
    noisy: bool = True,
) -> Row:
    """A row with a target: `value` judged against it (the ratio column shows it if a ratio)."""
    sign = "≤" if op == "<=" else "≥"
    known = next((why for prefix, why in KNOWN_MISSES.items() if case.startswith(prefix)), None)
    verdict = judge(value, op, target, quick, noisy=noisy, known_miss=known)
    ratio = value if is_ratio else None
    return Row(case, measured, floor, ratio, f"{sign} {target:g}{unit}", verdict)


def reported(case: str, measured: str, floor: str, ratio: float) -> Row:
    """A row reported for what it shows, with no target."""
    return Row(case, measured, floor, ratio, "(reported)", "-")


def check_row(case: str, check: dict[str, Any]) -> Row:
    return Row(
        case,
        f"cursor at last event, {check['modules_checked']} modules, max rel. err "
        f"{check['max_relative_error']:.0e}",
        "from scratch",
        None,
        "= from scratch",
        "pass",
    )


def report_rows(results: dict[str, Any], quick: bool) -> list[Row]:
    rows: list[Row] = []
    if learn := results.get("learning"):
        floor = learn["floor_seconds"]
        # At quick size the worker's fixed start-up (about 1 s, measured apart) outweighs the
        # floor itself, so quick judges the process time less that start-up; full size keeps it.
        startup = results.get("worker_startup_seconds", 0.0) if quick else 0.0
        for batch, p in learn["passes"].items():
            ratio = (p["seconds"] - startup) / floor
            less = f" less {startup:.2f} s start-up" if quick else ""
            rows.append(
                judged(
                    f"1 learn {learn['events']:,} events, batch {int(batch):,}",
                    f"{p['seconds']:.2f} s{less}, {p['runs']} run(s)"
                    f" ({p['run_seconds']:.2f} s alone)",
                    f"{floor:.2f} s UPDATE",
                    ratio, "<=", 1.5, quick,
                )
            )
        for batch, p in learn["passes"].items():
            rows.append(check_row(f"1 correctness, batch {int(batch):,}", p["check"]))
        if rpcs := learn.get("rpc_timing"):
            rows.extend(rpc_rows(rpcs, quick))
        for batch, p in learn["passes"].items():
            rows.append(
                judged(
                    f"3 worker peak RSS, batch {int(batch):,}",
                    f"{p['peak_rss_mb']:.0f} MB",
                    "-",
                    p["peak_rss_mb"], "<=", 150, quick,
                    unit=" MB", is_ratio=False, noisy=False,
                )
            )
    if hist := results.get("history"):
        before, after, after_draft = hist["before"], hist["after"], hist["after_draft"]
        n, h = hist["new_events"], hist["history_events"]
        for draft, what in (("no_draft", "no draft"), ("draft", "draft under audit")):
            history_phase = after if draft == "no_draft" else after_draft
            pairs = (
                (
                    f"2 {n:,} new events: {h:,}-event history vs none, {what}",
                    history_phase[f"history_{draft}"],
                    history_phase[draft],
                    "no history; median of paired ratios",
                    hist["comparisons"][draft]["history"],
                ),
                (
                    f"2 {n:,} new events, no history: {h:,} more rows in the table, {what}",
                    after[draft],
                    before[draft],
                    "before the load; in control units",
                    hist["comparisons"][draft]["table"],
                ),
            )
            for case, got, floor, floor_name, ratio in pairs:
                rows.append(
                    judged(
                        case,
                        f"DB CPU {got['db_cpu_seconds'] * 1e3:.0f} ms"
                        + (
                            f" ({ratio['cpu_ratio']:.2f}× plain, control "
                            f"{ratio['control_ratio']:.2f}×)"
                            if "control_ratio" in ratio
                            else ""
                        )
                        + f", API {got['api_cpu_seconds'] * 1e3:.0f} ms "
                        f"({ratio['api_ratio']:.2f}×), run {got['run_seconds']:.3f} s "
                        f"({ratio['run_ratio']:.2f}×)",
                        f"{floor['db_cpu_seconds'] * 1e3:.0f} ms "
                        f"({floor['run_seconds']:.3f} s) {floor_name}",
                        ratio["ratio"], "<=", 1.2, quick,
                    )
                )
        for name, check in hist["check"].items():
            rows.append(check_row(f"2 correctness, {name.replace('_', ' ')}", check))
    if many := results.get("many_twins"):
        rows.extend(many_twins_rows(many, quick))
    if rebuild := results.get("rebuild"):
        rows.extend(rebuild_rows(rebuild, quick))
    for ingest in filter(None, (results.get("ingest"), results.get("ingest_designs"))):
        rows.extend(ingest_rows(ingest, quick))
    if outbox := results.get("outbox"):
        for generation, figures in outbox.get("generations", {"-": outbox}).items():
            most = figures["rows"] / 50
            rows.append(
                reported(
                    f"5 Langfuse drain of {figures['rows']:,} rows ({generation})",
                    f"{figures['drain_seconds']:.2f} s, {figures['ms_per_score']:.2f} ms/score",
                    f"{figures['floor_seconds']:.2f} s sender alone",
                    figures["drain_seconds"] / figures["floor_seconds"],
                )
            )
            rows.append(
                Row(
                    f"5 Langfuse requests, every score once ({generation})",
                    f"{figures['requests']} requests",
                    f"{figures['floor_requests']} requests",
                    None,
                    f"≤ {most:.0f}",
                    "pass" if figures["requests"] <= most else "FAIL",
                )
            )
    return rows


def ms(latency: dict[str, float]) -> str:
    return f"p50 {latency['p50']:.0f}, p99 {latency['p99']:.0f} ms"


def cpu_text(cpu: dict[str, float], per: int = 1, uvicorn: bool = False) -> str:
    """CPU µs per request (per vote when `per` votes a request) of the stack's processes, and of
    the FastAPI baseline's uvicorn when it served the requests."""
    names = [*StackProcesses.NAMES, *(["uvicorn"] if uvicorn else [])]
    return " + ".join(f"{cpu[k] / per:.0f}" for k in names) + " µs"


def equal_p99_row(equal: dict[str, Any]) -> Row:
    """Case 4's rate at equal p99 (bench.ingest.rate_at_equal_p99), reported beside the judged
    same-connections ratio."""
    ours, theirs = equal["ours"], equal["theirs"]
    rounds = equal["theirs_rounds"]
    counts = sorted({int(p["connections"]) for p in [*equal["sweep"]["fastapi"], rounds]})

    def point(p: dict[str, float]) -> str:
        n = int(p["connections"])
        return (f"{p['rate']:.0f}/s at {n} connection{'s' if n > 1 else ''} "
                f"(p99 {p['p99_ms']:.1f} ms)")

    if theirs:
        floor = f"{point(theirs)} FastAPI"
    else:
        lowest = min(p["p99_ms"] for p in [*equal["sweep"]["fastapi"], rounds])
        floor = f"FastAPI: no p99 within it (lowest {lowest:.1f} ms)"
    return Row(
        f"4 rate at equal p99 (≤ {equal['budget_ms']:.1f} ms, ours at {rounds['connections']:.0f} "
        "connections): ours vs "
        f"FastAPI at {', '.join(map(str, counts))} connections",
        point(ours),
        floor,
        equal["ratio"],
        "(reported; ≥ 3 is judged above)",
        "-",
    )


def ingest_rows(ingest: dict[str, Any], quick: bool) -> list[Row]:
    """Case 4: the write path against the FastAPI endpoint a user would otherwise build (rate at
    the same connections, judged on the median paired ratio, and the p99 of each), batch ingest
    in votes per second, the bare table as a reference, CPU per request, the load generator's
    headroom and the one-current-vote guarantee."""
    events, bare = ingest["events"], ingest["bare"]
    rounds = f"wrk {ingest['wrk']} × {ingest['rounds']} rounds"
    rows: list[Row] = []
    if fastapi := ingest.get("fastapi"):
        versus = ingest["events_vs_fastapi"]
        rows.append(
            judged(
                f"4 feedback ingest vs a FastAPI endpoint (supabase-py), {rounds}",
                f"{events['rate']:.0f}/s ({ms(events['latency_ms'])})",
                f"{fastapi['rate']:.0f}/s FastAPI, {fastapi['uvicorn_workers']} uvicorn workers "
                f"({ms(fastapi['latency_ms'])})",
                versus["ratio"], ">=", 3, quick,
            )
        )
        rows.append(
            judged(
                f"4 p99 at the same {ingest['wrk'].split()[1][2:]} connections: ours vs FastAPI",
                f"{events['latency_ms']['p99']:.0f} ms",
                f"{fastapi['latency_ms']['p99']:.0f} ms FastAPI",
                events["latency_ms"]["p99"] / fastapi["latency_ms"]["p99"], "<=", 1, quick,
            )
        )
        rows.append(equal_p99_row(ingest["equal_p99"]))
        batch = ingest["batch"]
        n = batch["votes_per_request"]
        rows.append(
            reported(
                f"4 batch ingest, {n} votes a request (5 changed in the request, 5 from before)",
                f"{batch['votes_rate']:,.0f} votes/s ({batch['rate']:.0f} requests/s, "
                f"{ms(batch['latency_ms'])}); CPU per vote {cpu_text(batch['cpu_us'], n)}",
                f"{events['rate']:,.0f} votes/s one a request",
                ingest["batch_vs_events"]["ratio"],
            )
        )
        rows.append(
            reported(
                "4 CPU per request: PostgreSQL + PostgREST + nginx (+ uvicorn for FastAPI)",
                cpu_text(events["cpu_us"]),
                cpu_text(fastapi["cpu_us"], uvicorn=True) + " FastAPI",
                sum(fastapi["cpu_us"].values()) / sum(events["cpu_us"].values()),
            )
        )
    rows.append(
        reported(
            "4 against a bare table (reference: no policy, trigger, constraint or index)",
            f"{events['rate']:.0f}/s, CPU {cpu_text(events['cpu_us'])}",
            f"{bare['rate']:.0f}/s bare ({ms(bare['latency_ms'])}), CPU {cpu_text(bare['cpu_us'])}",
            events["ratio"],
        )
    )
    rows.append(
        judged(
            "4 load generator: wrk vs nginx no-op",
            f"{ingest['noop_rate']:.0f}/s",
            f"{bare['rate']:.0f}/s bare",
            ingest["noop_rate"] / bare["rate"], ">=", 5, quick,
        )
    )
    for name, design in ingest["designs"].items():
        rows.append(
            reported(
                f"4 design: {INGEST_DESIGNS[name]}",
                f"{design['rate']:.0f}/s, CPU {cpu_text(design['cpu_us'])}",
                f"{bare['rate']:.0f}/s bare",
                design["ratio"],
            )
        )
    g = ingest["guarantee"]
    rows.append(
        Row(
            "4 correctness: answers, rows, one current vote",
            f"all 2xx, rows = votes in 2xx (+ in flight at stop); {g['votes']:,} votes on "
            f"{g['feedbacks']:,} feedbacks ({g['changed']:,} changed): one current each, the last",
            "-",
            None,
            "every 2xx a row",
            "pass",
        )
    )
    return rows


# Short names of the worker's RPCs in the table.
RPC_SHORT = {
    "enqueue_due_learning_runs": "enqueue",
    "claim_learning_run": "claim",
    "claim_learning_run_events": "events",
    "extend_learning_run_lease": "lease",
    "complete_learning_run": "complete",
}


def many_twins_rows(many: dict[str, Any], quick: bool) -> list[Row]:
    """Case 6: the idle poll at many twins against few (the old design's reported beside it),
    the drain's rate by 1, 2 and 4 workers with its round trips and CPU per run, and the
    freshness of steady votes."""
    idle, n, few = many["idle"], many["twins"], many["floor_twins"]
    rows = [
        judged(
            f"6 idle poll, nothing due: {n:,} twins vs {few:,}",
            f"{idle['many']['new_ms']:.2f} ms CPU ({idle['many']['new_wall_ms']:.2f} ms wall)",
            f"{idle['few']['new_ms']:.2f} ms CPU at {few:,} twins",
            idle["ratio"], "<=", 1.2, quick,
        ),
        reported(
            "6 idle poll, the old design (every twin probed)",
            f"{idle['many']['old_ms']:.2f} ms CPU ({idle['many']['old_wall_ms']:.2f} ms wall)",
            f"{idle['few']['old_ms']:.2f} ms CPU at {few:,} twins",
            idle["old_ratio"],
        ),
    ]
    one = many["drain"]["1"]
    for k, d in many["drain"].items():
        cpu = d["cpu_ms_per_run"]
        measured = (
            f"{d['runs_per_second']:.1f} runs/s ({d['runs']:,} in {d['seconds']:.1f} s), "
            f"{d['rpc_per_run']:.2f} RPC/run; CPU/run: postgres {cpu['postgres']:.1f}, "
            f"PostgREST {cpu['postgrest']:.1f}, nginx {cpu['nginx']:.1f}, "
            f"workers {cpu['workers']:.1f} ms"
        )
        case = f"6 drain {many['drain_twins']:,} twins × 5 events, {k} worker(s)"
        if k == "1":
            rows.append(judged(case, measured, "-", d["runs_per_second"], ">=", 200, quick,
                               unit=" runs/s", is_ratio=False))
        else:
            rows.append(reported(case, measured, f"{one['runs_per_second']:.1f} runs/s by 1",
                                 d["runs_per_second"] / one["runs_per_second"]))
    fresh = many["freshness"]
    rows.append(
        judged(
            f"6 freshness: {fresh['rate']:.1f} votes/s over {fresh['twins']:,} twins, "
            "1 worker, p99",
            f"p50 {fresh['p50_seconds']:.2f} s, p99 {fresh['p99_seconds']:.2f} s, max "
            f"{fresh['max_seconds']:.2f} s ({fresh['votes']:,} votes)",
            "-", fresh["p99_seconds"], "<=", 5, quick, unit=" s", is_ratio=False,
        )
    )
    rows.append(Row("6 correctness: every run completed, every event learned", "all", "-",
                    None, "= sent", "pass"))
    return rows


def rebuild_rows(rebuild: dict[str, Any], quick: bool) -> list[Row]:
    """Case 7: the rebuild against the bare aggregate a rebuild needs (the decayed sum grouped by
    match key; the ungrouped sum reported beside it), its
    longest call through PostgREST against half the API's statement timeout, the worker's
    rebuilt modules against the oracle, and the user delete with and without its triggers."""
    n, med = rebuild["events"], rebuild["median_seconds"]
    rpcs = rebuild["rpc_seconds"]
    delete = rebuild["user_delete"]
    return [
        judged(
            f"7 rebuild {n:,} events' modules, {rebuild['calls']} call(s) of "
            f"{rebuild['step_events']:,}",
            f"{med['rebuild']:.3f} s",
            f"{med['grouped']:.3f} s aggregate by match key",
            rebuild["ratio_grouped"], "<=", 1.5, quick,
        ),
        reported(
            "7 rebuild against the ungrouped aggregate",
            f"{med['rebuild']:.3f} s",
            f"{med['floor']:.3f} s count and decayed sum",
            rebuild["ratio"],
        ),
        Row(
            f"7 longest rebuild call through PostgREST, {len(rpcs)} call(s)",
            f"{rebuild['longest_rpc_seconds']:.3f} s (" + ", ".join(f"{s:.3f}" for s in rpcs)
            + " s)",
            f"{rebuild['limit_seconds']:g} s API statement timeout",
            rebuild["longest_rpc_seconds"] / rebuild["limit_seconds"],
            f"≤ {rebuild['target_seconds']:g} s",
            judge(rebuild["longest_rpc_seconds"], "<=", rebuild["target_seconds"], quick),
        ),
        check_row("7 correctness, the worker's rebuild", rebuild["check"]),
        reported(
            f"7 delete a user with {delete['votes']:,} learned votes",
            f"{delete['median_seconds']['with'] * 1e3:.1f} ms",
            f"{delete['median_seconds']['without'] * 1e3:.1f} ms without "
            + ", ".join(delete["triggers"]),
            delete["ratio"],
        ),
    ]


def rpc_rows(rpcs: dict[str, Any], quick: bool) -> list[Row]:
    """Case 1's longest single worker RPC through PostgREST against the API's statement timeout
    (bench.config.RPC_TARGET_SECONDS says why the target is half of it), and the check of the
    pass that timed the RPCs. In --quick mode the batch is the same 200,000 events as at full
    size, and a miss fails only past the quick slack (2 × half the timeout: the timeout itself)."""
    longest, limit, target = rpcs["longest"], rpcs["limit_seconds"], rpcs["target_seconds"]
    where = f"run {longest['run']}" if longest["run"] is not None else "between runs"
    each = ", ".join(
        f"{RPC_SHORT.get(rpc, rpc)} {seconds:.3f}"
        for rpc, seconds in rpcs["longest_per_rpc"].items()
    )
    return [
        Row(
            f"1 longest worker RPC, batch {rpcs['batch']:,}, {rpcs['runs']} run(s)",
            f"{longest['rpc']} {longest['seconds']:.3f} s ({where}); longest of each: {each} s",
            f"{limit:g} s API statement timeout",
            longest["seconds"] / limit,
            f"≤ {target:g} s",
            judge(longest["seconds"], "<=", target, quick),
        ),
        check_row(f"1 correctness, RPCs timed, batch {rpcs['batch']:,}", rpcs["check"]),
    ]


def print_table(rows: list[Row]) -> None:
    header = ("case", "measured", "floor", "ratio", "target", "verdict")
    cells = [header] + [
        (
            r.case,
            r.measured,
            r.floor,
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            r.target,
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for i, cell in enumerate(cells):
        print(" | ".join(v.ljust(w) for v, w in zip(cell, widths, strict=True)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mem_kb = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else "unknown",
        "memory_gb": round(int(mem_kb.group(1)) / 1024 / 1024, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()

