"""When a single test of the production watch holds its share of alpha: exact enumeration.

A watch's union bound (README, "The production watch") needs each of its tests, a comparison
at one look, to call a false regression with probability at most the share of watch_alpha it
spends. This is checked here exactly, not by simulation: with n1 new and n2 old events at the
same true pass rate p, every pair of outcomes (x1, x2) is enumerated, the real decision
(`worker.watch.standardized_interval` on one stratum, with the imbalance cap the watch uses)
is applied to each, and the binomial probabilities of those that regress are summed. Which
outcomes regress depends on (n1, n2, z, margin) only, so each is judged once and weighed for
every p.

Run as a script for the wider scans whose figures the README quotes:
    .venv/bin/python tests/unit/test_watch_exact.py          (one module: pairs of side sizes)
    .venv/bin/python tests/unit/test_watch_exact.py strata   (several modules)
"""

from __future__ import annotations

import bisect
import itertools
import math
from statistics import NormalDist

import pytest

from worker.models import WATCH_MARGIN_MIN, WATCH_MIN_EVIDENCE_MIN, WatchSettings
from worker.watch import (
    IMBALANCE_CAP,
    STRATUM_MIN_EVIDENCE,
    effective_size_distances,
    standardized_difference,
    standardized_interval,
    strata_distances,
)

# p from 0.5 to 0.99, denser where the interval is most delicate (high pass rates).
RATES = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.91, 0.92, 0.93,
         0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99]
# One-sided shares a test may spend: alpha up to 0.5 over at least 2 comparisons (0.25) down
# to what an early look spends (O'Brien-Fleming: alpha 0.05, look 1 of 10, about 1e-10).
SHARES = [0.25, 0.1, 0.05, 0.025, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6, 1e-8, 1e-10, 1e-12]


def _pmf(n: int, p: float) -> list[float]:
    return [math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                     + k * math.log(p) + (n - k) * math.log1p(-p)) for k in range(n + 1)]


def regressing(n1: int, n2: int, share: float, margin: float, cap: float | None
               ) -> list[tuple[int, int]]:
    """The outcomes (x1 of n1 new, x2 of n2 old passing) whose upper bound at the one-sided
    level `share` lies below -margin: the watch's decision, one stratum."""
    z = -NormalDist().inv_cdf(share)
    found = []
    for x2 in range(n2 + 1):
        # The bound grows with x1: scan up from 0 and stop at the first outcome that holds.
        for x1 in range(n1 + 1):
            if standardized_interval([(x1, n1, x2, n2)], z, cap)[2] < -margin:
                found.append((x1, x2))
            else:
                break
    return found


def worst_ratio(n1: int, n2: int, margin: float, cap: float | None,
                rates: list[float] = RATES, shares: list[float] = SHARES
                ) -> tuple[float, float, float]:
    """max over p and share of P(false regression) / share, with the p and share where."""
    pmfs = {p: (_pmf(n1, p), _pmf(n2, p)) for p in rates}
    worst = (0.0, 0.0, 0.0)
    for share in shares:
        out = regressing(n1, n2, share, margin, cap)
        for p, (f1, f2) in pmfs.items():
            error = sum(f1[x1] * f2[x2] for x1, x2 in out)
            worst = max(worst, (error / share, p, share))
    return worst


def test_the_bound_grows_with_the_new_sides_passes() -> None:
    # `regressing` stops at the first outcome that holds: checked against the full scan.
    z = -NormalDist().inv_cdf(0.01)
    full = {(x1, x2) for x1 in range(31) for x2 in range(46)
            if standardized_interval([(x1, 30, x2, 45)], z, IMBALANCE_CAP)[2] < -0.02}
    assert set(regressing(30, 45, 0.01, 0.02, IMBALANCE_CAP)) == full and full


@pytest.mark.parametrize(
    ("n1", "n2"),
    [(30, 30), (30, 45), (30, 60), (60, 30), (45, 30), (30, 300), (300, 30), (40, 40), (50, 100)],
)
def test_at_the_floors_every_test_holds_its_share(n1: int, n2: int) -> None:
    # watch_margin 0.02, 30 events a side at least, the larger side's width capped at twice
    # the smaller's: at every p from 50% to 99% and every share from 0.25 to 1e-12, the exact
    # chance of a false regression is at most the share (worst over this grid: 0.93 of it;
    # README "When the bound holds" has the wider scan). A larger margin only regresses less.
    assert (WATCH_MARGIN_MIN, WATCH_MIN_EVIDENCE_MIN, IMBALANCE_CAP) == (0.02, 30, 2.0)
    ratio, p, share = worst_ratio(n1, n2, WATCH_MARGIN_MIN, IMBALANCE_CAP)
    assert ratio <= 1.0, (ratio, p, share)


