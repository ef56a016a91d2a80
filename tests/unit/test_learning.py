"""Learning math: decay, Beta mean, Wilson bounds, status, event weights and incremental learn().

Expected values are worked out by hand (literals or plain arithmetic), never by calling the code
under test.
"""

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from worker.learning import (
    beta_mean,
    classify,
    decay_factor,
    event_contribution,
    evidence_from_scratch,
    learn,
    wilson_bounds,
)
from worker.models import (
    EvidenceEvent,
    LearningSettings,
    ModuleEvidence,
    ModuleState,
    ModuleStatus,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DEFAULTS = LearningSettings()
S = ModuleStatus


def days(n: float) -> timedelta:
    return timedelta(days=n)


def feedback(score: int, cast_at: datetime, reason: str | None = None) -> EvidenceEvent:
    return EvidenceEvent(source="user_feedback", score=score, reason=reason, cast_at=cast_at)


def audit(passed: bool, cast_at: datetime, reason: str | None = None) -> EvidenceEvent:
    return EvidenceEvent(source="persona_audit", passed=passed, reason=reason, cast_at=cast_at)


def module(
    *,
    success: float = 0.0,
    failure: float = 0.0,
    evidence_at: datetime | None = None,
    confidence: float = 0.5,
    status: ModuleStatus = S.insufficient_data,
    module_id: UUID | None = None,
    key: str = "m",
) -> ModuleState:
    return ModuleState(
        module_id=module_id or uuid4(),
        module_key=key,
        intent_label="factual_with_evidence",
        success=success,
        failure=failure,
        evidence_at=evidence_at,
        confidence=confidence,
        status=status,
    )


# --- settings -------------------------------------------------------------------------------


def test_settings_defaults_are_the_documented_ones() -> None:
    assert DEFAULTS.model_dump() == {
        "half_life_days": 30.0,
        "feedback_weight": 1.0,
        "audit_weight": 2.0,
        "unsafe_multiplier": 3.0,
        "min_evidence": 10.0,
        "disable_upper_bound": 0.35,
        "activate_lower_bound": 0.6,
        "keep_active_lower_bound": 0.5,
        "wilson_z": 1.96,
        "gate_min_pairs": 20,
        "gate_non_inferiority_margin": 0.05,
        "gate_first_publish_min_lower_bound": 0.8,
        "gate_min_audited_traces": 20,
    }


def test_settings_map_from_a_row_ignoring_other_columns() -> None:
    row = {"twin_id": str(uuid4()), "updated_at": "2025-01-01T00:00:00Z", "half_life_days": 7}
    assert LearningSettings.model_validate(row).half_life_days == 7.0


@pytest.mark.parametrize(
    "overrides",
    [
        {"half_life_days": 0},  # a zero half-life would divide by zero
        {"half_life_days": -1},  # negative half-life makes evidence grow
        {"feedback_weight": -1},  # negative weight turns votes around
        {"unsafe_multiplier": 0.5},  # unsafe must weigh at least as much as any failure
        {"activate_lower_bound": 1.5},  # bounds are probabilities
        {"keep_active_lower_bound": 0.7},  # hysteresis above the activation bound is inverted
        {"gate_min_pairs": 0},  # the gate needs some evidence
        {"gate_non_inferiority_margin": -0.1},  # a negative margin demands superiority
    ],
)
def test_settings_reject_out_of_range_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LearningSettings(**overrides)


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        DEFAULTS.half_life_days = 1  # type: ignore[misc]


# --- decay ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "half_life", "expected"),
    [
        (days(0), 30, 1.0),  # no time passed
        (days(30), 30, 0.5),  # one half-life
        (days(60), 30, 0.25),  # two half-lives
        (days(15), 30, 1 / math.sqrt(2)),  # half a half-life
        (days(7), 7, 0.5),  # another half-life setting
        (timedelta(hours=36), 3, 2**-0.5),  # 1.5 days with H = 3 days
        (days(-5), 30, 1.0),  # `until` before `since` (clock skew): age 0, never growth
    ],
)
def test_decay_factor(age: timedelta, half_life: float, expected: float) -> None:
    assert decay_factor(T0, T0 + age, half_life) == pytest.approx(expected, abs=1e-15)


