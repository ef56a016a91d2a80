"""Builders and checks shared by the worker's integration tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from supabase import Client

from worker.learning import evidence_from_scratch
from worker.models import EvidenceEvent, LearningSettings


def scalar(db: psycopg.Connection, sql: str, *args: object) -> Any:
    """The single value a query returns."""
    return db.execute(sql, args).fetchone()[0]  # type: ignore[index]


@dataclass(frozen=True)
class Twin:
    id: str
    owner_id: str
    modules: dict[str, str]  # module_key -> module id
    published_spec_id: str


def create_twin(
    service: Client,
    owner_id: str,
    modules: dict[str, str] | None = None,
    *,
    feedback_from: str = "any_user",
) -> Twin:
    """A twin with modules (module_key -> intent_label) and a published spec listing them."""
    modules = modules or {"evidence_answers": "factual_with_evidence", "small_talk": "casual_chat"}
    twin = (
        service.table("twins")
        .insert(
            {
                "owner_id": owner_id,
                "name": f"twin-{uuid.uuid4().hex[:8]}",
                "feedback_from": feedback_from,
            }
        )
        .execute()
        .data[0]
    )
    rows = (
        service.table("persona_modules")
        .insert(
            [
                {"twin_id": twin["id"], "module_key": k, "intent_label": v}
                for k, v in modules.items()
            ]
        )
        .execute()
        .data
    )
    spec = (
        service.table("persona_specs")
        .insert(
            {
                "twin_id": twin["id"],
                "status": "published",
                "spec": {"modules": list(modules)},
            }
        )
        .execute()
        .data[0]
    )
    return Twin(twin["id"], owner_id, {r["module_key"]: r["id"] for r in rows}, spec["id"])


def module_row(db: psycopg.Connection, module_id: str) -> dict:
    cur = db.execute(
        "select success_weight, failure_weight, confidence, status, evidence_at"
        " from persona_modules where id = %s",
        (module_id,),
    )
    s, f, c, st, at = cur.fetchone()  # type: ignore[misc]
    return {"success": s, "failure": f, "confidence": c, "status": st, "evidence_at": at}


def evidence_now(
    db: psycopg.Connection,
    twin_id: str,
    module_key: str,
    intent_label: str,
    at: datetime,
    settings: LearningSettings | None = None,
) -> tuple[float, float]:
    """Recomputes a module's (s, f) from scratch over the current votes and the production
    audits of the twin, decayed to `at`: what incremental learning must equal."""
    rows = db.execute(
        """
        select e.source, e.score, e.passed, e.reason, e.created_at
        from persona_training_events e
        left join persona_specs s on s.id = e.persona_spec_id
        where e.twin_id = %s and e.processed_at is not null and e.superseded_at is null
          and (e.module_key = %s or (e.module_key is null and e.intent_label = %s))
          -- an audit moves modules only if its spec was live (published before) when processed
          and not (e.source = 'persona_audit' and e.persona_spec_id is not null
                   and (s.published_at is null or s.published_at >= e.processed_at))
        """,
        (twin_id, module_key, intent_label),
    ).fetchall()
    events = [
        EvidenceEvent(source=src, score=score, passed=passed, reason=reason, cast_at=created)
        for src, score, passed, reason, created in rows
    ]
    return evidence_from_scratch(events, at, settings or LearningSettings())
