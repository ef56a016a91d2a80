"""Benchmark case 4's rate at equal p99 (bench/ingest.py, bench/report.py) from figures alone:
which points fit the budget, and what is reported when none of the endpoint's do."""

from __future__ import annotations

from typing import Any

from bench.ingest import rate_at_equal_p99
from bench.report import equal_p99_row


def rounds(rate: float, p99_ms: float) -> dict[str, Any]:
    """A path's summary of the rounds at 16 connections, as bench.ingest's summary() gives it."""
    return {"rate": rate, "latency_ms": {"p50": p99_ms / 3, "p99": p99_ms}}


def points(*pairs: tuple[int, float, float]) -> list[dict[str, float]]:
    return [{"connections": c, "rate": r, "p99_ms": p} for c, r, p in pairs]


def test_each_path_gets_its_best_rate_with_its_p99_within_ours_at_16_connections() -> None:
    sweep = {
        "events": points((1, 300, 4), (2, 500, 6), (4, 700, 12), (8, 760, 25), (16, 750, 47)),
        "fastapi": points((1, 120, 15), (2, 190, 30), (4, 215, 49), (8, 225, 110), (16, 227, 240)),
    }
    equal = rate_at_equal_p99(rounds(730, 48), rounds(227, 234), sweep)

    assert equal["budget_ms"] == 48
    # Ours: the sweep's 8 connections beat the rounds' 730/s within 48 ms.
    assert (equal["ours"]["connections"], equal["ours"]["rate"]) == (8, 760)
    # Theirs: 4 connections at 49 ms is over the budget, 2 connections at 30 ms is the best within.
    assert (equal["theirs"]["connections"], equal["theirs"]["rate"]) == (2, 190)
    assert equal["ratio"] == round(760 / 190, 3)


def test_the_endpoint_within_the_budget_only_at_its_rounds_counts_them() -> None:
    sweep = {"events": points((16, 700, 60)), "fastapi": points((1, 100, 90), (16, 110, 80))}
    equal = rate_at_equal_p99(rounds(720, 50), rounds(230, 40), sweep)

    assert equal["ours"] == {"connections": 16, "rate": 720, "p99_ms": 50}
    assert equal["theirs"] == {"connections": 16, "rate": 230, "p99_ms": 40}
    assert equal["ratio"] == round(720 / 230, 3)


def test_no_endpoint_point_within_the_budget_is_reported_as_such() -> None:
    sweep = {"events": points((1, 300, 3)), "fastapi": points((1, 120, 15), (2, 190, 30))}
    equal = rate_at_equal_p99(rounds(730, 10), rounds(227, 234), sweep)

    assert equal["theirs"] is None and equal["ratio"] is None
    row = equal_p99_row(equal)
    assert row.floor == "FastAPI: no p99 within it (lowest 15.0 ms)"
    assert row.ratio is None and row.verdict == "-"
    assert row.measured == "730/s at 16 connections (p99 10.0 ms)"
    assert row.case.startswith("4 rate at equal p99 (≤ 10.0 ms, ours at 16 connections)")
    assert row.case.endswith("FastAPI at 1, 2, 16 connections")


def test_one_connection_is_written_in_the_singular() -> None:
    sweep = {"events": points((1, 300, 3)), "fastapi": points((1, 120, 4.6))}
    row = equal_p99_row(rate_at_equal_p99(rounds(730, 4.7), rounds(227, 234), sweep))
    assert row.floor == "120/s at 1 connection (p99 4.6 ms) FastAPI"
