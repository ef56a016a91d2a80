"""Case 7 (case 6 is the many-twins case): the exact learning path. Rebuilding one twin's
modules over its whole history against a bare aggregate over the same rows, each rebuild call
against the API's statement timeout; and the delete of a user with 10,000 votes with and without
the triggers that keep learning exact."""

from __future__ import annotations

import statistics
import time
from typing import Any
from uuid import UUID

import psycopg

from bench.config import (
    API_STATEMENT_TIMEOUT_SECONDS,
    BENCH_MODULES,
    HISTORY_DAYS,
    RPC_TARGET_SECONDS,
    USERS,
    CorrectnessError,
    log,
    timed,
)
from bench.data import generate_events, vacuum
from bench.worker_process import check_learning, delete_runs, learn_all, settle_history
from testkit.env import StackEnv
from testkit.world import connect, make_twin, make_users, scalar, user_ids
from worker.config import WorkerSettings
from worker.store import RebuildProgress, Store, make_client

DELETED_VOTES = 10_000
DECAY = "exp(-ln(2::float8) * greatest(0, date_part('epoch', now() - e.created_at)) / (30 * 86400))"


def case_rebuild(env: StackEnv, conn: psycopg.Connection, sizes: dict[str, int]) -> dict[str, Any]:
    """Case 7. A twin with n learned events (case 1's mix: votes, changed votes, audits) is
    marked for a rebuild. In SQL on one backend, alternated `rebuild_trials` times: the rebuild
    (every claim_learning_run_events call of one run, until it answers with the batch) against
    the bare aggregate (count and decayed sum over the twin's rows) and the same aggregate
    grouped by match key. Then each rebuild call through PostgREST, timed as the worker makes
    it, and a worker run that rebuilds, checked against the from-scratch oracle."""
    n, trials = sizes["rebuild_events"], sizes["rebuild_trials"]
    users = user_ids(make_users(conn, "rebuild", USERS))
    twin = make_twin(conn, users[0], BENCH_MODULES, name="bench: rebuild")
    log(f"case 7: generating {n:,} events")
    generate_events(env, twin, users, g_from=1, g_to=n, span_seconds=HISTORY_DAYS * 86_400)
    vacuum(conn)
    settle_history(conn, twin.id)
    step = scalar(
        conn,
        "select rebuild_step_events from public.persona_learning_settings where twin_id = %s",
        twin.id,
    )
    last = scalar(conn, "select learned_through_event_id from public.twins where id = %s", twin.id)

    mark(conn, twin.id)
    run_id, token = hold_run(conn, twin.id)
    floor = (
        f"select count(*), sum({DECAY}) from public.persona_training_events e "
        f"where e.twin_id = '{twin.id}' and e.id <= {last}"
    )
    grouped = (
        f"select e.module_key, e.intent_label, sum({DECAY}) from public.persona_training_events e "
        f"where e.twin_id = '{twin.id}' and e.id <= {last} group by 1, 2"
    )
    log(f"case 7: rebuild vs bare aggregate, {trials} alternations")
    figures: dict[str, list[float]] = {"floor": [], "grouped": [], "rebuild": []}
    calls = 0
    with connect(env.database_url) as c:
        for _ in range(trials):
            figures["floor"].append(timed(lambda: c.execute(floor).fetchall())[0])
            figures["grouped"].append(timed(lambda: c.execute(grouped).fetchall())[0])
            c.execute("delete from private.learning_run_rebuilds where run_id = %s", (run_id,))
            started = time.perf_counter()
            calls = rebuild_in_sql(c, run_id, token)
            figures["rebuild"].append(time.perf_counter() - started)
    release(conn, run_id, token)

    log("case 7: each rebuild call through PostgREST")
    rpc_seconds = rebuild_through_api(env, conn, twin.id)
    log("case 7: a worker run rebuilds the modules")
    delete_runs(conn, twin.id)
    mark(conn, twin.id)
    worker = learn_all(conn, twin.id)
    rebuilt = scalar(
        conn,
        "select bool_and(rebuilt_modules) from public.persona_feedback_learning_runs "
        "where twin_id = %s",
        twin.id,
    )
    if not rebuilt:
        raise CorrectnessError("the worker's run did not rebuild the marked twin's modules")
    medians = {k: statistics.median(v) for k, v in figures.items()}
    return {
        "events": n,
        "step_events": step,
        "calls": calls,
        "trials": trials,
        "seconds": {k: [round(x, 4) for x in v] for k, v in figures.items()},
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        "ratio": round(medians["rebuild"] / medians["floor"], 3),
        "ratio_grouped": round(medians["rebuild"] / medians["grouped"], 3),
        "rpc_seconds": rpc_seconds,
        "longest_rpc_seconds": max(rpc_seconds),
        "limit_seconds": API_STATEMENT_TIMEOUT_SECONDS,
        "target_seconds": RPC_TARGET_SECONDS,
        "worker": worker,
        "check": check_learning(conn, twin.id),
        "user_delete": user_delete(env, conn, sizes["rebuild_trials"]),
    }