def test_decay_factor_rejects_a_non_positive_half_life() -> None:
    with pytest.raises(ValueError, match="half_life_days"):
        decay_factor(T0, T0 + days(1), 0)


# --- Beta mean ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("success", "failure", "expected"),
    [
        (0, 0, 0.5),  # the prior alone
        (8, 2, 9 / 12),  # (8+1)/(10+2)
        (1, 0, 2 / 3),  # one success
        (0, 3, 1 / 5),  # three failures
        (0.5, 1.5, 1.5 / 4),  # weighted, decayed counts
    ],
)
def test_beta_mean(success: float, failure: float, expected: float) -> None:
    assert beta_mean(success, failure) == pytest.approx(expected, abs=1e-15)


# --- Wilson bounds --------------------------------------------------------------------------

Z2 = 1.96**2  # 3.8416


@pytest.mark.parametrize(
    ("success", "failure", "expected"),
    [
        # n = 10, p = 0.8: (0.8 + 0.19208 ∓ 1.96·√(0.016 + 0.009604)) / 1.38416
        (
            8,
            2,
            (
                (0.8 + 0.19208 - 1.96 * math.sqrt(0.016 + 0.009604)) / 1.38416,
                (0.8 + 0.19208 + 1.96 * math.sqrt(0.016 + 0.009604)) / 1.38416,
            ),
        ),
        (8, 2, (0.49015684672072346, 0.9433190520193067)),  # the same, as literals
        # p = 1: the radius equals z²/2n, so lower = 1/(1 + z²/n) and upper = 1
        (10, 0, (1 / 1.38416, 1.0)),
        # p = 0: lower = 0, upper = (z²/n)/(1 + z²/n)
        (0, 10, (0.0, 0.38416 / 1.38416)),
        # n = 10, p = 0.5: (0.5 + 0.19208 ∓ 1.96·√(0.025 + 0.009604)) / 1.38416
        (
            5,
            5,
            (
                (0.69208 - 1.96 * math.sqrt(0.034604)) / 1.38416,
                (0.69208 + 1.96 * math.sqrt(0.034604)) / 1.38416,
            ),
        ),
        # real-valued n = 2.5, p = 0.8: z²/2n = 0.76832, z²/n = 1.53664, z²/4n² = 0.153664
        (
            2.0,
            0.5,
            (
                (0.8 + 0.76832 - 1.96 * math.sqrt(0.064 + 0.153664)) / 2.53664,
                (0.8 + 0.76832 + 1.96 * math.sqrt(0.064 + 0.153664)) / 2.53664,
            ),
        ),
        (0, 0, (0.0, 1.0)),  # no evidence: the whole interval
    ],
)
def test_wilson_bounds(success: float, failure: float, expected: tuple[float, float]) -> None:
    lower, upper = wilson_bounds(success, failure, 1.96)
    assert lower == pytest.approx(expected[0], abs=1e-9)
    assert upper == pytest.approx(expected[1], abs=1e-9)
    assert 0.0 <= lower <= upper <= 1.0


def test_wilson_bounds_reject_negative_counts() -> None:
    with pytest.raises(ValueError, match="counts"):
        wilson_bounds(-1, 2, 1.96)


