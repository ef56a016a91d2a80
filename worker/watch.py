"""Pure production watch: is a newly published persona spec doing worse than the one it replaced?

Each run after a publish looks at the live evidence of the new spec against the replaced
spec's, one kind at a time and never pooled: votes cast since the publish against votes cast in
an equally long window before the switch, and production audits of the new spec since the
publish against production audits of the replaced spec in that window (the origin the audit
pipeline recorded, `audit_origin`: a replay, such as a gate's offline pairing, counts on
neither side). Each kind is compared for the twin as a whole and per module with enough
evidence, aggregated in SQL (`claim_production_watch`). The difference of two pass rates
(new − old) gets Newcombe's hybrid score interval; twin-wide, the difference standardised by
module to the old side's mix (`standardized_interval`) over the modules with at least
`STRATUM_MIN_EVIDENCE` on each side (`comparable_strata`), so that a change in traffic mix
alone is no regression and no module is judged on a handful of events. Because the watch looks
again at every run, the error it may make is spent over a plan of looks (`obf_alpha_spent`),
with what is left spent by a final test when the watch expires, and split over all the
comparisons (2 kinds × (twin + modules)), so that the chance of a false regression over the
whole watch stays below `alpha` however many runs look (a union bound over single tests, each
holding its share where README "When the bound holds" says: pass rates 0.5-0.99 scanned exactly,
independent events, several modules as far as the exact scans and simulations reach). Each kind
of evidence follows its own plan of looks, and a watch passes only once every kind in play
(compared at some run) has been tested with `pass_evidence` a side.

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
    WatchClock,
    WatchComparison,
    WatchComparisonEvidence,
    WatchComparisonVerdict,
    WatchEvidence,
    WatchKind,
    WatchMode,
    WatchReport,
    WatchState,
    WatchStratum,
)

NEWCOMBE_METHOD = "newcombe_hybrid_score"
STANDARDIZED_METHOD = "newcombe_standardized_kish_and_mover"
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


IMBALANCE_CAP = 2.0
"""A side's Wilson interval is computed as if it had at most this many times the other side's
events (its pass rate from all of them): Newcombe's interval does not hold its one-sided level
when one side is much larger than the other at high pass rates (10 new events against 400 old
at 92%: up to 2.9 times its share of alpha, exactly enumerated), and it does with the larger
side's width capped so (README, "When the bound holds"; tests/unit/test_watch_exact.py)."""

STRATUM_MIN_EVIDENCE = 10
"""Events each side a module needs to enter its twin's standardised comparison (which itself
needs `watch_min_evidence` a side over the modules it compares): with `watch_min_evidence` (30)
for each module, traffic spread over many modules left the twin-wide comparison empty until the
expiry (20 modules of 25 votes a side: a drop from 80% to 56% caught in 4 of 40 watches, only at
expiry; README, "Many small modules")."""


