"""Pure production watch: is a newly published persona spec doing worse than the one it replaced?

Each run after a publish looks at the live evidence of the new spec against the replaced
spec's, one kind at a time and never pooled: votes cast since the publish against votes cast in
an equally long window before the switch, and audits of the new spec since the publish against
audits of the replaced spec in that window (neither counting an audit of a trace also audited
under any other spec: a gate's offline pairing, not production). Each kind is compared for the
twin as a whole and per module with enough evidence, aggregated in SQL
(`claim_production_watch`). The difference of two pass rates (new − old) gets Newcombe's hybrid
score interval; twin-wide, the difference standardised by module to the old side's mix
(`standardized_interval`), so that a change in traffic mix alone is no regression. Because
the watch looks again at every run, the error it may make is spent over a plan of looks
(`obf_alpha_spent`) and split over all the comparisons (2 kinds × (twin + modules)), so that
the chance of a false regression over the whole watch stays below `alpha` however many runs
look.

No I/O here: `decide_watch` takes the evidence and the watch's settings and returns the decision
that the run's completion writes (and, in `auto` mode, acts on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from statistics import NormalDist

from worker.learning import wilson_bounds
from worker.models import (
    WATCH_KINDS,
    WatchAction,
    WatchComparison,
    WatchComparisonEvidence,
    WatchComparisonVerdict,
    WatchEvidence,
    WatchMode,
    WatchReport,
    WatchState,
    WatchStratum,
)

NEWCOMBE_METHOD = "newcombe_hybrid_score"
STANDARDIZED_METHOD = "newcombe_mover_standardized"
_NORMAL = NormalDist()


def newcombe_interval(
    x1: int, n1: int, x2: int, n2: int, z: float
) -> tuple[float, float]:
    """(lower, upper) of Newcombe's hybrid score interval for p1 − p2, independent samples.

    p1 = x1/n1 and p2 = x2/n2 (successes over trials), z the normal quantile (1.96: 95% two-sided;
    each bound alone is then a one-sided 97.5% bound). Newcombe, R. G. (1998), "Interval
    estimation for the difference between independent proportions: comparison of eleven
    methods", Statistics in Medicine 17:873-890, method 10: with (l1, u1) and (l2, u2) the
    Wilson score intervals (Wilson 1927; `worker.learning.wilson_bounds`) of p1 and p2,
    lower = d − √((p1 − l1)² + (u2 − p2)²), upper = d + √((u1 − p1)² + (p2 − l2)²), d = p1 − p2.
    Both bounds lie in [−1, 1]. Raises ValueError when a count is negative, a success count
    exceeds its trials, a sample is empty, or z <= 0.
    """
    for x, n in ((x1, n1), (x2, n2)):
        if n <= 0 or x < 0 or x > n:
            raise ValueError(f"need 0 <= x <= n and n > 0, got x={x}, n={n}")
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_bounds(x1, n1 - x1, z)
    l2, u2 = wilson_bounds(x2, n2 - x2, z)
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, lower), min(1.0, upper)


def standardized_interval(
    strata: Sequence[tuple[int, int, int, int]], z: float
) -> tuple[float, float, float]:
    """(difference, lower, upper) for the difference of pass rates (new − old) standardised to
    the old side's mix of strata (direct standardisation): d = Σ w_k (p1_k − p2_k) with
    w_k = n2_k / Σ n2 and p1_k = x1_k/n1_k (new), p2_k = x2_k/n2_k (old), from strata
    (x1, n1, x2, n2), each with both sides non-empty.

    The bounds combine the strata's Wilson intervals (l, u) by the method of variance estimates
    recovery for a linear combination (MOVER: Zou, G. Y. and Donner, A. (2008), "Construction
    of confidence limits about effect measures: a general approach", Statistics in Medicine
    27:1693-1702), of which Newcombe's method 10 is the one-stratum case:
    upper = d + √(Σ w_k² ((u1_k − p1_k)² + (p2_k − l2_k)²)), lower = d − √(Σ w_k² ((p1_k −
    l1_k)² + (u2_k − p2_k)²)), clipped to [−1, 1]. The weights are taken as fixed (the estimand
    is the difference at the old side's observed mix). One stratum gives `newcombe_interval`
    exactly. Raises ValueError for no strata, an empty side or impossible counts, or z <= 0.
    """
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    d = standardized_difference(strata)
    old_total = sum(n2 for _, _, _, n2 in strata)
    low_sq = up_sq = 0.0
    for x1, n1, x2, n2 in strata:
        w = n2 / old_total
        p1, p2 = x1 / n1, x2 / n2
        l1, u1 = wilson_bounds(x1, n1 - x1, z)
        l2, u2 = wilson_bounds(x2, n2 - x2, z)
        low_sq += w * w * ((p1 - l1) ** 2 + (u2 - p2) ** 2)
        up_sq += w * w * ((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, max(-1.0, d - math.sqrt(low_sq)), min(1.0, d + math.sqrt(up_sq))


def standardized_difference(strata: Sequence[tuple[int, int, int, int]]) -> float:
    """d = Σ w_k (p1_k − p2_k), the difference of pass rates (new − old) standardised to the old
    side's mix: w_k = n2_k / Σ n2, from strata (x1, n1, x2, n2) as `standardized_interval` takes
    them. Raises ValueError for no strata, an empty side or impossible counts."""
    if not strata:
        raise ValueError("need at least one stratum")
    for x1, n1, x2, n2 in strata:
        for x, n in ((x1, n1), (x2, n2)):
            if n <= 0 or x < 0 or x > n:
                raise ValueError(f"need 0 <= x <= n and n > 0, got x={x}, n={n}")
    old_total = sum(n2 for _, _, _, n2 in strata)
    return sum(n2 / old_total * (x1 / n1 - x2 / n2) for x1, n1, x2, n2 in strata)


def obf_alpha_spent(information: float, alpha: float) -> float:
    """The error allowed to be spent by `information` (a fraction in [0, 1]) of a watch.

    Lan and DeMets' O'Brien-Fleming-type spending function, one-sided: α(t) =
    2 − 2Φ(z_{1−α/2} / √t), with α(0) = 0 and α(1) = α (Lan, K. K. G. and DeMets, D. L. (1983),
    "Discrete sequential boundaries for clinical trials", Biometrika 70:659-663; O'Brien, P. C.
    and Fleming, T. R. (1979), Biometrics 35:549-556). It spends almost nothing early, where
    noise is largest, and most of α near the end. Raises ValueError for information outside
    [0, 1] or alpha outside (0, 1).
    """
    if not 0.0 <= information <= 1.0:
        raise ValueError(f"information must be in [0, 1], got {information}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if information == 0.0:
        return 0.0
    # z_{1−α/2} taken from the tail: 1 − α/2 rounds to 1 for α below about 1e-16.
    z = -_NORMAL.inv_cdf(alpha / 2.0)
    # 2 − 2Φ(x) = erfc(x/√2), exact in the tail where 2 − 2Φ(x) cancels to 0 (x > 8.3: early
    # looks at a small alpha) and NormalDist.cdf, through erf, does too.
    return math.erfc(z / math.sqrt(2.0 * information))


def _upper_quantile(share: float) -> float:
    """z with 1 − Φ(z) = `share` (a one-sided level), computed as −Φ⁻¹(share), which is exact
    in the tail: 1 − share rounds to 1.0 below 2⁻⁵⁴ (5.6e-17), where Φ⁻¹(1 − share) would raise
    (an early look spends about 1e-16 split over the comparisons). math.inf when there is
    nothing to spend (share <= 0): no finite bound may then call a regression."""
    return -_NORMAL.inv_cdf(share) if share > 0.0 else math.inf


def look_index(information_count: int, pass_evidence: int, looks: int) -> int:
    """Which planned look the evidence has reached: k in 0..`looks`, look k being due once
    `information_count` (the watch's clock: see `decide_watch`) reaches k/looks of
    `pass_evidence` (floor). Raises ValueError for a negative count or non-positive plan
    sizes."""
    if information_count < 0 or pass_evidence <= 0 or looks <= 0:
        raise ValueError("need information_count >= 0, pass_evidence > 0 and looks > 0")
    return min(looks, information_count * looks // pass_evidence)


def decide_watch(evidence: WatchEvidence) -> WatchReport:
    """The watch's decision at this run: the comparisons it made and the watch's next state.

    The decision rule, valid under repeated looks (a Bonferroni bound over looks and
    comparisons, spent by an alpha-spending plan):

    - Votes and audits are never pooled: each kind is its own comparison, twin-wide and per
      module (`evidence.twin`, `evidence.modules`), so 2 × (1 + modules_total) comparisons are
      planned whatever evidence arrives.
    - Looks are planned at k/K of `pass_evidence` (K = `looks`), counted on the kind with the
      most evidence: the larger of the two twin-wide comparisons' smaller sides (a count, never
      a pass rate). A run tests only when a new look is due (several due at once make one
      test); runs in between test nothing, so any number of runs makes at most K tests.
    - A test at look k may spend α(k/K) − (what earlier tests spent), α the O'Brien-Fleming-type
      spending function (`obf_alpha_spent`), split equally over the planned comparisons. Over
      the whole watch the shares sum to at most α(1) = alpha: by the union bound, with no true
      difference the chance of any false regression is at most alpha, whatever the correlation
      between looks and comparisons.
    - A comparison with at least `min_evidence` on each side is a regression when the upper
      bound of Newcombe's interval for (new − old) at the one-sided level of its share lies
      below −margin (z = Φ⁻¹(1 − share), computed as −Φ⁻¹(share)).
    - The watch ends `regressed` when any comparison regressed; `passed` after the last look
      (K) without one ("no regression found", not "proved as good"); `expired` when
      `expire_days` have passed since the publish before that; otherwise it goes on
      `watching`. A regression's action is `roll_back` in `auto` mode when there is a spec to
      go back to, `alert` otherwise.

    Raises ValueError for settings out of range (as the database refuses them).
    """
    s = evidence.settings
    info = max(min(c.new_n, c.old_n) for c in evidence.twin)
    planned = len(WATCH_KINDS) * (1 + evidence.modules_total)
    due = look_index(info, s.pass_evidence, s.looks)
    test = due > evidence.looks_done
    spent_after = evidence.alpha_spent
    share: float | None = None
    z: float | None = None
    if test:
        spent_after = max(evidence.alpha_spent, obf_alpha_spent(due / s.looks, s.alpha))
        share = (spent_after - evidence.alpha_spent) / planned
        z = _upper_quantile(share)

    comparisons = tuple(
        _compare(c, z, s.margin, s.min_evidence)
        for c in (*evidence.twin, *evidence.modules)
    )
    regressed = any(c.verdict is WatchComparisonVerdict.regressed for c in comparisons)
    looks_done = due if test else evidence.looks_done
    age = evidence.learning_time - evidence.published_at
    if regressed:
        state = WatchState.regressed
    elif looks_done >= s.looks:
        state = WatchState.passed
    elif age >= timedelta(days=s.expire_days):
        state = WatchState.expired
    else:
        state = WatchState.watching
    if not regressed:
        action = WatchAction.none
    elif s.mode is WatchMode.auto and evidence.previous_spec_id is not None:
        action = WatchAction.roll_back
    else:
        action = WatchAction.alert
    return WatchReport(
        watch_id=evidence.watch_id,
        spec_id=evidence.spec_id,
        previous_spec_id=evidence.previous_spec_id,
        mode=s.mode,
        state=state,
        action=action,
        tested=test,
        look=looks_done,
        looks_planned=s.looks,
        information=min(1.0, info / s.pass_evidence),
        alpha_spent=spent_after,
        comparisons_planned=planned,
        alpha_per_comparison=share,
        z=z if z is None or math.isfinite(z) else None,
        window_start=evidence.window_start,
        published_at=evidence.published_at,
        comparisons=comparisons,
    )


def _compare(
    c: WatchComparisonEvidence, z: float | None, margin: float, min_evidence: int
) -> WatchComparison:
    """One comparison's verdict at this run (see `decide_watch`); `z` is None when the run
    tests nothing (no look due, or a share of alpha too small to be a float)."""
    threshold = -margin
    counts = {
        "new_n": c.new_n, "new_passed": c.new_passed, "old_n": c.old_n, "old_passed": c.old_passed,
    }
    # Strata with evidence on both sides (a module seen on one side only has nothing to be
    # compared with); a comparison without strata is one stratum.
    strata = [
        (s.new_passed, s.new_n, s.old_passed, s.old_n)
        for s in c.strata or (WatchStratum(new_n=c.new_n, new_passed=c.new_passed,
                                           old_n=c.old_n, old_passed=c.old_passed),)
        if s.new_n and s.old_n
    ]
    difference = standardized_difference(strata) if strata else None
    compared = min(sum(s[1] for s in strata), sum(s[3] for s in strata))
    if compared < min_evidence:
        return WatchComparison(
            scope=c.scope, kind=c.kind, module_key=c.module_key, value=None,
            difference=difference, threshold=threshold,
            verdict=WatchComparisonVerdict.insufficient_evidence,
            evidence=counts,
        )
    if z is None:
        return WatchComparison(
            scope=c.scope, kind=c.kind, module_key=c.module_key, value=None,
            difference=difference, threshold=threshold,
            verdict=WatchComparisonVerdict.not_tested, evidence=counts,
        )
    upper = 1.0 if math.isinf(z) else standardized_interval(strata, z)[2]
    verdict = (
        WatchComparisonVerdict.regressed if upper < threshold
        else WatchComparisonVerdict.no_regression
    )
    return WatchComparison(
        scope=c.scope, kind=c.kind, module_key=c.module_key, value=upper,
        difference=difference, threshold=threshold, verdict=verdict, evidence=counts,
        method=NEWCOMBE_METHOD if len(strata) == 1 else STANDARDIZED_METHOD,
    )
