"""Rows of the owner views (supabase/schemas/700_owner_views.sql) and of the spec history, as
the store reads them for `pfl report` and `pfl runs`. Frozen; columns a model does not name are
ignored. Confidence, rates and bounds are fractions in [0, 1]; weights are decayed evidence
weights (feedback 1, audits 2, unsafe failures 3x); times are aware datetimes (UTC from the API).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from worker.models import ModuleStatus


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class TrendPoint(_Row):
    """One recorded change of a module (persona_module_trend): its state after run `run_id`,
    whose learning time is `measured_at`."""

    twin_id: UUID
    module_id: UUID
    module_key: str
    intent_label: str
    run_id: UUID
    measured_at: datetime
    confidence_before: float
    confidence: float
    status_before: ModuleStatus
    status: ModuleStatus
    success_weight: float
    failure_weight: float
    evidence_weight: float
    wilson_lower: float | None = None
    wilson_upper: float | None = None


class ModuleFeedback(_Row):
    """A module's votes and approval over the last 7 and 30 UTC days
    (persona_module_feedback); rates and bounds are None without +1 or -1 votes."""

    module_id: UUID
    module_key: str
    status: ModuleStatus
    votes_7d: int
    up_7d: int
    down_7d: int
    approval_rate_7d: float | None = None
    approval_lower_7d: float | None = None
    approval_upper_7d: float | None = None
    votes_30d: int
    up_30d: int
    down_30d: int
    approval_rate_30d: float | None = None
    approval_lower_30d: float | None = None
    approval_upper_30d: float | None = None
    top_negative_reason_30d: str | None = None


class ReasonCount(_Row):
    """Votes of one module with one reason (None: no reason given) over the last 7 and 30 days
    (persona_module_feedback_reasons)."""

    module_id: UUID
    module_key: str
    reason: str | None = None
    votes_7d: int
    up_7d: int
    down_7d: int
    votes_30d: int
    up_30d: int
    down_30d: int


class RunEvidence(_Row):
    """How many events of a run's batch counted for a module (None: matched no module), by
    source, reason and outcome (persona_run_evidence)."""

    run_id: UUID
    module_id: UUID | None = None
    source: Literal["user_feedback", "persona_audit"]
    reason: str | None = None
    outcome: Literal["success", "failure", "neutral"]
    events: int
    vote_changes: int


class TwinOverview(_Row):
    """A twin at a glance (persona_twin_overview)."""

    twin_id: UUID
    name: str
    modules: int
    modules_active: int
    modules_probation: int
    modules_disabled: int
    modules_insufficient_data: int
    published_spec_id: UUID | None = None
    published_version: int | None = None
    published_at: datetime | None = None
    draft_spec_id: UUID | None = None
    draft_version: int | None = None
    draft_updated_at: datetime | None = None
    last_run_id: UUID | None = None
    last_run_status: str | None = None
    last_run_trigger: str | None = None
    last_run_created_at: datetime | None = None
    last_run_finished_at: datetime | None = None
    last_run_gate_passed: bool | None = None
    last_run_failed_checks: tuple[str, ...] = ()
    last_run_publish_decision: str | None = None
    last_run_hold_reason: str | None = None
    last_run_error: str | None = None
    pending_events: int
    pending_since: datetime | None = None
    next_run_status: str | None = None
    watch_state: str | None = None
    watch_spec_id: UUID | None = None
    last_run_retry_not_before: datetime | None = None
    """When the last run that ended failed: no scheduled run of the twin before this time."""


class SpecVersion(_Row):
    """One persona spec of a twin, for its timeline: created (draft), published, archived."""

    id: UUID
    version: int
    status: Literal["draft", "published", "archived"]
    created_at: datetime
    published_at: datetime | None = None
    archived_at: datetime | None = None