@pytest.mark.parametrize(
    ("n1", "n2", "margin", "cap", "over"),
    [
        # Margin 0, 30 a side (allowed before the floors): 1.08 times its share at p = 0.85.
        (30, 30, 0.0, IMBALANCE_CAP, 1.05),
        # Under 30 a side: 20 a side at the margin, 1.07 times its share at p = 0.5.
        (20, 20, 0.02, IMBALANCE_CAP, 1.05),
        # 10 new against 400 old without the cap (a module entering the twin-wide comparison
        # at 10 a side beside most of the old weight): 2.9 times its share at high p.
        (10, 400, 0.02, None, 2.0),
    ],
)
def test_without_the_floors_or_the_cap_a_test_overspends(
    n1: int, n2: int, margin: float, cap: float | None, over: float
) -> None:
    ratio, _, _ = worst_ratio(n1, n2, margin, cap)
    assert ratio > over


def test_with_the_cap_a_small_new_side_beside_a_large_old_one_holds() -> None:
    # The same 10 against 400 with the old side's width capped at that of 20 events.
    assert worst_ratio(10, 400, WATCH_MARGIN_MIN, IMBALANCE_CAP)[0] <= 1.0


def test_the_smallest_plan_the_database_allowed_overspent_its_alpha() -> None:
    # min_evidence 1, pass_evidence 2, one look, margin 0 (allowed before 20261218000700): one
    # test at 2 a side spends all of alpha 0.05 over 2 comparisons (0.025 each). 0 of 2 against
    # 2 of 2 regresses, 1/16 at p = 0.5: 6.25%, 2.5 times its share. Refused now.
    assert regressing(2, 2, 0.025, 0.0, None) == [(0, 2)]
    with pytest.raises(ValueError):
        WatchSettings(min_evidence=1, pass_evidence=2, looks=1, margin=0.0)


# --- the twin-wide comparison: several modules (strata) -----------------------------------------

Side = dict[float, dict[float, tuple[float, tuple[int, ...]]]]
"""A side's standardised pass rate (rounded, so that equal sums meet) -> the square of its
strata's combined distance to the bound that matters (rounded likewise) -> the probability of
the outcome vectors with both, and one such vector x_k."""


NEGLIGIBLE = 1e-40
"""A count whose probability is below this is left out of a side's distribution: what that
drops, at most 1e-40 per count and stratum, is far below any share checked."""


def _standardised_rates(sizes: list[int], weights: list[float], rates: list[float],
                        squares: list[list[float]]) -> Side:
    """The distribution of (Σ w_k x_k / n_k, Σ squares[k][x_k]) with x_k ~ Binomial(n_k, p_k),
    independent."""
    out: Side = {0.0: {0.0: (1.0, ())}}
    for n, w, p, square in zip(sizes, weights, rates, squares, strict=True):
        step: Side = {}
        for rate, by_square in out.items():
            for x, px in enumerate(_pmf(n, p)):
                if px < NEGLIGIBLE:
                    continue
                into = step.setdefault(round(rate + w * x / n, 12), {})
                for total, (chance, xs) in by_square.items():
                    key = round(total + square[x], 15)
                    was = into.get(key, (0.0, (*xs, x)))
                    into[key] = (was[0] + chance * px, was[1])
        out = step
    return out


