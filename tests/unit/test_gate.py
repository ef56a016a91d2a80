"""Regression gate: each check passing, failing and short of evidence, and the publish decision.

Expected values are worked out by hand (literals or plain arithmetic). The paired bounds are
Tango's: the closed form −z²/(n + z²) when no pair is discordant, otherwise literals that
tests/unit/test_tango_interval.py checks against a brute-force computation.
"""

import json
import math
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from worker.cli import summarize
from worker.gate import evaluate_gate
from worker.models import (
    AuditComparison,
    CheckVerdict,
    GateCheck,
    GateInput,
    GateReport,
    HoldReason,
    LearningSettings,
    ModuleStatus,
    PublishDecision,
)
from worker.store import Run

DEFAULTS = LearningSettings()
S = ModuleStatus
V = CheckVerdict
DRAFT = uuid4()
BASELINE = uuid4()

# 25 pairs, 5 candidate-only passes: d = 0.2, Tango lower bound 0.0402 — passes.
GOOD_AUDITS = {
    "pairs": 25,
    "candidate_only_passed": 5,
    "baseline_only_passed": 0,
    "candidate_audited": 25,
    "candidate_passed": 25,
    "candidate_unsafe_failures": 0,
}


def gate_input(
    *,
    draft: UUID | None = DRAFT,
    baseline: UUID | None = BASELINE,
    modules: tuple[str, ...] = ("facts", "tone"),
    status: dict[str, ModuleStatus] | None = None,
    safe_mode: bool = False,
    **audits: int,
) -> GateInput:
    return GateInput(
        draft_spec_id=draft,
        baseline_spec_id=baseline,
        draft_modules=modules,
        module_status={"facts": S.active, "tone": S.probation} if status is None else status,
        audits=AuditComparison(**{**GOOD_AUDITS, **audits}),
        safe_mode=safe_mode,
    )


def check(report: GateReport, name: str) -> GateCheck:
    (found,) = [c for c in report.checks if c.name == name]
    return found


# --- no draft -------------------------------------------------------------------------------


@pytest.mark.parametrize("safe_mode", [False, True])
def test_no_draft_passes_and_holds(safe_mode: bool) -> None:
    report = evaluate_gate(gate_input(draft=None, safe_mode=safe_mode), DEFAULTS)
    assert report.passed is True
    assert report.publish_decision is PublishDecision.held
    assert report.hold_reason is HoldReason.no_draft
    assert report.checks == ()
    assert report.draft_spec_id is None
    assert report.baseline_spec_id == BASELINE


# --- required_modules_healthy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("modules", "status", "verdict", "value", "named"),
    [
        # active, probation and insufficient_data are all healthy enough
        (
            ("a", "b", "c"),
            {"a": S.active, "b": S.probation, "c": S.insufficient_data},
            V.pass_,
            0,
            [],
        ),
        # one listed module disabled after this run
        (("a", "b"), {"a": S.active, "b": S.disabled}, V.fail, 1, ["b"]),
        # a disabled module the draft does not list does not matter
        (("a",), {"a": S.active, "b": S.disabled}, V.pass_, 0, []),
        # a listed key the twin has no module for
        (("a", "ghost"), {"a": S.active}, V.fail, 1, ["ghost"]),
        # both problems at once
        (("b", "ghost"), {"b": S.disabled}, V.fail, 2, ["b", "ghost"]),
        # a key listed twice counts once
        (("b", "b"), {"b": S.disabled}, V.fail, 1, ["b"]),
        # the draft relies on no module
        ((), {}, V.pass_, 0, []),
    ],
)
def test_required_modules_healthy(
    modules: tuple[str, ...],
    status: dict[str, ModuleStatus],
    verdict: CheckVerdict,
    value: int,
    named: list[str],
) -> None:
    report = evaluate_gate(gate_input(modules=modules, status=status), DEFAULTS)
    result = check(report, "required_modules_healthy")
    assert (result.verdict, result.value, result.threshold) == (verdict, value, 0)
    for key in named:
        assert key in result.detail
    assert report.passed is (verdict is V.pass_)


