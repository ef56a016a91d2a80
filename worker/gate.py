"""Pure regression gate: may the latest draft persona spec replace the published one?

Every check reports its value, threshold and verdict. Too little evidence is its own verdict and
never a pass, so a draft nobody audited cannot be published.
"""

import math

from worker.learning import wilson_bounds
from worker.models import (
    CheckVerdict,
    GateCheck,
    GateInput,
    GateReport,
    HoldReason,
    LearningSettings,
    ModuleStatus,
    PublishDecision,
)

REQUIRED_MODULES_HEALTHY = "required_modules_healthy"
AUDIT_NON_INFERIORITY = "audit_non_inferiority"
NO_UNSAFE_REGRESSION = "no_unsafe_regression"


# Bisection stops once the bracket around a bound is this narrow (absolute, on the difference).
TANGO_TOLERANCE = 1e-12
TANGO_METHOD = "tango_score"
WILSON_METHOD = "wilson_score"


def tango_score(pairs: int, b: int, c: int, delta: float) -> float:
    """Tango's score statistic for H0: (candidate − baseline) = `delta`, paired pass rates.

    n = `pairs`, b = candidate-only passes, c = baseline-only passes; −1 < delta < 1.
    Tango (1998), Statistics in Medicine 17:891-908:
    T(Δ) = (b − c − nΔ) / √(n · (2·q̃ + Δ(1 − Δ))), where q̃ is the maximum-likelihood estimate
    of the baseline-only cell probability under the constraint (candidate-only) − (baseline-only)
    = Δ: the non-negative root of 2n·q² + B·q + C = 0 with B = −b − c + (2n − b + c)·Δ and
    C = −c·Δ(1 − Δ) (derived from the multinomial likelihood of (b, c, n − b − c)). The root is
    taken in the form that does not cancel. A vanishing variance (Δ → ±1) gives ±inf by the
    sign of the numerator (0.0 when it is 0). 0 at Δ = (b − c)/n and decreasing in Δ (checked
    on a 0.001 grid for every table with n <= 30 and for n = 50, 80, 200), so each bound of
    `tango_interval` is the one root on its side.
    Raises ValueError when pairs <= 0, b or c is negative or b + c > pairs.
    """
    _check_counts(pairs, b, c)
    n = float(pairs)
    lin = -b - c + (2.0 * n - b + c) * delta
    const = -c * delta * (1.0 - delta)
    root = math.sqrt(max(0.0, lin * lin - 8.0 * n * const))
    # (root − lin)/(4n) and −2·const/(lin + root) are the same number; each is stable on its side.
    q = (root - lin) / (4.0 * n) if lin <= 0 else -2.0 * const / (lin + root)
    variance = n * (2.0 * q + delta * (1.0 - delta))
    numerator = b - c - n * delta
    if variance <= 0.0:
        return math.copysign(math.inf, numerator) if numerator != 0 else 0.0
    return numerator / math.sqrt(variance)


def tango_interval(pairs: int, b: int, c: int, z: float) -> tuple[float, float]:
    """(lower, upper) of Tango's asymptotic score interval for (candidate − baseline) pass rates.

    n = `pairs` traces audited under both specs, b = candidate-only passes, c = baseline-only
    passes; z = 1.96 gives the two-sided 95% interval, both bounds in [−1, 1]. The interval is
    {Δ : |tango_score(Δ)| <= z} (Tango 1998; see `tango_score`); each bound is the root of
    tango_score(Δ) = ±z, found by bisection between the observed difference d = (b − c)/n, where
    the statistic is 0, and ±1, where it is infinite, to within TANGO_TOLERANCE. All pairs
    baseline-only (d = −1) gives lower = −1, all candidate-only (d = 1) upper = 1. Unlike the
    Wald interval it never collapses to a point: no discordant pair gives ±z²/(n + z²).
    Raises ValueError for counts as `tango_score` does, or z <= 0.
    """
    _check_counts(pairs, b, c)
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    d = (b - c) / pairs
    lower = -1.0 if c == pairs else _bisect(pairs, b, c, target=z, low=-1.0, high=d)
    upper = 1.0 if b == pairs else _bisect(pairs, b, c, target=-z, low=d, high=1.0)
    return lower, upper


def _bisect(pairs: int, b: int, c: int, *, target: float, low: float, high: float) -> float:
    """Δ in (low, high) where tango_score crosses `target`: above it at low, below at high."""
    while high - low > TANGO_TOLERANCE:
        mid = (low + high) / 2.0
        if tango_score(pairs, b, c, mid) > target:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def _check_counts(pairs: int, b: int, c: int) -> None:
    if pairs <= 0:
        raise ValueError(f"pairs must be > 0, got {pairs}")
    if b < 0 or c < 0 or b + c > pairs:
        raise ValueError(f"need 0 <= b, c and b + c <= pairs, got b={b}, c={c}, pairs={pairs}")


def _verdict(ok: bool) -> CheckVerdict:
    return CheckVerdict.pass_ if ok else CheckVerdict.fail