def standardized_interval(
    strata: Sequence[tuple[int, int, int, int]], z: float, cap: float | None = None
) -> tuple[float, float, float]:
    """(difference, lower, upper) for the difference of pass rates (new − old) standardised to
    the old side's mix of strata (direct standardisation): d = P1 − P2, P1 = Σ w_k p1_k and
    P2 = Σ w_k p2_k, with w_k = n2_k / Σ n2, p1_k = x1_k/n1_k (new) and p2_k = x2_k/n2_k (old),
    from strata (x1, n1, x2, n2), each with both sides non-empty. The weights are taken as fixed
    (the estimand is the difference at the old side's observed mix).

    Each side's standardised rate gets two distances from its estimate to its bound, and the
    wider of them is taken, bound by bound:
    - Wilson's score interval (Wilson 1927; `worker.learning.wilson_bounds`) of the side's rate
      at Kish's effective sample size n_eff = 1 / Σ w_k² / n_k (Kish, L. (1965), Survey
      Sampling, Wiley, section 11.7: the size of a simple random sample whose proportion has
      the variance of the weighted one, p(1 − p) Σ w_k² / n_k, at a common p);
    - each stratum's own Wilson interval, combined by variance recovery (MOVER: Zou, G. Y. and
      Donner, A. (2008), Statistics in Medicine 27:1693-1702): √(Σ w_k² (u_k − p_k)²) above
      the rate and √(Σ w_k² (p_k − l_k)²) below it.
    The two sides' distances are then combined as Newcombe's method 10 combines two
    (`newcombe_interval`): upper = d + √(up1² + down2²), lower = d − √(down1² + up2²), clipped
    to [−1, 1]. One stratum gives `newcombe_interval` exactly (both distances are then that
    stratum's Wilson interval).

    Why the wider of two: each fails where the other holds, and an outcome regresses under the
    wider only when it regresses under both, so a test's chance of a false regression is at
    most the smaller of the two methods' (README, "When the bound holds"). Kish's size assumes
    one pass rate in every stratum: a module with a fifth of the old weight (400 old events) and
    10 new events at 85% beside a large module at 99-99.9% has a variance three times what it
    assumes on the new side, and regressed at up to 7.8 times its share at 1e-8 (1.1-1.4 times
    at 1e-3). The strata's own
    intervals follow such a module, but a Wilson interval of a few events cannot be wider than
    [0, 1], so at the large z of an early look their widths saturate while the combination
    still shrinks them as if they were normal: three modules of 10 events a side at p = 0.5
    regressed at 67 times the share at 1e-6 with them alone. Both cases, and the mixes between,
    are enumerated exactly in tests/unit/test_watch_exact.py.

    With `cap`, each stratum's side counts at most `cap` times the other side's events in both
    distances (its pass rate stays x/n): the larger side's interval is no narrower than that of
    a side `cap` times the smaller (`IMBALANCE_CAP`). Raises ValueError for no strata, an empty
    side or impossible counts, or z <= 0.
    """
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    d = standardized_difference(strata)
    up1, down1, up2, down2 = (max(kish, mover) for kish, mover in zip(
        effective_size_distances(strata, z, cap), strata_distances(strata, z, cap), strict=True))
    lower = d - math.sqrt(down1 ** 2 + up2 ** 2)
    upper = d + math.sqrt(up1 ** 2 + down2 ** 2)
    return d, max(-1.0, lower), min(1.0, upper)


Distances = tuple[float, float, float, float]
"""From each side's standardised rate to its bounds: (new up, new down, old up, old down)."""


def _sizes(n1: int, n2: int, cap: float | None) -> tuple[float, float]:
    return (n1, n2) if cap is None else (min(n1, cap * n2), min(n2, cap * n1))


def effective_size_distances(
    strata: Sequence[tuple[int, int, int, int]], z: float, cap: float | None = None
) -> Distances:
    """Each side's distances to the bounds of Wilson's interval of its standardised rate at
    Kish's effective size (`standardized_interval`; strata checked there)."""
    old_total = sum(n2 for _, _, _, n2 in strata)
    rate1 = rate2 = inverse1 = inverse2 = 0.0
    for x1, n1, x2, n2 in strata:
        w = n2 / old_total
        size1, size2 = _sizes(n1, n2, cap)
        rate1 += w * x1 / n1
        rate2 += w * x2 / n2
        inverse1 += w * w / size1
        inverse2 += w * w / size2
    rate1, rate2 = min(1.0, rate1), min(1.0, rate2)
    l1, u1 = wilson_bounds(rate1 / inverse1, (1.0 - rate1) / inverse1, z)
    l2, u2 = wilson_bounds(rate2 / inverse2, (1.0 - rate2) / inverse2, z)
    return u1 - rate1, rate1 - l1, u2 - rate2, rate2 - l2