def strata_regress_chance(sides: list[tuple[int, int]], rates: list[float], share: float,
                          margin: float = WATCH_MARGIN_MIN, effective_size_only: bool = False
                          ) -> float:
    """The exact chance that the twin-wide test over strata of (n1, n2) events, both sides of
    stratum k at the true pass rate rates[k], calls a regression at the one-sided level
    `share`, by the worker's `standardized_interval` (with the cap), taken apart: its upper
    bound is d + √(up1² + down2²), each distance the wider of the effective-size one (a
    function of that side's standardised rate, which grows with the new side's rate) and the
    strata's combined one, √(Σ w_k² d_k(x_k)²), each stratum's distance a function of its own
    count. So every outcome vector is summed by (rate, Σ w_k² d_k²), and only pairs of rates
    that regress under the effective-size distances alone are judged in full.
    `test_the_exact_strata_scan_agrees_with_a_full_enumeration` checks the chance against a full
    enumeration judged by the worker's own `standardized_interval`. With `effective_size_only`,
    the chance under the effective-size distances alone (the interval before the strata's own
    were taken as well)."""
    z = -NormalDist().inv_cdf(share)
    news, olds = [n1 for n1, _ in sides], [n2 for _, n2 in sides]
    weights = [n2 / sum(olds) for n2 in olds]
    # Each stratum's own distance, weighted and squared, per count: new side up, old side down.
    up = [[(w * strata_distances([(x, n1, 0, n2)], z, IMBALANCE_CAP)[0]) ** 2
           for x in range(n1 + 1)] for n1, n2, w in zip(news, olds, weights, strict=True)]
    down = [[(w * strata_distances([(0, n1, x, n2)], z, IMBALANCE_CAP)[3]) ** 2
             for x in range(n2 + 1)] for n1, n2, w in zip(news, olds, weights, strict=True)]
    if effective_size_only:
        up, down = [[0.0] * len(u) for u in up], [[0.0] * len(d) for d in down]
    new_side = sorted(_standardised_rates(news, weights, rates, up).items())
    chance = 0.0
    for rate2, old_vectors in _standardised_rates(olds, weights, rates, down).items():
        xs2 = next(iter(old_vectors.values()))[1]
        # The old side's down2² = max(kish², Σ): its outcomes by Σ, with running chances.
        down_squares = sorted(old_vectors)
        below = list(itertools.accumulate(old_vectors[d][0] for d in down_squares))
        for rate1, new_vectors in new_side:
            first = [(a, n1, b, n2) for a, n1, b, n2 in
                     zip(next(iter(new_vectors.values()))[1], news, xs2, olds, strict=True)]
            kish_up1, _, _, kish_down2 = effective_size_distances(first, z, IMBALANCE_CAP)
            gap = rate2 - rate1 - margin  # regresses when √(up1² + down2²) < gap
            if gap <= 0 or kish_up1 ** 2 + kish_down2 ** 2 >= gap ** 2:
                break
            for up_square, (p_new, _) in new_vectors.items():
                room = gap ** 2 - max(kish_up1 ** 2, up_square)  # down2² must stay below it
                if room > kish_down2 ** 2:
                    under = bisect.bisect_left(down_squares, room)
                    chance += p_new * (below[under - 1] if under else 0.0)
    return chance


def _mover_upper(strata: list[tuple[int, int, int, int]], z: float) -> float:
    """The twin-wide upper bound the worker used before the effective size: each stratum's own
    Wilson intervals combined by variance recovery (Zou and Donner 2008) alone, the larger side
    capped as now."""
    up1, _, _, down2 = strata_distances(strata, z, IMBALANCE_CAP)
    return standardized_difference(strata) + math.hypot(up1, down2)


def test_the_exact_strata_scan_agrees_with_a_full_enumeration() -> None:
    # Two strata of 6 and 9 events at different rates, every outcome judged one by one by the
    # worker: the scan, which takes the bound apart, gives the same chance. The strata's own
    # distances are wider than the effective-size ones in some outcomes here (the chance under
    # those alone is larger), so both parts of the decision are checked.
    z = -NormalDist().inv_cdf(0.01)
    sides, rates = [(6, 9), (9, 6)], [0.7, 0.95]
    full = effective_only = 0.0
    for a in range(7):
        for b in range(10):
            for c in range(10):
                for e in range(7):
                    strata = [(a, 6, b, 9), (c, 9, e, 6)]
                    chance = (_pmf(6, 0.7)[a] * _pmf(9, 0.7)[b] * _pmf(9, 0.95)[c]
                              * _pmf(6, 0.95)[e])
                    if standardized_interval(strata, z, IMBALANCE_CAP)[2] < -0.02:
                        full += chance
                    up1, _, _, down2 = effective_size_distances(strata, z, IMBALANCE_CAP)
                    if standardized_difference(strata) + math.hypot(up1, down2) < -0.02:
                        effective_only += chance
    assert 0 < full < 0.7 * effective_only
    assert strata_regress_chance(sides, rates, 0.01) == pytest.approx(full, rel=1e-9)


STRATA_SHARES = [0.025, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10]


def test_three_modules_at_the_floor_hold_their_share_at_every_level() -> None:
    # The review's case: three modules of 10 events a side (STRATUM_MIN_EVIDENCE, and 30 a
    # side in all), the same pass rate on both sides. Each stratum's own Wilson interval,
    # combined by variance recovery, regressed at 67 times the share at 1e-6 and 1.04 times at
    # 0.025 (p = 0.5); one Wilson interval per side at Kish's effective size holds everywhere.
    assert STRATUM_MIN_EVIDENCE == 10
    worst = max((strata_regress_chance([(10, 10)] * 3, [p] * 3, share) / share, p, share)
                for share in STRATA_SHARES for p in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99))
    assert worst[0] <= 1.0, worst


@pytest.mark.parametrize(
    ("sides", "rates"),
    [
        # A module holding most of the old side's weight enters with 10 new events.
        ([(10, 360), (30, 20), (30, 20)], [0.7, 0.99, 0.9]),
        ([(10, 400), (10, 10), (10, 10)], [0.7, 0.5, 0.5]),
        # Unequal sides both ways, rates apart.
        ([(40, 10), (10, 40), (10, 10)], [0.9, 0.7, 0.7]),
        ([(12, 30), (30, 12), (15, 15)], [0.7, 0.9, 0.7]),
        ([(10, 10)] * 4, [0.5, 0.99, 0.5, 0.99]),
    ],
)
def test_modules_at_different_rates_and_sizes_hold_their_share(
    sides: list[tuple[int, int]], rates: list[float]
) -> None:
    for share in (0.025, 1e-3, 1e-6):
        assert strata_regress_chance(sides, rates, share) <= share, share


