"""Tango's score interval for the paired difference (candidate − baseline) of pass rates.

Checked four ways: against published worked values; against a brute-force computation that
shares no code with worker/gate.py (the constrained maximum-likelihood estimate found by
golden-section search on the log-likelihood instead of the closed form, the bounds by a grid
over Δ refined to 1e-7 instead of bisection); on edge cases with closed forms; and by coverage,
seeded simulation and exact enumeration, against the Wald interval the gate used before.
"""

import decimal
import math
import random
import re
from collections.abc import Callable
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.gate import TANGO_TOLERANCE, tango_interval, tango_score

Z95 = 1.959963984540054  # the 97.5% normal quantile, as the R values below use it
Interval = Callable[[int, int, int], tuple[float, float]]


# --- published worked values -----------------------------------------------------------------

# Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, chapter 8, as
# printed (4 decimals) by the test suite of its R companion package `contingencytables`
# (tests/testthat/test-ch8.R): Cavo et al. (2012), complete response before and after
# consolidation therapy, n = 161 pairs, n12 = 6, n21 = 16: estimate −0.0621, 95% CI
# −0.1240 to −0.0054; and the all-discordant tables n = 3 with n12 = 3 (CI −0.1230 to 1) and
# with n21 = 3 (CI −1 to 0.1230). b is n12, c is n21.
PUBLISHED = [
    ((161, 6, 16), (-0.1240, -0.0054)),
    ((3, 3, 0), (-0.1230, 1.0)),
    ((3, 0, 3), (-1.0, 0.1230)),
]


@pytest.mark.parametrize(("table", "expected"), PUBLISHED)
def test_published_values(table: tuple[int, int, int], expected: tuple[float, float]) -> None:
    lower, upper = tango_interval(*table, Z95)
    # printed to 4 decimals: within half a unit of the last digit
    assert lower == pytest.approx(expected[0], abs=5e-5)
    assert upper == pytest.approx(expected[1], abs=5e-5)


# --- brute force -----------------------------------------------------------------------------


def _log_likelihood(n: int, b: int, c: int, delta: float, q: float) -> float:
    """Multinomial log-likelihood of (b, c, n − b − c) with cell probabilities
    (q + Δ, q, 1 − 2q − Δ), up to a constant; a cell with count 0 adds nothing."""
    total = 0.0
    for count, p in ((b, q + delta), (c, q), (n - b - c, 1.0 - 2.0 * q - delta)):
        if count:
            total += count * math.log(p)
    return total


def _constrained_mle(n: int, b: int, c: int, delta: float) -> float:
    """q maximising the (concave) log-likelihood over its feasible range, by golden section."""
    low, high = max(0.0, -delta), (1.0 - delta) / 2.0
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = high - ratio * (high - low), low + ratio * (high - low)
    f1, f2 = _log_likelihood(n, b, c, delta, x1), _log_likelihood(n, b, c, delta, x2)
    for _ in range(80):
        if f1 < f2:
            low, x1, f1 = x1, x2, f2
            x2 = low + ratio * (high - low)
            f2 = _log_likelihood(n, b, c, delta, x2)
        else:
            high, x2, f2 = x2, x1, f1
            x1 = high - ratio * (high - low)
            f1 = _log_likelihood(n, b, c, delta, x1)
    return (low + high) / 2.0


def _brute_statistic(n: int, b: int, c: int, delta: float) -> float:
    q = _constrained_mle(n, b, c, delta)
    return (b - c - n * delta) / math.sqrt(n * (2.0 * q + delta * (1.0 - delta)))


