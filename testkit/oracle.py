"""The one from-scratch oracle of module counts: what learning must equal (DESIGN.md, Learning).

After a completed run, every module of a twin holds the sum over the evidence that exists now,
matched to the modules that exist now, decayed to the module's time:

- evidence: the twin's events up to its cursor (`learned_through_event_id`) that are current as of
  the cursor (not superseded, or superseded only by a vote after the cursor, which the next run
  retracts); feedback with a score other than 0; audits unless they audited a draft, which is
  fixed when the audit is recorded (`audit_of_draft`; a caller may pass the ids it knows to be
  audits of a draft instead, to check that flag too);
- matching: an event with a module_key counts for the module with that key only; one without
  counts for every module with its intent_label;
- weight: feedback_weight or audit_weight, times unsafe_multiplier for an unsafe failure, times
  0.5 ** (max(0, age) / half-life), age = the module's `evidence_at` − when the event was cast.

The weight is written here again, apart from worker.learning and the SQL, so that the oracle can
catch a mistake in either. The evidence is streamed (a server-side cursor), so a twin with
millions of events (the benchmark's) is checked without holding them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import psycopg

from worker.models import LearningSettings

# One row per (module, event that counts for it).
COUNTED_EVIDENCE_SQL = """
with cursor as (
  select learned_through_event_id as id from public.twins where id = %(twin)s
),
counted as (
  -- The twin's events the cursor has passed that count: current as of the cursor (never
  -- replaced, or replaced by a vote beyond the cursor; a vote whose replacement was deleted
  -- stays retracted) and not neutral; each once, however many votes name it.
  select e.id, e.source::text as source, e.module_key, e.intent_label, e.score, e.passed,
         e.reason::text as reason, e.created_at, e.audit_of_draft
  from public.persona_training_events e
  cross join cursor c
  where e.twin_id = %(twin)s
    and e.id <= c.id
    and (e.superseded_at is null
         or exists (select 1 from public.persona_training_events n
                    where n.twin_id = e.twin_id and n.supersedes_id = e.id and n.id > c.id))
    and (e.source = 'persona_audit' or e.score <> 0)
)
select m.id::text, v.id, v.source, v.score, v.passed, v.reason, v.created_at, v.audit_of_draft
from public.persona_modules m
join counted v
  on v.module_key = m.module_key or v.module_key is null and v.intent_label = m.intent_label
where m.twin_id = %(twin)s
"""


@dataclass(frozen=True)
class ModuleCounts:
    """A module's stored counts and state beside its counts recomputed from scratch."""

    module_id: str
    module_key: str
    intent_label: str
    success: float
    failure: float
    confidence: float
    status: str
    evidence_at: datetime | None
    expected_success: float
    expected_failure: float

    @property
    def expected(self) -> tuple[float, float]:
        return self.expected_success, self.expected_failure

    @property
    def stored(self) -> tuple[float, float]:
        return self.success, self.failure

    @property
    def expected_confidence(self) -> float:
        """The Beta(1,1) posterior mean of the recomputed counts."""
        return (self.expected_success + 1) / (self.expected_success + self.expected_failure + 2)


def twin_settings(conn: psycopg.Connection, twin_id: str) -> LearningSettings:
    row = conn.execute(
        "select to_jsonb(s) from public.persona_learning_settings s where twin_id = %s",
        (twin_id,),
    ).fetchone()
    assert row is not None, twin_id
    return LearningSettings.model_validate(row[0])


