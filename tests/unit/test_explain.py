"""A module's move explained: what evidence moved it, by how much, which threshold it crossed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from worker.explain import describe_evidence, explain_move, notable, threshold_crossed
from worker.learning import classify, wilson_bounds
from worker.models import LearningSettings, ModuleStatus
from worker.views import RunEvidence, TrendPoint

RUN = uuid.uuid4()
MODULE = uuid.uuid4()
SETTINGS = LearningSettings()


def change(
    before: str, after: str, s: float, f: float, conf_before: float, conf: float
) -> TrendPoint:
    return TrendPoint(
        twin_id=uuid.uuid4(), module_id=MODULE, module_key="evidence_answers",
        intent_label="factual_with_evidence", run_id=RUN, measured_at=datetime.now(UTC),
        confidence_before=conf_before, confidence=conf, status_before=ModuleStatus(before),
        status=ModuleStatus(after), success_weight=s, failure_weight=f, evidence_weight=s + f,
    )


def evidence(source: str, outcome: str, events: int, reason: str | None = None,
             changes: int = 0, module: uuid.UUID | None = MODULE) -> RunEvidence:
    return RunEvidence(run_id=RUN, module_id=module, source=source, reason=reason,  # type: ignore[arg-type]
                       outcome=outcome, events=events, vote_changes=changes)  # type: ignore[arg-type]


def test_a_fall_from_active_names_the_votes_the_reasons_and_the_keep_active_bound() -> None:
    s, f = 30.0, 22.0
    lower, _ = wilson_bounds(s, f, 1.96)
    # The counts really are below the keep-active bound: the sentence describes the rule.
    assert lower < SETTINGS.keep_active_lower_bound
    assert classify(s, f, ModuleStatus.active, SETTINGS) is ModuleStatus.probation
    text = explain_move(
        change("active", "probation", s, f, 0.71, 0.58),
        [evidence("user_feedback", "failure", 7, "incorrect"),
         evidence("user_feedback", "failure", 5, "outdated", changes=2),
         evidence("user_feedback", "success", 3, "helpful"),
         evidence("user_feedback", "failure", 40, "incorrect", module=uuid.uuid4())],
        SETTINGS,
    )
    assert text == (
        "evidence_answers fell from active to probation, confidence 0.71 -> 0.58 (-0.13), "
        "after new evidence: 12 votes down (7 incorrect, 5 outdated) and 3 up "
        "(2 of the votes changed an earlier one); its cautious score (Wilson lower bound) "
        f"{lower:.2f} fell below 0.50, the level an active module must keep."
    )


def test_becoming_active_names_the_activate_bound() -> None:
    s, f = 40.0, 5.0
    lower, _ = wilson_bounds(s, f, 1.96)
    assert classify(s, f, ModuleStatus.probation, SETTINGS) is ModuleStatus.active
    text = explain_move(change("probation", "active", s, f, 0.70, 0.87),
                        [evidence("persona_audit", "success", 4)], SETTINGS)
    assert text.startswith("evidence_answers rose from probation to active, confidence 0.70 -> "
                           "0.87 (+0.17), after new evidence: 4 passed audits;")
    assert text.endswith(f"its cautious score (Wilson lower bound) {lower:.2f} reached 0.60, "
                         "the level to become active.")


def test_being_disabled_names_the_upper_bound_and_unsafe_audits() -> None:
    s, f = 1.0, 12.0
    _, upper = wilson_bounds(s, f, 1.96)
    assert classify(s, f, ModuleStatus.probation, SETTINGS) is ModuleStatus.disabled
    text = explain_move(change("probation", "disabled", s, f, 0.30, 0.13),
                        [evidence("persona_audit", "failure", 2, "unsafe")], SETTINGS)
    assert "after new evidence: 2 failed audits (2 unsafe);" in text
    assert text.endswith(f"its optimistic score (Wilson upper bound) {upper:.2f} fell below "
                         "0.35, under which a module is disabled.")


def test_a_move_without_evidence_is_put_down_to_fading() -> None:
    text = explain_move(change("active", "active", 50.0, 5.0, 0.900, 0.895), [], SETTINGS)
    assert "confidence fell 0.900 -> 0.895 (-0.005), still active, with no new evidence: older " \
        "evidence faded (half-life 30 days); it stays active" in text


def test_a_recount_is_not_put_down_to_fading() -> None:
    # A run that recounted the modules (rebuilt_modules: evidence was deleted or edited) says
    # so, with or without new evidence, instead of blaming fading.
    moved = change("insufficient_data", "insufficient_data", 5.0, 0.0, 0.875, 0.857)
    text = explain_move(moved, [], SETTINGS, recounted=True)
    assert "with no new evidence: recounted from the evidence that exists now (evidence was " \
        "deleted or edited since the last run);" in text
    assert "faded" not in text
    text = explain_move(moved, [evidence("user_feedback", "success", 2)], SETTINGS,
                        recounted=True)
    assert "after new evidence: 2 votes up, recounted from the evidence that exists now" in text


def test_fading_below_the_minimum_evidence() -> None:
    text = threshold_crossed(change("probation", "insufficient_data", 6.0, 3.5, 0.6, 0.6),
                             SETTINGS)
    assert text == ("its evidence weight 9.5 fell below 10, the minimum for a status, as older "
                    "evidence faded")


@pytest.mark.parametrize(
    ("before", "after", "s", "f", "expected"),
    [
        ("insufficient_data", "probation", 6.0, 5.0,
         "its evidence weight reached 11.0 (minimum 10)"),
        ("disabled", "probation", 5.0, 9.0, "so it is no longer disabled"),
        ("probation", "probation", 8.0, 6.0, "no threshold crossed"),
        ("insufficient_data", "insufficient_data", 2.0, 1.0, "is still below 10"),
        ("disabled", "disabled", 0.0, 20.0, "is still below 0.35"),
    ],
)
def test_every_transition_names_its_rule(
    before: str, after: str, s: float, f: float, expected: str
) -> None:
    # Each case is what classify really decides for those counts.
    assert classify(s, f, ModuleStatus(before), SETTINGS) is ModuleStatus(after)
    assert expected in threshold_crossed(change(before, after, s, f, 0.5, 0.5), SETTINGS)


def test_thresholds_come_from_the_twins_settings() -> None:
    custom = LearningSettings(keep_active_lower_bound=0.4, activate_lower_bound=0.7)
    text = threshold_crossed(change("active", "probation", 10.0, 10.0, 0.6, 0.5), custom)
    assert "fell below 0.40, the level an active module must keep" in text


def test_evidence_in_words() -> None:
    assert describe_evidence([]) == "no new evidence"
    assert describe_evidence([evidence("user_feedback", "success", 1, "helpful")]) == \
        "new evidence: 1 vote up"
    assert describe_evidence([
        evidence("user_feedback", "failure", 1, None),
        evidence("user_feedback", "neutral", 2),
        evidence("persona_audit", "failure", 1, "off_persona"),
    ]) == "new evidence: 1 vote down (1 no reason), 2 neutral and 1 failed audit"


def test_notable_moves() -> None:
    assert notable(change("active", "probation", 1, 1, 0.6, 0.6))
    assert notable(change("active", "active", 1, 1, 0.60, 0.61))
    assert not notable(change("active", "active", 1, 1, 0.600, 0.605))


# --- the production watch in words (pfl runs, pfl report) ---------------------------------------

WATCH_REPORT = {
    "spec_id": "spec-2", "previous_spec_id": "spec-1", "state": "regressed", "action": "roll_back",
    "look": 6, "looks_planned": 10,
    "comparisons": [
        {"scope": "twin", "kind": "audits", "module_key": None, "value": -0.17218,
         "threshold": -0.02, "verdict": "regressed",
         "evidence": {"new_n": 200, "new_passed": 120, "old_n": 200, "old_passed": 170}},
        {"scope": "twin", "kind": "votes", "module_key": None, "value": None,
         "threshold": -0.02, "verdict": "insufficient_evidence",
         "evidence": {"new_n": 20, "new_passed": 8, "old_n": 50, "old_passed": 40}},
        {"scope": "module", "kind": "votes", "module_key": "small_talk", "value": None,
         "threshold": -0.02, "verdict": "insufficient_evidence", "evidence": {}},
        {"scope": "module", "kind": "audits", "module_key": "evidence_answers", "value": -0.13,
         "threshold": -0.02, "verdict": "regressed", "evidence": {}},
    ],
}


def test_a_rollback_by_the_watch_in_words() -> None:
    from worker.explain import describe_watch, watch_outcome

    report = {"watch": WATCH_REPORT}
    assert watch_outcome(report) == "regressed, rolled back"
    assert describe_watch(report, {"spec-1": 1, "spec-2": 2}) == (
        "watch of v2: regressed at look 6/10, rolled back to v1; twin-wide audits 120/200 passed "
        "since the publish vs 170/200 before, regressed (upper bound -0.1722, threshold -0.02); "
        "votes 8/20 up since the publish vs 40/50 before, insufficient_evidence; "
        "modules regressed: evidence_answers (audits)"
    )


def test_a_kind_without_evidence_and_a_report_from_before_kinds_in_words() -> None:
    from worker.explain import describe_watch

    no_votes = {**WATCH_REPORT, "comparisons": [
        WATCH_REPORT["comparisons"][0],  # type: ignore[index]
        {"scope": "twin", "kind": "votes", "module_key": None, "value": None,
         "threshold": -0.02, "verdict": "insufficient_evidence",
         "evidence": {"new_n": 0, "new_passed": 0, "old_n": 0, "old_passed": 0}}]}
    assert describe_watch({"watch": no_votes}, {}) == (
        "watch of spec spec-2: regressed at look 6/10, rolled back to spec spec-1; twin-wide "
        "audits 120/200 passed since the publish vs 170/200 before, regressed (upper bound "
        "-0.1722, threshold -0.02)"
    )
    pooled = {**WATCH_REPORT, "comparisons": [
        {"scope": "twin", "module_key": None, "value": -0.17218, "threshold": -0.02,
         "verdict": "regressed",
         "evidence": {"new_n": 250, "new_passed": 140, "old_n": 250, "old_passed": 210}},
        {"scope": "module", "module_key": "evidence_answers", "verdict": "regressed"}]}
    assert describe_watch({"watch": pooled}, {"spec-1": 1, "spec-2": 2}) == (
        "watch of v2: regressed at look 6/10, rolled back to v1; twin-wide 140/250 passed since "
        "the publish vs 210/250 before, regressed (upper bound -0.1722, threshold -0.02); "
        "modules regressed: evidence_answers"
    )


@pytest.mark.parametrize(
    "method", ["newcombe_standardized_kish_and_mover", "newcombe_standardized_effective_n",
               "newcombe_mover_standardized"])
def test_a_twin_wide_comparison_by_module_says_so(method: str) -> None:
    # The pooled counts read as a drop; the verdict is on the difference at the earlier mix.
    # Older reports name the method they used then.
    from worker.explain import describe_watch

    by_module = {**WATCH_REPORT, "state": "passed", "action": "none", "look": 10,
                 "comparisons": [
        {"scope": "twin", "kind": "votes", "module_key": None, "value": 0.0612,
         "difference": 0.0, "threshold": -0.02, "verdict": "no_regression",
         "method": method,
         "evidence": {"new_n": 400, "new_passed": 280, "old_n": 400, "old_passed": 328}}]}
    assert describe_watch({"watch": by_module}, {"spec-2": 2}) == (
        "watch of v2: passed at look 10/10; twin-wide votes 280/400 up since the publish vs "
        "328/400 before, no_regression (by module at the earlier mix: difference +0.0000, upper "
        "bound 0.0612, threshold -0.02)"
    )


def test_a_final_test_at_expiry_and_modules_left_out_in_words() -> None:
    from worker.explain import describe_watch, watch_outcome

    expired = {**WATCH_REPORT, "state": "expired", "action": "none", "look": 2, "final": True,
               "comparisons": [
        {"scope": "twin", "kind": "votes", "module_key": None, "value": 0.0412,
         "difference": -0.001, "threshold": -0.02, "verdict": "no_regression",
         "method": "newcombe_hybrid_score", "compared_new_n": 399, "compared_old_n": 40,
         "evidence": {"new_n": 400, "new_passed": 319, "old_n": 400, "old_passed": 372}}]}
    assert watch_outcome({"watch": expired}) == "expired"
    assert describe_watch({"watch": expired}, {"spec-2": 2}) == (
        "watch of v2: expired at look 2/10 (its final test, at expiry); twin-wide votes 319/400 "
        "up since the publish vs 372/400 before, no_regression (upper bound 0.0412, threshold "
        "-0.02) (compared 399 vs 40: modules with too few events a side left out)"
    )
    # The final test a run makes before it publishes the next spec says so.
    superseded = {**expired, "state": "superseded", "superseding": True}
    assert describe_watch({"watch": superseded}, {"spec-2": 2}).startswith(  # type: ignore[union-attr]
        "watch of v2: superseded at look 2/10 (its final test, as the next spec passed its "
        "gate); ")


def test_an_expiry_that_tested_nothing_does_not_claim_a_final_test() -> None:
    # The review's cases: traffic spread over modules each under watch_min_evidence a side
    # (every comparison insufficient_evidence), and a plan changed mid-watch so that nothing
    # was left to spend (comparisons with evidence not_tested): "its final test" named a test
    # that was never made.
    from worker.explain import describe_watch

    votes = {"scope": "twin", "kind": "votes", "module_key": None, "value": None,
             "difference": -0.24, "threshold": -0.02, "method": None,
             "evidence": {"new_n": 500, "new_passed": 280, "old_n": 500, "old_passed": 400}}
    thin = {**WATCH_REPORT, "state": "expired", "action": "none", "look": 0, "final": True,
            "comparisons": [{**votes, "verdict": "insufficient_evidence"}]}
    assert describe_watch({"watch": thin}, {"spec-2": 2}) == (
        "watch of v2: expired at look 0/10 (at expiry, with no final test: no comparison had "
        "watch_min_evidence a side); twin-wide votes 280/500 up since the publish vs 400/500 "
        "before, insufficient_evidence"
    )
    spent = {**thin, "look": 9, "comparisons": [{**votes, "verdict": "not_tested"}]}
    assert describe_watch({"watch": spent}, {"spec-2": 2}) == (
        "watch of v2: expired at look 9/10 (at expiry, with no final test: no alpha left to "
        "spend); twin-wide votes 280/500 up since the publish vs 400/500 before, not_tested"
    )


def test_a_report_past_its_plan_never_reads_more_looks_than_planned() -> None:
    # A report written before looks were kept within the plan (watch_looks lowered from 5 to 3
    # mid-watch left a kind at look 4): it reads look 3/3, never 4/3.
    from worker.explain import describe_watch

    past = {**WATCH_REPORT, "state": "watching", "action": "none", "look": 4,
            "looks_planned": 3, "comparisons": []}
    assert describe_watch({"watch": past}, {"spec-2": 2}) == "watch of v2: watching at look 3/3"


def test_an_alert_a_pass_and_an_owner_rollback_in_words() -> None:
    from worker.explain import describe_watch, watch_outcome

    alert = {"watch": {**WATCH_REPORT, "action": "alert", "comparisons": []}}
    assert watch_outcome(alert) == "regressed"
    assert describe_watch(alert, {}) == (
        "watch of spec spec-2: regressed at look 6/10, alert only (watch_mode alert: roll back "
        "with rollback_persona_spec)"
    )
    passed = {"watch": {**WATCH_REPORT, "state": "passed", "action": "none", "look": 10,
                        "comparisons": []}}
    assert watch_outcome(passed) == "passed"
    assert describe_watch(passed, {"spec-2": 2}) == "watch of v2: passed at look 10/10"
    owner = {"rollback": {"reason": "tone", "from_spec_id": "spec-2", "to_spec_id": "spec-1"}}
    assert watch_outcome(owner) == "owner rollback"
    assert describe_watch(owner, {"spec-1": 1, "spec-2": 2}) == (
        "rolled back by the owner from v2 to v1: tone")
    nothings: list[dict[str, object] | None] = [None, {}, {"watch": None, "checks": []}]
    for nothing in nothings:
        assert watch_outcome(nothing) == "-" and describe_watch(nothing, {}) is None
