"""Pure: a module's move in one run, told in sentences an owner understands.

In: the module's change (`TrendPoint`: confidence and status before and after, its weighted
counts after), what the run learned from for that module (`RunEvidence` rows) and the twin's
`LearningSettings` (the status thresholds). Out: text. No I/O.

The thresholds are the status rules of worker/learning.py `classify` on the Wilson score bounds
(Wilson 1927) of the module's weighted counts, read back from the counts after the run:
insufficient_data while s + f < min_evidence, disabled when the upper bound < disable_upper_bound,
active when the lower bound >= activate_lower_bound (or, once active, >= keep_active_lower_bound),
probation otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from worker.learning import wilson_bounds
from worker.models import LearningSettings, ModuleStatus
from worker.views import RunEvidence, TrendPoint
from worker.watch import STANDARDIZED_METHOD

STANDARDIZED_METHODS = (
    STANDARDIZED_METHOD, "newcombe_standardized_effective_n", "newcombe_mover_standardized")
"""`method` of a twin-wide comparison over several modules: now (the wider of the effective-size
and the combined modules' intervals), and in reports written before, with the effective-size
interval alone, and before that the modules' intervals combined alone."""

STATUS_WORDS = {
    ModuleStatus.insufficient_data: "insufficient data",
    ModuleStatus.probation: "probation",
    ModuleStatus.active: "active",
    ModuleStatus.disabled: "disabled",
}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe_evidence(evidence: Iterable[RunEvidence]) -> str:
    """What a run learned from for one module, e.g. "12 new votes down (7 incorrect, 5
    outdated), 3 up and 2 failed audits (1 of the votes changed an earlier one)"; "no new
    evidence" when there is none."""
    down: Counter[str] = Counter()
    up = neutral = passed = failed = changed = 0
    failed_reasons: Counter[str] = Counter()
    for e in evidence:
        changed += e.vote_changes
        if e.source == "user_feedback":
            if e.outcome == "failure":
                down[e.reason or "no reason"] += e.events
            elif e.outcome == "success":
                up += e.events
            else:
                neutral += e.events
        elif e.outcome == "failure":
            failed += e.events
            failed_reasons[e.reason or "no reason"] += e.events
        else:
            passed += e.events
    parts: list[str] = []
    n_down = sum(down.values())
    if n_down:
        ranked = sorted(down.items(), key=lambda x: (-x[1], x[0]))
        reasons = ", ".join(f"{n} {r}" for r, n in ranked)
        parts.append(f"{_plural(n_down, 'vote')} down ({reasons})")
    if up:
        parts.append(f"{up} up" if parts else f"{_plural(up, 'vote')} up")
    if neutral:
        parts.append(f"{neutral} neutral")
    if failed:
        unsafe = failed_reasons.get("unsafe", 0)
        parts.append(_plural(failed, "failed audit") + (f" ({unsafe} unsafe)" if unsafe else ""))
    if passed:
        parts.append(_plural(passed, "passed audit"))
    if not parts:
        return "no new evidence"
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if changed:
        text += f" ({changed} of the votes changed an earlier one)"
    return "new evidence: " + text


def threshold_crossed(change: TrendPoint, settings: LearningSettings) -> str:
    """Which status rule the module's counts after the run met, as a clause naming the value
    and the threshold, e.g. "its cautious score (Wilson lower bound) 0.46 fell below 0.50, the
    level an active module must keep"."""
    s, f = change.success_weight, change.failure_weight
    n = s + f
    lower, upper = wilson_bounds(s, f, settings.wilson_z)
    before, after = change.status_before, change.status
    if after is ModuleStatus.insufficient_data:
        if before is ModuleStatus.insufficient_data:
            return (f"its evidence weight {n:.1f} is still below {settings.min_evidence:g}, "
                    "the minimum for a status")
        return (f"its evidence weight {n:.1f} fell below {settings.min_evidence:g}, the minimum "
                "for a status, as older evidence faded")
    if after is ModuleStatus.disabled:
        verb = "is still below" if before is ModuleStatus.disabled else "fell below"
        return (f"its optimistic score (Wilson upper bound) {upper:.2f} {verb} "
                f"{settings.disable_upper_bound:.2f}, under which a module is disabled")
    if after is ModuleStatus.active:
        if before is ModuleStatus.active:
            return (f"it stays active: its cautious score (Wilson lower bound) {lower:.2f} is at "
                    f"least {settings.keep_active_lower_bound:.2f}, the level an active module "
                    "must keep")
        return (f"its cautious score (Wilson lower bound) {lower:.2f} reached "
                f"{settings.activate_lower_bound:.2f}, the level to become active")
    # probation
    if before is ModuleStatus.active:
        return (f"its cautious score (Wilson lower bound) {lower:.2f} fell below "
                f"{settings.keep_active_lower_bound:.2f}, the level an active module must keep")
    if before is ModuleStatus.disabled:
        return (f"its optimistic score (Wilson upper bound) {upper:.2f} rose to at least "
                f"{settings.disable_upper_bound:.2f}, so it is no longer disabled")
    if before is ModuleStatus.insufficient_data:
        return (f"its evidence weight reached {n:.1f} (minimum {settings.min_evidence:g}); its "
                f"cautious score (Wilson lower bound) {lower:.2f} is below "
                f"{settings.activate_lower_bound:.2f}, the level to become active")
    return (f"no threshold crossed: its cautious score (Wilson lower bound) {lower:.2f} is below "
            f"{settings.activate_lower_bound:.2f}, the level to become active, and its "
            f"optimistic score {upper:.2f} is at least {settings.disable_upper_bound:.2f}")


def explain_move(
    change: TrendPoint, evidence: Iterable[RunEvidence], settings: LearningSettings,
    *, recounted: bool = False,
) -> str:
    """One module's move in one run, e.g. "evidence_answers fell from active to probation,
    confidence 0.71 -> 0.58 (-0.13), after new evidence: 12 votes down (7 incorrect, 5
    outdated) and 3 up; its cautious score (Wilson lower bound) 0.46 fell below 0.50, the level
    an active module must keep." `evidence`: the run's rows for this module (others ignored).
    `recounted`: the run recounted the modules from the evidence that exists (the run's
    `rebuilt_modules`: evidence was deleted or edited since), which the sentence then says.
    Without new evidence and without a recount the move is put down to older evidence fading
    (half-life from `settings`)."""
    mine = [e for e in evidence if e.module_id == change.module_id and e.run_id == change.run_id]
    delta = change.confidence - change.confidence_before
    d = 2 if abs(delta) >= 0.01 else 3  # a small move still shows two different numbers
    before, after = f"{change.confidence_before:.{d}f}", f"{change.confidence:.{d}f}"
    direction = "rose" if delta > 0 else "fell" if delta < 0 else "held"
    if change.status != change.status_before:
        way = "rose" if _rank(change.status) > _rank(change.status_before) else "fell"
        moved = (f"{change.module_key} {way} from {STATUS_WORDS[change.status_before]} to "
                 f"{STATUS_WORDS[change.status]}, "
                 f"confidence {before} -> {after} ({delta:+.{d}f})")
    else:
        moved = (f"{change.module_key} confidence {direction} {before} -> {after} "
                 f"({delta:+.{d}f}), still {STATUS_WORDS[change.status]}")
    what = describe_evidence(mine)
    recount = ("recounted from the evidence that exists now (evidence was deleted or edited "
               "since the last run)")
    if what == "no new evidence" and recounted:
        what = f"with no new evidence: {recount}"
    elif what == "no new evidence":
        what = (f"with no new evidence: older evidence faded (half-life "
                f"{settings.half_life_days:g} days)")
    else:
        what = "after " + what + (f", {recount}" if recounted else "")
    return f"{moved}, {what}; {threshold_crossed(change, settings)}."


def _rank(status: ModuleStatus) -> int:
    """Order of standing for "rose"/"fell": disabled < insufficient data < probation < active."""
    return {
        ModuleStatus.disabled: 0,
        ModuleStatus.insufficient_data: 1,
        ModuleStatus.probation: 2,
        ModuleStatus.active: 3,
    }[status]


def notable(change: TrendPoint, min_confidence_move: float = 0.01) -> bool:
    """Whether a change is worth a sentence: its status changed, or its confidence moved by at
    least `min_confidence_move` (a fraction; 0.01 = one point)."""
    return (change.status != change.status_before
            or abs(change.confidence - change.confidence_before) >= min_confidence_move)


def watch_outcome(gate_report: Mapping[str, Any] | None) -> str:
    """A run's production-watch outcome in a word or two (`pfl runs`' watch column), from its
    gate_report: the
    watch's state after the run (and "rolled back" when the run rolled the spec back), "owner
    rollback" for a rollback by hand, "-" when the run looked at no watch."""
    report = gate_report or {}
    if isinstance(report.get("rollback"), dict):
        return "owner rollback"
    watch = report.get("watch")
    if not isinstance(watch, dict):
        return "-"
    if watch.get("action") == "roll_back":
        return "regressed, rolled back"
    return str(watch.get("state", "-"))


def describe_watch(
    gate_report: Mapping[str, Any] | None, versions: Mapping[str, int]
) -> str | None:
    """One sentence on what a run (its gate_report) found about the production watch, or did
    by hand; None when it looked at no watch. `versions` maps spec ids (text) to version
    numbers (a spec not in it is named by its id's first 8 characters)."""
    report = gate_report or {}

    def version(spec: object) -> str:
        return f"v{versions[str(spec)]}" if str(spec) in versions else f"spec {str(spec)[:8]}"

    rollback = report.get("rollback")
    if isinstance(rollback, dict):
        return (
            f"rolled back by the owner from {version(rollback.get('from_spec_id'))} to "
            f"{version(rollback.get('to_spec_id'))}: {rollback.get('reason')}"
        )
    watch = report.get("watch")
    if not isinstance(watch, dict):
        return None
    look, planned = watch.get("look"), watch.get("looks_planned")
    if isinstance(look, int) and isinstance(planned, int):
        # Reports from before looks were kept within the plan could hold a kind's look past a
        # watch_looks lowered mid-watch: never "look 4/3".
        look = min(look, planned)
    sentence = (
        f"watch of {version(watch.get('spec_id'))}: {watch.get('state')} at look "
        f"{look}/{planned}"
    )
    if watch.get("final"):
        verdicts = {c.get("verdict") for c in watch.get("comparisons", [])}
        when = "as the next spec passed its gate" if watch.get("superseding") else "at expiry"
        if verdicts & {"regressed", "no_regression"}:
            sentence += f" (its final test, {when})"
        elif "not_tested" in verdicts:
            sentence += f" ({when}, with no final test: no alpha left to spend)"
        else:
            sentence += (f" ({when}, with no final test: no comparison had watch_min_evidence"
                         " a side)")
    action = watch.get("action")
    if action == "roll_back":
        sentence += f", rolled back to {version(watch.get('previous_spec_id'))}"
    elif action == "alert":
        sentence += ", alert only (watch_mode alert: roll back with rollback_persona_spec)"
    # One clause per kind with evidence (votes and audits are compared apart; a report from
    # before that has one twin-wide comparison without a kind).
    clauses = []
    for c in watch.get("comparisons", []):
        e = c.get("evidence", {})
        if c.get("scope") != "twin" or not (e.get("new_n") or e.get("old_n")):
            continue
        kind = c.get("kind")
        clause = (
            f"{kind + ' ' if kind else ''}{e.get('new_passed')}/{e.get('new_n')} "
            f"{'up' if kind == 'votes' else 'passed'} since the publish "
            f"vs {e.get('old_passed')}/{e.get('old_n')} before, {c.get('verdict')}"
        )
        if c.get("method") in STANDARDIZED_METHODS and c.get("difference") is not None:
            clause += (f" (by module at the earlier mix: difference {c['difference']:+.4f}"
                       + (f", upper bound {c['value']:.4f}" if c.get("value") is not None else "")
                       + f", threshold {c.get('threshold')})")
        elif c.get("value") is not None:
            clause += f" (upper bound {c['value']:.4f}, threshold {c.get('threshold')})"
        compared = (c.get("compared_new_n"), c.get("compared_old_n"))
        if compared[0] is not None and compared != (e.get("new_n"), e.get("old_n")):
            clause += (f" (compared {compared[0]} vs {compared[1]}: modules with too few events "
                       "a side left out)")
        clauses.append(clause)
    if clauses:
        sentence += "; twin-wide " + "; ".join(clauses)
    regressed = [
        f"{c.get('module_key')}" + (f" ({c['kind']})" if c.get("kind") else "")
        for c in watch.get("comparisons", [])
        if c.get("scope") == "module" and c.get("verdict") == "regressed"
    ]
    if regressed:
        sentence += f"; modules regressed: {', '.join(regressed)}"
    return sentence