def brute_force_interval(n: int, b: int, c: int, z: float) -> tuple[float, float]:
    """{Δ : |T(Δ)| <= z} on a grid of step 0.002 over (−1, 1), which must be one run of
    points, each end then refined by grids 20 times finer down to a step below 1e-7."""
    step = 0.002
    grid = [-1.0 + k * step for k in range(1, round(2 / step))]
    inside = [abs(_brute_statistic(n, b, c, d)) <= z for d in grid]
    first, last = inside.index(True), len(inside) - 1 - inside[::-1].index(True)
    assert all(inside[first : last + 1]), "the accepted set is not an interval"

    def refine(outside: float, within: float) -> float:
        while abs(within - outside) > 1e-7:
            points = [outside + (within - outside) * k / 20 for k in range(1, 21)]
            k = next(i for i, d in enumerate(points) if abs(_brute_statistic(n, b, c, d)) <= z)
            outside, within = (points[k - 1] if k else outside), points[k]
        return within

    lower = -1.0 if first == 0 else refine(grid[first - 1], grid[first])
    upper = 1.0 if last == len(grid) - 1 else refine(grid[last + 1], grid[last])
    return lower, upper


@pytest.mark.parametrize(
    "table",
    [
        (20, 0, 0),  # no discordant pair
        (25, 5, 0),  # the gate tests' good draft
        (25, 3, 1),  # the gate tests' failing draft
        (80, 4, 1),  # the demo's good draft
        (161, 6, 16),  # the published example
        (21, 1, 7),  # Bentur et al. (2009), the other chapter 8 example
        (20, 20, 0),  # all discordant, for the candidate
        (30, 0, 30),  # all discordant, for the baseline: lower −1
    ],
)
def test_matches_brute_force(table: tuple[int, int, int]) -> None:
    lower, upper = tango_interval(*table, Z95)
    brute = brute_force_interval(*table, Z95)
    assert lower == pytest.approx(brute[0], abs=2e-7)
    assert upper == pytest.approx(brute[1], abs=2e-7)


# --- the statistic itself, against the likelihood solved in high precision --------------------