# --- audit_non_inferiority with a baseline ---------------------------------------------------


Z2 = 1.96**2


@pytest.mark.parametrize(
    ("pairs", "b", "c", "verdict", "lower"),
    [
        # d = 2/25 = 0.08, but one pair in five discordant: lower −0.1023 < −0.05
        (25, 3, 1, V.fail, -0.1022765562289169),
        # d = 0.2: lower 0.0402
        (25, 5, 0, V.pass_, 0.040164207255929785),
        # 20 agreeing pairs: −z²/(20 + z²) = −0.1611, no longer 0 as with the Wald interval
        (20, 0, 0, V.fail, -Z2 / (20 + Z2)),
        # 73 agreeing pairs are the fewest that pass at the default margin: −0.04999...
        (73, 0, 0, V.pass_, -Z2 / (73 + Z2)),
        (72, 0, 0, V.fail, -Z2 / (72 + Z2)),  # −0.0507
        # the minimum of 20 pairs, all for the candidate: lower 0.6777
        (20, 20, 0, V.pass_, 0.6777397490100157),
        # 19 < 20 pairs: short of evidence; the bound is still reported
        (19, 0, 0, V.insufficient_evidence, -Z2 / (19 + Z2)),
        # no pairs at all: no value
        (0, 0, 0, V.insufficient_evidence, None),
    ],
)
def test_audit_non_inferiority(
    pairs: int, b: int, c: int, verdict: CheckVerdict, lower: float | None
) -> None:
    audits: dict[str, Any] = {"pairs": pairs, "candidate_only_passed": b, "baseline_only_passed": c}
    report = evaluate_gate(gate_input(**audits), DEFAULTS)
    result = check(report, "audit_non_inferiority")
    assert result.verdict is verdict
    assert result.threshold == -0.05
    assert result.method == "tango_score"
    assert result.evidence == {"n": pairs, "b": b, "c": c}
    if lower is None:
        assert result.value is None
    else:
        assert result.value == pytest.approx(lower, abs=1e-9)
        assert f"{lower:.4f}" in result.detail
    assert "first publish" not in result.detail
    assert report.passed is (verdict is V.pass_)


def test_audit_non_inferiority_reports_the_observed_difference_and_the_interval() -> None:
    # Fagerland, Lydersen & Laake (2017), ch. 8: Cavo et al., 161 pairs, 6 candidate-only and
    # 16 baseline-only: difference (6 − 16)/161 = −0.0621, Tango's 95% interval
    # [−0.1240, −0.0054] (test_tango_interval.py's published values).
    result = check(
        evaluate_gate(
            gate_input(pairs=161, candidate_only_passed=6, baseline_only_passed=16), DEFAULTS
        ),
        "audit_non_inferiority",
    )
    assert result.detail.startswith(
        "161 paired traces, candidate-only passes 6, baseline-only passes 16, difference -0.0621,"
        " Tango score interval [-0.1240, -0.0054]"
    )
    assert result.verdict is V.fail  # −0.1240 < −0.05


def test_audit_non_inferiority_uses_the_twin_margin_and_minimum() -> None:
    settings = LearningSettings(gate_non_inferiority_margin=0.11, gate_min_pairs=25)
    # (25, 3, 1): lower −0.1023 ≥ −0.11
    result = check(
        evaluate_gate(
            gate_input(pairs=25, candidate_only_passed=3, baseline_only_passed=1), settings
        ),
        "audit_non_inferiority",
    )
    assert (result.verdict, result.threshold) == (V.pass_, -0.11)
    result = check(evaluate_gate(gate_input(pairs=24), settings), "audit_non_inferiority")
    assert result.verdict is V.insufficient_evidence


