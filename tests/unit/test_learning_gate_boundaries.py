"""Learning and gate at their exact boundaries, and the errors they name.

Each test here fails on a mutant scripts/mutation found surviving (issue 17): a comparison moved
by one (`>=` to `>`, `<` to `<=`), a bound shifted (`0` to `1`), a check that was never reached,
hysteresis that `learn()` never exercised. Thresholds are set to the value the code computes, so
"reaches the bound" is tested at equality, where `>=` and `>` differ.
"""

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from worker.gate import evaluate_gate, tango_interval
from worker.learning import (
    COUNT_NOISE,
    beta_mean,
    classify,
    decay_factor,
    learn,
    wilson_bounds,
)
from worker.models import (
    AuditComparison,
    CheckVerdict,
    GateInput,
    LearningSettings,
    ModuleEvidence,
    ModuleState,
    ModuleStatus,
)

S = ModuleStatus
V = CheckVerdict
T = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
Z = 1.96


def module(
    success: float,
    failure: float,
    status: ModuleStatus,
    *,
    confidence: float | None = None,
    module_id: UUID | None = None,
) -> ModuleState:
    return ModuleState(
        module_id=module_id or uuid4(),
        module_key=f"m{uuid4().hex[:6]}",
        intent_label="factual_with_evidence",
        success=success,
        failure=failure,
        evidence_at=T,
        confidence=beta_mean(success, failure) if confidence is None else confidence,
        status=status,
    )


# ------------------------------------------------------------------------------ learning


def test_learn_keeps_an_active_module_active_between_keep_and_activate_bounds() -> None:
    # 30 successes, 10 failures: the Wilson lower bound lies in [0.5, 0.6), between the bounds.
    lower = wilson_bounds(30, 10, Z)[0]
    assert 0.5 <= lower < 0.6
    was_active = module(30, 10, S.active)
    was_probation = module(30, 10, S.probation)

    updates = learn([was_active, was_probation], {}, T, LearningSettings())

    assert [u.status for u in updates] == [S.active, S.probation]
    assert [u.changed for u in updates] == [False, False]


def test_learn_refuses_evidence_keyed_under_another_module() -> None:
    a, b = module(1, 0, S.insufficient_data), module(1, 0, S.insufficient_data)
    wrong = {a.module_id: ModuleEvidence(module_id=b.module_id, success=1, failure=0)}

    with pytest.raises(ValueError, match=f"evidence keyed by {a.module_id} is for {b.module_id}"):
        learn([a, b], wrong, T, LearningSettings())


def test_learn_names_the_duplicate_module_id() -> None:
    a = module(1, 0, S.insufficient_data)

    with pytest.raises(ValueError, match="^duplicate module_id in modules$"):
        learn([a, a], {}, T, LearningSettings())


def test_half_lives_of_a_day_and_less_are_valid() -> None:
    day = timedelta(days=1)
    assert decay_factor(T, T + day, 1.0) == 0.5
    assert decay_factor(T, T + day, 0.5) == 0.25
    with pytest.raises(ValueError, match="^half_life_days must be > 0, got 0$"):
        decay_factor(T, T + day, 0)

    old = module(4, 0, S.insufficient_data).model_copy(update={"evidence_at": T - day})
    (update,) = learn([old], {}, T, LearningSettings(half_life_days=1.0))
    assert update.success == 2.0


def test_a_count_exactly_at_the_noise_floor_is_kept() -> None:
    (update,) = learn([module(COUNT_NOISE, 0.0, S.insufficient_data)], {}, T, LearningSettings())
    assert update.success == COUNT_NOISE


def test_the_wilson_upper_bound_is_clamped_to_1() -> None:
    # Unclamped, 5 successes and no failure give 1.0000000000000002 in floats.
    assert wilson_bounds(5, 0, Z)[1] == 1.0


def test_classify_at_min_evidence_exactly_has_enough_evidence() -> None:
    settings = LearningSettings(min_evidence=10)
    assert classify(5, 5, S.probation, settings) is S.probation
    assert classify(5, 4.999, S.probation, settings) is S.insufficient_data


def test_classify_at_the_disable_bound_exactly_is_not_disabled() -> None:
    upper = wilson_bounds(3, 17, Z)[1]
    settings = LearningSettings(disable_upper_bound=upper)
    assert classify(3, 17, S.probation, settings) is S.probation
    assert classify(3, 17.5, S.probation, settings) is S.disabled


def test_classify_at_the_activate_bound_exactly_activates() -> None:
    lower = wilson_bounds(40, 5, Z)[0]
    settings = LearningSettings(activate_lower_bound=lower, keep_active_lower_bound=0.0)
    assert classify(40, 5, S.probation, settings) is S.active
    assert classify(40, 5.5, S.probation, settings) is S.probation