def _precise_score(n: int, b: int, c: int, delta: float) -> float:
    """T(Δ) in 60-digit decimals, q̃ found by bisection on the likelihood's score equation
    b/(q + Δ) + c/q − 2(n − b − c)/(1 − 2q − Δ) = 0 (decreasing in q) over the feasible
    q in [max(0, −Δ), (1 − Δ)/2]: no closed form, no floating point."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        d, m = decimal.Decimal(delta), n - b - c
        low, high = max(decimal.Decimal(0), -d), (1 - d) / 2

        def slope(q: decimal.Decimal) -> decimal.Decimal:
            total = decimal.Decimal(0)
            if b:
                total += b / (q + d)
            if c:
                total += c / q
            if m:
                total -= 2 * m / (1 - 2 * q - d)
            return total

        for _ in range(250):
            mid = (low + high) / 2
            if slope(mid) > 0:
                low = mid
            else:
                high = mid
        q = (low + high) / 2
        return float((b - c - n * d) / (n * (2 * q + d * (1 - d))).sqrt())


@pytest.mark.parametrize(
    ("table", "delta"),
    [
        # No discordant pair, Δ near 0: the quadratic's discriminant (2nΔ)² is below 1.
        ((20, 0, 0), -0.001),
        ((20, 0, 0), -0.01),
        ((20, 1, 0), 0.001),
        ((20, 0, 1), -0.01),
        ((25, 5, 0), 0.1),
        ((3, 3, 0), 0.9),
        # Δ within 1e-9 of 1: q̃ ≈ 1e-10 is the difference of two numbers near 2n, which the
        # form (root − lin)/(4n) would lose to rounding (relative error 4e-8).
        ((161, 6, 16), 1 - 1e-9),
        ((80, 4, 1), 1 - 1e-9),
        ((161, 6, 16), -0.3),
        ((21, 1, 7), 0.5),
    ],
)
def test_score_matches_the_likelihood_solved_precisely(
    table: tuple[int, int, int], delta: float
) -> None:
    assert tango_score(*table, delta) == pytest.approx(_precise_score(*table, delta), rel=1e-10)


@pytest.mark.parametrize(
    ("table", "delta", "expected"),
    [
        # At Δ = 1 the constraint leaves one possible table, every pair candidate-only (q̃ = 0,
        # variance 0): any other table lies infinitely far below, that one at 0.
        ((20, 5, 3), 1.0, -math.inf),
        ((1, 0, 0), 1.0, -math.inf),
        ((20, 20, 0), 1.0, 0.0),
        # At Δ = −1, every pair baseline-only (q̃ = 1): the mirror image.
        ((20, 5, 3), -1.0, math.inf),
        ((20, 0, 20), -1.0, 0.0),
        # No discordant pair, at its estimate 0: q̃ = 0 and variance 0, numerator 0.
        ((20, 0, 0), 0.0, 0.0),
        ((1, 0, 0), 0.0, 0.0),
    ],
)
def test_score_where_the_variance_vanishes(
    table: tuple[int, int, int], delta: float, expected: float
) -> None:
    assert tango_score(*table, delta) == expected


def test_score_is_zero_at_the_estimate_and_z_at_the_bounds() -> None:
    n, b, c = 161, 6, 16
    assert tango_score(n, b, c, (b - c) / n) == pytest.approx(0.0, abs=1e-12)
    lower, upper = tango_interval(n, b, c, Z95)
    # the bisection leaves the root within TANGO_TOLERANCE; T's slope there is below 100
    assert tango_score(n, b, c, lower) == pytest.approx(Z95, abs=100 * TANGO_TOLERANCE)
    assert tango_score(n, b, c, upper) == pytest.approx(-Z95, abs=100 * TANGO_TOLERANCE)


# --- edge cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 19, 20, 72, 73, 1000])
def test_no_discordant_pair_has_a_closed_form(n: int) -> None:
    # b = c = 0: q̃ = −Δ for Δ < 0, so T(Δ)² = n·(−Δ)/(1 + Δ); T = z at Δ = −z²/(n + z²)
    bound = Z95**2 / (n + Z95**2)
    lower, upper = tango_interval(n, 0, 0, Z95)
    assert lower == pytest.approx(-bound, abs=1e-11)
    assert upper == pytest.approx(bound, abs=1e-11)


def test_twenty_agreeing_pairs_no_longer_give_zero() -> None:
    # Wald: 0 − 1.96·√0/20 = 0. Tango: −1.96²/(20 + 1.96²) = −0.1611, far below −0.05.
    lower, _ = tango_interval(20, 0, 0, 1.96)
    assert lower == pytest.approx(-3.8416 / 23.8416, abs=1e-11)
    assert lower < -0.16


@pytest.mark.parametrize(
    ("n", "b", "c", "lower", "upper"),
    [
        (20, 0, 20, -1.0, None),  # every pair favours the baseline: lower is −1 exactly
        (20, 20, 0, None, 1.0),  # every pair favours the candidate: upper is 1 exactly
        (1, 1, 0, None, 1.0),  # the smallest table
        (1, 0, 1, -1.0, None),
    ],
)
def test_all_discordant(n: int, b: int, c: int, lower: float | None, upper: float | None) -> None:
    low, high = tango_interval(n, b, c, Z95)
    d = (b - c) / n
    if lower is not None:
        assert low == lower
        assert d < high < 1.0  # the other bound is a real root, not the estimate
    if upper is not None:
        assert high == upper
        assert -1.0 < low < d


def test_the_smallest_table_is_wide() -> None:
    # n = 1, b = c = 0: ±z²/(1 + z²) = ±0.7934
    assert tango_interval(1, 0, 0, Z95) == pytest.approx((-0.79345, 0.79345), abs=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0, 0, 1.96), "pairs must be > 0"),
        ((-3, 0, 0, 1.96), "pairs must be > 0"),
        ((5, 3, 3, 1.96), "b + c <= pairs"),
        ((5, -1, 0, 1.96), "0 <= b, c"),
        ((5, 1, 1, 0.0), "z must be > 0"),
    ],
)
def test_bad_input_is_refused(args: tuple[int, int, int, float], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tango_interval(*args)


# README's "pairs a draft needs" table, every cell: (discordant share r, the draft's advantage
# a) -> the fewest pairs n from which on a draft passes, with b = round((r + a)/2 · n) and
# c = round((r − a)/2 · n) (Python's round). Rounding makes passing non-monotone near the
# edge (10% discordant, +2: 85-87 pass, 88-96 do not), so the cell is where failing stops.
PAIRS_NEEDED = [
    (0.00, 0.00, 73),
    (0.02, 0.00, 91), (0.02, 0.02, 53),
    (0.05, 0.00, 120), (0.05, 0.02, 72), (0.05, 0.05, 33),
    (0.10, 0.00, 180), (0.10, 0.02, 97), (0.10, 0.05, 47),
    (0.20, 0.00, 320), (0.20, 0.02, 185), (0.20, 0.05, 101),
    (0.30, 0.00, 467), (0.30, 0.02, 241), (0.30, 0.05, 125),
]


@pytest.mark.parametrize(("share", "advantage", "needed"), PAIRS_NEEDED)
def test_pairs_a_draft_needs_at_the_default_margin(
    share: float, advantage: float, needed: int
) -> None:
    # `needed` fails one pair fewer and passes at every size from it to 1,000 (twice the
    # largest cell; README's table was checked up to 4,000), at margin 0.05 and z = 1.96.
    def passes(n: int) -> bool:
        b, c = round((share + advantage) / 2 * n), round((share - advantage) / 2 * n)
        return tango_interval(n, b, c, 1.96)[0] >= -0.05

    assert not passes(needed - 1)
    assert all(passes(n) for n in range(needed, 1001))


# --- properties ------------------------------------------------------------------------------


@st.composite
def tables(draw: st.DrawFn, max_n: int = 400) -> tuple[int, int, int]:
    n = draw(st.integers(min_value=1, max_value=max_n))
    b = draw(st.integers(min_value=0, max_value=n))
    c = draw(st.integers(min_value=0, max_value=n - b))
    return n, b, c


@settings(deadline=None)
@given(tables())
def test_interval_contains_the_observed_difference(table: tuple[int, int, int]) -> None:
    n, b, c = table
    lower, upper = tango_interval(n, b, c, Z95)
    d = (b - c) / n
    assert -1.0 <= lower <= d <= upper <= 1.0
    assert lower < upper


@settings(deadline=None)
@given(tables(max_n=200), st.integers(min_value=2, max_value=10))
def test_interval_narrows_as_n_grows(table: tuple[int, int, int], k: int) -> None:
    # The same observed proportions from k times the pairs: T(Δ) grows by √k at every Δ, so the
    # interval lies inside the smaller sample's and is strictly narrower.
    n, b, c = table
    lower, upper = tango_interval(n, b, c, Z95)
    lower_k, upper_k = tango_interval(k * n, k * b, k * c, Z95)
    slack = 2 * TANGO_TOLERANCE
    assert lower - slack <= lower_k and upper_k <= upper + slack
    assert upper_k - lower_k < upper - lower


# --- coverage ----------------------------------------------------------------------------------


def wald_interval(n: int, b: int, c: int) -> tuple[float, float]:
    """The gate's former interval: d ± z·√(b + c − (b − c)²/n)/n (Newcombe 1998, method 1)."""
    d = (b - c) / n
    radius = Z95 * math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n
    return d - radius, d + radius