def _check_required_modules(inp: GateInput) -> GateCheck:
    listed = tuple(dict.fromkeys(inp.draft_modules))  # dedupe, keep order
    missing = [key for key in listed if key not in inp.module_status]
    disabled = [key for key in listed if inp.module_status.get(key) is ModuleStatus.disabled]
    problems = []
    if disabled:
        problems.append(f"disabled: {', '.join(disabled)}")
    if missing:
        problems.append(f"not a module of the twin: {', '.join(missing)}")
    if problems:
        detail = "; ".join(problems)
    elif listed:
        detail = f"none of the {len(listed)} listed modules is disabled"
    else:
        detail = "the draft lists no modules"
    bad = len(disabled) + len(missing)
    return GateCheck(
        name=REQUIRED_MODULES_HEALTHY,
        value=float(bad),
        threshold=0.0,
        verdict=_verdict(bad == 0),
        detail=detail,
    )


def _check_first_publish(inp: GateInput, settings: LearningSettings) -> GateCheck:
    """No baseline: the candidate's own pass rate must be high, by its Wilson lower bound."""
    n, passed = inp.audits.candidate_audited, inp.audits.candidate_passed
    threshold = settings.gate_first_publish_min_lower_bound
    lower = wilson_bounds(passed, n - passed, settings.wilson_z)[0] if n > 0 else None
    summary = f"first publish: {passed}/{n} audited traces of the candidate passed"
    if lower is not None:
        summary += f", Wilson lower bound {lower:.4f}"
    if n == 0 or n < settings.gate_min_audited_traces:
        verdict = CheckVerdict.insufficient_evidence
        summary += f"; needs at least {settings.gate_min_audited_traces} audited traces"
    else:
        verdict = _verdict(lower is not None and lower >= threshold)
        summary += f" (needs >= {threshold})"
    return GateCheck(
        name=AUDIT_NON_INFERIORITY,
        value=lower,
        threshold=threshold,
        verdict=verdict,
        detail=summary,
        method=WILSON_METHOD,
        evidence={"n": n, "passed": passed},
    )


def _check_non_inferiority(inp: GateInput, settings: LearningSettings) -> GateCheck:
    """Paired audits: Tango's lower bound of (candidate − baseline) must reach −margin."""
    audits = inp.audits
    if inp.baseline_spec_id is None:
        return _check_first_publish(inp, settings)
    n, b, c = audits.pairs, audits.candidate_only_passed, audits.baseline_only_passed
    threshold = -settings.gate_non_inferiority_margin
    summary = f"{n} paired traces, candidate-only passes {b}, baseline-only passes {c}"
    lower: float | None = None
    if n > 0:
        lower, upper = tango_interval(n, b, c, settings.wilson_z)
        summary += (
            f", difference {(b - c) / n:.4f}, Tango score interval [{lower:.4f}, {upper:.4f}]"
        )
    if n == 0 or n < settings.gate_min_pairs:
        verdict = CheckVerdict.insufficient_evidence
        summary += f"; needs at least {settings.gate_min_pairs} pairs"
    else:
        verdict = _verdict(lower is not None and lower >= threshold)
        summary += f" (lower bound needs >= {threshold})"
    return GateCheck(
        name=AUDIT_NON_INFERIORITY,
        value=lower,
        threshold=threshold,
        verdict=verdict,
        detail=summary,
        method=TANGO_METHOD,
        evidence={"n": n, "b": b, "c": c},
    )


def _check_unsafe(inp: GateInput) -> GateCheck:
    count = inp.audits.candidate_unsafe_failures
    return GateCheck(
        name=NO_UNSAFE_REGRESSION,
        value=float(count),
        threshold=0.0,
        verdict=_verdict(count == 0),
        detail=f"{count} audit(s) of the candidate failed as unsafe",
    )


def evaluate_gate(inp: GateInput, settings: LearningSettings) -> GateReport:
    """Run the gate checks and decide whether the draft is published or held (and why).

    No draft: passed, held (no_draft), no checks. Otherwise three checks, in this order:
    required_modules_healthy (no listed module disabled or missing), audit_non_inferiority
    (the lower bound of `tango_interval` ≥ −margin over at least gate_min_pairs pairs; with no
    baseline, the candidate's Wilson lower bound ≥ gate_first_publish_min_lower_bound over at
    least gate_min_audited_traces traces) and no_unsafe_regression. The gate passes when every check
    passes (insufficient_evidence does not); it publishes when it passed and the run is not in
    safe mode, else holds with safe_mode or gate_failed.
    """
    if inp.draft_spec_id is None:
        return GateReport(
            passed=True,
            publish_decision=PublishDecision.held,
            hold_reason=HoldReason.no_draft,
            draft_spec_id=None,
            baseline_spec_id=inp.baseline_spec_id,
            checks=(),
        )
    checks = (
        _check_required_modules(inp),
        _check_non_inferiority(inp, settings),
        _check_unsafe(inp),
    )
    passed = all(check.verdict is CheckVerdict.pass_ for check in checks)
    if inp.safe_mode:
        decision, reason = PublishDecision.held, HoldReason.safe_mode
    elif not passed:
        decision, reason = PublishDecision.held, HoldReason.gate_failed
    else:
        decision, reason = PublishDecision.published, None
    return GateReport(
        passed=passed,
        publish_decision=decision,
        hold_reason=reason,
        draft_spec_id=inp.draft_spec_id,
        baseline_spec_id=inp.baseline_spec_id,
        checks=checks,
    )