# --- status ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("success", "failure", "previous", "expected"),
    [
        # n = 9 < 10: not enough, however good
        (9, 0, S.insufficient_data, S.insufficient_data),
        # n = 9.99 < 10: insufficient_data comes before disabled
        (0, 9.99, S.probation, S.insufficient_data),
        # n below 10 even for a module that was active
        (9.5, 0, S.active, S.insufficient_data),
        # (0, 10): upper = 0.38416/1.38416 ≈ 0.2775 < 0.35
        (0, 10, S.insufficient_data, S.disabled),
        # disabled wins over hysteresis
        (0, 10, S.active, S.disabled),
        # (1, 9): upper ≈ 0.4042 ≥ 0.35, lower ≈ 0.0179: probation
        (1, 9, S.disabled, S.probation),
        # (10, 0): lower = 1/1.38416 ≈ 0.7225 ≥ 0.6
        (10, 0, S.insufficient_data, S.active),
        # (18, 2): lower ≈ 0.6990 ≥ 0.6
        (18, 2, S.probation, S.active),
        # (9, 1): lower ≈ 0.5958, just under 0.6
        (9, 1, S.insufficient_data, S.probation),
        # (16, 4): lower ≈ 0.5840 — probation does not become active...
        (16, 4, S.probation, S.probation),
        # ...but an active module stays active (hysteresis, ≥ 0.5)
        (16, 4, S.active, S.active),
        # (15, 5): lower ≈ 0.5313 — stays active, is not activated
        (15, 5, S.active, S.active),
        (15, 5, S.probation, S.probation),
        # (8, 2): lower ≈ 0.4902 < 0.5 — an active module drops to probation
        (8, 2, S.active, S.probation),
    ],
)
def test_classify(
    success: float, failure: float, previous: ModuleStatus, expected: ModuleStatus
) -> None:
    assert classify(success, failure, previous, DEFAULTS) is expected


def test_classify_uses_the_twin_settings() -> None:
    strict = LearningSettings(min_evidence=30, keep_active_lower_bound=0.59)
    # (18, 2): n = 20 < 30 under these settings
    assert classify(18, 2, S.active, strict) is S.insufficient_data
    # (30, 10): n = 40, lower ≈ 0.5981 — kept active only if the keep bound is ≤ 0.5981
    assert classify(30, 10, S.active, strict) is S.active
    assert classify(30, 10, S.active, LearningSettings(keep_active_lower_bound=0.6)) is S.probation


# --- event weights --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (feedback(1, T0), (1.0, 0.0)),  # thumbs up
        (feedback(-1, T0, "incorrect"), (0.0, 1.0)),  # thumbs down
        (feedback(-1, T0, "unsafe"), (0.0, 3.0)),  # unsafe failure weighs 3×
        (feedback(1, T0, "unsafe"), (1.0, 0.0)),  # `unsafe` only weighs on failures
        (feedback(0, T0), (0.0, 0.0)),  # neutral: processed, no evidence
        (feedback(0, T0, "unsafe"), (0.0, 0.0)),  # neutral even with an unsafe reason
        (audit(True, T0), (2.0, 0.0)),  # audit weighs 2
        (audit(False, T0, "off_persona"), (0.0, 2.0)),  # failed audit
        (audit(False, T0, "unsafe"), (0.0, 6.0)),  # unsafe audit: 2 × 3
        (feedback(-1, T0 - days(30), "unsafe"), (0.0, 1.5)),  # 3 × 2^-1
        (audit(True, T0 - days(60)), (0.5, 0.0)),  # 2 × 2^-2
        (feedback(1, T0 + days(1)), (1.0, 0.0)),  # cast "after" the run (skew): no growth
    ],
)
def test_event_contribution(event: EvidenceEvent, expected: tuple[float, float]) -> None:
    assert event_contribution(event, T0, DEFAULTS) == pytest.approx(expected, abs=1e-15)


