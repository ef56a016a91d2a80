#!/usr/bin/env python3
"""Measures the owner views (supabase/schemas/700_owner_views.sql) for a twin with 1,000,000
events.

Load: a new owner and twin (8 modules, a published and a draft spec, 1,000 voters) and
`--events` events (default 1,000,000; 90% feedback with ~5% vote changes, 10% audits of the
published spec) spread evenly over the last `--days` days (60), bulk-loaded with COPY under
`session_replication_role = replica` (the superuser connection of the local stack: the consent
and vote triggers are skipped, so the loader sets their columns itself). Then one learning run
per `--run-hours` (1) hours over those days, written as the worker would leave them: the run row
(queued, then completed, which fires the summary trigger over its batch), a module change per
module with counts decayed as worker/learning.py decays them (one decay per run), the twin's
cursor moved past the last batch. `--pending` (1,000) events arrive after the last run.

Measure: every view queried as the owner would query it, each `--repeat` (20) times after one
warm-up: in SQL as the owner (role authenticated with the JWT claims, so RLS applies) and over
HTTP through nginx -> PostgREST with the owner's JWT. Prints a table of median and p95 in ms and
writes the figures as JSON (`--out`, default bench-results/views.json).

Run it on a stack of your own (ports from the environment, see scripts/stack):
    scripts/stack up; set -a; eval "$(scripts/stack env)"; set +a
    .venv/bin/python scripts/measure_views.py
The loaded twin stays (`--keep-world ID` measures an already loaded twin again).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit import tokens  # noqa: E402
from testkit.env import StackEnv  # noqa: E402
from testkit.world import make_users, user_ids  # noqa: E402
from worker.learning import beta_mean, classify, decay_factor  # noqa: E402
from worker.models import LearningSettings, ModuleStatus  # noqa: E402

MODULES = {  # module_key -> (intent_label, approval at the start, approval at the end)
    "evidence_answers": ("factual_with_evidence", 0.85, 0.45),
    "small_talk": ("casual_chat", 0.80, 0.82),
    "career_advice": ("career", 0.55, 0.75),
    "code_review": ("code", 0.70, 0.70),
    "travel_tips": ("travel", 0.60, 0.40),
    "book_notes": ("books", 0.90, 0.88),
    "health_faq": ("health", 0.50, 0.30),
    "news_digest": ("news", 0.75, 0.60),
}
NEGATIVE_REASONS = (
    ["incorrect"] * 5 + ["outdated"] * 3 + ["off_persona"] * 2 + ["unhelpful"] * 2
    + ["unsafe"] + ["other"] + [None] * 2
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--run-hours", type=float, default=1.0)
    p.add_argument("--pending", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--keep-world", metavar="TWIN_ID", help="measure this loaded twin, load nothing")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "views.json")
    p.add_argument("--seed", type=int, default=16)
    return p.parse_args()


# ----------------------------------------------------------------------------- loading


def load_world(db: psycopg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    # The auth service picks each user's id: auth.users.id has no default.
    owner = make_users(db, "views-owner")[0].id
    voters = user_ids(make_users(db, "views-voter", 1000))
    twin = db.execute(
        "insert into public.twins (owner_id, name, feedback_from) "
        "values (%s, 'Views bench twin', 'any_user') returning id::text", (owner,),
    ).fetchone()[0]  # type: ignore[index]
    modules = {
        key: db.execute(
            "insert into public.persona_modules (twin_id, module_key, intent_label) "
            "values (%s, %s, %s) returning id::text", (twin, key, intent),
        ).fetchone()[0]  # type: ignore[index]
        for key, (intent, _, _) in MODULES.items()
    }
    start = datetime.now(UTC) - timedelta(days=args.days)
    published = db.execute(
        "insert into public.persona_specs (twin_id, status, spec, published_at) "
        "values (%s, 'published', %s, %s) returning id::text",
        (twin, json.dumps({"modules": list(MODULES)}), start - timedelta(days=1)),
    ).fetchone()[0]  # type: ignore[index]
    db.execute(
        "insert into public.persona_specs (twin_id, status, spec) values (%s, 'draft', %s)",
        (twin, json.dumps({"modules": list(MODULES), "voice": "new"})),
    )
    first_id = db.execute(
        "select coalesce(max(id), 0) + 1 from public.persona_training_events"
    ).fetchone()[0]  # type: ignore[index]

    keys = list(MODULES)
    span = timedelta(days=args.days).total_seconds()
    rows: list[list[Any]] = []
    votes: list[int] = []  # indexes into rows of feedback votes (for vote changes)
    for i in range(args.events):
        at = start + timedelta(seconds=span * i / args.events)
        key = keys[rng.randrange(len(keys))]
        intent, p0, p1 = MODULES[key]
        p = p0 + (p1 - p0) * i / args.events
        eid = first_id + i
        module_key = key if rng.random() < 0.5 else None
        if rng.random() < 0.1:
            passed = rng.random() < min(0.98, p + 0.1)
            reason = None if passed else rng.choice(NEGATIVE_REASONS)
            rows.append([eid, twin, "persona_audit", f"audit-{eid}", intent, module_key, None,
                         passed, reason, published, None, at, None, None, None, None, None,
                         "production", None])
            continue
        if votes and rng.random() < 0.05:  # a voter changes an earlier vote
            old = rows[votes.pop(rng.randrange(len(votes)))]
            old[12] = at  # superseded_at
            old[15] = "superseded" if old[15] == "pending" else old[15]
            score = 1 if rng.random() < p else -1
            reason = "helpful" if score > 0 else rng.choice(NEGATIVE_REASONS)
            rows.append([eid, twin, "user_feedback", old[3], old[4], old[5], score, None, reason,
                         None, old[10], at, None, old[13], old[0], "pending", at, None, old[18]])
            continue
        u = rng.random()
        score = 1 if u < p else (0 if u < p + 0.03 else -1)
        reason = (rng.choice(["helpful", None]) if score > 0 else
                  None if score == 0 else rng.choice(NEGATIVE_REASONS))
        rows.append([eid, twin, "user_feedback", f"trace-{eid}", intent, module_key, score, None,
                     reason, None, voters[rng.randrange(len(voters))], at, None, eid, None,
                     "pending", at, None, at])
        votes.append(len(rows) - 1)

    columns = (
        "id, twin_id, source, trace_id, intent_label, module_key, score, passed, reason, "
        "persona_spec_id, created_by, created_at, superseded_at, first_vote_id, supersedes_id, "
        "langfuse_status, langfuse_next_attempt_at, audit_origin, first_vote_at"
    )
    t0 = time.monotonic()
    with db.transaction():
        db.execute("set local session_replication_role = replica")
        with db.cursor().copy(
            f"copy public.persona_training_events ({columns}) from stdin"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        db.execute(
            "select setval(pg_get_serial_sequence('public.persona_training_events', 'id'), %s)",
            (first_id + args.events - 1,),
        )
    print(f"loaded {args.events} events in {time.monotonic() - t0:.1f} s", file=sys.stderr)

    t0 = time.monotonic()
    learn(db, twin, modules, rows, first_id, start, args)
    print(f"wrote the runs in {time.monotonic() - t0:.1f} s", file=sys.stderr)

    # Evidence that arrived after the last run.
    db.execute(
        "insert into public.persona_training_events (twin_id, trace_id, score, reason, "
        "intent_label, created_by) select %s, 'pending-' || g, -1, 'incorrect', "
        "'factual_with_evidence', %s from generate_series(1, %s) g",
        (twin, voters[0], args.pending),
    )
    db.execute("analyze")
    return {"twin": twin, "owner": owner, "module": modules["evidence_answers"],
            "trace": rows[len(rows) // 2][3]}


def learn(
    db: psycopg.Connection, twin: str, modules: dict[str, str], rows: list[list[Any]],
    first_id: int, start: datetime, args: argparse.Namespace,
) -> None:
    """One run per run_hours: the run row, its module changes (counts decayed once per run, as
    worker/learning.py does between runs), then completed (the summary trigger reads its batch)."""
    settings = LearningSettings()
    # per module: success and failure weights, status, confidence
    state: dict[str, tuple[float, float, ModuleStatus, float]] = {
        k: (0.0, 0.0, ModuleStatus.insufficient_data, 0.5) for k in MODULES
    }
    by_intent = {intent: key for key, (intent, _, _) in MODULES.items()}
    step = timedelta(hours=args.run_hours)
    at = start + step
    i = 0
    previous = start
    while i < len(rows):
        batch_first = i
        while i < len(rows) and rows[i][11] < at:
            i += 1
        new: dict[str, list[float]] = {k: [0.0, 0.0] for k in MODULES}
        for row in rows[batch_first:i]:
            key = row[5] or by_intent[row[4]]
            success = row[6] == 1 if row[2] == "user_feedback" else row[7]
            failure = row[6] == -1 if row[2] == "user_feedback" else not row[7]
            w = 1.0 if row[2] == "user_feedback" else 2.0
            if failure and row[8] == "unsafe":
                w *= 3.0
            if success:
                new[key][0] += w
            elif failure:
                new[key][1] += w
        after_id = first_id + batch_first - 1
        last_id = first_id + i - 1
        run = db.execute(
            "insert into public.persona_feedback_learning_runs (twin_id, trigger, created_at, "
            "learning_time, batch_after_event_id, batch_last_event_id, started_at, attempts) "
            "values (%s, 'schedule', %s, %s, %s, %s, %s, 1) returning id::text",
            (twin, at, at, after_id, last_id, at),
        ).fetchone()[0]  # type: ignore[index]
        changes = []
        for key, (s, f, status, confidence) in state.items():
            k = decay_factor(previous, at, settings.half_life_days)
            s2, f2 = s * k + new[key][0], f * k + new[key][1]
            status2 = classify(s2, f2, status, settings)
            conf2 = beta_mean(s2, f2)
            if abs(conf2 - confidence) > 1e-12 or status2 != status:
                changes.append((modules[key], twin, run, confidence, conf2, status.value,
                                status2.value, s2, f2, at))
            state[key] = (s2, f2, status2, conf2)
        with db.cursor() as cur:
            cur.executemany(
                "insert into public.persona_module_changes (module_id, twin_id, run_id, "
                "confidence_before, confidence_after, status_before, status_after, "
                "success_weight, failure_weight, changed_at) "
                "values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", changes,
            )
        db.execute(
            "update public.persona_feedback_learning_runs set status = 'completed', "
            "finished_at = %s, events_scanned = %s, events_processed = %s, events_unmatched = 0,"
            " modules_updated = %s, gate_passed = true, gate_report = '{\"checks\": []}', "
            "publish_decision = 'held', hold_reason = 'no_draft' where id = %s",
            (at + timedelta(seconds=2), i - batch_first, i - batch_first, len(changes), run),
        )
        db.execute("update public.twins set learned_through_event_id = %s where id = %s",
                   (last_id, twin))
        previous = at
        at += step
    for key, (s, f, status, confidence) in state.items():
        db.execute(
            "update public.persona_modules set success_weight = %s, failure_weight = %s, "
            "confidence = %s, status = %s, evidence_at = %s where id = %s",
            (s, f, confidence, status.value, previous, modules[key]),
        )


# ----------------------------------------------------------------------------- measuring


def queries(world: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], str]]:
    """(name, SQL, params, PostgREST path) of each view as the dashboard, apps and
    `pfl report` read it."""
    t, m = world["twin"], world["module"]
    yield ("trend: one module", "select * from public.persona_module_trend where module_id = "
           "%(m)s order by measured_at", {"m": m},
           f"persona_module_trend?module_id=eq.{m}&order=measured_at")
    yield ("trend: whole twin, first page", "select * from public.persona_module_trend where "
           "twin_id = %(t)s order by measured_at desc limit 1000", {"t": t},
           f"persona_module_trend?twin_id=eq.{t}&order=measured_at.desc&limit=1000")
    yield ("feedback by module and reason", "select * from "
           "public.persona_module_feedback_reasons where twin_id = %(t)s", {"t": t},
           f"persona_module_feedback_reasons?twin_id=eq.{t}")
    yield ("feedback by module (approval)", "select * from public.persona_module_feedback "
           "where twin_id = %(t)s", {"t": t}, f"persona_module_feedback?twin_id=eq.{t}")
    yield ("twin overview", "select * from public.persona_twin_overview where twin_id = %(t)s",
           {"t": t}, f"persona_twin_overview?twin_id=eq.{t}")
    yield ("events: newest page", "select * from public.persona_training_events_state where "
           "twin_id = %(t)s order by id desc limit 100", {"t": t},
           f"persona_training_events_state?twin_id=eq.{t}&order=id.desc&limit=100")
    yield ("events: oldest page", "select * from public.persona_training_events_state where "
           "twin_id = %(t)s order by id limit 100", {"t": t},
           f"persona_training_events_state?twin_id=eq.{t}&order=id&limit=100")
    yield ("events: waiting, newest first", "select * from "
           "public.persona_training_events_state where twin_id = %(t)s and processed = false "
           "order by id desc limit 100", {"t": t},
           f"persona_training_events_state?twin_id=eq.{t}&processed=is.false&order=id.desc"
           "&limit=100")



def timed(fn: Any, repeat: int) -> dict[str, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[min(len(samples) - 1, int(0.95 * len(samples)))], 2),
        "max_ms": round(samples[-1], 2),
    }


def measure(db: psycopg.Connection, world: dict[str, Any], repeat: int) -> list[dict[str, Any]]:
    env = StackEnv.from_environ()
    token = tokens.user_token(env.jwt_secret, world["owner"])
    claims = jwt.decode(token, options={"verify_signature": False})  # as PostgREST sets them
    rest = env.rest + "/"
    headers = {"apikey": env.anon_key, "Authorization": f"Bearer {token}"}
    results = []
    with httpx.Client(timeout=30) as http:
        for name, sql, params, path in queries(world):
            rows_seen: list[int] = []

            def as_owner(
                sql: str = sql, params: dict[str, Any] = params, seen: list[int] = rows_seen
            ) -> None:
                with db.transaction():
                    db.execute("set local role authenticated")
                    db.execute("select set_config('request.jwt.claims', %s, true)",
                               (json.dumps(claims),))
                    seen.append(len(db.execute(sql, params).fetchall()))

            def over_http(path: str = path) -> None:
                r = http.get(rest + path, headers=headers)
                r.raise_for_status()

            sql_t = timed(as_owner, repeat)
            http_t = timed(over_http, repeat)
            results.append({"view": name, "rows": rows_seen[-1], "sql": sql_t, "http": http_t})
            print(f"{name:38} rows {rows_seen[-1]:>5}  sql median {sql_t['median_ms']:7.2f} ms "
                  f"p95 {sql_t['p95_ms']:7.2f}  http median {http_t['median_ms']:7.2f} ms "
                  f"p95 {http_t['p95_ms']:7.2f}", file=sys.stderr)
    return results


def main() -> int:
    args = parse_args()
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as db:
        if args.keep_world:
            twin = args.keep_world
            owner, module = db.execute(
                "select t.owner_id::text, m.id::text from public.twins t join "
                "public.persona_modules m on m.twin_id = t.id and m.module_key = "
                "'evidence_answers' where t.id = %s", (twin,),
            ).fetchone()  # type: ignore[misc]
            trace = db.execute(
                "select trace_id from public.persona_training_events where twin_id = %s "
                "order by id offset 500000 limit 1", (twin,),
            ).fetchone()[0]  # type: ignore[index]
            world = {"twin": twin, "owner": owner, "module": module, "trace": trace}
        else:
            world = load_world(db, args)
        counts = db.execute(
            "select (select count(*) from public.persona_training_events where twin_id = %(t)s),"
            " (select count(*) from public.persona_feedback_learning_runs where twin_id = %(t)s),"
            " (select count(*) from public.persona_module_changes where twin_id = %(t)s),"
            " (select count(*) from public.persona_feedback_daily where twin_id = %(t)s),"
            " (select count(*) from public.persona_run_evidence where twin_id = %(t)s)",
            {"t": world["twin"]},
        ).fetchone()
        print(f"twin {world['twin']}: events, runs, module changes, daily rows, run evidence rows"
              f" = {counts}", file=sys.stderr)
        results = measure(db, world, args.repeat)
    doc = {
        "measured_at": datetime.now(UTC).isoformat(),
        "twin": world["twin"],
        "events": counts[0], "runs": counts[1], "module_changes": counts[2],  # type: ignore[index]
        "feedback_daily_rows": counts[3], "run_evidence_rows": counts[4],  # type: ignore[index]
        "repeat": args.repeat,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    worst = max(max(r["sql"]["median_ms"], r["http"]["median_ms"]) for r in results)
    print(f"slowest median: {worst:.2f} ms (limit 100 ms); figures in {args.out}", file=sys.stderr)
    return 0 if worst < 100 else 1


if __name__ == "__main__":
    sys.exit(main())