@cache
def tango95(n: int, b: int, c: int) -> tuple[float, float]:
    return tango_interval(n, b, c, Z95)


# True cell probabilities (candidate-only pass, baseline-only pass): a candidate exactly at the
# default margin, 5 points worse than the baseline. MODERATE: 25% of pairs discordant. SPARSE: 7%
# discordant, which is where Wald's interval collapses (no discordant pair gives [0, 0]).
MODERATE = (0.10, 0.15)
SPARSE = (0.01, 0.06)


def simulate(n: int, cells: tuple[float, float], draws: int, seed: int) -> dict[str, float]:
    """Seeded: `draws` samples of n pairs; the share of intervals that contain the true
    difference, and the share whose lower bound lies above it (the gate's false passes)."""
    rng = random.Random(seed)
    p_b, p_c = cells
    delta = p_b - p_c
    cum_weights = [p_b, p_b + p_c, 1.0]
    hits = {"tango": 0, "wald": 0, "tango_above": 0, "wald_above": 0}
    for _ in range(draws):
        sample = rng.choices((0, 1, 2), cum_weights=cum_weights, k=n)
        b, c = sample.count(0), sample.count(1)
        for name, interval in (("tango", tango95), ("wald", wald_interval)):
            lower, upper = interval(n, b, c)
            hits[name] += lower <= delta <= upper
            hits[f"{name}_above"] += lower > delta
    return {key: count / draws for key, count in hits.items()}