def test_event_contribution_uses_the_twin_weights() -> None:
    settings = LearningSettings(feedback_weight=0.5, audit_weight=4, unsafe_multiplier=10)
    assert event_contribution(feedback(-1, T0, "unsafe"), T0, settings) == (0.0, 5.0)
    assert event_contribution(audit(True, T0), T0, settings) == (4.0, 0.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"source": "user_feedback", "cast_at": T0},  # feedback without a score
        {"source": "user_feedback", "score": 2, "cast_at": T0},  # score outside −1..1
        {"source": "user_feedback", "score": 1, "passed": True, "cast_at": T0},  # mixed
        {"source": "persona_audit", "cast_at": T0},  # audit without passed
        {"source": "persona_audit", "passed": True, "score": 1, "cast_at": T0},  # mixed
        {"source": "user_feedback", "score": 1, "cast_at": datetime(2025, 1, 1)},  # naive time
        {"source": "webhook", "score": 1, "cast_at": T0},  # unknown source
    ],
)
def test_evidence_event_rejects_inconsistent_fields(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EvidenceEvent.model_validate(fields)


def test_evidence_from_scratch_sums_decayed_contributions() -> None:
    events = [
        feedback(1, T0),  # (1, 0)
        feedback(-1, T0 - days(30)),  # (0, 0.5)
        feedback(0, T0),  # (0, 0)
        audit(True, T0 - days(30)),  # (1, 0)
        audit(False, T0 - days(60), "unsafe"),  # (0, 6 × 0.25)
    ]
    assert evidence_from_scratch(events, T0, DEFAULTS) == pytest.approx((2.0, 2.0), abs=1e-15)
    assert evidence_from_scratch([], T0, DEFAULTS) == (0.0, 0.0)


# --- learn() --------------------------------------------------------------------------------


def test_learn_decays_old_counts_and_adds_new_evidence() -> None:
    m = module(success=8, failure=4, evidence_at=T0, confidence=9 / 14, status=S.insufficient_data)
    at = T0 + days(30)  # one half-life: (8, 4) → (4, 2)
    (update,) = learn(
        [m],
        {m.module_id: ModuleEvidence(module_id=m.module_id, success=2, failure=0)},
        at,
        DEFAULTS,
    )
    assert (update.success, update.failure) == pytest.approx((6.0, 2.0), abs=1e-12)
    assert update.confidence == pytest.approx(7 / 10, abs=1e-12)  # (6+1)/(8+2)
    assert update.status is S.insufficient_data  # n = 8 < 10
    assert update.evidence_at == at
    assert (update.confidence_before, update.status_before) == (9 / 14, S.insufficient_data)
    assert update.changed
    assert (update.module_id, update.module_key) == (m.module_id, m.module_key)


def test_learn_takes_a_never_learned_module_as_zero_counts() -> None:
    m = module(evidence_at=None)
    at = T0 + days(400)
    evidence = {m.module_id: ModuleEvidence(module_id=m.module_id, success=12, failure=0)}
    (update,) = learn([m], evidence, at, DEFAULTS)
    assert (update.success, update.failure) == (12.0, 0.0)  # nothing to decay
    assert update.confidence == pytest.approx(13 / 14, abs=1e-15)
    assert update.status is S.active  # n = 12, p = 1: lower = 1/(1 + 3.8416/12) ≈ 0.7575
    assert update.evidence_at == at


def test_learn_decays_modules_without_new_evidence() -> None:
    m = module(success=20, failure=0, evidence_at=T0, confidence=21 / 22, status=S.active)
    (update,) = learn([m], {}, T0 + days(30), DEFAULTS)
    assert (update.success, update.failure) == pytest.approx((10.0, 0.0), abs=1e-12)
    # confidence moves toward 0.5 with decay alone: (10+1)/(10+2)
    assert update.confidence == pytest.approx(11 / 12, abs=1e-12)
    assert update.status is S.active  # (10, 0): lower ≈ 0.7225
    assert update.changed


def test_learn_treats_a_run_time_before_evidence_at_as_no_decay() -> None:
    m = module(success=6, failure=2, evidence_at=T0, confidence=7 / 10)
    (update,) = learn([m], {}, T0 - days(1), DEFAULTS)
    assert (update.success, update.failure) == (6.0, 2.0)


@pytest.mark.parametrize(
    ("state", "changed"),
    [
        # never learned, no evidence: stays (0, 0) → 0.5, insufficient_data
        ({"confidence": 0.5, "status": S.insufficient_data}, False),
        # stored confidence differs only by float noise (≤ 1e-12)
        ({"confidence": 0.5 + 1e-13, "status": S.insufficient_data}, False),
        # a real confidence difference
        ({"confidence": 0.5 + 1e-6, "status": S.insufficient_data}, True),
        # a status-only change: (0, 0) is insufficient_data, not probation
        ({"confidence": 0.5, "status": S.probation}, True),
    ],
)
def test_learn_changed_flag(state: dict[str, object], changed: bool) -> None:
    m = module(**state)  # type: ignore[arg-type]
    (update,) = learn([m], {}, T0, DEFAULTS)
    assert update.changed is changed


def test_learn_flags_a_status_change_at_unchanged_confidence() -> None:
    # (16, 4) at its own time: no decay, confidence 17/22 stays; the stricter keep bound (0.59 >
    # lower ≈ 0.5840) turns the active module into probation.
    m = module(success=16, failure=4, evidence_at=T0, confidence=17 / 22, status=S.active)
    (update,) = learn([m], {}, T0, LearningSettings(keep_active_lower_bound=0.59))
    assert update.confidence == pytest.approx(17 / 22, abs=1e-15)
    assert (update.status_before, update.status) == (S.active, S.probation)
    assert update.changed


def test_learn_counts_modules_updated_over_several_modules() -> None:
    unchanged = module(key="unchanged")  # (0, 0), 0.5, insufficient_data: no change
    decaying = module(key="decaying", success=4, evidence_at=T0, confidence=5 / 6)
    fed = module(key="fed")
    evidence = {fed.module_id: ModuleEvidence(module_id=fed.module_id, success=0, failure=1)}
    updates = learn([unchanged, decaying, fed], evidence, T0 + days(30), DEFAULTS)
    assert [u.module_key for u in updates] == ["unchanged", "decaying", "fed"]  # every module
    assert [u.changed for u in updates] == [False, True, True]
    assert sum(u.changed for u in updates) == 2  # the run's modules_updated
    assert updates[1].confidence == pytest.approx(3 / 4, abs=1e-12)  # (2+1)/(2+2)
    assert updates[2].confidence == pytest.approx(1 / 3, abs=1e-15)  # (0+1)/(1+2)


@pytest.mark.parametrize(
    ("stored", "delta", "expected"),
    [
        (0.1 + 0.2, -0.3, 0.0),  # 5.6e-17 left by float noise → exactly 0
        (0.3, -(0.1 + 0.2), 0.0),  # −5.6e-17 → exactly 0, never negative
        (1.0, -1.5, 0.0),  # an over-retraction clamps to 0
        (1.0, -0.5, 0.5),  # a real remainder is kept
    ],
)
def test_learn_clamps_counts_at_zero(stored: float, delta: float, expected: float) -> None:
    m = module(success=stored, failure=stored, evidence_at=T0)
    evidence = {m.module_id: ModuleEvidence(module_id=m.module_id, success=delta, failure=delta)}
    (update,) = learn([m], evidence, T0, DEFAULTS)
    assert update.success == expected
    assert update.failure == expected


def test_learn_rejects_evidence_for_an_unknown_module() -> None:
    m = module()
    stray = uuid4()
    with pytest.raises(ValueError, match="unknown modules"):
        learn([m], {stray: ModuleEvidence(module_id=stray, success=1, failure=0)}, T0, DEFAULTS)


def test_learn_rejects_duplicate_modules() -> None:
    m = module()
    with pytest.raises(ValueError, match="duplicate"):
        learn([m, m], {}, T0, DEFAULTS)


def test_learn_of_no_modules_is_empty() -> None:
    assert learn([], {}, T0, DEFAULTS) == ()


# --- incremental learning equals recomputation from scratch ------------------------------------


def run_evidence(
    module_id: UUID,
    added: list[EvidenceEvent],
    retracted: list[EvidenceEvent],
    at: datetime,
    settings: LearningSettings,
) -> ModuleEvidence:
    """What a run hands to learn(): new events added, changed votes' old contributions removed."""
    add_s, add_f = evidence_from_scratch(added, at, settings)
    sub_s, sub_f = evidence_from_scratch(retracted, at, settings)
    return ModuleEvidence(module_id=module_id, success=add_s - sub_s, failure=add_f - sub_f)


def test_retracting_a_changed_vote_equals_recomputation() -> None:
    m = module(evidence_at=None)
    t1, run1, t2, run2 = T0, T0 + days(3), T0 + days(20), T0 + days(41)
    old_vote = feedback(-1, t1, "unsafe")  # counted as (0, 3) at t1
    kept = [audit(True, T0 - days(10)), feedback(1, t1 + days(1))]

    (first,) = learn(
        [m],
        {m.module_id: run_evidence(m.module_id, [old_vote, *kept], [], run1, DEFAULTS)},
        run1,
        DEFAULTS,
    )
    stored = m.model_copy(
        update={
            "success": first.success,
            "failure": first.failure,
            "evidence_at": first.evidence_at,
            "confidence": first.confidence,
            "status": first.status,
        }
    )

    new_vote = feedback(1, t2, "helpful")  # the same user changes the vote at t2
    evidence = run_evidence(m.module_id, [new_vote], [old_vote], run2, DEFAULTS)
    (second,) = learn([stored], {m.module_id: evidence}, run2, DEFAULTS)

    # Hand-computed at run2 (H = 30): audit 2·2^(−51/30), kept vote 2^(−40/30), new vote
    # 2^(−21/30); the old unsafe vote is gone entirely.
    expected_s = 2 * 2 ** (-51 / 30) + 2 ** (-40 / 30) + 2 ** (-21 / 30)
    assert second.success == pytest.approx(expected_s, abs=1e-9)
    assert second.failure == pytest.approx(0.0, abs=1e-9)
    oracle = evidence_from_scratch([*kept, new_vote], run2, DEFAULTS)
    assert (second.success, second.failure) == pytest.approx(oracle, abs=1e-9)
    assert second.confidence == pytest.approx(beta_mean(*oracle), abs=1e-9)


def test_incremental_learning_matches_recomputation_over_many_runs() -> None:
    """Random votes, vote changes and audits over 30 runs: counts always equal the oracle."""
    rng = random.Random(20250101)
    settings = LearningSettings(half_life_days=9)
    m = module(evidence_at=None)
    state = m
    votes: dict[int, EvidenceEvent] = {}  # current vote per user
    audits: list[EvidenceEvent] = []
    now = T0
    for _ in range(30):
        now += timedelta(hours=rng.uniform(1, 240))
        added: list[EvidenceEvent] = []
        retracted: list[EvidenceEvent] = []
        for _ in range(rng.randint(0, 8)):
            cast_at = now - timedelta(hours=rng.uniform(0, 1))
            if rng.random() < 0.3:
                event = audit(rng.random() < 0.6, cast_at, rng.choice([None, "unsafe"]))
                audits.append(event)
            else:
                user = rng.randint(0, 12)
                event = feedback(rng.choice([-1, 0, 1]), cast_at, rng.choice([None, "unsafe"]))
                if user in votes:
                    retracted.append(votes[user])
                votes[user] = event
            added.append(event)
        evidence = run_evidence(m.module_id, added, retracted, now, settings)
        (update,) = learn([state], {m.module_id: evidence}, now, settings)
        oracle = evidence_from_scratch([*votes.values(), *audits], now, settings)
        assert (update.success, update.failure) == pytest.approx(oracle, abs=1e-9)
        state = state.model_copy(
            update={
                "success": update.success,
                "failure": update.failure,
                "evidence_at": update.evidence_at,
                "confidence": update.confidence,
                "status": update.status,
            }
        )
