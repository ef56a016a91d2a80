"""The run's decision: what the runner decides from a batch, the rules the model holds, and the
payload the store makes of it, held to the keys complete_learning_run's SQL reads."""

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from worker.models import (
    AuditComparison,
    CheckVerdict,
    GateCheck,
    GateReport,
    HoldReason,
    LearningSettings,
    ModuleEvidence,
    ModuleState,
    ModuleStatus,
    ModuleUpdate,
    PublishDecision,
    RunDecision,
)
from worker.runner import decide
from worker.store import CompletionPayload, RunBatch, completion_payload

MIGRATIONS = Path(__file__).resolve().parents[2] / "supabase" / "migrations"
T = datetime(2026, 11, 1, 12, tzinfo=UTC)
DRAFT = UUID("00000000-0000-4000-8000-00000000000d")
BASELINE = UUID("00000000-0000-4000-8000-00000000000b")
MODULE = UUID("00000000-0000-4000-8000-000000000001")


def complete_learning_run_sql() -> str:
    """The body of the latest definition of complete_learning_run in the migrations."""
    found = None
    for path in sorted(MIGRATIONS.glob("*.sql")):
        text = path.read_text()
        for match in re.finditer(
            r"create (?:or replace )?function public\.complete_learning_run\b", text
        ):
            start = text.index("$$", match.end())
            found = text[start : text.index("$$", start + 2)]
    assert found is not None, f"no complete_learning_run in {MIGRATIONS}"
    return found


def keys_the_sql_reads() -> tuple[set[str], set[str]]:
    """(the p_result keys, the columns of each module update) that complete_learning_run reads."""
    body = complete_learning_run_sql()
    keys = set(re.findall(r"p_result\s*->>?\s*'(\w+)'", body))
    (columns,) = re.findall(
        r"jsonb_to_recordset\(\s*p_result\s*->\s*'module_updates'\s*\)\s*as\s+\w+\s*\(([^)]*)\)",
        body,
    )
    return keys, {column.split()[0] for column in columns.split(",")}


def update(*, changed: bool, status: ModuleStatus = ModuleStatus.probation) -> ModuleUpdate:
    return ModuleUpdate(
        module_id=MODULE,
        module_key="facts",
        success=9.0,
        failure=5.0,
        evidence_at=T,
        confidence=0.625,
        status=status,
        confidence_before=0.5 if changed else 0.625,
        status_before=ModuleStatus.insufficient_data if changed else status,
        changed=changed,
    )


def report(decision: PublishDecision, reason: HoldReason | None, passed: bool) -> GateReport:
    check = GateCheck(
        name="no_unsafe_regression",
        value=0.0,
        threshold=0.0,
        verdict=CheckVerdict.pass_ if passed else CheckVerdict.fail,
        detail="0 audit(s) of the candidate failed as unsafe",
    )
    return GateReport(
        passed=passed,
        publish_decision=decision,
        hold_reason=reason,
        draft_spec_id=DRAFT,
        baseline_spec_id=BASELINE,
        checks=(check,),
    )


def decision(**overrides: Any) -> RunDecision:
    """A published decision with one changed module; `overrides` replace its fields."""
    fields: dict[str, Any] = {
        "events_scanned": 14,
        "events_processed": 14,
        "events_unmatched": 1,
        "modules_updated": 1,
        "module_updates": (update(changed=True),),
        "gate_passed": True,
        "gate_report": report(PublishDecision.published, None, passed=True),
        "publish_decision": PublishDecision.published,
        "hold_reason": None,
        "publish_spec_id": DRAFT,
    }
    return RunDecision(**{**fields, **overrides})


def batch(*, draft: UUID | None, audits: dict[str, int] | None = None) -> RunBatch:
    """A batch of one module with new evidence s = 9, f = 5 (never learned before)."""
    return RunBatch(
        learning_time=T,
        events_scanned=15,
        events_unmatched=1,
        settings=LearningSettings(),
        modules=(
            ModuleState(
                module_id=MODULE,
                module_key="facts",
                intent_label="factual_with_evidence",
                success=0.0,
                failure=0.0,
                evidence_at=None,
                confidence=0.5,
                status=ModuleStatus.insufficient_data,
            ),
        ),
        evidence=(ModuleEvidence(module_id=MODULE, success=9.0, failure=5.0),),
        draft_spec_id=draft,
        draft_modules=("facts",) if draft else (),
        baseline_spec_id=BASELINE,
        audits=AuditComparison(
            **(
                audits
                or {
                    "pairs": 0,
                    "candidate_only_passed": 0,
                    "baseline_only_passed": 0,
                    "candidate_audited": 0,
                    "candidate_passed": 0,
                    "candidate_unsafe_failures": 0,
                }
            )
        ),
    )


# 25 pairs, 5 candidate-only passes: the paired lower bound 0.0432 passes (see test_gate).
PASSING_AUDITS = {
    "pairs": 25,
    "candidate_only_passed": 5,
    "baseline_only_passed": 0,
    "candidate_audited": 25,
    "candidate_passed": 25,
    "candidate_unsafe_failures": 0,
}


# --- the payload against the SQL ------------------------------------------------------------


def test_the_sql_reads_the_keys_this_test_expects() -> None:
    # Guards the parsing below: if the function is rewritten so that these are not found, the
    # test must be adapted rather than pass on an empty set.
    keys, columns = keys_the_sql_reads()
    assert {"module_updates", "gate_passed", "gate_report"} <= keys
    assert {"module_id", "status"} <= columns