def exact_coverage(n: int, cells: tuple[float, float], interval: Interval) -> float:
    """Coverage summed over every table with its multinomial probability (terms < 1e-15 left
    out, which changes the sum by less than 1e-9 at these n)."""
    p_b, p_c = cells
    p_0, delta = 1.0 - p_b - p_c, p_b - p_c
    total = 0.0
    for b in range(n + 1):
        for c in range(n + 1 - b):
            log_p = (
                math.lgamma(n + 1)
                - math.lgamma(b + 1)
                - math.lgamma(c + 1)
                - math.lgamma(n - b - c + 1)
                + b * math.log(p_b)
                + c * math.log(p_c)
                + (n - b - c) * math.log(p_0)
            )
            if log_p < -35.0:
                continue
            lower, upper = interval(n, b, c)
            total += math.exp(log_p) * (lower <= delta <= upper)
    return total


# Tolerance: |coverage − 0.95| <= 0.025. The exact coverage of Tango's interval at MODERATE is
# 0.9596, 0.9552 and 0.9513 at n = 20, 50 and 200 (test_exact_coverage): the interval's own
# discreteness keeps it up to 0.01 from nominal. 5,000 draws add a standard error of
# √(0.95·0.05/5000) = 0.0031, so 0.025 leaves more than four standard errors beyond the 0.01.
TOLERANCE = 0.025


@pytest.mark.parametrize("n", [20, 50, 200])
def test_simulated_coverage_is_close_to_95_percent(n: int) -> None:
    rates = simulate(n, MODERATE, draws=5000, seed=14_000 + n)
    assert abs(rates["tango"] - 0.95) <= TOLERANCE
    # one-sided: the lower bound misses upwards about 2.5% of the time (exact 0.026, 0.022, 0.024)
    assert rates["tango_above"] <= 0.025 + TOLERANCE


@pytest.mark.parametrize("n", [20, 50, 200])
def test_simulated_coverage_where_wald_fails(n: int) -> None:
    rates = simulate(n, SPARSE, draws=5000, seed=14_500 + n)
    # Tango's interval errs on the safe side here (exact 0.9989, 0.9767, 0.9546)...
    assert rates["tango"] >= 0.95 - TOLERANCE
    assert rates["tango_above"] <= 0.025 + TOLERANCE
    if n == 20:
        # ...Wald's covers the truth 70.5% of the time (exact) and its lower bound is above it
        # 29% of the time: with the Wald gate, a draft exactly 5 points worse passed 29% of
        # the time instead of at most 2.5%.
        assert rates["wald"] < 0.80
        assert rates["wald_above"] > 0.20


def test_exact_coverage() -> None:
    for n, expected in ((20, 0.9596), (50, 0.9552), (200, 0.9513)):
        assert exact_coverage(n, MODERATE, tango95) == pytest.approx(expected, abs=1e-4)
    assert exact_coverage(20, SPARSE, tango95) == pytest.approx(0.9989, abs=1e-4)
    assert exact_coverage(20, SPARSE, wald_interval) == pytest.approx(0.7051, abs=1e-4)
