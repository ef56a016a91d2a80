"""The from-scratch oracle of the learning invariant (DESIGN.md, Learning), written apart from the
worker's and the SQL's code so that it can catch both.

After a completed run, every module of a twin must hold the sum over the evidence that exists
now, matched to the modules that exist now, decayed to the module's time:

- evidence: the twin's events up to its cursor (`learned_through_event_id`) that are current as of
  the cursor (not superseded, or superseded only by a vote after the cursor, which the next run
  retracts); feedback with a score other than 0; audits unless they audited a draft (fixed when
  the audit was recorded: the caller may pass the ids it knows to be audits of a draft, else the
  stored `audit_of_draft` is taken);
- matching: an event with a module_key counts for the module with that key only; one without
  counts for every module with its intent_label;
- weight: feedback_weight or audit_weight, times unsafe_multiplier for an unsafe failure, times
  0.5 ** (max(0, age in seconds) / (half_life_days * 86400)), age = evidence_at − cast time.

To merge into the shared `testkit/` oracle (replacing tests/integration/helpers.evidence_now, which
judges audits by the spec's publish time and leaves the cursor implicit).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import psycopg
import pytest


@dataclass(frozen=True)
class ModuleNow:
    id: str
    module_key: str
    intent_label: str
    success: float
    failure: float
    confidence: float
    status: str
    evidence_at: datetime | None


def modules_now(db: psycopg.Connection, twin_id: str) -> dict[str, ModuleNow]:
    """The twin's modules as stored, by module_key."""
    rows = db.execute(
        "select id::text, module_key, intent_label, success_weight, failure_weight, confidence,"
        " status::text, evidence_at from persona_modules where twin_id = %s",
        (twin_id,),
    ).fetchall()
    return {r[1]: ModuleNow(*r) for r in rows}


def from_scratch(
    db: psycopg.Connection, twin_id: str, draft_audit_ids: Collection[int] | None = None
) -> dict[str, tuple[float, float]]:
    """(success, failure) per module_key, recomputed from the events as they are now."""
    cursor = db.execute(
        "select learned_through_event_id from twins where id = %s", (twin_id,)
    ).fetchone()[0]  # type: ignore[index]
    h, fw, aw, um = db.execute(
        "select half_life_days, feedback_weight, audit_weight, unsafe_multiplier"
        " from persona_learning_settings where twin_id = %s",
        (twin_id,),
    ).fetchone()  # type: ignore[misc]
    events = db.execute(
        "select id, source::text, module_key, intent_label, score, passed, reason::text,"
        " created_at, superseded_at, supersedes_id, audit_of_draft"
        " from persona_training_events where twin_id = %s",
        (twin_id,),
    ).fetchall()
    superseded_by = {e[9]: e[0] for e in events if e[9] is not None}
    out: dict[str, tuple[float, float]] = {}
    for m in modules_now(db, twin_id).values():
        s = f = 0.0
        for (eid, source, key, intent, score, passed, reason, cast_at, superseded_at, _,
             stored_draft) in events:
            if eid > cursor:
                continue
            if superseded_at is not None and superseded_by.get(eid, 0) <= cursor:
                continue
            if (key or None) is not None:
                if key != m.module_key:
                    continue
            elif intent != m.intent_label:
                continue
            if source == "user_feedback":
                if score == 0:
                    continue
                weight, success = fw, score > 0
            else:
                draft = eid in draft_audit_ids if draft_audit_ids is not None else stored_draft
                if draft:
                    continue
                weight, success = aw, bool(passed)
            if not success and reason == "unsafe":
                weight *= um
            # A module never learned holds 0: any evidence for it is then a mismatch.
            at = m.evidence_at or cast_at
            age = max(0.0, (at - cast_at).total_seconds())
            weight *= 0.5 ** (age / (h * 86400.0))
            if success:
                s += weight
            else:
                f += weight
        out[m.module_key] = (s, f)
    return out


def assert_modules_exact(
    db: psycopg.Connection, twin_id: str, draft_audit_ids: Collection[int] | None = None
) -> dict[str, ModuleNow]:
    """Every module equals the oracle (relative 1e-9, absolute 1e-9) and its confidence is the
    Beta(1,1) mean of its counts; returns the modules."""
    modules = modules_now(db, twin_id)
    expected = from_scratch(db, twin_id, draft_audit_ids)
    for key, m in modules.items():
        s, f = expected[key]
        assert (m.success, m.failure) == (
            pytest.approx(s, rel=1e-9, abs=1e-9),
            pytest.approx(f, rel=1e-9, abs=1e-9),
        ), f"module {key}: stored ({m.success}, {m.failure}), from scratch ({s}, {f})"
        assert m.confidence == pytest.approx((m.success + 1) / (m.success + m.failure + 2))
    return modules