def test_payload_has_exactly_the_keys_the_sql_reads() -> None:
    keys, columns = keys_the_sql_reads()
    payload = completion_payload(decision())
    assert set(payload) == keys == set(CompletionPayload.__required_keys__)
    assert [set(u) for u in payload["module_updates"]] == [columns]


@pytest.mark.parametrize(
    "made",
    [
        decision(),  # published
        decision(  # held by safe mode, nothing changed
            modules_updated=0,
            module_updates=(update(changed=False),),
            gate_report=report(PublishDecision.held, HoldReason.safe_mode, passed=True),
            publish_decision=PublishDecision.held,
            hold_reason=HoldReason.safe_mode,
            publish_spec_id=None,
        ),
    ],
)
def test_payload_has_the_json_types_the_sql_checks(made: RunDecision) -> None:
    payload = completion_payload(made)
    assert json.loads(json.dumps(payload)) == payload  # plain JSON, nothing left to encode
    # complete_learning_run refuses a p_result whose jsonb types differ from these.
    assert isinstance(payload["module_updates"], list)
    assert isinstance(payload["gate_passed"], bool)
    assert isinstance(payload["gate_report"], dict)


def test_payload_values() -> None:
    # Worked out by hand: what the runner handed to complete_learning_run before the decision
    # model existed, and so what the SQL function and the run row expect.
    made = decision()
    assert completion_payload(made) == {
        "module_updates": [
            {
                "module_id": str(MODULE),
                "success": 9.0,
                "failure": 5.0,
                "confidence": 0.625,
                "status": "probation",
            }
        ],
        "gate_passed": True,
        "gate_report": {
            "passed": True,
            "publish_decision": "published",
            "hold_reason": None,
            "draft_spec_id": str(DRAFT),
            "baseline_spec_id": str(BASELINE),
            "checks": [
                {
                    "name": "no_unsafe_regression",
                    "value": 0.0,
                    "threshold": 0.0,
                    "verdict": "pass",
                    "detail": "0 audit(s) of the candidate failed as unsafe",
                    "method": None,
                    "evidence": {},
                }
            ],
            "watch": None,
        },
        "publish_spec_id": str(DRAFT),
        "hold_reason": None,
        "watch": None,
    }
    held = decision(
        gate_passed=False,
        gate_report=report(PublishDecision.held, HoldReason.gate_failed, passed=False),
        publish_decision=PublishDecision.held,
        hold_reason=HoldReason.gate_failed,
        publish_spec_id=None,
    )
    payload = completion_payload(held)
    assert (payload["gate_passed"], payload["publish_spec_id"], payload["hold_reason"]) == (
        False,
        None,
        "gate_failed",
    )


# --- what the runner decides ----------------------------------------------------------------


def test_decide_without_a_draft_holds_and_carries_the_figures() -> None:
    made = decide(batch(draft=None), safe_mode=False)
    assert (made.events_scanned, made.events_processed, made.events_unmatched) == (15, 15, 1)
    [learned] = made.module_updates
    assert (learned.success, learned.failure, learned.confidence) == (9.0, 5.0, 10 / 16)
    assert made.modules_updated == 1
    assert (made.gate_passed, made.publish_decision, made.hold_reason) == (
        True,
        PublishDecision.held,
        HoldReason.no_draft,
    )
    assert made.publish_spec_id is None
    assert made.gate_report.checks == ()


@pytest.mark.parametrize(
    ("safe_mode", "decision_", "reason", "spec"),
    [
        (False, PublishDecision.published, None, DRAFT),  # the gate passed: publish the draft
        (True, PublishDecision.held, HoldReason.safe_mode, None),  # safe mode never publishes
    ],
)
def test_decide_publishes_a_passing_draft_unless_in_safe_mode(
    safe_mode: bool, decision_: PublishDecision, reason: HoldReason | None, spec: UUID | None
) -> None:
    made = decide(batch(draft=DRAFT, audits=PASSING_AUDITS), safe_mode=safe_mode)
    assert made.gate_passed is True
    assert (made.publish_decision, made.hold_reason, made.publish_spec_id) == (
        decision_,
        reason,
        spec,
    )
    assert made.gate_report.publish_decision is decision_


# --- the model's rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"events_processed": 13},  # a run processes its whole batch
        {"modules_updated": 0},  # one update changed
        {"module_updates": (update(changed=False),)},  # none changed, but modules_updated = 1
        {"gate_passed": False},  # differs from the report
        {"hold_reason": HoldReason.safe_mode},  # differs from the report
        {"publish_spec_id": None},  # published without the spec
        {"publish_spec_id": uuid4()},  # published another spec than the report's draft
        {"events_scanned": -1, "events_processed": -1},  # counts are never negative
        {  # a published decision needs a passed gate
            "gate_passed": False,
            "gate_report": report(PublishDecision.published, None, passed=False),
        },
        {  # held, but still names a spec to publish
            "gate_report": report(PublishDecision.held, HoldReason.safe_mode, passed=True),
            "publish_decision": PublishDecision.held,
            "hold_reason": HoldReason.safe_mode,
        },
    ],
)
def test_decision_rejects_figures_that_disagree(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        decision(**overrides)


def test_decision_is_frozen() -> None:
    with pytest.raises(ValidationError):
        decision().gate_passed = False  # type: ignore[misc]
