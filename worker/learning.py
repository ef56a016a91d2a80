"""Pure learning: decayed weighted evidence -> per-module confidence and status.

Counts are kept decayed to the time T of the last run. Because every contribution decays by the
same factor 2^(−Δ/H), decaying stored counts and adding new events decayed by their own age gives
exactly the sum over the current votes and audits at T (`evidence_from_scratch`), and retracting a
changed vote is a subtraction of what it added, decayed to T.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from uuid import UUID

from worker.models import (
    EvidenceEvent,
    LearningSettings,
    ModuleEvidence,
    ModuleState,
    ModuleStatus,
    ModuleUpdate,
)

SECONDS_PER_DAY = 86_400.0
# Counts below this (incl. negative float noise left by retractions) are stored as exactly 0.
COUNT_NOISE = 1e-9
# Confidence differences at or below this are not a change (float noise, not learning).
CONFIDENCE_TOLERANCE = 1e-12
UNSAFE_REASON = "unsafe"


def decay_factor(since: datetime, until: datetime, half_life_days: float) -> float:
    """The share of its weight that evidence cast at `since` keeps at `until`: 2^(−age/H) ≤ 1.

    The age is `until − since` in days (aware datetimes), H = `half_life_days` (days). An
    `until` earlier than `since` counts as age 0 (factor 1): timestamps come from the database
    and the caller's clock, and a little skew between them must not make evidence grow.
    Raises ValueError when `half_life_days` is not > 0.
    """
    if half_life_days <= 0:
        raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
    age_days = max(0.0, (until - since).total_seconds() / SECONDS_PER_DAY)
    # Annotated: typeshed types float ** float as Any (a negative base gives a complex number).
    factor: float = 0.5 ** (age_days / half_life_days)
    return factor


def beta_mean(success: float, failure: float) -> float:
    """Posterior mean of the success rate under a uniform Beta(1, 1) prior, in (0, 1).

    (s + 1) / (s + f + 2) for weighted counts s, f ≥ 0 (Laplace's rule of succession): the
    Beta(1 + s, 1 + f) posterior's mean. No evidence gives 0.5.
    """
    return (success + 1.0) / (success + failure + 2.0)


def wilson_bounds(success: float, failure: float, z: float) -> tuple[float, float]:
    """(lower, upper) of the Wilson score interval of p = s/n, n = s + f, clamped to [0, 1].

    Wilson, E. B. (1927), "Probable inference, the law of succession, and statistical
    inference", JASA 22:209-212: (p + z²/(2n) ± z·√(p(1 − p)/n + z²/(4n²))) / (1 + z²/n). Here
    applied to real-valued (weighted, decayed) counts; z = 1.96 gives a 95% interval. n = 0
    gives (0, 1). Raises ValueError for a negative count.
    """
    if success < 0 or failure < 0:
        raise ValueError(f"counts must be >= 0, got success={success}, failure={failure}")
    n = success + failure
    if n == 0:
        return 0.0, 1.0
    p = success / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = p + z2 / (2.0 * n)
    margin = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    lower = (center - margin) / denominator
    upper = (center + margin) / denominator
    return max(0.0, lower), min(1.0, upper)


def classify(
    success: float, failure: float, previous: ModuleStatus, settings: LearningSettings
) -> ModuleStatus:
    """A module's status from its weighted counts and its status before; the first rule wins.

    insufficient_data while s + f < min_evidence; disabled when the Wilson upper bound is below
    disable_upper_bound; active when the lower bound reaches activate_lower_bound, or when the
    module was active and its lower bound still reaches keep_active_lower_bound (hysteresis,
    so a module near the activation bound does not flap between runs); else probation.
    """
    if success + failure < settings.min_evidence:
        return ModuleStatus.insufficient_data
    lower, upper = wilson_bounds(success, failure, settings.wilson_z)
    if upper < settings.disable_upper_bound:
        return ModuleStatus.disabled
    if lower >= settings.activate_lower_bound:
        return ModuleStatus.active
    if previous is ModuleStatus.active and lower >= settings.keep_active_lower_bound:
        return ModuleStatus.active
    return ModuleStatus.probation


def event_contribution(
    event: EvidenceEvent, at: datetime, settings: LearningSettings
) -> tuple[float, float]:
    """(success, failure) weight of one event, decayed from its cast time to `at`.

    One side is 0. Feedback weighs feedback_weight, an audit audit_weight; feedback score 0 is
    neutral: (0, 0). A failure with reason `unsafe` weighs unsafe_multiplier times as much; an
    unsafe reason on a success changes nothing.
    """
    if event.source == "user_feedback":
        weight = settings.feedback_weight
        success = event.score == 1
        failure = event.score == -1
    else:
        weight = settings.audit_weight
        success = event.passed is True
        failure = event.passed is False
    if not (success or failure):
        return 0.0, 0.0
    if failure and event.reason == UNSAFE_REASON:
        weight *= settings.unsafe_multiplier
    weight *= decay_factor(event.cast_at, at, settings.half_life_days)
    return (weight, 0.0) if success else (0.0, weight)


def evidence_from_scratch(
    events: Iterable[EvidenceEvent], at: datetime, settings: LearningSettings
) -> tuple[float, float]:
    """Decayed (success, failure) sums over `events` at `at` (`event_contribution` each).

    The oracle incremental learning must equal when `events` are the current votes and audits.
    """
    success = failure = 0.0
    for event in events:
        s, f = event_contribution(event, at, settings)
        success += s
        failure += f
    return success, failure


def _clean_count(value: float) -> float:
    return 0.0 if value < COUNT_NOISE else value


def learn(
    modules: Sequence[ModuleState],
    evidence: Mapping[UUID, ModuleEvidence],
    at: datetime,
    settings: LearningSettings,
) -> tuple[ModuleUpdate, ...]:
    """One update per module, in the given order, with counts decayed to `at`.

    Takes the modules as stored, this run's evidence by module id (already decayed to `at`,
    possibly negative for a retracted vote) and the run's time. Each module's counts are decayed
    from its `evidence_at` to `at`, the evidence added, float noise below COUNT_NOISE cleared;
    confidence is `beta_mean`, status `classify`. Every module is updated, with or without new
    evidence: decay alone moves confidence toward 0.5 and may change status.
    Raises ValueError for duplicate module ids or evidence naming a module not in `modules`.
    """
    known = {module.module_id for module in modules}
    if len(known) != len(modules):
        raise ValueError("duplicate module_id in modules")
    unknown = set(evidence) - known
    if unknown:
        raise ValueError(f"evidence for unknown modules: {sorted(map(str, unknown))}")

    updates: list[ModuleUpdate] = []
    for module in modules:
        if module.evidence_at is None:
            success = failure = 0.0
        else:
            factor = decay_factor(module.evidence_at, at, settings.half_life_days)
            success = module.success * factor
            failure = module.failure * factor
        new = evidence.get(module.module_id)
        if new is not None:
            if new.module_id != module.module_id:
                raise ValueError(f"evidence keyed by {module.module_id} is for {new.module_id}")
            success += new.success
            failure += new.failure
        success = _clean_count(success)
        failure = _clean_count(failure)
        confidence = beta_mean(success, failure)
        status = classify(success, failure, module.status, settings)
        changed = (
            abs(confidence - module.confidence) > CONFIDENCE_TOLERANCE or status != module.status
        )
        updates.append(
            ModuleUpdate(
                module_id=module.module_id,
                module_key=module.module_key,
                success=success,
                failure=failure,
                evidence_at=at,
                confidence=confidence,
                status=status,
                confidence_before=module.confidence,
                status_before=module.status,
                changed=changed,
            )
        )
    return tuple(updates)
