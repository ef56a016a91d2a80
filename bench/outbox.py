"""Case 5: the Langfuse drain against the stand-in, in a process of its own, in each server
generation it models."""

from __future__ import annotations

from typing import Any

import psycopg

from bench.config import (
    BENCH_MODULES,
    STANDIN_KEYS,
    STANDIN_PORT,
    USERS,
    CorrectnessError,
    log,
    timed,
)
from bench.data import generate_outbox
from bench.worker_process import run_pfl
from testkit.env import StackEnv
from testkit.standin import GENERATIONS
from testkit.standin_process import StandinProcess
from testkit.world import make_twin, make_users, scalar, user_ids
from worker.langfuse_sender import LangfuseSender
from worker.outbox import score_item
from worker.store import OutboxRow


def case_outbox(env: StackEnv, conn: psycopg.Connection, sizes: dict[str, int]) -> dict[str, Any]:
    """Case 5, once per Langfuse server generation of the stand-in (v3, v4, v4.59, cloud):
    pending outbox rows drained by `pfl outbox drain`, against the same scores sent by the
    worker's LangfuseSender alone (no database). Returns each generation's figures under
    `generations` and, at the top level, the slowest drain and the most requests of any."""
    per: dict[str, dict[str, Any]] = {}
    for generation in GENERATIONS:
        per[generation] = _one_generation(conn, sizes["outbox_rows"], generation)
    worst = max(per.values(), key=lambda r: r["drain_seconds"] / r["floor_seconds"])
    return {
        **worst,
        "generation": next(g for g, r in per.items() if r is worst),
        "requests": max(r["requests"] for r in per.values()),
        "generations": per,
    }


def _one_generation(conn: psycopg.Connection, n: int, generation: str) -> dict[str, Any]:
    users = user_ids(make_users(conn, f"outbox-{generation}", USERS))
    twin = make_twin(conn, users[0], BENCH_MODULES, name=f"bench: outbox {generation}")
    # Feedback another case (or generation) left in the outbox would be drained too.
    conn.execute(
        "update public.persona_training_events set langfuse_status = 'skipped' "
        "where langfuse_status in ('pending', 'retrying')"
    )
    gen = generate_outbox(conn, twin, users, n)
    due = scalar(
        conn,
        "select count(*) from public.persona_training_events "
        "where langfuse_status in ('pending', 'retrying')",
    )
    if due != n:
        raise CorrectnessError(f"{due} outbox rows due, expected {n}")
    columns = (
        "event_id",
        "twin_id",
        "trace_id",
        "created_by",
        "score",
        "reason",
        "intent_label",
        "module_key",
        "comment",
        "metadata",
        "attempts",
        "score_timestamp",
    )
    items = [
        score_item(OutboxRow.model_validate(dict(zip(columns, row, strict=True))))
        for row in conn.execute(
            "select id, twin_id, trace_id, created_by, score, reason, intent_label, module_key, "
            "comment, metadata, langfuse_attempts, created_at from public.persona_training_events "
            "where twin_id = %s order by id",
            (twin.id,),
        )
    ]
    expected = {item.score_id for item in items}

    with StandinProcess(STANDIN_PORT, STANDIN_KEYS, generation=generation) as lf:
        with LangfuseSender(lf.url, *STANDIN_KEYS, 10.0) as sender:
            floor_seconds, deliveries = timed(lambda: sender.send(items))
        if any(d.outcome.value != "sent" for d in deliveries):
            raise CorrectnessError(f"floor ({generation}): the stand-in refused scores")
        floor_requests = lf.state()["score_requests"]
        lf.clear()
        log(f"case 5 ({generation}): draining {n:,} outbox rows to the stand-in at {lf.url}")
        drained = run_pfl("outbox", "drain", env_extra=lf.worker_env())
        state = lf.state()
    requests, scores = state["score_requests"], state["scores"]
    if set(scores) != expected:
        raise CorrectnessError(
            f"{generation}: the stand-in got {len(scores)} score ids, expected {len(expected)} "
            f"({len(expected - set(scores))} missing, {len(set(scores) - expected)} unexpected)"
        )
    repeated = sum(1 for versions in scores.values() if len(versions) != 1)
    if repeated or state["duplicates"]:
        raise CorrectnessError(f"{generation}: {repeated} scores were received more than once")
    statuses: dict[str, int] = dict(
        conn.execute(
            "select langfuse_status, count(*) from public.persona_training_events "
            "where twin_id = %s group by 1",
            (twin.id,),
        ).fetchall()
    )
    if statuses != {"sent": n}:
        raise CorrectnessError(f"{generation}: outbox rows after the drain: {statuses}")
    log(
        f"case 5 ({generation}): {drained['seconds']:.2f} s, {requests} score requests (and the "
        f"start-up check's two); sender alone {floor_seconds:.2f} s"
    )
    return {
        "rows": n,
        "generation_seconds": gen["seconds"],
        "drain_seconds": round(drained["seconds"], 3),
        "ms_per_score": round(drained["seconds"] / n * 1000, 4),
        "requests": requests,
        "check_requests": state["requests"] - requests,
        "floor_seconds": round(floor_seconds, 3),
        "floor_requests": floor_requests,
        "drain_peak_rss_mb": round(drained["peak_rss_mb"], 1),
    }