def test_audit_non_inferiority_uses_the_twin_z() -> None:
    # 20 agreeing pairs with z = 1: −1/(20 + 1) = −0.0476 ≥ −0.05 (z = 1.96 gives −0.1611)
    result = check(
        evaluate_gate(
            gate_input(pairs=20, candidate_only_passed=0), LearningSettings(wilson_z=1.0)
        ),
        "audit_non_inferiority",
    )
    assert result.value == pytest.approx(-1 / 21, abs=1e-11)
    assert result.verdict is V.pass_


# --- audit_non_inferiority on first publish ---------------------------------------------------


@pytest.mark.parametrize(
    ("audited", "passed", "verdict", "lower"),
    [
        # 20/20: lower = 1/(1 + 3.8416/20) ≈ 0.8389 ≥ 0.8
        (20, 20, V.pass_, 1 / (1 + 3.8416 / 20)),
        # 24/25, p = 0.96: (0.96 + 0.076832 − 1.96·√(0.0384/25 + 0.006146...)) / 1.153664 ≈ 0.8046
        (
            25,
            24,
            V.pass_,
            (0.96 + 0.076832 - 1.96 * math.sqrt(0.96 * 0.04 / 25 + 3.8416 / 2500)) / 1.153664,
        ),
        # 19/20 ≈ 0.7639 < 0.8
        (
            20,
            19,
            V.fail,
            (0.95 + 0.09604 - 1.96 * math.sqrt(0.95 * 0.05 / 20 + 3.8416 / 1600)) / 1.19208,
        ),
        # 10/10 is perfect but 10 < 20 audited traces
        (10, 10, V.insufficient_evidence, 1 / (1 + 3.8416 / 10)),
        # nothing audited yet
        (0, 0, V.insufficient_evidence, None),
    ],
)
def test_first_publish(
    audited: int, passed: int, verdict: CheckVerdict, lower: float | None
) -> None:
    inp = gate_input(
        baseline=None,
        pairs=0,
        candidate_only_passed=0,
        candidate_audited=audited,
        candidate_passed=passed,
    )
    report = evaluate_gate(inp, DEFAULTS)
    result = check(report, "audit_non_inferiority")
    assert result.verdict is verdict
    assert result.threshold == 0.8
    if lower is None:
        assert result.value is None
    else:
        assert result.value == pytest.approx(lower, abs=1e-9)
    assert "first publish" in result.detail
    assert (result.method, result.evidence) == ("wilson_score", {"n": audited, "passed": passed})
    assert report.baseline_spec_id is None
    expected = PublishDecision.published if verdict is V.pass_ else PublishDecision.held
    assert report.publish_decision is expected


# --- no_unsafe_regression -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unsafe", "verdict"),
    [
        (0, V.pass_),  # no unsafe failure of the candidate
        (1, V.fail),  # one is enough to fail
        (4, V.fail),
    ],
)
def test_no_unsafe_regression(unsafe: int, verdict: CheckVerdict) -> None:
    report = evaluate_gate(gate_input(candidate_unsafe_failures=unsafe), DEFAULTS)
    result = check(report, "no_unsafe_regression")
    assert (result.verdict, result.value, result.threshold) == (verdict, unsafe, 0)


def test_unsafe_audit_holds_as_gate_failed() -> None:
    report = evaluate_gate(gate_input(candidate_unsafe_failures=1), DEFAULTS)
    assert report.passed is False
    assert (report.publish_decision, report.hold_reason) == (
        PublishDecision.held,
        HoldReason.gate_failed,
    )