def strata_distances(
    strata: Sequence[tuple[int, int, int, int]], z: float, cap: float | None = None
) -> Distances:
    """Each side's distances to its bounds from each stratum's own Wilson interval, weighted and
    combined by variance recovery, √(Σ w_k² d_k²) (`standardized_interval`; strata checked
    there)."""
    old_total = sum(n2 for _, _, _, n2 in strata)
    squares = [0.0, 0.0, 0.0, 0.0]
    for x1, n1, x2, n2 in strata:
        w = n2 / old_total
        for side, (p, size) in enumerate(zip((x1 / n1, x2 / n2), _sizes(n1, n2, cap),
                                             strict=True)):
            low, high = wilson_bounds(p * size, (1.0 - p) * size, z)
            squares[2 * side] += (w * (high - p)) ** 2
            squares[2 * side + 1] += (w * (p - low)) ** 2
    up1, down1, up2, down2 = (math.sqrt(s) for s in squares)
    return up1, down1, up2, down2


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
    [0, 1], alpha outside (0, 1), or an alpha so small that α/2 rounds to 0 (5e-324: the
    watch's settings allow no alpha below `WATCH_ALPHA_MIN`, 1e-10).
    """
    if not 0.0 <= information <= 1.0:
        raise ValueError(f"information must be in [0, 1], got {information}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if alpha / 2.0 == 0.0:
        raise ValueError(f"alpha is too small: alpha/2 rounds to 0, got {alpha}")
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


_SAME_SPEND = 1e-9
"""Relative difference under which what a look allows and what a kind spent count as equal
(`_more_to_spend`): a kind's `alpha_spent` is read back from its last report, and a rounding
between there and here must not make a look that was tested due again. Two different looks'
allowances differ far more (k/K and k'/K' with K, K' <= 100 differ by at least 1e-4 of the
plan, and the spending function is steep)."""


def _more_to_spend(allowed: float, spent: float) -> bool:
    """Whether the plan allows more than was spent, past rounding (`_SAME_SPEND`)."""
    return allowed > spent and not math.isclose(allowed, spent, rel_tol=_SAME_SPEND)


def look_index(information_count: int, pass_evidence: int, looks: int) -> int:
    """Which planned look the evidence has reached: k in 0..`looks`, look k being due once
    `information_count` (the watch's clock: see `decide_watch`) reaches k/looks of
    `pass_evidence` (floor). Raises ValueError for a negative count or non-positive plan
    sizes."""
    if information_count < 0 or pass_evidence <= 0 or looks <= 0:
        raise ValueError("need information_count >= 0, pass_evidence > 0 and looks > 0")
    return min(looks, information_count * looks // pass_evidence)


Stratum = tuple[int, int, int, int]
"""(x1, n1, x2, n2): passed and seen on the new side, passed and seen on the old side."""


def comparable_strata(c: WatchComparisonEvidence, min_evidence: int) -> list[Stratum]:
    """The strata of comparison `c` that its test compares, as (x1, n1, x2, n2)
    (`standardized_interval`'s form). A comparison without strata (a module's own) is one
    stratum, its counts, compared with at least `min_evidence` (`watch_min_evidence`) on each
    side. A twin-wide comparison compares its strata (modules) with at least
    `STRATUM_MIN_EVIDENCE` (10; `min_evidence` if lower) on each side, and only when those hold
    `min_evidence` on each side in all.

    A floor for each stratum: a module that holds most of the old side's weight but has a
    handful of events since the publish would otherwise carry that weight on a Wilson interval
    of a few events (one failure in one new event read as a drop of its whole weight: where that
    module held 90% of the old side's votes, passed 92% and got one vote since the publish, 5.4%
    of 6,000 simulated watches falsely regressed at alpha 0.05). The floor was
    `min_evidence` (30) until 20261218000700, which left traffic spread over many modules with
    nothing to compare until the expiry; at 10 (with the larger side's width capped,
    `IMBALANCE_CAP`) the heavy-module case and adversarial mixes stay within alpha
    (tests/unit/test_production_watch.py). Strata below the floor are left out, not pooled into
    one "rest" stratum: a pooled stratum compares different modules on the two sides and brings
    back the dependence on the traffic mix that standardisation removes (simulated: 14.4% and
    95.6% false regressions). The estimand is the difference at the old side's mix over the
    modules with enough evidence; a module left out is judged by its own comparison once it has
    `min_evidence` a side.
    """
    if not c.strata:
        return [s for s in seen_strata(c) if s[1] >= min_evidence and s[3] >= min_evidence]
    floor = min(STRATUM_MIN_EVIDENCE, min_evidence)
    strata = [s for s in seen_strata(c) if s[1] >= floor and s[3] >= floor]
    if (sum(n1 for _, n1, _, _ in strata) < min_evidence
            or sum(n2 for _, _, _, n2 in strata) < min_evidence):
        return []
    return strata


def seen_strata(c: WatchComparisonEvidence) -> list[Stratum]:
    """The strata of comparison `c` seen on both sides (at least one event each), as
    (x1, n1, x2, n2); a comparison without strata is one stratum, its counts. They give a
    comparison's `difference` when none has enough evidence to compare; a kind seen so but
    never compared (`comparable_strata`) is not in play and holds no watch (`decide_watch`)."""
    return [
        (s.new_passed, s.new_n, s.old_passed, s.old_n)
        for s in c.strata or (WatchStratum(new_n=c.new_n, new_passed=c.new_passed,
                                           old_n=c.old_n, old_passed=c.old_passed),)
        if s.new_n > 0 and s.old_n > 0
    ]


def compared_evidence(strata: Sequence[Stratum]) -> int:
    """The smaller side of the compared strata, in events (0 without strata): a comparison's
    share of the watch's clock."""
    if not strata:
        return 0
    return min(sum(n1 for _, n1, _, _ in strata), sum(n2 for _, _, _, n2 in strata))


def decide_watch(evidence: WatchEvidence, superseding: bool = False) -> WatchReport:
    """The watch's decision at this run: the comparisons it made and the watch's next state.
    `superseding`: the run publishes the next spec, which ends this watch (below).

    The decision rule, valid under repeated looks (a Bonferroni bound over looks and
    comparisons, spent by an alpha-spending plan):

    - Votes and audits are never pooled: each kind is its own comparison, twin-wide and per
      module (`evidence.twin`, `evidence.modules`), so 2 × (1 + modules_total) comparisons are
      planned whatever evidence arrives.
    - A comparison compares its strata with at least `min_evidence` on each side
      (`comparable_strata`); without any it is `insufficient_evidence`.
    - Each kind of evidence has its own plan of looks (`WatchClock`, read back from the
      watch's last report: `evidence.clocks`; without them both kinds start from `looks_done`
      and `alpha_spent`, the one clock watches kept before). A kind's looks are planned at k/K
      of `pass_evidence` (K = `looks`), counted on its twin-wide comparison's
      `compared_evidence` (the smaller side of its compared strata; a count, never a pass
      rate). A kind is in play once it has been compared: its twin-wide comparison had
      comparable strata (`min_evidence` a side) at this run or an earlier one (the clock's
      `in_play` keeps it; a clock written before that rule, when in play meant seen on both
      sides at that run, is read as it is, which can only hold a watch longer). A kind that
      never reached `min_evidence` a side (one vote a side, say) does not hold the watch, and
      a kind compared once stays in play when its evidence goes (votes retracted). With one
      clock for both kinds, the least compared evidence of the kinds in play, a trickle of
      votes under the floor held every look of plentiful audits at 0 until the expiry (audits
      60% against 90%, 200 a side, beside one vote a side: never looked at); with the most,
      plentiful audits that hold passed a watch whose few votes were never tested at a useful
      level.
    - A run tests a kind when a look of it is due: when the plan as it now stands allows more
      to be spent than the kind has spent, α(k/K) > its `alpha_spent` (past rounding:
      `_more_to_spend`), k = `look_index` of its compared evidence with K, `pass_evidence`
      and alpha as now set. Several looks due at once make one test, and a run at a look
      already tested tests nothing, so with the settings unchanged any number of runs makes
      at most K tests of each kind, and one more at expiry. Changing the plan mid-watch moves
      what the looks to come may spend, never what was spent: with `looks` lowered from 5 to
      3 after a kind's look 4 (α(0.8) spent), its look 3 (α(1)) is due once its evidence
      reaches it, and is its last; raised to 10, its looks up to 8 test nothing. The look a
      kind reached never goes back and never exceeds K.
    - A test of a kind at its look k may spend α(k/K) − (what the kind's earlier tests spent),
      α the O'Brien-Fleming-type spending function (`obf_alpha_spent`), split equally over all
      the planned comparisons: each kind's comparisons (half of them) spend at most α/2. Once
      `expire_days` have passed since the publish, the run makes a final test that spends all
      that is left, α(1) − spent (Lan and DeMets' spending function lets the last analysis come
      at any time and spend the rest), so a watch of a quiet twin still ends with a real test.
      A run that publishes the next spec (`superseding`) makes the same final test first: the
      publish ends the watch, and without it a spec that regressed but was not caught yet
      ended `superseded` untested and became the next spec's baseline (a weekly shipper's
      twin at about 12 votes a day a side: a drop from 80% to 50% caught before the next
      publish in 29 of 200 watches). A spending plan's last analysis may come at any time
      that does not depend on the evidence tested; a publish mostly comes with the next
      draft, but a gate paired with the watched spec's production audits, or an owner timing
      a publish on the interim comparisons, ties it to them (README, "The publish as the last
      analysis").
      Over the whole watch the shares sum to at most α(1) = alpha: by the union bound, with no
      true difference the chance of any false regression is at most alpha, whatever the
      correlation between looks and comparisons, as far as each single test holds its share
      (README, "When the bound holds").
    - A compared comparison is a regression when the upper bound of Newcombe's interval for
      (new − old), standardised over its strata, at the one-sided level of its share lies below
      −margin (z = Φ⁻¹(1 − share), computed as −Φ⁻¹(share)). A planned look always has
      something to spend; a final test with nothing left (watch_alpha lowered mid-watch below
      what was spent), or a share that underflows, tests nothing: its comparisons are
      `not_tested`.
    - The watch ends `regressed` when any comparison regressed (at a planned look or at the
      final test); `passed` once at least one kind is in play and every kind in play has
      passed its last look (K): that look tested at least one comparison of the kind with
      something to spend and found no regression ("no regression found", not "proved as
      good"); `superseded` at a publish's final test, and `expired` when it expires,
      otherwise (the final test found no regression, or, when no comparison had enough
      evidence or nothing was left to spend, made none); else it goes on `watching`. A
      regression's action is `roll_back` in `auto` mode when there is a spec to go back to,
      `alert` otherwise.

    Raises ValueError for settings out of range (as the database refuses them).
    """
    s = evidence.settings
    every = (*evidence.twin, *evidence.modules)
    planned = len(WATCH_KINDS) * (1 + evidence.modules_total)
    age = evidence.learning_time - evidence.published_at
    expired = age >= timedelta(days=s.expire_days)
    final = expired or superseding  # this run's test spends all that is left
    before = {c.kind: c for c in evidence.clocks}
    clocks: dict[WatchKind, WatchClock] = {}
    for twin in evidence.twin:
        kind = twin.kind
        strata = comparable_strata(twin, s.min_evidence)
        # Watches whose last report has no clocks (before 20261218000700) shared one: each
        # kind's comparisons had spent the same share of it.
        was = before.get(kind) or WatchClock(kind=kind, look=evidence.looks_done,
                                             alpha_spent=evidence.alpha_spent)
        info = compared_evidence(strata)
        due = look_index(info, s.pass_evidence, s.looks)
        # A look is due when the plan, as it stands now, allows more to be spent than the kind
        # has spent, not when its index passes the last one's: the two differ once watch_looks,
        # watch_pass_evidence or watch_alpha changed mid-watch (a plan cut from 5 looks to 3
        # never got past a kind's look 4, and so never tested it again).
        test = final or _more_to_spend(obf_alpha_spent(due / s.looks, s.alpha),
                                       was.alpha_spent)
        spent = was.alpha_spent
        share: float | None = None
        z: float | None = None
        if test:
            spend_to = 1.0 if final else due / s.looks
            spent = max(was.alpha_spent, obf_alpha_spent(spend_to, s.alpha))
            share = (spent - was.alpha_spent) / planned
            z = _upper_quantile(share)
        clocks[kind] = WatchClock(
            kind=kind, look=min(s.looks, max(due, was.look)), alpha_spent=spent,
            passed=was.passed, in_play=was.in_play or bool(strata),
            information=min(1.0, info / s.pass_evidence), tested=test,
            alpha_per_comparison=share, z=z)

    # A kind's z is None unless it is tested at this run (no look of it due: not_tested).
    comparisons = tuple(
        _compare(c, comparable_strata(c, s.min_evidence), clocks[c.kind].z, s.margin)
        for c in every
    )
    regressed = any(c.verdict is WatchComparisonVerdict.regressed for c in comparisons)
    for kind, clock in clocks.items():
        # A kind passes its plan when its last look tested something (had error to spend and a
        # comparison with evidence: with nothing to spend they are not_tested) and found no
        # regression; it stays passed. The last look is judged on the evidence, not on the look
        # reached: with watch_looks lowered mid-watch the look reached may already be the new
        # last one while the evidence holds a third of pass_evidence.
        tested_any = any(c.verdict is WatchComparisonVerdict.no_regression
                         for c in comparisons if c.kind == kind)
        if clock.tested and clock.information >= 1.0 and tested_any and not regressed:
            clocks[kind] = clock.model_copy(update={"passed": True})
    in_play = [c for c in clocks.values() if c.in_play]
    if regressed:
        state = WatchState.regressed
    elif in_play and all(c.passed for c in in_play):
        state = WatchState.passed
    elif superseding:
        state = WatchState.superseded
    elif expired:
        state = WatchState.expired
    else:
        state = WatchState.watching
    if not regressed:
        action = WatchAction.none
    elif s.mode is WatchMode.auto and evidence.previous_spec_id is not None:
        action = WatchAction.roll_back
    else:
        action = WatchAction.alert
    shown = in_play or list(clocks.values())
    tested = [c for c in clocks.values() if c.tested]
    widest = max(tested, key=lambda c: c.alpha_per_comparison or 0.0, default=None)
    z_shown = widest.z if widest is not None else None
    return WatchReport(
        watch_id=evidence.watch_id,
        spec_id=evidence.spec_id,
        previous_spec_id=evidence.previous_spec_id,
        mode=s.mode,
        state=state,
        action=action,
        tested=bool(tested),
        final=final,
        superseding=superseding,
        look=min(c.look for c in shown) if in_play else max(c.look for c in shown),
        looks_planned=s.looks,
        information=min(c.information for c in in_play) if in_play else 0.0,
        # Each kind's comparisons hold half of the planned ones: the watch as a whole has spent
        # the mean of the kinds' shares of the spending function.
        alpha_spent=sum(c.alpha_spent for c in clocks.values()) / len(WATCH_KINDS),
        comparisons_planned=planned,
        alpha_per_comparison=widest.alpha_per_comparison if widest is not None else None,
        z=z_shown if z_shown is None or math.isfinite(z_shown) else None,
        window_start=evidence.window_start,
        published_at=evidence.published_at,
        comparisons=comparisons,
        clocks=tuple(c if c.z is None or math.isfinite(c.z) else c.model_copy(update={"z": None})
                     for c in (clocks[k] for k in WATCH_KINDS)),
    )


def _compare(
    c: WatchComparisonEvidence, strata: list[Stratum], z: float | None, margin: float
) -> WatchComparison:
    """One comparison's verdict at this run (see `decide_watch`), over `strata`, its strata
    with enough evidence on each side (`comparable_strata`); `z` is None when the run tests
    nothing (no look due) and math.inf when the look has nothing to spend: both leave a
    comparison with evidence `not_tested`. `difference` is that of the compared strata, or,
    when none has enough evidence, of those seen on both sides (`seen_strata`; for the report,
    nothing is judged on it)."""
    threshold = -margin
    counts = {
        "new_n": c.new_n, "new_passed": c.new_passed, "old_n": c.old_n, "old_passed": c.old_passed,
    }
    seen = strata or seen_strata(c)
    difference = standardized_difference(seen) if seen else None

    def judged(verdict: WatchComparisonVerdict, value: float | None = None,
               method: str | None = None) -> WatchComparison:
        return WatchComparison(
            scope=c.scope, kind=c.kind, module_key=c.module_key, value=value,
            difference=difference, threshold=threshold, verdict=verdict, evidence=counts,
            compared_new_n=sum(n1 for _, n1, _, _ in strata) if strata else None,
            compared_old_n=sum(n2 for _, _, _, n2 in strata) if strata else None,
            method=method,
        )

    if not strata:
        return judged(WatchComparisonVerdict.insufficient_evidence)
    if z is None or math.isinf(z):
        # No look due, or a look with nothing left to spend (share <= 0: the plan was changed
        # mid-watch below what was spent): nothing is tested, and nothing reads as tested.
        return judged(WatchComparisonVerdict.not_tested)
    upper = standardized_interval(strata, z, IMBALANCE_CAP)[2]
    verdict = (
        WatchComparisonVerdict.regressed if upper < threshold
        else WatchComparisonVerdict.no_regression
    )
    return judged(verdict, upper, NEWCOMBE_METHOD if len(strata) == 1 else STANDARDIZED_METHOD)