def test_classify_at_the_keep_active_bound_exactly_stays_active() -> None:
    lower = wilson_bounds(40, 5, Z)[0]
    settings = LearningSettings(activate_lower_bound=0.99, keep_active_lower_bound=lower)
    assert classify(40, 5, S.active, settings) is S.active
    assert classify(40, 5.5, S.active, settings) is S.probation


# ------------------------------------------------------------------------------ gate

DRAFT, BASELINE = uuid4(), uuid4()


def gate(baseline: UUID | None = BASELINE, **audits: int) -> GateInput:
    counts = {
        "pairs": 0,
        "candidate_only_passed": 0,
        "baseline_only_passed": 0,
        "candidate_audited": 0,
        "candidate_passed": 0,
        "candidate_unsafe_failures": 0,
        **audits,
    }
    return GateInput(
        draft_spec_id=DRAFT,
        baseline_spec_id=baseline,
        draft_modules=("facts",),
        module_status={"facts": S.active},
        audits=AuditComparison(**counts),
        safe_mode=False,
    )


def test_one_paired_trace_is_insufficient_evidence_with_its_bound_shown() -> None:
    report = evaluate_gate(
        gate(pairs=1, candidate_only_passed=1, candidate_audited=1, candidate_passed=1),
        LearningSettings(),
    )
    check = report.checks[1]
    assert check.verdict is V.insufficient_evidence
    lower, upper = tango_interval(1, 1, 0, Z)
    assert check.value == lower
    assert check.detail == (
        "1 paired traces, candidate-only passes 1, baseline-only passes 0, difference 1.0000, "
        f"Tango score interval [{lower:.4f}, {upper:.4f}]; needs at least 20 pairs"
    )


def test_no_paired_trace_shows_no_bound() -> None:
    check = evaluate_gate(gate(), LearningSettings()).checks[1]
    assert check.verdict is V.insufficient_evidence
    assert check.value is None
    assert check.detail == (
        "0 paired traces, candidate-only passes 0, baseline-only passes 0; needs at least 20 pairs"
    )


def test_one_pair_is_judged_when_one_pair_is_enough() -> None:
    check = evaluate_gate(
        gate(pairs=1, candidate_only_passed=1, candidate_audited=1, candidate_passed=1),
        # One pair's interval is wide: judged against the widest margin, it passes.
        LearningSettings(gate_min_pairs=1, gate_non_inferiority_margin=1.0),
    ).checks[1]
    assert check.verdict is V.pass_


def test_non_inferiority_at_the_margin_exactly_passes() -> None:
    lower = tango_interval(25, 2, 3, Z)[0]
    assert lower < 0
    audits: dict[str, Any] = {
        "pairs": 25,
        "candidate_only_passed": 2,
        "baseline_only_passed": 3,
        "candidate_audited": 25,
        "candidate_passed": 20,
    }
    at_margin = evaluate_gate(gate(**audits), LearningSettings(gate_non_inferiority_margin=-lower))
    assert at_margin.checks[1].verdict is V.pass_
    assert at_margin.passed is True
    inside = evaluate_gate(
        gate(**audits), LearningSettings(gate_non_inferiority_margin=-lower - 1e-9)
    )
    assert inside.checks[1].verdict is V.fail


def test_first_publish_at_the_bound_exactly_passes() -> None:
    lower = wilson_bounds(24, 1, Z)[0]
    audits = {"candidate_audited": 25, "candidate_passed": 24}
    at_bound = evaluate_gate(
        gate(None, **audits), LearningSettings(gate_first_publish_min_lower_bound=lower)
    )
    assert at_bound.checks[1].verdict is V.pass_
    above = evaluate_gate(
        gate(None, **audits), LearningSettings(gate_first_publish_min_lower_bound=lower + 1e-9)
    )
    assert above.checks[1].verdict is V.fail


def test_first_publish_of_one_audited_trace() -> None:
    lower = wilson_bounds(1, 0, Z)[0]
    audits = {"candidate_audited": 1, "candidate_passed": 1}
    short = evaluate_gate(gate(None, **audits), LearningSettings()).checks[1]
    assert short.verdict is V.insufficient_evidence
    assert short.value == lower
    enough = evaluate_gate(
        gate(None, **audits),
        LearningSettings(gate_min_audited_traces=1, gate_first_publish_min_lower_bound=0.2),
    ).checks[1]
    assert lower > 0.2
    assert enough.verdict is V.pass_


def test_required_modules_detail_names_each_problem() -> None:
    inp = gate().model_copy(
        update={
            "draft_modules": ("facts", "tone", "ghost", "phantom"),
            "module_status": {"facts": S.disabled, "tone": S.disabled},
        }
    )
    check = evaluate_gate(inp, LearningSettings()).checks[0]
    assert check.detail == "disabled: facts, tone; not a module of the twin: ghost, phantom"
    assert check.value == 4.0

    empty = gate().model_copy(update={"draft_modules": ()})
    assert evaluate_gate(empty, LearningSettings()).checks[0].detail == (
        "the draft lists no modules"
    )