# --- decision -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "passed", "decision", "reason"),
    [
        # every check passes, the run may publish
        ({}, True, PublishDecision.published, None),
        # safe mode holds a passing gate, which still reports passed
        ({"safe_mode": True}, True, PublishDecision.held, HoldReason.safe_mode),
        # safe mode is the reason even when the gate failed too
        (
            {"safe_mode": True, "candidate_unsafe_failures": 2},
            False,
            PublishDecision.held,
            HoldReason.safe_mode,
        ),
        # a disabled required module
        (
            {"status": {"facts": S.disabled, "tone": S.active}},
            False,
            PublishDecision.held,
            HoldReason.gate_failed,
        ),
        # too few pairs is not a pass
        (
            {"pairs": 10, "candidate_only_passed": 0},
            False,
            PublishDecision.held,
            HoldReason.gate_failed,
        ),
    ],
)
def test_publish_decision(
    overrides: dict[str, object],
    passed: bool,
    decision: PublishDecision,
    reason: HoldReason | None,
) -> None:
    report = evaluate_gate(gate_input(**overrides), DEFAULTS)  # type: ignore[arg-type]
    assert (report.passed, report.publish_decision, report.hold_reason) == (
        passed,
        decision,
        reason,
    )
    assert [c.name for c in report.checks] == [
        "required_modules_healthy",
        "audit_non_inferiority",
        "no_unsafe_regression",
    ]
    assert (report.draft_spec_id, report.baseline_spec_id) == (DRAFT, BASELINE)


def test_report_dumps_to_json() -> None:
    data = evaluate_gate(gate_input(safe_mode=True), DEFAULTS).model_dump(mode="json")
    assert json.loads(json.dumps(data)) == data
    assert data["publish_decision"] == "held"
    assert data["hold_reason"] == "safe_mode"
    assert data["draft_spec_id"] == str(DRAFT)
    assert [c["verdict"] for c in data["checks"]] == ["pass", "pass", "pass"]
    paired = data["checks"][1]
    assert paired["value"] == pytest.approx(0.040164207255929785, abs=1e-12)
    assert (paired["method"], paired["evidence"]) == ("tango_score", {"n": 25, "b": 5, "c": 0})
    assert (paired["threshold"], paired["verdict"]) == (-0.05, "pass")
    # the counting checks carry no interval
    assert (data["checks"][0]["method"], data["checks"][0]["evidence"]) == (None, {})


# --- model guards ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"pairs": 3, "candidate_only_passed": 2, "baseline_only_passed": 2},  # b + c > n
        {"candidate_audited": 3, "candidate_passed": 4},  # more passed than audited
        {"candidate_unsafe_failures": -1},  # counts are never negative
    ],
)
def test_audit_comparison_rejects_inconsistent_counts(overrides: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        AuditComparison(**{**GOOD_AUDITS, **overrides})


@pytest.mark.parametrize(
    ("decision", "reason"),
    [
        (PublishDecision.held, None),  # a hold needs its reason
        (PublishDecision.published, HoldReason.safe_mode),  # a publish has none
    ],
)
def test_gate_report_rejects_a_decision_without_a_matching_reason(
    decision: PublishDecision, reason: HoldReason | None
) -> None:
    with pytest.raises(ValidationError):
        GateReport(
            passed=True,
            publish_decision=decision,
            hold_reason=reason,
            draft_spec_id=DRAFT,
            baseline_spec_id=None,
            checks=(),
        )


# --- what owners read -----------------------------------------------------------------------


def test_run_summary_shows_the_interval_and_its_counts() -> None:
    stored = evaluate_gate(gate_input(), DEFAULTS).model_dump(mode="json")
    stored["checks"][1]["evidence"] = {"b": 5, "c": 0, "n": 25}  # jsonb's key order
    run = Run(
        id=uuid4(),
        twin_id=uuid4(),
        status="completed",
        trigger="request",
        safe_mode=False,
        attempts=1,
        max_attempts=3,
        gate_report=stored,
        created_at=datetime.now(UTC),
    )
    lines = summarize(run, {}).splitlines()
    assert (
        "    audit_non_inferiority: pass (value 0.04016, threshold -0.05, tango_score n=25 b=5 c=0)"
    ) in lines
    assert "    no_unsafe_regression: pass (value 0, threshold 0)" in lines
