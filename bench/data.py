"""Bulk data on the bench stack: twins, events, outbox rows, written as postgres."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import psycopg

from bench.config import GATE_TRACES, INTENTS, MODULES, CorrectnessError, timed
from testkit.env import StackEnv
from testkit.world import Twin, add_spec, connect, module_keys, scalar


def add_draft_under_audit(conn: psycopg.Connection, twin: Twin) -> None:
    """A draft spec, with audits of it and of the published spec on the same GATE_TRACES traces,
    written as the audit pipeline writes them (plain inserts, through the insert trigger; the
    gate's traces replayed under both specs, so marked replay)."""
    draft = add_spec(conn, twin.id, "draft", {"modules": module_keys(MODULES), "note": "next"})
    conn.execute(
        "insert into public.persona_training_events "
        "  (twin_id, source, trace_id, intent_label, passed, reason, persona_spec_id, "
        "   audit_origin) "
        "select %s, 'persona_audit', 'gate-' || i, 'intent_' || (i %% 10), i %% 7 <> 0, "
        "  case when i %% 7 = 0 then 'off_persona'::public.training_event_reason end, spec, "
        "  'replay' "
        "from generate_series(1, %s) i, unnest(array[%s, %s]::uuid[]) spec",
        (twin.id, GATE_TRACES, twin.published_spec_id, draft),
    )


# Rows numbered g = g_from .. g_to of one twin, ids base + g, cast times spread evenly over the
# `step` × n seconds before now (g_last is the last row of the whole load). Every 10th row is
# an audit of the published spec; every 20th is a changed vote of the row before it (same trace
# and user, flipped score), which that row records as superseded. 80 % of the votes name a
# module, 18 % only an intent, 2 % an intent no module serves; success rates differ by module.
# Feedback is marked sent to Langfuse, as it would be long after it was cast. What the insert
# triggers set (created_by, first_vote_id and first_vote_at, supersedes, outbox state, an audit's
# origin) is filled in; feedback names no spec (only audits do).
EVENTS_SQL = """
insert into public.persona_training_events (
  id, twin_id, source, trace_id, intent_label, module_key, score, passed, reason,
  persona_spec_id, created_by, created_at, first_vote_id, supersedes_id, superseded_at,
  langfuse_status, langfuse_attempts, langfuse_next_attempt_at, langfuse_sent_at, audit_origin,
  first_vote_at)
overriding system value
select %(base)s + (g - %(g0)s) * %(stride)s, %(twin)s,
       (case when audit then 'persona_audit' else 'user_feedback' end)
         ::public.training_event_source,
       case when audit then 'a' || lpad(g::text, 10, '0') else 't' || lpad(o::text, 10, '0') end,
       case when pick >= 98 then 'intent_none' else 'intent_' || (k %% %(intents)s) end,
       case when pick < 80 then 'module_' || lpad(k::text, 2, '0') end,
       case when not audit then vote end,
       case when audit then pass end,
       case when audit then (case when pass then null when r5 < 0.05 then 'unsafe'
                                  else 'off_persona' end)
            when vote = 1 then 'helpful' when vote = 0 then 'other'
            when r5 < 0.05 then 'unsafe' when r5 < 0.35 then 'incorrect'
            when r5 < 0.6 then 'unhelpful' when r5 < 0.8 then 'off_persona' else 'outdated'
       end::public.training_event_reason,
       case when audit then %(spec)s::uuid end,
       case when not audit then (%(users)s::uuid[])[1 + abs(hashint8extended(o, 6)) %% %(nusers)s]
       end,
       ts,
       case when not audit then %(base)s + (o - %(g0)s) * %(stride)s end,
       case when revote then %(base)s + (o - %(g0)s) * %(stride)s end,
       case when revoted then ts + %(step)s * interval '1 second' end,
       case when not audit then 'sent'::public.langfuse_status end,
       case when not audit then 1 else 0 end,
       case when not audit then ts end,
       case when not audit then ts end,
       case when audit then 'production'::public.audit_origin end,
       -- the first vote's time: row o's (a changed vote's first vote is the row before it)
       case when not audit then %(now)s - (%(g_last)s - o) * %(step)s * interval '1 second' end
from (
  select *,
         case when revote then (case when first_vote = 1 then -1 else 1 end)
              else first_vote end as vote
  from (
    select *,
           case when r1 < 0.05 then 0 when r4 < p then 1 else -1 end as first_vote,
           r4 < p + 0.1 as pass
    from (
      select g, o, audit, revote, revoted, k, pick, ts,
             0.3 + 0.65 * k / (%(modules)s - 1)::float8 as p,
             (abs(hashint8extended(o, 2)) %% 1000) / 1000.0 as r1,
             (abs(hashint8extended(o, 4)) %% 1000) / 1000.0 as r4,
             (abs(hashint8extended(g, 5)) %% 1000) / 1000.0 as r5
      from (
        select g, o, g %% 10 = 3 as audit, g %% 20 = 0 as revote,
               g %% 20 = 19 and g < %(g_last)s as revoted,
               abs(hashint8extended(o, 1)) %% %(modules)s as k,
               abs(hashint8extended(o, 3)) %% 100 as pick,
               %(now)s - (%(g_last)s - g) * %(step)s * interval '1 second' as ts
        from (
          select g, case when g %% 20 = 0 then g - 1 else g end as o
          from generate_series(%(g_from)s::bigint, %(g_to)s::bigint) g
        ) numbered
      ) drawn
    ) scored
  ) voted
) ev
"""


def generate_events(
    env: StackEnv,
    twin: Twin,
    users: list[str],
    *,
    g_from: int,
    g_to: int,
    span_seconds: float,
    base: int | None = None,
    stride: int = 1,
    parallel: int = 2,
) -> dict[str, Any]:
    """Bulk-inserts rows g_from..g_to of one twin (EVENTS_SQL) over `parallel` connections, a
    slice each; returns the ids and seconds. Row g gets id base + (g − g_from) × stride: after
    the table's last id by default; with a stride, several loads can interleave. The caller
    vacuums."""
    if g_from % 20 != 1 or (g_to - g_from + 1) % 20:
        raise ValueError("rows must come in whole runs of 20 (changed votes pair up)")
    n = g_to - g_from + 1
    started = time.perf_counter()
    if base is None:
        with connect(env.database_url) as conn:
            base = next_event_id(conn)
    params = {
        "base": base,
        "g0": g_from,
        "stride": stride,
        "twin": twin.id,
        "spec": twin.published_spec_id,
        "users": users,
        "nusers": len(users),
        "intents": INTENTS,
        "modules": MODULES,
        "g_last": g_to,
        "step": span_seconds / n,
        "now": datetime.now(UTC),
    }
    chunk = -(-n // (20 * parallel)) * 20
    slices = [(a, min(a + chunk - 1, g_to)) for a in range(g_from, g_to + 1, chunk)]

    def insert(bounds: tuple[int, int]) -> None:
        with connect(env.database_url) as conn, conn.transaction():
            conn.execute("set local session_replication_role = replica")
            conn.execute(EVENTS_SQL, {**params, "g_from": bounds[0], "g_to": bounds[1]})

    with ThreadPoolExecutor(len(slices)) as pool:
        list(pool.map(insert, slices))
    with connect(env.database_url) as conn:
        conn.execute(
            "select setval(pg_get_serial_sequence('public.persona_training_events', 'id'), "
            "(select max(id) from public.persona_training_events))"
        )
    return {
        "first_id": base,
        "last_id": base + (n - 1) * stride,
        "events": n,
        "seconds": round(time.perf_counter() - started, 2),
    }


def next_event_id(conn: psycopg.Connection) -> int:
    return int(scalar(conn, "select coalesce(max(id), 0) + 1 from public.persona_training_events"))


def generate_outbox(
    conn: psycopg.Connection, twin: Twin, users: list[str], n: int
) -> dict[str, Any]:
    """n first votes on distinct traces, pending in the Langfuse outbox and due now."""
    started = time.perf_counter()
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute(
            "insert into public.persona_training_events (twin_id, source, trace_id, "
            "  intent_label, score, reason, created_by, created_at, first_vote_at, "
            "  langfuse_status, langfuse_next_attempt_at) "
            "select %(twin)s, 'user_feedback', 'outbox-' || g, 'intent_' || (g %% 10), "
            "  case when g %% 3 = 0 then -1 else 1 end, "
            "  (case when g %% 3 = 0 then 'incorrect' else 'helpful' end)"
            "::public.training_event_reason, "
            "  (%(users)s::uuid[])[1 + g %% %(nusers)s], "
            "  now() - (%(n)s - g) * interval '1 second', "
            "  now() - (%(n)s - g) * interval '1 second', 'pending', "
            "  now() - (%(n)s - g) * interval '1 second' "
            "from generate_series(1, %(n)s) g",
            {"twin": twin.id, "users": users, "nusers": len(users), "n": n},
        )
        conn.execute(
            "update public.persona_training_events set first_vote_id = id "
            "where twin_id = %s and source = 'user_feedback'",
            (twin.id,),
        )
    vacuum(conn)
    return {"rows": n, "seconds": round(time.perf_counter() - started, 2)}


def vacuum(conn: psycopg.Connection) -> float:
    """VACUUM ANALYZE after a bulk load (hint bits, visibility map, planner statistics), as
    autovacuum would do before long; returns its seconds."""
    seconds, _ = timed(lambda: conn.execute("vacuum analyze public.persona_training_events"))
    conn.execute("analyze public.persona_modules")
    conn.execute("analyze public.persona_specs")
    return round(seconds, 2)


def checkpoint() -> None:
    """CHECKPOINT, so that a timed step does not pay for the writes before it. Only a superuser
    may: the local platform's supabase_admin (PFL_ADMIN_DATABASE_URL, which the stack exports)."""
    admin_url = StackEnv.from_environ().admin_database_url
    if admin_url is None:
        raise CorrectnessError("CHECKPOINT needs PFL_ADMIN_DATABASE_URL (scripts/stack env)")
    with connect(admin_url) as admin:
        admin.execute("checkpoint")
