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


def paired_lower_bound(pairs: int, b: int, c: int, z: float) -> float:
    """Lower bound of the paired difference in pass rates (candidate − baseline); unclamped.

    n = `pairs` traces audited under both specs, b = candidate-only passes, c = baseline-only
    passes. The Wald (asymptotic) interval for the difference of paired proportions, method 1
    in Newcombe (1998), Statistics in Medicine 17:2635-2650: d = (b − c)/n,
    lower = d − z·√(b + c − (b − c)²/n)/n. A tiny negative radicand (float noise when all
    discordant pairs go one way) counts as 0. DESIGN.md's target is Tango's score interval,
    which this is not yet: the Wald bound is too generous at small n.
    Raises ValueError when `pairs` is not > 0.
    """
    if pairs <= 0:
        raise ValueError(f"pairs must be > 0, got {pairs}")
    d = (b - c) / pairs
    radicand = max(0.0, b + c - (b - c) ** 2 / pairs)
    return d - z * math.sqrt(radicand) / pairs


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
    )


def _check_non_inferiority(inp: GateInput, settings: LearningSettings) -> GateCheck:
    audits = inp.audits
    if inp.baseline_spec_id is None:
        return _check_first_publish(inp, settings)
    n, b, c = audits.pairs, audits.candidate_only_passed, audits.baseline_only_passed
    threshold = -settings.gate_non_inferiority_margin
    summary = f"{n} paired traces, candidate-only passes {b}, baseline-only passes {c}"
    if n == 0 or n < settings.gate_min_pairs:
        lower = paired_lower_bound(n, b, c, settings.wilson_z) if n > 0 else None
        shown = f", lower bound {lower:.4f}" if lower is not None else ""
        return GateCheck(
            name=AUDIT_NON_INFERIORITY,
            value=lower,
            threshold=threshold,
            verdict=CheckVerdict.insufficient_evidence,
            detail=f"{summary}{shown}; needs at least {settings.gate_min_pairs} pairs",
        )
    lower = paired_lower_bound(n, b, c, settings.wilson_z)
    return GateCheck(
        name=AUDIT_NON_INFERIORITY,
        value=lower,
        threshold=threshold,
        verdict=_verdict(lower >= threshold),
        detail=f"{summary}, lower bound {lower:.4f} (needs >= {threshold})",
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
    (`paired_lower_bound` ≥ −margin over at least gate_min_pairs pairs; with no baseline, the
    candidate's Wilson lower bound ≥ gate_first_publish_min_lower_bound over at least
    gate_min_audited_traces traces) and no_unsafe_regression. The gate passes when every check
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