def module_counts_from_scratch(
    conn: psycopg.Connection, twin_id: str, draft_audit_ids: Collection[int] | None = None
) -> list[ModuleCounts]:
    """Every module of the twin (by module_key), stored and recomputed from scratch; a module
    never learned is recomputed at its first evidence's time, so any evidence shows as a
    mismatch against its zero counts."""
    settings = twin_settings(conn, twin_id)
    half_life_s = settings.half_life_days * 86_400.0
    modules = conn.execute(
        "select id::text, module_key, intent_label, success_weight, failure_weight, confidence,"
        " status::text, evidence_at from public.persona_modules where twin_id = %s"
        " order by module_key",
        (twin_id,),
    ).fetchall()
    at = {m[0]: m[7] for m in modules}
    sums = {m[0]: [0.0, 0.0] for m in modules}
    with conn.transaction(), conn.cursor(name="pfl_oracle") as cur:
        cur.itersize = 20_000
        cur.execute(COUNTED_EVIDENCE_SQL, {"twin": twin_id})
        for module_id, event_id, source, score, passed, reason, cast_at, stored_draft in cur:
            if source == "user_feedback":
                weight, success = settings.feedback_weight, score > 0
            else:
                of_draft = (event_id in draft_audit_ids if draft_audit_ids is not None
                            else stored_draft)
                if of_draft:
                    continue
                weight, success = settings.audit_weight, bool(passed)
            if not success and reason == "unsafe":
                weight *= settings.unsafe_multiplier
            age_s = max(0.0, ((at[module_id] or cast_at) - cast_at).total_seconds())
            sums[module_id][0 if success else 1] += weight * 0.5 ** (age_s / half_life_s)
    return [
        ModuleCounts(mid, key, intent, s, f, c, status, evidence_at, *sums[mid])
        for mid, key, intent, s, f, c, status, evidence_at in modules
    ]


def modules_by_key(conn: psycopg.Connection, twin_id: str,
                   draft_audit_ids: Collection[int] | None = None) -> dict[str, ModuleCounts]:
    """module_counts_from_scratch, by module_key."""
    return {m.module_key: m for m in module_counts_from_scratch(conn, twin_id, draft_audit_ids)}


def assert_modules_exact(
    conn: psycopg.Connection, twin_id: str, draft_audit_ids: Collection[int] | None = None,
    *, tolerance: float = 1e-9,
) -> dict[str, ModuleCounts]:
    """Every module's counts equal the recomputation (relative, absolute below 1) and its
    confidence is the Beta(1,1) mean of its counts; returns the modules by module_key. Raises
    AssertionError naming the first module that differs."""
    modules = modules_by_key(conn, twin_id, draft_audit_ids)
    for key, m in modules.items():
        errors = [relative_error(got, want) for got, want in zip(m.stored, m.expected, strict=True)]
        assert max(errors) <= tolerance, (
            f"module {key}: stored {m.stored}, from scratch {m.expected}"
        )
        confidence = (m.success + 1) / (m.success + m.failure + 2)
        assert relative_error(m.confidence, confidence) <= 1e-9, (
            f"module {key}: confidence {m.confidence}, Beta(1,1) mean of its counts {confidence}"
        )
    return modules


def relative_error(got: float, want: float) -> float:
    """|got − want| relative to want, absolute below 1."""
    return abs(got - want) / max(1.0, abs(want))



def daily_summary(conn: psycopg.Connection, twin_id: str) -> list[tuple[object, ...]]:
    """The twin's rows of persona_feedback_daily (day, intent, module key, reason, score,
    votes), sorted."""
    return sorted(conn.execute(
        "select day, intent_label, module_key, reason::text, score, votes"
        " from public.persona_feedback_daily where twin_id = %s", (twin_id,)).fetchall(), key=repr)


def daily_from_scratch(conn: psycopg.Connection, twin_id: str) -> list[tuple[object, ...]]:
    """What persona_feedback_daily should hold for the twin, straight from the events: the
    learned feedback votes current at the cursor (never replaced, or replaced by a vote after
    it), counted per UTC day and bucket, sorted as `daily_summary`."""
    return sorted(conn.execute(
        "select (e.created_at at time zone 'UTC')::date, e.intent_label, e.module_key,"
        " e.reason::text, e.score, count(*)"
        " from public.persona_training_events e join public.twins t on t.id = e.twin_id"
        " where e.twin_id = %s and e.source = 'user_feedback'"
        " and e.id <= t.learned_through_event_id"
        " and (e.superseded_at is null or exists (select 1 from public.persona_training_events n"
        "      where n.twin_id = e.twin_id and n.supersedes_id = e.id"
        "        and n.id > t.learned_through_event_id))"
        " group by 1, 2, 3, 4, 5", (twin_id,)).fetchall(), key=repr)
