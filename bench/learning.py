"""Cases 1 (and 3) and 2: learning throughput and memory, and cost that follows new work."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from bench.config import (
    API_STATEMENT_TIMEOUT_SECONDS,
    BENCH_MODULES,
    HISTORY_DAYS,
    LEARN_TRIALS,
    MODULES,
    NEW_EVENTS_SPAN_SECONDS,
    OTHER_PER_NEW,
    RPC_TARGET_SECONDS,
    USERS,
    CorrectnessError,
    log,
    timed,
)
from bench.data import (
    add_draft_under_audit,
    checkpoint,
    generate_events,
    next_event_id,
    vacuum,
)
from bench.ingest import StackProcesses, proc_stat
from bench.worker_process import (
    check_learning,
    forget_learning,
    learn_all,
    restore_learning,
    settle_history,
    snapshot_learning,
)
from testkit.env import StackEnv
from testkit.world import Twin, connect, make_twin, make_users, scalar, user_ids
from worker.config import WorkerSettings
from worker.runner import decide
from worker.store import Run, RunBatch, Store, make_client


def case_learning(env: StackEnv, conn: psycopg.Connection, sizes: dict[str, int]) -> dict[str, Any]:
    """Case 1 (and 3): N pending events of one twin learned by the worker, at two batch sizes,
    against a bare UPDATE of a copy of the same rows."""
    n = sizes["learn_events"]
    users = user_ids(make_users(conn, "learn", USERS))
    twin = make_twin(conn, users[0], BENCH_MODULES, name="bench: learning throughput")
    log(f"case 1: generating {n:,} events")
    gen = generate_events(env, twin, users, g_from=1, g_to=n, span_seconds=HISTORY_DAYS * 86_400)
    gen["vacuum_seconds"] = vacuum(conn)
    log(f"case 1: generated in {gen['seconds']} s, vacuum analyze {gen['vacuum_seconds']} s")

    passes = {}
    for batch in (sizes["learn_batch_large"], sizes["learn_batch_small"]):
        conn.execute(
            "update public.persona_learning_settings set max_batch_events = %s where twin_id = %s",
            (batch, twin.id),
        )
        trials = []
        for trial in range(LEARN_TRIALS):
            log(f"case 1: the worker learns {n:,} events, batch {batch:,} (trial {trial + 1})")
            forget_learning(conn, twin.id)
            figures = learn_all(conn, twin.id)
            if figures["events_processed"] != n:
                raise CorrectnessError(f"{figures['events_processed']} of {n} events processed")
            figures["check"] = check_learning(conn, twin.id)
            trials.append(figures)
        figures = {**min(trials, key=lambda f: f["seconds"]),
                   "trial_seconds": [f["seconds"] for f in trials]}
        passes[str(batch)] = figures
        log(
            f"case 1: {figures['seconds']} s in {figures['runs']} run(s) (runs alone "
            f"{figures['run_seconds']} s), peak RSS {figures['peak_rss_mb']} MB; "
            f"cursor and weights as from scratch"
        )

    large = sizes["learn_batch_large"]
    log(f"case 1: each worker RPC through PostgREST, {n:,} events learned again at batch {large:,}")
    rpcs = worker_rpc_times(env, conn, twin.id, n, large)
    longest = rpcs["longest"]
    log(
        f"case 1: longest RPC {longest['rpc']} {longest['seconds']} s (run {longest['run']}) of "
        f"{rpcs['runs']} run(s); cursor and weights as from scratch"
    )

    floors = [update_floor(conn, twin.id, n) for _ in range(LEARN_TRIALS)]
    log(
        f"case 1: floor (UPDATE … SET processed_at = now() over a copy of the same rows): "
        f"{', '.join(f'{f:.2f}' for f in floors)} s"
    )
    return {
        "events": n,
        "modules": MODULES,
        "generation": gen,
        "floor_seconds": round(min(floors), 3),
        "floor_trials": [round(f, 3) for f in floors],
        "passes": passes,
        "rpc_timing": rpcs,
    }


# The RPCs of one run, in the order worker.runner makes them (Runner._learn_and_complete).
RUN_RPCS = (
    "claim_learning_run",
    "claim_learning_run_events",
    "extend_learning_run_lease",
    "complete_learning_run",
)


def timed_run(store: Store, run: Run, lease_seconds: int) -> tuple[Run, dict[str, Any]]:
    """One claimed run driven as Runner._learn_and_complete does (its first read): the batch,
    the decision, the lease renewal, the completion. Returns the run's row afterwards and its
    figures: each RPC's seconds, the decision's seconds, the events processed, and whether the
    worker would have renewed the lease. Raises CorrectnessError when the run does not complete."""
    started = time.monotonic()  # as Runner.process: the attempt starts after the claim
    t0 = time.perf_counter()
    batch = store.claim_events(run)
    t1 = time.perf_counter()
    if not isinstance(batch, RunBatch):
        raise CorrectnessError(f"run {run.id}: the twin's modules were being rebuilt: {batch}")
    decision = decide(batch, safe_mode=run.safe_mode)
    t2 = time.perf_counter()
    renewal_due = time.monotonic() - started > lease_seconds / 2
    store.extend_lease(run, lease_seconds)
    t3 = time.perf_counter()
    done = store.complete_run(run, decision)
    t4 = time.perf_counter()
    if done.status != "completed":
        raise CorrectnessError(f"run {done.id} ended {done.status}: {done.error}")
    return done, {
        "events": done.events_processed or 0,
        "rpc_seconds": {
            "claim_learning_run_events": round(t1 - t0, 4),
            "extend_learning_run_lease": round(t3 - t2, 4),
            "complete_learning_run": round(t4 - t3, 4),
        },
        "decide_seconds": round(t2 - t1, 4),
        "lease_renewal_due": renewal_due,
    }


def worker_rpc_times(
    env: StackEnv, conn: psycopg.Connection, twin_id: str, n: int, batch: int
) -> dict[str, Any]:
    """The wall time of each RPC a `pfl run-once --twin` burst makes, through PostgREST.

    Puts the twin back to nothing learned with `max_batch_events` = `batch`, then drives the
    worker's calls by hand in worker.runner's order (Runner.run_once and _learn_and_complete):
    enqueue_due_learning_runs, then per run claim_learning_run, claim_learning_run_events,
    `decide` (pure, timed apart), extend_learning_run_lease and complete_learning_run, until a
    claim finds nothing. Each call goes through worker.store.Store on the worker's default
    settings (service-role key, HTTP timeout), its wall time taken with time.perf_counter around
    the Store method: the request, PostgREST, the statement and the answer parsed as the worker
    parses it. The store tries each call once (no retry hidden inside a figure; an error fails
    the case). The worker renews the lease only when a run has taken half of it
    (PFL_LEASE_SECONDS, 60 s by default), which no run here does; the renewal is called once per
    run anyway, at the point the worker would call it, so its time is known too
    (`lease_renewal_due` says whether the worker would have called it).

    Returns the runs (each RPC's seconds, the decision's seconds, events), the calls between runs,
    and the longest single RPC (`rpc`, `seconds`, `run`: 1-based, None between runs) against
    API_STATEMENT_TIMEOUT_SECONDS. Raises CorrectnessError when a run does not complete, the runs
    do not process all n events, or the twin's cursor or weights then differ from scratch.
    """
    forget_learning(conn, twin_id)
    conn.execute(
        "update public.persona_learning_settings set max_batch_events = %s where twin_id = %s",
        (batch, twin_id),
    )
    checkpoint()
    defaults = WorkerSettings.model_fields
    lease_seconds = int(defaults["pfl_lease_seconds"].default)
    http_timeout = float(defaults["pfl_http_timeout_seconds"].default)
    store = Store(make_client(env.url, env.service_key, timeout=http_timeout), attempts=1)
    twin = UUID(twin_id)
    worker_id = "bench-rpc-timing"
    runs: list[dict[str, Any]] = []
    between: list[tuple[str, float]] = []  # enqueue_due_learning_runs; the claim finding none
    try:
        progress = True
        while True:
            if progress:
                t0 = time.perf_counter()
                store.enqueue_due_runs(twin)
                between.append(("enqueue_due_learning_runs", time.perf_counter() - t0))
            t0 = time.perf_counter()
            run = store.claim_run(worker_id, lease_seconds, twin)
            claim_seconds = time.perf_counter() - t0
            if run is None:
                between.append(("claim_learning_run", claim_seconds))
                break
            done, figures = timed_run(store, run, lease_seconds)
            runs.append(
                {
                    **figures,
                    "rpc_seconds": {RUN_RPCS[0]: round(claim_seconds, 4)} | figures["rpc_seconds"],
                }
            )
            progress = (done.events_scanned or 0) > 0
    finally:
        store.close()
    processed = sum(r["events"] for r in runs)
    if processed != n:
        raise CorrectnessError(f"the timed RPCs processed {processed} of {n} events")
    calls = [
        {"rpc": rpc, "seconds": seconds, "run": i}
        for i, r in enumerate(runs, start=1)
        for rpc, seconds in r["rpc_seconds"].items()
    ] + [{"rpc": rpc, "seconds": round(seconds, 4), "run": None} for rpc, seconds in between]
    longest = max(calls, key=lambda c: c["seconds"])
    return {
        "batch": batch,
        "runs": len(runs),
        "lease_seconds": lease_seconds,
        "per_run": runs,
        "between_runs": [{"rpc": rpc, "seconds": round(t, 4)} for rpc, t in between],
        "longest_per_rpc": {
            rpc: max(c["seconds"] for c in calls if c["rpc"] == rpc)
            for rpc in ("enqueue_due_learning_runs", *RUN_RPCS)
        },
        "longest": longest,
        "limit_seconds": API_STATEMENT_TIMEOUT_SECONDS,
        "target_seconds": RPC_TARGET_SECONDS,
        "check": check_learning(conn, twin_id),
    }


def update_floor(conn: psycopg.Connection, twin_id: str, n: int) -> float:
    """Seconds of a bare `UPDATE … SET processed_at = now()` over a fresh copy of the twin's
    events (CREATE TABLE AS, vacuumed, after a checkpoint)."""
    conn.execute("drop table if exists public.bench_floor")
    conn.execute(
        "create table public.bench_floor as select e.*, null::timestamptz as processed_at "
        "from public.persona_training_events e where e.twin_id = %s",
        (twin_id,),
    )
    conn.execute("vacuum analyze public.bench_floor")
    checkpoint()
    seconds, cur = timed(lambda: conn.execute("update public.bench_floor set processed_at = now()"))
    if cur.rowcount != n:
        raise CorrectnessError(f"the floor updated {cur.rowcount} rows, not {n}")
    conn.execute("drop table public.bench_floor")
    return seconds


# ----------------------------------------------------------------------------- case 2


def case_history(env: StackEnv, conn: psycopg.Connection, sizes: dict[str, int]) -> dict[str, Any]:
    """Case 2: a run over n new events of a twin with a long processed history versus a twin
    with none, in the same database; and the twin with none before and after the long history
    was loaded (the table's size). Each with no draft spec and with a draft under audit (the
    run's gate then has work). `history_trials` rounds per phase, the twins' order rotating each
    round. The judged figure is the CPU of the PostgreSQL backends serving the run-once. A twin
    against another measured in the same rounds is judged by the median of the rounds' ratios;
    a twin against itself before the load (phases minutes apart) by a ratio of ratios: each
    trial against a control measured around it (CONTROL_SQL over a copy of the batch in a table
    that never grows: how fast the machine ran that kind of work then), the phases' medians of
    that compared."""
    h, n, trials = sizes["history_events"], sizes["new_events"], sizes["history_trials"]
    users = user_ids(make_users(conn, "history", USERS))
    fresh = make_twin(conn, users[0], BENCH_MODULES, name="bench: no history")
    drafting = make_twin(conn, users[1], BENCH_MODULES, name="bench: no history, draft")
    old = make_twin(conn, users[2], BENCH_MODULES, name="bench: long history")
    other = make_twin(conn, users[3], BENCH_MODULES, name="bench: other twins")

    log(f"case 2: {n:,} new events for each twin, among other twins' events")
    for twin, g_from in ((fresh, 1), (drafting, 1)):
        add_new_events(env, twin, other, users, n, g_from=g_from)
    add_draft_under_audit(conn, drafting)
    make_control(conn, fresh)
    vacuum(conn)
    snaps = {t.id: snapshot_learning(conn, t.id) for t in (fresh, drafting)}
    before = history_trials(
        conn,
        {"no_draft": fresh, "draft": drafting},
        snaps,
        trials,
        "no history, before the long history was loaded",
        control_twin=fresh,
    )

    log(f"case 2: generating {h:,} events of history")
    gen = generate_events(env, old, users, g_from=1, g_to=h, span_seconds=HISTORY_DAYS * 86_400)
    gen["vacuum_seconds"] = vacuum(conn)
    settle_history(conn, old.id)
    log(f"case 2: generated in {gen['seconds']} s, vacuum analyze {gen['vacuum_seconds']} s")
    add_new_events(env, old, other, users, n, g_from=h + 1)
    vacuum(conn)
    snaps[old.id] = snapshot_learning(conn, old.id)
    after = history_trials(
        conn,
        {"no_draft": fresh, "draft": drafting, "history_no_draft": old},
        snaps,
        trials,
        "after the long history was loaded",
        control_twin=fresh,
    )
    add_draft_under_audit(conn, old)
    after_draft = history_trials(
        conn,
        {"draft": drafting, "history_draft": old},
        snaps,
        trials,
        "after the long history was loaded, both twins with a draft",
        control_twin=fresh,
    )
    conn.execute("drop table public.bench_history_control")
    return {
        "history_events": h,
        "new_events": n,
        "other_twins_events_per_new_event": OTHER_PER_NEW,
        "trials": trials,
        "generation": gen,
        "before": before,
        "after": after,
        "after_draft": after_draft,
        "comparisons": {
            "no_draft": {
                "history": paired(after["history_no_draft"], after["no_draft"]),
                "table": unpaired(after["no_draft"], before["no_draft"]),
            },
            "draft": {
                "history": paired(after_draft["history_draft"], after_draft["draft"]),
                "table": unpaired(after["draft"], before["draft"]),
            },
        },
        "check": {
            name: check_learning(conn, t.id)
            for name, t in (("no_history", fresh), ("no_history_draft", drafting), ("history", old))
        },
    }


def paired(got: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """Two twins measured in the same rounds: the median of the rounds' ratios of the backends'
    CPU (the judged figure), and beside it of the API's CPU (PostgREST too) and of run time."""
    out: dict[str, Any] = {}
    for key, name in (
        ("db_cpu_seconds", "ratio"),
        ("api_cpu_seconds", "api_ratio"),
        ("run_seconds", "run_ratio"),
    ):
        ratios = [
            g[key] / max(f[key], 1e-3) for g, f in zip(got["trials"], floor["trials"], strict=True)
        ]
        out[name] = round(statistics.median(ratios), 3)
        out[f"round_{name}s"] = [round(r, 3) for r in ratios]
    return out


def unpaired(got: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """One twin in two phases, minutes apart, through which the machine's speed drifts with
    other sessions' load: each trial's backend CPU is taken in units of the control measured
    around it (control_cpu_seconds), and the judged ratio is that of the phases' medians of
    that, a ratio of ratios. Beside it the plain ratios of the phases' medians (backends' CPU,
    API CPU, run time) and the control's own, which says how much the machine's speed moved."""

    def ratio(key: str) -> float:
        return round(got[key] / max(floor[key], 1e-4), 3)

    def in_control_units(side: dict[str, Any]) -> float:
        return statistics.median(
            t["db_cpu_seconds"] / max(t["control_cpu_seconds"], 1e-4) for t in side["trials"]
        )

    return {
        "ratio": round(in_control_units(got) / in_control_units(floor), 3),
        "cpu_ratio": ratio("db_cpu_seconds"),
        "api_ratio": ratio("api_cpu_seconds"),
        "run_ratio": ratio("run_seconds"),
        "control_ratio": ratio("control_cpu_seconds"),
    }


# The control of the before/after-load comparison: the run's kind of work (an index range of
# one twin's events, interleaved with another twin's as in the live table, each vote's decayed
# weight summed per match key) over a copy of the no-history twin's batch made before the load,
# in a table that never grows. Its cost tracks the machine's speed, never the events table's size.
CONTROL_SQL = """
select module_key, intent_label, source, count(*),
       sum(exp(-ln(2) * extract(epoch from now() - created_at) / (30 * 86400))
           * coalesce(score, 1))
from public.bench_history_control
where twin_id = %s and id > 0
group by module_key, intent_label, source
"""


def make_control(conn: psycopg.Connection, twin: Twin) -> None:
    """The control's table: the twin's pending events and the other twins' between them (the
    ids from its first pending event to its last), copied with the (twin_id, id) index."""
    conn.execute("drop table if exists public.bench_history_control")
    conn.execute(
        "create table public.bench_history_control as select e.* "
        "from public.persona_training_events e, "
        "(select min(id) lo, max(id) hi from public.persona_training_events where twin_id = %s) b "
        "where e.id between b.lo and b.hi order by e.id",
        (twin.id,),
    )
    conn.execute("create index on public.bench_history_control (twin_id, id)")


def control_cpu_seconds(conn: psycopg.Connection, twin: Twin, repeats: int = 3) -> float:
    """The CPU seconds (schedstat, as api_cpu_ns) the bench's own backend spends on CONTROL_SQL,
    the least of `repeats` in a row, with no parallel workers: how fast the machine runs this kind
    of statement now, whatever the events table holds. Measured once, with parallel workers
    allowed, a 28 ms control read 17-44 ms after the load: a worker's CPU is not the backend's,
    and the first statement after a trial may find its pages pushed out of shared buffers."""
    path = Path(f"/proc/{scalar(conn, 'select pg_backend_pid()')}/schedstat")
    least = float("inf")
    with conn.transaction():
        # All of it on this backend: a parallel worker's CPU would not be in its schedstat.
        conn.execute("set local max_parallel_workers_per_gather = 0")
        for _ in range(repeats):
            before = int(path.read_text().split()[0])
            conn.execute(CONTROL_SQL, (twin.id,)).fetchall()
            least = min(least, (int(path.read_text().split()[0]) - before) / 1e9)
    return least


def add_new_events(
    env: StackEnv,
    twin: Twin,
    other: Twin,
    users: list[str],
    n: int,
    *,
    g_from: int,
) -> None:
    """n new events of `twin`, arriving among OTHER_PER_NEW times as many events of `other`
    (the ids interleave), as a twin's feedback arrives in a database many twins write to."""
    with connect(env.database_url) as c:
        base = next_event_id(c)
        other_from = scalar(
            c,
            "select count(*) + 1 from public.persona_training_events where twin_id = %s",
            other.id,
        )
    stride = OTHER_PER_NEW + 1
    generate_events(
        env,
        twin,
        users,
        g_from=g_from,
        g_to=g_from + n - 1,
        span_seconds=NEW_EVENTS_SPAN_SECONDS,
        base=base,
        stride=stride,
    )
    for k in range(OTHER_PER_NEW):
        start = other_from + k * n
        generate_events(
            env,
            other,
            users,
            g_from=start,
            g_to=start + n - 1,
            span_seconds=NEW_EVENTS_SPAN_SECONDS,
            base=base + 1 + k,
            stride=stride,
        )


def history_trials(
    conn: psycopg.Connection,
    twins: dict[str, Twin],
    snaps: dict[str, Any],
    trials: int,
    label: str,
    *,
    control_twin: Twin,
) -> dict[str, Any]:
    """Learns each twin's new events in `trials` rounds (the twin put back as it was before each
    trial; each round one trial of every twin, the order rotating so that no twin always goes
    first); per twin the medians and every trial, in round order.

    Before the rounds each twin learns once untimed: PostgREST closes a pool connection idle for
    30 s, and the first run on a new one pays for the backend's start and for compiling the
    worker's functions (20 ms more of backend CPU here). Before each trial the twin's pending
    events are read into shared buffers, so that no trial pays for another twin's trial having
    pushed its batch out (3 twins a round after the load, 2 before); a run reading more than its
    batch still pays for the rest. The control (control_cpu_seconds) is measured right before
    that read and right after the trial, and the mean of the two kept: it reads about 70 MB,
    which between the read and the run could push the batch back out of the 128 MB of shared
    buffers."""
    times: dict[str, list[dict[str, Any]]] = {name: [] for name in twins}
    new = {
        name: scalar(
            conn,
            "select count(*) from public.persona_training_events where twin_id = %s and id > %s",
            twin.id,
            snaps[twin.id]["cursor"],
        )
        for name, twin in twins.items()
    }
    stack = StackProcesses.find(conn)
    for twin in twins.values():
        restore_learning(conn, twin.id, snaps[twin.id])
        learn_all(conn, twin.id)
    for trial in range(trials):
        order = list(twins)
        order = order[trial % len(order):] + order[: trial % len(order)]
        for name in order:
            twin = twins[name]
            restore_learning(conn, twin.id, snaps[twin.id])
            checkpoint()  # the restore's writes are flushed before, not during, the span
            control = control_cpu_seconds(conn, control_twin)
            read_pending(conn, twin, snaps[twin.id]["cursor"])  # after the control (above)
            cpu_before = api_cpu_ns(stack)
            figures = learn_all(conn, twin.id)
            cpu_after = api_cpu_ns(stack)
            control += control_cpu_seconds(conn, control_twin)
            delta = {pid: ns - cpu_before.get(pid, 0) for pid, ns in cpu_after.items()}
            figures["api_cpu_seconds"] = round(sum(delta.values()) / 1e9, 4)
            figures["db_cpu_seconds"] = round(
                sum(ns for pid, ns in delta.items() if pid != stack.postgrest) / 1e9, 4
            )
            figures["control_cpu_seconds"] = round(control / 2, 5)
            if figures["events_processed"] != new[name]:
                raise CorrectnessError(
                    f"{name}: {figures['events_processed']} of {new[name]} new events processed"
                )
            times[name].append(figures)
        log(
            f"case 2 ({label}): trial {trial + 1}: "
            + ", ".join(
                f"{name} {runs[-1]['run_seconds']} s "
                f"(CPU {runs[-1]['db_cpu_seconds'] * 1e3:.0f} ms backends, "
                f"{runs[-1]['api_cpu_seconds'] * 1e3:.0f} ms with PostgREST)"
                for name, runs in times.items()
            )
            + f"; control {times[order[-1]][-1]['control_cpu_seconds'] * 1e3:.1f} ms"
        )
    return {
        name: {
            "seconds": statistics.median(f["seconds"] for f in runs),
            "run_seconds": statistics.median(f["run_seconds"] for f in runs),
            "api_cpu_seconds": statistics.median(f["api_cpu_seconds"] for f in runs),
            "db_cpu_seconds": statistics.median(f["db_cpu_seconds"] for f in runs),
            "control_cpu_seconds": statistics.median(f["control_cpu_seconds"] for f in runs),
            "events_processed": runs[0]["events_processed"],
            "trials": runs,
        }
        for name, runs in times.items()
    }


def read_pending(conn: psycopg.Connection, twin: Twin, cursor: int) -> None:
    """Reads the twin's events after `cursor` (heap and index) into shared buffers: `score` is
    not in the index, so every row's page is visited."""
    conn.execute(
        "select count(score) from public.persona_training_events where twin_id = %s and id > %s",
        (twin.id, cursor),
    )


def api_cpu_ns(stack: StackProcesses) -> dict[int, int]:
    """CPU time so far, in ns, of the API's side of the bench stack, by process: every thread of
    PostgREST (pid stack.postgrest) and each PostgreSQL backend it connected (the postmaster's
    children whose command line names the `authenticator` role), from the scheduler's per-thread
    accounting (/proc/<pid>/task/<tid>/schedstat, first field), which counts time on a CPU only:
    waiting for one on a busy machine is not in it. Background processes (autovacuum,
    checkpointer) and the bench's own connection are left out."""
    pids = [stack.postgrest]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc_stat(int(entry.name))["ppid"] == stack.postmaster
                        and b"authenticator" in (entry / "cmdline").read_bytes()):
                    pids.append(int(entry.name))
    times: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            times[pid] = sum(int((task / "schedstat").read_text().split()[0])
                             for task in Path(f"/proc/{pid}/task").iterdir())
    return times
