"""The benchmark harness; run it through `scripts/bench [--quick] [--out FILE]`.

Builds its own data on the bench stack (the environment `scripts/stack env` prints), measures
each case against a floor measured side by side in the same run, prints a table and writes the
figures as JSON. Cases at full size (--quick shrinks them and fails only on clear misses):

1. Learning throughput: 1,000,000 pending events of one twin with 50 modules, learned end to end
   by `pfl run-once --twin` (a subprocess, through PostgREST) with the batch at 1,000,000 and at
   100,000; floor: a bare `UPDATE … SET processed_at = now()` over a copy of the same rows.
   Target: worker ≤ 1.5 × floor. Afterwards the twin's cursor must be its last event id and
   every module's weights must equal a from-scratch recomputation.
2. Cost follows new work: the run over 10,000 new events (among other twins' events) of a twin
   with 5,000,000 processed events versus a twin with none, and the twin with none after versus
   before those 5,000,000 rows were loaded; without a draft spec and with one under audit (the
   gate then has work). The runs' own time, best of 5. Target: ratio ≤ 1.2.
3. Worker memory: peak RSS of the worker process in the case 1 runs ≤ 150 MB at both batch sizes.
4. Feedback ingest: wrk POSTs of new votes with user JWTs through nginx → PostgREST into
   persona_training_events versus the same requests into a bare table, in 8 short rounds that
   pair the two back to back (the order alternating), with the CPU time PostgreSQL, PostgREST
   and nginx spend per request. Target: the median of the paired ratios ≥ 0.85; every answer
   2xx and every 2xx a row. wrk against an nginx no-op location shows the load generator is not
   the bottleneck.
5. Langfuse drain: 10,000 pending outbox rows drained by `pfl outbox drain` to the Langfuse
   stand-in; floor: the same scores sent by the worker's LangfuseSender alone. Target: requests
   ≤ rows / 50; every score received exactly once.

Bulk data is written as the postgres superuser with `session_replication_role = replica` (no
triggers, no foreign-key checks), so the generator fills in what the insert trigger would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # for `python scripts/bench.py` without PYTHONPATH
    sys.path.insert(0, str(ROOT))

from worker.langfuse_sender import LangfuseSender  # noqa: E402
from worker.learning import beta_mean, classify, evidence_from_scratch  # noqa: E402
from worker.models import EvidenceEvent, LearningSettings, ModuleStatus  # noqa: E402
from worker.outbox import score_item  # noqa: E402
from worker.store import OutboxRow  # noqa: E402

PFL = ROOT / ".venv" / "bin" / "pfl"
WRK_SCRIPT = ROOT / "scripts" / "local" / "bench.lua"
RESULTS = ROOT / "bench-results"
RUN_TAG = uuid.uuid4().hex[:8]  # keeps this run's users apart from an earlier run's

SIZES: dict[str, dict[str, int]] = {
    "full": {
        "learn_events": 1_000_000,
        "learn_batch_small": 100_000,
        "history_events": 5_000_000,
        "new_events": 10_000,
        "history_trials": 5,
        "ingest_seconds": 5,
        "ingest_rounds": 8,
        "outbox_rows": 10_000,
    },
    "quick": {
        "learn_events": 200_000,
        "learn_batch_small": 50_000,
        "history_events": 400_000,
        "new_events": 5_000,
        "history_trials": 3,
        "ingest_seconds": 3,
        "ingest_rounds": 2,
        "outbox_rows": 10_000,
    },
}
MODULES = 50
INTENTS = 10
USERS = 1_000
INGEST_USERS = 8
WRK_THREADS, WRK_CONNECTIONS = 2, 16
HISTORY_DAYS = 60
NEW_EVENTS_SPAN_SECONDS = 86_400
GATE_TRACES = 25
FLOOR_TRIALS = 2  # case 1: the UPDATE floor is I/O-bound and the noisiest figure; best of 2
OTHER_PER_NEW = 4  # case 2: other twins' events between two new events of the measured twin
STANDIN_PORT = 59341
STANDIN_KEYS = ("pk-lf-bench", "sk-lf-bench")
# --quick runs small sizes on a shared machine: a ratio target fails there only when missed by
# this factor (ratio ≤ t fails above t × slack; ratio ≥ t fails below t / slack).
QUICK_SLACK = 2.0


@dataclass(frozen=True)
class Env:
    url: str
    anon_key: str
    service_key: str
    jwt_secret: str
    database_url: str

    @classmethod
    def from_environ(cls) -> Env:
        try:
            return cls(
                url=os.environ["SUPABASE_URL"],
                anon_key=os.environ["SUPABASE_ANON_KEY"],
                service_key=os.environ["SUPABASE_SERVICE_ROLE_KEY"],
                jwt_secret=os.environ["SUPABASE_JWT_SECRET"],
                database_url=os.environ["DATABASE_URL"],
            )
        except KeyError as exc:
            sys.exit(f"bench: {exc.args[0]} is not set; run scripts/bench (it starts a stack)")


class CorrectnessError(Exception):
    """The system did the wrong thing; no figure of that case can be trusted."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def connect(env: Env) -> psycopg.Connection:
    return psycopg.connect(env.database_url, autocommit=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def one(conn: psycopg.Connection, sql: str, params: Any = None) -> Any:
    """The single value a query returns."""
    return conn.execute(sql, params).fetchone()[0]  # type: ignore[index]


# ----------------------------------------------------------------------------- data


def make_users(conn: psycopg.Connection, n: int, prefix: str) -> list[str]:
    """n users in auth.users, as the platform's auth service would have them."""
    rows = conn.execute(
        "insert into auth.users (email) "
        "select format('%%s-%%s-%%s@bench.local', %s::text, %s::text, g) "
        "from generate_series(1, %s) g returning id",
        (prefix, RUN_TAG, n),
    ).fetchall()
    return [str(r[0]) for r in rows]


def make_twin(conn: psycopg.Connection, owner: str, name: str, *, modules: int) -> dict[str, str]:
    """A twin open to any user, with a published spec and `modules` modules over 10 intents."""
    twin = str(
        one(
            conn,
            "insert into public.twins (owner_id, name, feedback_from) "
            "values (%s, %s, 'any_user') returning id",
            (owner, name),
        )
    )
    spec = str(
        one(
            conn,
            "insert into public.persona_specs (twin_id, status, spec) "
            "values (%s, 'published', jsonb_build_object('modules', %s::jsonb)) returning id",
            (twin, json.dumps(module_keys(modules))),
        )
    )
    conn.execute(
        "insert into public.persona_modules (twin_id, module_key, intent_label) "
        "select %s, format('module_%%s', lpad(k::text, 2, '0')), format('intent_%%s', k %% %s) "
        "from generate_series(0, %s - 1) k",
        (twin, INTENTS, modules),
    )
    return {"twin_id": twin, "spec_id": spec}


def module_keys(modules: int) -> list[str]:
    return [f"module_{k:02d}" for k in range(modules)]


def add_draft_under_audit(conn: psycopg.Connection, twin: dict[str, str]) -> None:
    """A draft spec, with audits of it and of the published spec on the same GATE_TRACES traces,
    written as the audit pipeline writes them (plain inserts, through the insert trigger)."""
    draft = one(
        conn,
        "insert into public.persona_specs (twin_id, spec) "
        "values (%s, jsonb_build_object('modules', %s::jsonb, 'note', 'next')) returning id",
        (twin["twin_id"], json.dumps(module_keys(MODULES))),
    )
    conn.execute(
        "insert into public.persona_training_events "
        "  (twin_id, source, trace_id, intent_label, passed, reason, persona_spec_id) "
        "select %s, 'persona_audit', 'gate-' || i, 'intent_' || (i %% 10), i %% 7 <> 0, "
        "  case when i %% 7 = 0 then 'off_persona' end, spec "
        "from generate_series(1, %s) i, unnest(array[%s, %s]::uuid[]) spec",
        (twin["twin_id"], GATE_TRACES, twin["spec_id"], draft),
    )


# Rows numbered g = g_from .. g_to of one twin, ids base + g, cast times spread evenly over the
# `step` × n seconds before now (g_last is the last row of the whole load). Every 10th row is
# an audit of the published spec; every 20th is a changed vote of the row before it (same trace
# and user, flipped score), which that row records as superseded. 80 % of the votes name a
# module, 18 % only an intent, 2 % an intent no module serves; success rates differ by module.
# Feedback is marked sent to Langfuse, as it would be long after it was cast. What the insert
# trigger sets (created_by, first_vote_id, supersedes, outbox state) is filled in; feedback
# names no spec (only audits do).
EVENTS_SQL = """
insert into public.persona_training_events (
  id, twin_id, source, trace_id, intent_label, module_key, score, passed, reason,
  persona_spec_id, created_by, created_at, first_vote_id, supersedes_id, superseded_at,
  langfuse_status, langfuse_attempts, langfuse_next_attempt_at, langfuse_sent_at)
overriding system value
select %(base)s + (g - %(g0)s) * %(stride)s, %(twin)s,
       case when audit then 'persona_audit' else 'user_feedback' end,
       case when audit then 'a' || lpad(g::text, 10, '0') else 't' || lpad(o::text, 10, '0') end,
       case when pick >= 98 then 'intent_none' else 'intent_' || (k %% %(intents)s) end,
       case when pick < 80 then 'module_' || lpad(k::text, 2, '0') end,
       case when not audit then vote end,
       case when audit then pass end,
       case when audit then (case when pass then null when r5 < 0.05 then 'unsafe'
                                  else 'off_persona' end)
            when vote = 1 then 'helpful' when vote = 0 then 'other'
            when r5 < 0.05 then 'unsafe' when r5 < 0.35 then 'incorrect'
            when r5 < 0.6 then 'unhelpful' when r5 < 0.8 then 'off_persona' else 'outdated' end,
       case when audit then %(spec)s::uuid end,
       case when not audit then (%(users)s::uuid[])[1 + abs(hashint8extended(o, 6)) %% %(nusers)s]
       end,
       ts,
       case when not audit then %(base)s + (o - %(g0)s) * %(stride)s end,
       case when revote then %(base)s + (o - %(g0)s) * %(stride)s end,
       case when revoted then ts + %(step)s * interval '1 second' end,
       case when not audit then 'sent' end,
       case when not audit then 1 else 0 end,
       case when not audit then ts end,
       case when not audit then ts end
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
    env: Env,
    twin: dict[str, str],
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
        with connect(env) as conn:
            base = next_event_id(conn)
    params = {
        "base": base,
        "g0": g_from,
        "stride": stride,
        "twin": twin["twin_id"],
        "spec": twin["spec_id"],
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
        with connect(env) as conn, conn.transaction():
            conn.execute("set local session_replication_role = replica")
            conn.execute(EVENTS_SQL, {**params, "g_from": bounds[0], "g_to": bounds[1]})

    with ThreadPoolExecutor(len(slices)) as pool:
        list(pool.map(insert, slices))
    with connect(env) as conn:
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
    return int(one(conn, "select coalesce(max(id), 0) + 1 from public.persona_training_events"))


def generate_outbox(
    conn: psycopg.Connection, twin: dict[str, str], users: list[str], n: int
) -> dict[str, Any]:
    """n first votes on distinct traces, pending in the Langfuse outbox and due now."""
    started = time.perf_counter()
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute(
            "insert into public.persona_training_events (twin_id, source, trace_id, "
            "  intent_label, score, reason, created_by, created_at, "
            "  langfuse_status, langfuse_next_attempt_at) "
            "select %(twin)s, 'user_feedback', 'outbox-' || g, 'intent_' || (g %% 10), "
            "  case when g %% 3 = 0 then -1 else 1 end, "
            "  case when g %% 3 = 0 then 'incorrect' else 'helpful' end, "
            "  (%(users)s::uuid[])[1 + g %% %(nusers)s], "
            "  now() - (%(n)s - g) * interval '1 second', 'pending', "
            "  now() - (%(n)s - g) * interval '1 second' "
            "from generate_series(1, %(n)s) g",
            {"twin": twin["twin_id"], "users": users, "nusers": len(users), "n": n},
        )
        conn.execute(
            "update public.persona_training_events set first_vote_id = id "
            "where twin_id = %s and source = 'user_feedback'",
            (twin["twin_id"],),
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


# ----------------------------------------------------------------------------- worker


def run_pfl(*args: str, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs the worker's CLI as a subprocess with the bench stack's environment: its wall time
    and peak RSS. A non-zero exit is a correctness failure."""
    env = {**os.environ, "PFL_LOG_FORMAT": "json"}
    for key in ("LANGFUSE_HOST", "LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY"):
        env.pop(key, None)
    env.update(env_extra or {})
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen([str(PFL), *args], stdout=out, stderr=out, env=env, cwd=ROOT)
        with PeakRss(proc.pid) as peak:
            proc.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        output = out.read().decode()
    if proc.returncode != 0:
        raise CorrectnessError(f"pfl {' '.join(args)} exited {proc.returncode}:\n{output}")
    return {"seconds": seconds, "peak_rss_mb": peak.kib / 1024}


class PeakRss:
    """Polls a process's VmHWM (its peak resident set) from /proc every 10 ms until it exits.

    Not getrusage/wait4: a child's ru_maxrss carries the high-water mark of the address space it
    replaced at exec, which after subprocess's vfork is this harness's own (≈ 150 MB once the
    harness has checked a few modules); VmHWM belongs to the worker's own address space."""

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.kib = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                found = re.search(r"^VmHWM:\s+(\d+) kB", self.status.read_text(), re.MULTILINE)
            except OSError:
                return
            if found is None:  # a zombie: its memory is gone
                return
            self.kib = max(self.kib, int(found.group(1)))
            self._done.wait(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def startup_seconds(twin_id: str, repeats: int = 3) -> float:
    """`pfl run-once` with nothing due (process start-up and two RPCs): the fixed part of every
    worker figure."""
    return min(run_pfl("run-once", "--twin", twin_id)["seconds"] for _ in range(repeats))


def learn_all(conn: psycopg.Connection, twin_id: str) -> dict[str, Any]:
    """`pfl run-once --twin` (runs until the twin has nothing left): its wall time, the runs'
    own time (started → finished, summed), the runs and the process's peak RSS."""
    conn.execute("checkpoint")
    result = run_pfl("run-once", "--twin", twin_id)
    runs = conn.execute(
        "select status, events_processed, extract(epoch from finished_at - started_at)::float8 "
        "from public.persona_feedback_learning_runs where twin_id = %s order by created_at",
        (twin_id,),
    ).fetchall()
    if not runs or any(r[0] != "completed" for r in runs):
        raise CorrectnessError(f"twin {twin_id}: runs {[r[0] for r in runs]}")
    return {
        "seconds": round(result["seconds"], 3),
        "run_seconds": round(sum(r[2] for r in runs), 3),
        "runs": len(runs),
        "events_processed": sum(r[1] for r in runs),
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
    }


def forget_learning(conn: psycopg.Connection, twin_id: str) -> None:
    """Puts a twin back to 'nothing learned yet': cursor 0, blank modules, no runs."""
    with conn.transaction():
        conn.execute(
            "update public.twins set learned_through_event_id = 0 where id = %s", (twin_id,)
        )
        conn.execute(
            "update public.persona_modules set success_weight = 0, failure_weight = 0, "
            "confidence = 0.5, status = 'insufficient_data', evidence_at = null "
            "where twin_id = %s",
            (twin_id,),
        )
        delete_runs(conn, twin_id)


def delete_runs(conn: psycopg.Connection, twin_id: str) -> None:
    conn.execute("delete from public.persona_module_changes where twin_id = %s", (twin_id,))
    conn.execute("delete from public.persona_feedback_learning_runs where twin_id = %s", (twin_id,))


def snapshot_learning(conn: psycopg.Connection, twin_id: str) -> dict[str, Any]:
    return {
        "cursor": one(
            conn, "select learned_through_event_id from public.twins where id = %s", (twin_id,)
        ),
        "modules": conn.execute(
            "select success_weight, failure_weight, confidence, status, evidence_at, id "
            "from public.persona_modules where twin_id = %s",
            (twin_id,),
        ).fetchall(),
    }


def restore_learning(conn: psycopg.Connection, twin_id: str, snap: dict[str, Any]) -> None:
    """Puts a twin back as `snapshot_learning` saw it: same cursor, same modules, no runs."""
    with conn.transaction():
        conn.execute(
            "update public.twins set learned_through_event_id = %s where id = %s",
            (snap["cursor"], twin_id),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "update public.persona_modules set success_weight = %s, failure_weight = %s, "
                "confidence = %s, status = %s, evidence_at = %s where id = %s",
                snap["modules"],
            )
        delete_runs(conn, twin_id)


# Decayed (success, failure) per module over the twin's current votes and its audits (not of a
# draft), at the module's own time T = evidence_at: the sum of w × 2^(−(T − t)/H), in float8.
FROM_SCRATCH_SQL = """
with s as (select * from public.persona_learning_settings where twin_id = %(twin)s),
m as (select * from public.persona_modules where twin_id = %(twin)s),
cur as (
  select e.* from public.persona_training_events e
  left join public.persona_specs sp on sp.id = e.persona_spec_id
  where e.twin_id = %(twin)s
    and (e.source = 'user_feedback' and e.superseded_at is null and e.score <> 0
         or e.source = 'persona_audit' and coalesce(sp.status, '') <> 'draft')
),
matched as (
  select m.id as module_id, m.evidence_at, e.* from cur e
  join m on m.module_key = e.module_key
  union all
  select m.id, m.evidence_at, e.* from cur e
  join m on e.module_key is null and m.intent_label = e.intent_label
),
weighted as (
  select module_id, coalesce(x.score > 0, x.passed) as success,
         case when x.source = 'user_feedback' then s.feedback_weight else s.audit_weight end
         * case when not coalesce(x.score > 0, x.passed) and x.reason = 'unsafe'
                then s.unsafe_multiplier else 1 end
         * power(2::float8, -greatest(0, extract(epoch from x.evidence_at - x.created_at)::float8)
                            / (s.half_life_days * 86400)) as w
  from matched x cross join s
)
select m.id, m.module_key, m.success_weight, m.failure_weight, m.evidence_at,
       coalesce(sum(w) filter (where success), 0), coalesce(sum(w) filter (where not success), 0)
from m left join weighted on weighted.module_id = m.id
group by m.id, m.module_key, m.success_weight, m.failure_weight, m.evidence_at
order by m.module_key
"""

# The same module's evidence, row by row, for worker.learning.evidence_from_scratch.
MODULE_EVIDENCE_SQL = """
select e.source, e.score, e.passed, e.reason, e.created_at
from public.persona_training_events e
join public.persona_modules m on m.id = %s
where e.twin_id = m.twin_id
  and (e.module_key = m.module_key or e.module_key is null and e.intent_label = m.intent_label)
  and (e.source = 'persona_audit' or e.superseded_at is null)
  and not exists (select 1 from public.persona_specs sp
                  where sp.id = e.persona_spec_id and sp.status = 'draft')
"""


def settings_of(conn: psycopg.Connection, twin_id: str) -> LearningSettings:
    return LearningSettings.model_validate(
        one(
            conn,
            "select to_jsonb(s) from public.persona_learning_settings s where twin_id = %s",
            (twin_id,),
        )
    )


def check_learning(conn: psycopg.Connection, twin_id: str, *, sample: int = 2) -> dict[str, Any]:
    """After all of a twin's events were learned: its cursor is its last event id, and every
    module's weights equal the from-scratch sum (FROM_SCRATCH_SQL for all modules, and
    worker.learning.evidence_from_scratch for `sample` of them). Raises CorrectnessError."""
    cursor, last = conn.execute(
        "select t.learned_through_event_id, "
        "(select max(id) from public.persona_training_events e where e.twin_id = t.id) "
        "from public.twins t where t.id = %s",
        (twin_id,),
    ).fetchone()  # type: ignore[misc]
    if cursor != last:
        raise CorrectnessError(f"twin {twin_id}: cursor at {cursor}, last event {last}")
    worst = 0.0

    def compare(key: str, got: tuple[float, float], want: tuple[float, float], how: str) -> None:
        nonlocal worst
        for g, w in zip(got, want, strict=True):
            error = abs(g - w) / max(1.0, abs(w))
            worst = max(worst, error)
            if error > 1e-6:
                raise CorrectnessError(f"module {key}: weights {got}, {how} {want}")

    rows = conn.execute(FROM_SCRATCH_SQL, {"twin": twin_id}).fetchall()
    for _, key, s, f, at, s0, f0 in rows:
        if at is None and (s0 or f0):
            raise CorrectnessError(f"module {key} has evidence but was never learned")
        compare(key, (s, f), (s0, f0), "from scratch (SQL)")
    settings = settings_of(conn, twin_id)
    for module_id, key, s, f, at, _, _ in rows[:sample]:
        events = [
            EvidenceEvent(source=src, score=score, passed=passed, reason=reason, cast_at=cast)
            for src, score, passed, reason, cast in conn.execute(MODULE_EVIDENCE_SQL, (module_id,))
        ]
        compare(key, (s, f), evidence_from_scratch(events, at, settings), "evidence_from_scratch")
    return {"modules_checked": len(rows), "max_relative_error": worst}


def settle_history(conn: psycopg.Connection, twin_id: str) -> None:
    """What completed runs over a twin's whole history leave behind: the cursor at its last
    event, and each module's weights, confidence and status as of now (the from-scratch sum)."""
    conn.execute(
        "update public.persona_modules set evidence_at = %s where twin_id = %s",
        (datetime.now(UTC), twin_id),
    )
    settings = settings_of(conn, twin_id)
    rows = conn.execute(FROM_SCRATCH_SQL, {"twin": twin_id}).fetchall()
    with conn.transaction():
        for module_id, _, _, _, _, s, f in rows:
            status = classify(s, f, ModuleStatus.insufficient_data, settings)
            conn.execute(
                "update public.persona_modules set success_weight = %s, failure_weight = %s, "
                "confidence = %s, status = %s where id = %s",
                (s, f, beta_mean(s, f), status.value, module_id),
            )
        conn.execute(
            "update public.twins t set learned_through_event_id = "
            "(select max(id) from public.persona_training_events e where e.twin_id = t.id) "
            "where t.id = %s",
            (twin_id,),
        )


# ----------------------------------------------------------------------------- case 1 (and 3)


def case_learning(env: Env, conn: psycopg.Connection, sizes: dict[str, int]) -> dict[str, Any]:
    """Case 1 (and 3): N pending events of one twin learned by the worker, at two batch sizes,
    against a bare UPDATE of a copy of the same rows."""
    n = sizes["learn_events"]
    users = make_users(conn, USERS, "learn")
    twin = make_twin(conn, users[0], "bench: learning throughput", modules=MODULES)
    log(f"case 1: generating {n:,} events")
    gen = generate_events(env, twin, users, g_from=1, g_to=n, span_seconds=HISTORY_DAYS * 86_400)
    gen["vacuum_seconds"] = vacuum(conn)
    log(f"case 1: generated in {gen['seconds']} s, vacuum analyze {gen['vacuum_seconds']} s")

    passes = {}
    for batch in (n, sizes["learn_batch_small"]):
        forget_learning(conn, twin["twin_id"])
        conn.execute(
            "update public.persona_learning_settings set max_batch_events = %s where twin_id = %s",
            (batch, twin["twin_id"]),
        )
        log(f"case 1: the worker learns {n:,} events, batch {batch:,}")
        figures = learn_all(conn, twin["twin_id"])
        if figures["events_processed"] != n:
            raise CorrectnessError(f"{figures['events_processed']} of {n} events processed")
        figures["check"] = check_learning(conn, twin["twin_id"])
        passes[str(batch)] = figures
        log(
            f"case 1: {figures['seconds']} s in {figures['runs']} run(s) (runs alone "
            f"{figures['run_seconds']} s), peak RSS {figures['peak_rss_mb']} MB; "
            f"cursor and weights as from scratch"
        )

    floors = [update_floor(conn, twin["twin_id"], n) for _ in range(FLOOR_TRIALS)]
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
    conn.execute("checkpoint")
    seconds, cur = timed(lambda: conn.execute("update public.bench_floor set processed_at = now()"))
    if cur.rowcount != n:
        raise CorrectnessError(f"the floor updated {cur.rowcount} rows, not {n}")
    conn.execute("drop table public.bench_floor")
    return seconds


# ----------------------------------------------------------------------------- case 2


def case_history(env: Env, conn: psycopg.Connection, sizes: dict[str, int]) -> dict[str, Any]:
    """Case 2: a run over n new events of a twin with a long processed history versus a twin
    with none, in the same database; and the twin with none before and after the long history
    was loaded (the table's size). Each with no draft spec and with a draft under audit (the
    run's gate then has work). Best of `history_trials` each, twins alternating."""
    h, n, trials = sizes["history_events"], sizes["new_events"], sizes["history_trials"]
    users = make_users(conn, USERS, "history")
    fresh = make_twin(conn, users[0], "bench: no history", modules=MODULES)
    drafting = make_twin(conn, users[1], "bench: no history, draft", modules=MODULES)
    old = make_twin(conn, users[2], "bench: long history", modules=MODULES)
    other = make_twin(conn, users[3], "bench: other twins", modules=MODULES)

    log(f"case 2: {n:,} new events for each twin, among other twins' events")
    for twin, g_from in ((fresh, 1), (drafting, 1)):
        add_new_events(env, twin, other, users, n, g_from=g_from)
    add_draft_under_audit(conn, drafting)
    vacuum(conn)
    snaps = {t["twin_id"]: snapshot_learning(conn, t["twin_id"]) for t in (fresh, drafting)}
    before = history_trials(
        conn,
        {"no_draft": fresh, "draft": drafting},
        snaps,
        trials,
        "no history, before the long history was loaded",
    )

    log(f"case 2: generating {h:,} events of history")
    gen = generate_events(env, old, users, g_from=1, g_to=h, span_seconds=HISTORY_DAYS * 86_400)
    gen["vacuum_seconds"] = vacuum(conn)
    settle_history(conn, old["twin_id"])
    log(f"case 2: generated in {gen['seconds']} s, vacuum analyze {gen['vacuum_seconds']} s")
    add_new_events(env, old, other, users, n, g_from=h + 1)
    vacuum(conn)
    snaps[old["twin_id"]] = snapshot_learning(conn, old["twin_id"])
    after = history_trials(
        conn,
        {"no_draft": fresh, "draft": drafting, "history_no_draft": old},
        snaps,
        trials,
        "after the long history was loaded",
    )
    add_draft_under_audit(conn, old)
    after |= history_trials(
        conn, {"history_draft": old}, snaps, trials, "after the long history was loaded"
    )
    return {
        "history_events": h,
        "new_events": n,
        "other_twins_events_per_new_event": OTHER_PER_NEW,
        "trials": trials,
        "generation": gen,
        "before": before,
        "after": after,
        "check": {
            name: check_learning(conn, t["twin_id"])
            for name, t in (("no_history", fresh), ("no_history_draft", drafting), ("history", old))
        },
    }


def add_new_events(
    env: Env,
    twin: dict[str, str],
    other: dict[str, str],
    users: list[str],
    n: int,
    *,
    g_from: int,
) -> None:
    """n new events of `twin`, arriving among OTHER_PER_NEW times as many events of `other`
    (the ids interleave), as a twin's feedback arrives in a database many twins write to."""
    with connect(env) as c:
        base = next_event_id(c)
        other_from = one(
            c,
            "select count(*) + 1 from public.persona_training_events where twin_id = %s",
            (other["twin_id"],),
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
    twins: dict[str, dict[str, str]],
    snaps: dict[str, Any],
    trials: int,
    label: str,
) -> dict[str, Any]:
    """Learns each twin's new events `trials` times (the twin put back as it was before each
    trial, the twins alternating); per twin the best process and run time and every trial."""
    times: dict[str, list[dict[str, Any]]] = {name: [] for name in twins}
    new = {
        name: one(
            conn,
            "select count(*) from public.persona_training_events where twin_id = %s and id > %s",
            (twin["twin_id"], snaps[twin["twin_id"]]["cursor"]),
        )
        for name, twin in twins.items()
    }
    for trial in range(trials):
        for name, twin in twins.items():
            restore_learning(conn, twin["twin_id"], snaps[twin["twin_id"]])
            figures = learn_all(conn, twin["twin_id"])
            if figures["events_processed"] != new[name]:
                raise CorrectnessError(
                    f"{name}: {figures['events_processed']} of {new[name]} new events processed"
                )
            times[name].append(figures)
        log(
            f"case 2 ({label}): trial {trial + 1}: "
            + ", ".join(f"{name} {runs[-1]['run_seconds']} s" for name, runs in times.items())
        )
    return {
        name: {
            "seconds": min(f["seconds"] for f in runs),
            "run_seconds": min(f["run_seconds"] for f in runs),
            "events_processed": runs[0]["events_processed"],
            "trials": runs,
        }
        for name, runs in times.items()
    }


# ----------------------------------------------------------------------------- case 4


INGEST_DESIGNS_SQL = ROOT / "scripts" / "local" / "ingest_designs.sql"
INGEST_DESIGNS = {
    "bench_design_no_fks": "the table as it is, without its foreign keys",
    "bench_design_lazy": "no insert trigger, supersede later, rules and consent in the policy",
    "bench_design_lazy_no_fks": "the same without the foreign keys",
}
DROP_INGEST_DESIGNS = (
    f"drop table if exists {', '.join(f'public.{name}' for name in INGEST_DESIGNS)}; "
    "drop schema if exists bench_design cascade"
)


def case_ingest(env: Env, conn: psycopg.Connection, sizes: dict[str, int]) -> dict[str, Any]:
    """Case 4: new feedback votes through nginx → PostgREST into persona_training_events versus
    the same requests into a bare table, in short rounds whose order alternates, judged on the
    median of the rounds' paired ratios; the CPU time each process of the stack spends per
    request; then wrk against nginx's no-op location."""
    return ingest(env, conn, sizes, designs=False)


def case_ingest_designs(
    env: Env, conn: psycopg.Connection, sizes: dict[str, int]
) -> dict[str, Any]:
    """Case 4 with other designs of the feedback table in the same rounds
    (scripts/local/ingest_designs.sql): what each part of the write path costs. Run by hand."""
    return ingest(env, conn, sizes, designs=True)


def ingest(
    env: Env, conn: psycopg.Connection, sizes: dict[str, int], designs: bool
) -> dict[str, Any]:
    seconds, rounds = sizes["ingest_seconds"], sizes["ingest_rounds"]
    case = "ingest_designs" if designs else "ingest"
    users = make_users(conn, INGEST_USERS, case)
    twin = make_twin(conn, users[0], f"bench: {case}", modules=MODULES)
    conn.execute(
        "create table public.bench_bare_feedback (id bigint generated always as identity, "
        "twin_id uuid, trace_id text, score smallint, reason text, intent_label text, "
        "module_key text, comment text, metadata jsonb)"
    )
    conn.execute("grant insert on public.bench_bare_feedback to authenticated")
    if designs:
        conn.execute(INGEST_DESIGNS_SQL.read_text())
    conn.execute("notify pgrst, 'reload schema'")
    wait_until_served(env, "bench_bare_feedback")

    rest = f"{env.url}/rest/v1"
    of_twin = (twin["twin_id"],)
    targets = {
        "bare": (
            f"{rest}/bench_bare_feedback",
            "select count(*) from public.bench_bare_feedback",
            (),
        ),
        "events": (
            f"{rest}/persona_training_events",
            "select count(*) from public.persona_training_events where twin_id = %s",
            of_twin,
        ),
    }
    for name in INGEST_DESIGNS if designs else ():
        wait_until_served(env, name)
        targets[name] = (
            f"{rest}/{name}",
            f"select count(*) from public.{name} where twin_id = %s",
            of_twin,
        )
    stack = StackProcesses.find(conn)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    tmp = Path(tempfile.mkdtemp(prefix="pfl-bench-"))
    try:
        tokens = tmp / "tokens"
        now = int(time.time())
        tokens.write_text(
            "".join(
                jwt.encode(
                    {
                        "sub": u,
                        "role": "authenticated",
                        "aud": "authenticated",
                        "iat": now,
                        "exp": now + 3 * 3600,
                    },
                    env.jwt_secret,
                    algorithm="HS256",
                )
                + "\n"
                for u in users
            )
        )

        def load(url: str, secs: int, tag: str) -> dict[str, Any]:
            return wrk(url, secs, tokens, twin["twin_id"], f"{RUN_TAG}-{tag}", env.anon_key)

        log("case 4: warm-up")
        for url, _, _ in targets.values():
            load(url, 2, "warm")
        for r in range(rounds):
            # Rates drift on a shared machine (the floor moved 1,000 → 2,000/s in one run): each
            # round runs every table back to back, and the order alternates.
            for name in list(targets) if r % 2 == 0 else list(targets)[::-1]:
                url, count_sql, params = targets[name]
                before, cpu_before = settled_count(conn, count_sql, params), stack.cpu_seconds()
                doc = load(url, seconds, f"{name}{r}")
                cpu_after = stack.cpu_seconds()
                doc["rows_created"] = settled_count(conn, count_sql, params) - before
                doc["cpu_us_per_request"] = {
                    k: round((cpu_after[k] - cpu_before[k]) / doc["completed"] * 1e6, 1)
                    for k in cpu_after
                }
                check_ingest(name, doc)
                results[name].append(doc)
                log(
                    f"case 4: round {r + 1}/{rounds}: {name}: {doc['rate']:.0f} inserts/s, p50 "
                    f"{doc['latency_us']['p50'] / 1000:.1f} ms, CPU per request "
                    + ", ".join(f"{k} {v:.0f} µs" for k, v in doc["cpu_us_per_request"].items())
                )
        noop = load(f"{env.url}/_bench/noop", min(seconds, 5), "noop")
        log(f"case 4: wrk against nginx's no-op location: {noop['rate']:.0f} requests/s")
    finally:
        shutil.rmtree(tmp)
        conn.execute("drop table if exists public.bench_bare_feedback")
        if designs:
            conn.execute(DROP_INGEST_DESIGNS)
        conn.execute("notify pgrst, 'reload schema'")

    def median_of(name: str, pick: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(pick(d) for d in results[name])

    def summary(name: str) -> dict[str, Any]:
        paired = [
            d["rate"] / b["rate"] for d, b in zip(results[name], results["bare"], strict=True)
        ]
        return {
            "ratio": round(statistics.median(paired), 3),
            "round_ratios": [round(x, 3) for x in paired],
            "rate": round(median_of(name, lambda d: d["rate"]), 1),
            "latency_ms": {
                k: median_of(name, lambda d, k=k: d["latency_us"][k]) / 1000 for k in ("p50", "p99")
            },
            "cpu_us": {
                k: round(median_of(name, lambda d, k=k: d["cpu_us_per_request"][k]))
                for k in StackProcesses.NAMES
            },
        }

    events, bare = summary("events"), summary("bare")
    return {
        "wrk": f"-t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{seconds}s",
        "rounds": rounds,
        "users": INGEST_USERS,
        "ratio": events["ratio"],
        "round_ratios": events["round_ratios"],
        "events_rate": events["rate"],
        "bare_rate": bare["rate"],
        "noop_rate": round(noop["rate"], 1),
        "events_latency_ms": events["latency_ms"],
        "bare_latency_ms": bare["latency_ms"],
        "events_cpu_us": events["cpu_us"],
        "bare_cpu_us": bare["cpu_us"],
        "designs": {name: summary(name) for name in targets if name in INGEST_DESIGNS},
        "runs": results,
    }


def settled_count(
    conn: psycopg.Connection, count_sql: str, params: Any, timeout: float = 10.0
) -> int:
    """The row count once the requests wrk left in flight when it stopped have landed (or
    failed): the same count twice, 0.2 s apart."""
    deadline = time.monotonic() + timeout
    count = one(conn, count_sql, params)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = one(conn, count_sql, params)
        if again == count:
            return count
        count = again
    raise RuntimeError(f"rows still arriving {timeout} s after wrk stopped: {count_sql}")


@dataclass(frozen=True)
class StackProcesses:
    """The bench stack's server processes, for the CPU time they spend per request: the
    PostgreSQL postmaster (its live children and those it has reaped: backends, WAL writer,
    checkpointer), PostgREST (all its threads) and nginx (master and workers)."""

    postmaster: int
    postgrest: int
    nginx: int
    NAMES = ("postgres", "postgrest", "nginx")

    @classmethod
    def find(cls, conn: psycopg.Connection) -> StackProcesses:
        stack_dir = ROOT / os.environ.get("PFL_STACK_DIR", ".stack/bench")
        backend = one(conn, "select pg_backend_pid()")
        return cls(
            postmaster=proc_stat(backend)["ppid"],
            postgrest=int((stack_dir / "postgrest.pid").read_text()),
            nginx=int((stack_dir / "nginx" / "nginx.pid").read_text()),
        )

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far: a parent's own and reaped ticks plus its live children's, from one
        pass over /proc."""
        ticks = {self.postmaster: 0, self.nginx: 0}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    stat = proc_stat(int(entry.name))
                    if stat["ppid"] in ticks:
                        ticks[stat["ppid"]] += stat["utime"] + stat["stime"]
        for parent in ticks:
            own = proc_stat(parent)
            ticks[parent] += own["utime"] + own["stime"] + own["cutime"] + own["cstime"]
        rest = proc_stat(self.postgrest)
        return {
            "postgres": ticks[self.postmaster] / CLK_TCK,
            "postgrest": (rest["utime"] + rest["stime"]) / CLK_TCK,
            "nginx": ticks[self.nginx] / CLK_TCK,
        }


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> dict[str, int]:
    """ppid and CPU ticks from /proc/<pid>/stat (fields 4 and 14-17; the name may hold spaces)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {
        "ppid": int(fields[1]),
        "utime": int(fields[11]),
        "stime": int(fields[12]),
        "cutime": int(fields[13]),
        "cstime": int(fields[14]),
    }


def wrk(url: str, seconds: int, tokens: Path, twin_id: str, tag: str, anon: str) -> dict:
    """One wrk run with scripts/local/bench.lua; its BENCH_JSON figures plus the rate."""
    cmd = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{WRK_CONNECTIONS}",
        f"-d{seconds}s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        str(tokens),
        twin_id,
        tag,
        anon,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            doc = json.loads(line.removeprefix("BENCH_JSON "))
            doc["rate"] = doc["completed"] / (doc["duration_us"] / 1e6)
            return doc
    raise RuntimeError(f"wrk printed no figures:\n{done.stdout}\n{done.stderr}")


def wait_until_served(env: Env, table: str, timeout: float = 15.0) -> None:
    """Until PostgREST's schema cache has a new table (after NOTIFY pgrst)."""
    deadline = time.monotonic() + timeout
    headers = {"apikey": env.service_key, "Authorization": f"Bearer {env.service_key}"}
    while time.monotonic() < deadline:
        answer = httpx.get(f"{env.url}/rest/v1/{table}?limit=0", headers=headers, timeout=5)
        if answer.status_code == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"PostgREST does not serve {table} after {timeout} s")


def check_ingest(name: str, doc: dict[str, Any]) -> None:
    """No answer but 2xx, and rows created = 2xx answers. wrk stops with a request in flight
    on each connection; those were sent but never answered and may or may not have landed, so
    the rows must lie in [2xx, 2xx + in flight]."""
    ok = sum(n for code, n in doc["statuses"].items() if code.startswith("2"))
    bad = {code: n for code, n in doc["statuses"].items() if not code.startswith("2")}
    errors = {k: v for k, v in doc["errors"].items() if v}
    in_flight = doc["sent"] - doc["completed"]
    doc.update(ok=ok, in_flight_at_stop=in_flight)
    if bad or errors:
        raise CorrectnessError(f"ingest {name}: non-2xx answers {bad}, errors {errors}")
    if not ok <= doc["rows_created"] <= ok + in_flight:
        raise CorrectnessError(
            f"ingest {name}: {doc['rows_created']} rows for {ok} 2xx answers "
            f"({in_flight} requests in flight at stop)"
        )


# ----------------------------------------------------------------------------- case 5


def case_outbox(env: Env, conn: psycopg.Connection, sizes: dict[str, int]) -> dict[str, Any]:
    """Case 5: pending outbox rows drained by `pfl outbox drain` to the Langfuse stand-in,
    against the same scores sent by the worker's LangfuseSender alone (no database)."""
    n = sizes["outbox_rows"]
    users = make_users(conn, USERS, "outbox")
    twin = make_twin(conn, users[0], "bench: outbox", modules=MODULES)
    # Feedback another case left in the outbox would be drained too: set it aside.
    conn.execute(
        "update public.persona_training_events set langfuse_status = 'skipped' "
        "where langfuse_status in ('pending', 'retrying')"
    )
    gen = generate_outbox(conn, twin, users, n)
    due = one(
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
            (twin["twin_id"],),
        )
    ]
    expected = {item.score_id for item in items}

    with standin_process() as lf:
        with LangfuseSender(lf.url, *STANDIN_KEYS, 10.0) as sender:
            floor_seconds, deliveries = timed(lambda: sender.send(items))
        if any(d.outcome.value != "sent" for d in deliveries):
            raise CorrectnessError("floor: the stand-in refused scores")
        floor_requests = lf.state()["requests"]
        lf.clear()
        log(f"case 5: draining {n:,} outbox rows to the stand-in at {lf.url}")
        drained = run_pfl(
            "outbox",
            "drain",
            env_extra={
                "LANGFUSE_HOST": lf.url,
                "LANGFUSE_PUBLIC_KEY": STANDIN_KEYS[0],
                "LANGFUSE_SECRET_KEY": STANDIN_KEYS[1],
            },
        )
        state = lf.state()
    requests, scores = state["requests"], state["scores"]
    if set(scores) != expected:
        raise CorrectnessError(
            f"the stand-in got {len(scores)} score ids, expected {len(expected)} "
            f"({len(expected - set(scores))} missing, {len(set(scores) - expected)} unexpected)"
        )
    repeated = sum(1 for versions in scores.values() if len(versions) != 1)
    if repeated:
        raise CorrectnessError(f"{repeated} scores were received more than once")
    statuses = dict(
        conn.execute(
            "select langfuse_status, count(*) from public.persona_training_events "
            "where twin_id = %s group by 1",
            (twin["twin_id"],),
        ).fetchall()
    )
    if statuses != {"sent": n}:
        raise CorrectnessError(f"outbox rows after the drain: {statuses}")
    log(
        f"case 5: {drained['seconds']:.2f} s, {requests} requests; sender alone "
        f"{floor_seconds:.2f} s"
    )
    return {
        "rows": n,
        "generation_seconds": gen["seconds"],
        "drain_seconds": round(drained["seconds"], 3),
        "ms_per_score": round(drained["seconds"] / n * 1000, 4),
        "requests": requests,
        "floor_seconds": round(floor_seconds, 3),
        "floor_requests": floor_requests,
        "drain_peak_rss_mb": round(drained["peak_rss_mb"], 1),
    }


@dataclass(frozen=True)
class StandinProcess:
    url: str

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_standin/state", timeout=30).raise_for_status().json()

    def clear(self) -> None:
        httpx.post(f"{self.url}/_standin/clear", timeout=30).raise_for_status()


@contextlib.contextmanager
def standin_process() -> Iterator[StandinProcess]:
    """tests/langfuse_standin.py in a process of its own, as Langfuse would be: it shares no
    interpreter with the sender it serves. Stopped at the end."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.langfuse_standin",
            "--port",
            str(STANDIN_PORT),
            "--public-key",
            STANDIN_KEYS[0],
            "--secret-key",
            STANDIN_KEYS[1],
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        if not url.startswith("http"):
            raise RuntimeError(f"the Langfuse stand-in did not start (port {STANDIN_PORT} taken?)")
        yield StandinProcess(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    case: str
    measured: str
    floor: str
    ratio: float | None
    target: str
    verdict: str


def judge(value: float, op: str, target: float, quick: bool, *, noisy: bool = True) -> str:
    """`pass` or `FAIL`; in --quick mode a noisy figure missed by less than QUICK_SLACK is
    reported as a miss but does not fail the run."""
    if value <= target if op == "<=" else value >= target:
        return "pass"
    if quick and noisy:
        limit = target * QUICK_SLACK if op == "<=" else target / QUICK_SLACK
        if value <= limit if op == "<=" else value >= limit:
            return "miss (within quick slack)"
    return "FAIL"


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
                Row(
                    f"1 learn {learn['events']:,} events, batch {int(batch):,}",
                    f"{p['seconds']:.2f} s{less}, {p['runs']} run(s)"
                    f" ({p['run_seconds']:.2f} s alone)",
                    f"{floor:.2f} s UPDATE",
                    ratio,
                    "≤ 1.5",
                    judge(ratio, "<=", 1.5, quick),
                )
            )
        for batch, p in learn["passes"].items():
            rows.append(check_row(f"1 correctness, batch {int(batch):,}", p["check"]))
        for batch, p in learn["passes"].items():
            rows.append(
                Row(
                    f"3 worker peak RSS, batch {int(batch):,}",
                    f"{p['peak_rss_mb']:.0f} MB",
                    "-",
                    None,
                    "≤ 150 MB",
                    judge(p["peak_rss_mb"], "<=", 150, quick, noisy=False),
                )
            )
    if hist := results.get("history"):
        before, after = hist["before"], hist["after"]
        n, h = hist["new_events"], hist["history_events"]
        for draft, what in (("no_draft", "no draft"), ("draft", "draft under audit")):
            pairs = (
                (
                    f"2 {n:,} new events: {h:,}-event history vs none, {what}",
                    after[f"history_{draft}"],
                    after[draft],
                    "no history",
                ),
                (
                    f"2 {n:,} new events, no history: {h:,} more rows in the table, {what}",
                    after[draft],
                    before[draft],
                    "before the load",
                ),
            )
            for case, got, floor, floor_name in pairs:
                ratio = got["run_seconds"] / max(floor["run_seconds"], 1e-3)
                rows.append(
                    Row(
                        case,
                        f"run {got['run_seconds']:.3f} s (process {got['seconds']:.2f} s)",
                        f"{floor['run_seconds']:.3f} s ({floor['seconds']:.2f} s) {floor_name}",
                        ratio,
                        "≤ 1.2",
                        judge(ratio, "<=", 1.2, quick),
                    )
                )
        for name, check in hist["check"].items():
            rows.append(check_row(f"2 correctness, {name.replace('_', ' ')}", check))
    for ingest in filter(None, (results.get("ingest"), results.get("ingest_designs"))):
        lat, bare_lat = ingest["events_latency_ms"], ingest["bare_latency_ms"]
        rows.append(
            Row(
                f"4 feedback ingest, wrk {ingest['wrk']} × {ingest['rounds']} rounds",
                f"{ingest['events_rate']:.0f}/s (p50 {lat['p50']:.0f}, p99 {lat['p99']:.0f} ms)",
                f"{ingest['bare_rate']:.0f}/s bare (p50 {bare_lat['p50']:.0f}, "
                f"p99 {bare_lat['p99']:.0f} ms)",
                ingest["ratio"],
                "≥ 0.85",
                judge(ingest["ratio"], ">=", 0.85, quick),
            )
        )
        cpu, bare_cpu = ingest["events_cpu_us"], ingest["bare_cpu_us"]
        rows.append(
            Row(
                "4 CPU per request: PostgreSQL + PostgREST + nginx",
                " + ".join(f"{cpu[k]}" for k in StackProcesses.NAMES) + " µs",
                " + ".join(f"{bare_cpu[k]}" for k in StackProcesses.NAMES) + " µs bare",
                sum(bare_cpu.values()) / sum(cpu.values()),
                "(reported)",
                "-",
            )
        )
        ratio = ingest["noop_rate"] / ingest["bare_rate"]
        rows.append(
            Row(
                "4 load generator: wrk vs nginx no-op",
                f"{ingest['noop_rate']:.0f}/s",
                f"{ingest['bare_rate']:.0f}/s bare",
                ratio,
                "≥ 5",
                judge(ratio, ">=", 5, quick),
            )
        )
        for name, design in ingest["designs"].items():
            rows.append(
                Row(
                    f"4 design: {INGEST_DESIGNS[name]}",
                    f"{design['rate']:.0f}/s, CPU "
                    + " + ".join(f"{design['cpu_us'][k]}" for k in StackProcesses.NAMES)
                    + " µs",
                    f"{ingest['bare_rate']:.0f}/s bare",
                    design["ratio"],
                    "(reported)",
                    "-",
                )
            )
        rows.append(
            Row(
                "4 correctness: answers, rows",
                "all 2xx, rows = 2xx (+ in flight at stop)",
                "-",
                None,
                "every 2xx a row",
                "pass",
            )
        )
    if outbox := results.get("outbox"):
        most = outbox["rows"] / 50
        rows.append(
            Row(
                f"5 Langfuse drain of {outbox['rows']:,} rows",
                f"{outbox['drain_seconds']:.2f} s, {outbox['ms_per_score']:.2f} ms/score",
                f"{outbox['floor_seconds']:.2f} s sender alone",
                outbox["drain_seconds"] / outbox["floor_seconds"],
                "(reported)",
                "-",
            )
        )
        rows.append(
            Row(
                "5 Langfuse requests, every score once",
                f"{outbox['requests']} requests",
                f"{outbox['floor_requests']} requests",
                None,
                f"≤ {most:.0f}",
                "pass" if outbox["requests"] <= most else "FAIL",
            )
        )
    return rows


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


CASES: dict[str, Callable[[Env, psycopg.Connection, dict[str, int]], dict[str, Any]]] = {
    # The outbox case runs before ingest, which leaves feedback pending in the outbox.
    "learning": case_learning,
    "history": case_history,
    "outbox": case_outbox,
    "ingest": case_ingest,
}
# Run only when asked for (--cases ingest_designs): case 4 with three more tables, about 5 minutes.
BY_HAND = {"ingest_designs": case_ingest_designs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
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
    env = Env.from_environ()
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
    with connect(env) as conn:
        doc["postgres"] = one(conn, "select version()")
        idle = make_twin(conn, make_users(conn, 1, "idle")[0], "bench: idle", modules=1)
        doc["results"]["worker_startup_seconds"] = round(startup_seconds(idle["twin_id"]), 3)
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
