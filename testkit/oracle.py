"""The one from-scratch oracle of module counts: what incremental learning must equal.

Which evidence counts (DESIGN.md, "Learning"): a twin's feedback, and its audits of a published
(or archived) spec or of no spec; an audit of a draft never moves a module, and a spec that is
published later does not bring back the audits learned while it was a draft. So an audit counts
when it names no spec, or when it was learned after its spec left draft (was published or
archived): the evidence each run saw, replayed. Of the feedback, only the current votes count
(a changed vote is retracted). Only events the twin's cursor has passed are counted, so call it
once the twin's events are learned; each module's counts are decayed to its own time
(`evidence_at`, or now for a module never learned) with worker.learning's pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from worker.learning import beta_mean, event_contribution
from worker.models import EvidenceEvent, LearningSettings

# One row per (module, event that counts for it): an event counts for the module with its
# module_key if it names one, else for every module with its intent_label.
COUNTED_EVIDENCE_SQL = """
with left_draft as (
  -- per spec that left draft: the twin's cursor when it did (what runs learned before)
  select sp.id,
         coalesce((select max(r.batch_last_event_id)
                   from public.persona_feedback_learning_runs r
                   where r.twin_id = sp.twin_id and r.status = 'completed'
                     and r.finished_at <= coalesce(sp.published_at, sp.archived_at)), 0)
           as learned_before
  from public.persona_specs sp
  where sp.twin_id = %(twin)s and coalesce(sp.published_at, sp.archived_at) is not null
)
select m.id::text, e.source, e.score, e.passed, e.reason, e.created_at
from public.persona_modules m
join public.twins t on t.id = m.twin_id
join public.persona_training_events e
  on e.twin_id = m.twin_id
 and (e.module_key = m.module_key or e.module_key is null and e.intent_label = m.intent_label)
left join left_draft d on d.id = e.persona_spec_id
where m.twin_id = %(twin)s
  and e.id <= t.learned_through_event_id
  and e.superseded_at is null
  and (e.source = 'user_feedback' or e.persona_spec_id is null or e.id > d.learned_before)
"""


@dataclass(frozen=True)
class ModuleCounts:
    """A module's stored counts beside the counts recomputed from scratch at its own time."""

    module_id: str
    module_key: str
    intent_label: str
    success: float
    failure: float
    confidence: float
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
        return beta_mean(self.expected_success, self.expected_failure)


def twin_settings(conn: psycopg.Connection, twin_id: str) -> LearningSettings:
    row = conn.execute(
        "select to_jsonb(s) from public.persona_learning_settings s where twin_id = %s",
        (twin_id,),
    ).fetchone()
    assert row is not None, twin_id
    return LearningSettings.model_validate(row[0])


def module_counts_from_scratch(conn: psycopg.Connection, twin_id: str) -> list[ModuleCounts]:
    """Every module of the twin (by module_key), stored and recomputed from scratch."""
    settings = twin_settings(conn, twin_id)
    modules = conn.execute(
        "select id::text, module_key, intent_label, success_weight, failure_weight, confidence,"
        " evidence_at from public.persona_modules where twin_id = %s order by module_key",
        (twin_id,),
    ).fetchall()
    now = datetime.now(UTC)
    at = {m[0]: m[6] or now for m in modules}
    sums = {m[0]: [0.0, 0.0] for m in modules}
    # A server-side cursor: a large twin's evidence is streamed, never held whole.
    with conn.transaction(), conn.cursor(name="pfl_oracle") as cur:
        cur.itersize = 20_000
        cur.execute(COUNTED_EVIDENCE_SQL, {"twin": twin_id})
        for module_id, source, score, passed, reason, cast_at in cur:
            event = EvidenceEvent.model_construct(
                source=source, score=score, passed=passed, reason=reason, cast_at=cast_at
            )
            s, f = event_contribution(event, at[module_id], settings)
            sums[module_id][0] += s
            sums[module_id][1] += f
    return [
        ModuleCounts(mid, key, intent, s, f, c, evidence_at, *sums[mid])
        for mid, key, intent, s, f, c, evidence_at in modules
    ]


def relative_error(got: float, want: float) -> float:
    """|got − want| relative to want, absolute below 1."""
    return abs(got - want) / max(1.0, abs(want))