@pytest.mark.parametrize("large_rate", [0.99, 0.999])
def test_a_heavy_module_at_a_lower_rate_beside_a_large_one_holds_its_share(
    large_rate: float
) -> None:
    # A review's case: a module with a fifth of the old weight (400 old events) enters with 10
    # new at 85%, beside a module of 3,200 new and 1,600 old at 99% or 99.9%. The effective size
    # assumes one rate for both and took the new side's variance as a third of what it is: alone
    # it regressed at up to 1.5 and 2.2 times the share at 1e-4, 3.2 and 7.8 at 1e-6 and 1e-8.
    sides, rates = [(10, 400), (3200, 1600)], [0.85, large_rate]
    for share in (1e-3, 1e-4, 1e-6, 1e-8):
        assert strata_regress_chance(sides, rates, share) <= share, share
    assert strata_regress_chance(sides, rates, 1e-4, effective_size_only=True) > 1.4e-4


def test_each_modules_own_interval_combined_overspent_at_an_early_looks_level() -> None:
    # What the review found, with the combination the worker used before:
    # three modules of 10 a side at p = 0.5, share 1e-6 (an early look's).
    z, share = -NormalDist().inv_cdf(1e-6), 1e-6
    f = _pmf(10, 0.5)
    chance = sum(
        f[a] * f[b] * f[c] * f[d] * f[e] * f[g]
        for a in range(11) for b in range(11) for c in range(11)
        for d in range(11) for e in range(11) for g in range(11)
        if a + c + e <= 12 and b + d + g >= 18
        and _mover_upper([(a, 10, b, 10), (c, 10, d, 10), (e, 10, g, 10)], z) < -0.02)
    assert chance > 50 * share


def _wide_scan() -> None:  # pragma: no cover - by hand: about ten minutes
    pairs = []
    for n in [*range(30, 81), 100, 150, 200, 300, 400]:
        for f in (1, 1.25, 1.5, 1.75, 2, 3, 10):
            m = round(n * f)
            pairs += [(n, m)] + ([(m, n)] if f != 1 else [])
    worst = max((*worst_ratio(n1, n2, WATCH_MARGIN_MIN, IMBALANCE_CAP), n1, n2)
                for n1, n2 in pairs)
    print(f"{len(pairs)} pairs: worst actual/nominal {worst[0]:.3f} at p={worst[1]}, "
          f"share={worst[2]}, n1={worst[3]}, n2={worst[4]}")


def _strata_scan() -> None:  # pragma: no cover - by hand: about half an hour
    """The README's scans of twin-wide comparisons: a grid of a small module with much of the
    old weight beside a large one at 99% or 99.9%, and random mixes of two and three modules."""
    grid = list(itertools.product([10, 20], [100, 400, 1600], [0.5, 0.8, 0.85, 0.9], [800, 3200],
                                  [400, 1600], [0.99, 0.999], [1e-3, 1e-5, 1e-8]))
    ours = alone = 0.0
    over = 0
    for a1, a2, pa, b1, b2, pb, share in grid:
        sides, rates = [(a1, a2), (b1, b2)], [pa, pb]
        ours = max(ours, strata_regress_chance(sides, rates, share) / share)
        ratio = strata_regress_chance(sides, rates, share, effective_size_only=True) / share
        alone, over = max(alone, ratio), over + (ratio > 1)
    print(f"grid, {len(grid)} tests: worst {ours:.3f} of the share; the effective size alone "
          f"overspent in {over}, up to {alone:.2f} times")
    rng = random.Random(1)
    for strata, sizes, count in ((2, [10, 12, 15, 20, 30, 45, 60, 100, 200, 400], 100),
                                 (3, [10, 12, 15, 20, 30, 45, 60, 100], 100)):
        worst = 0.0
        for _ in range(count):
            sides = [(rng.choice(sizes), rng.choice(sizes)) for _ in range(strata)]
            rates = [rng.choice([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999])
                     for _ in range(strata)]
            worst = max([worst] + [strata_regress_chance(sides, rates, share) / share
                                   for share in (0.025, 1e-3, 1e-5, 1e-8, 1e-10)])
        print(f"{count} random mixes of {strata} modules, 5 shares each: worst {worst:.3f}")


if __name__ == "__main__":  # pragma: no cover
    import random
    import sys

    if sys.argv[1:] == ["strata"]:
        _strata_scan()
    else:
        _wide_scan()