def mark(conn: psycopg.Connection, twin_id: str) -> None:
    """Marks the twin for a rebuild, as a deletion or a module edit does."""
    conn.execute(
        "update public.twins set evidence_generation = learned_generation + 1 where id = %s",
        (twin_id,),
    )


def hold_run(conn: psycopg.Connection, twin_id: str) -> tuple[str, str]:
    """A run of the twin, queued and claimed for an hour: (run id, lease token)."""
    run_id = scalar(conn, "select id from public.enqueue_learning_run(%s, true)", twin_id)
    token = scalar(
        conn,
        "select lease_token from public.claim_learning_run('bench-rebuild', 3600, %s)",
        twin_id,
    )
    if token is None:
        raise CorrectnessError(f"run {run_id} of the marked twin could not be claimed")
    return str(run_id), str(token)


def release(conn: psycopg.Connection, run_id: str, token: str) -> None:
    conn.execute("select public.release_learning_run(%s, %s)", (run_id, token))


def rebuild_in_sql(conn: psycopg.Connection, run_id: str, token: str) -> int:
    """Calls claim_learning_run_events until it answers with the batch; returns the calls.
    Raises CorrectnessError when the answer has no rebuilt modules."""
    for calls in range(1, 10_000):
        doc = scalar(conn, "select public.claim_learning_run_events(%s, %s)", run_id, token)
        if not doc.get("rebuild_pending"):
            if not doc["rebuilt_modules"]:
                raise CorrectnessError(f"run {run_id}: the batch came back without a rebuild")
            return calls
    raise CorrectnessError(f"run {run_id}: the rebuild did not end")


def rebuild_through_api(env: StackEnv, conn: psycopg.Connection, twin_id: str) -> list[float]:
    """The wall time of each claim_learning_run_events call of one rebuild, made through the
    worker's Store (PostgREST, the worker's default HTTP timeout, no retries)."""
    delete_runs(conn, twin_id)
    timeout = float(WorkerSettings.model_fields["pfl_http_timeout_seconds"].default)
    store = Store(make_client(env.url, env.service_key, timeout=timeout), attempts=1)
    try:
        store.enqueue_run(UUID(twin_id), safe_mode=True)
        run = store.claim_run("bench-rebuild-api", 3600, UUID(twin_id))
        if run is None:
            raise CorrectnessError("the marked twin's run could not be claimed")
        seconds = []
        while True:
            started = time.perf_counter()
            got = store.claim_events(run)
            seconds.append(round(time.perf_counter() - started, 4))
            if not isinstance(got, RebuildProgress):
                break
        store.release_run(run)
    finally:
        store.close()
    return seconds


def user_delete(env: StackEnv, conn: psycopg.Connection, trials: int) -> dict[str, Any]:
    """The delete of a user with DELETED_VOTES learned votes (their account goes; the votes
    cascade), as one statement, with the triggers on deleted events (which mark the twins for a
    rebuild and correct the owner views' summaries) and without them, alternated; each delete
    rolled back, so every trial deletes the same rows."""
    [voter] = make_users(conn, "rebuild-voter")
    twin = make_twin(conn, voter.id, {"m": "a"}, name="bench: user delete")
    conn.execute(
        "insert into public.persona_training_events "
        "  (twin_id, trace_id, intent_label, score, created_by) "
        "select %s, 'del-' || g, 'a', case when g %% 3 = 0 then -1 else 1 end, %s "
        "from generate_series(1, %s) g",
        (twin.id, voter.id, DELETED_VOTES),
    )
    settle_history(conn, twin.id)
    vacuum(conn)
    triggers = [
        r[0]
        for r in conn.execute(
            "select tgname from pg_trigger"
            " where tgrelid = 'public.persona_training_events'::regclass"
            " and not tgisinternal and tgtype & 8 <> 0"  # fires on DELETE
        )
    ]
    off = "; ".join(
        f"alter table public.persona_training_events disable trigger {t}" for t in triggers
    )
    seconds: dict[str, list[float]] = {"with": [], "without": []}
    with connect(env.database_url) as c:
        for _ in range(trials):
            for kind in ("with", "without"):
                with c.transaction(force_rollback=True):
                    if kind == "without":
                        c.execute(off)
                    seconds[kind].append(
                        timed_sql_rowcount(c, "delete from auth.users where id = %s", voter.id)
                    )
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "votes": DELETED_VOTES,
        "triggers": triggers,
        "seconds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        "ratio": round(medians["with"] / medians["without"], 3),
    }


def timed_sql_rowcount(conn: psycopg.Connection, sql: str, *args: object) -> float:
    """The statement's wall time; raises CorrectnessError unless it deleted exactly one row."""
    seconds, cur = timed(lambda: conn.execute(sql, args))
    if cur.rowcount != 1:
        raise CorrectnessError(f"{sql!r} affected {cur.rowcount} rows")
    return seconds
