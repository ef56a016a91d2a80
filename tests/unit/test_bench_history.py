"""Benchmark case 2's verdicts (bench/learning.py, bench/report.py) from figures alone: which CPU
is judged, how the rounds are combined, and that a run whose cost grew is failed."""

from __future__ import annotations

from typing import Any

from bench.learning import paired, unpaired
from bench.report import report_rows


def trial(db: float, api: float | None = None, control: float = 0.028) -> dict[str, Any]:
    return {
        "db_cpu_seconds": db,
        "api_cpu_seconds": db + 0.005 if api is None else api,
        "run_seconds": db * 0.8,
        "control_cpu_seconds": control,
    }


def side(*trials: dict[str, Any]) -> dict[str, Any]:
    """A twin's figures as history_trials returns them: medians over its trials."""
    keys = ("db_cpu_seconds", "api_cpu_seconds", "run_seconds", "control_cpu_seconds")
    out: dict[str, Any] = {k: sorted(t[k] for t in trials)[len(trials) // 2] for k in keys}
    return out | {"seconds": 0.5, "events_processed": 50_000, "trials": list(trials)}


def test_paired_judges_the_backends_cpu_round_by_round() -> None:
    # PostgREST's CPU (api minus db) is large and erratic in the floor's rounds; the judged
    # ratio is that of the backends alone, the median of the rounds' ratios.
    got = side(trial(0.066, api=0.071), trial(0.070, api=0.075), trial(0.130, api=0.135))
    floor = side(trial(0.066, api=0.150), trial(0.064, api=0.210), trial(0.065, api=0.160))
    out = paired(got, floor)
    assert out["round_ratios"] == [1.0, 1.094, 2.0]
    assert out["ratio"] == 1.094
    assert out["api_ratio"] < 0.5  # what judging the API's CPU would have said


def test_unpaired_takes_each_trial_in_units_of_the_control_measured_around_it() -> None:
    # The machine ran 10 % slower after the load: the runs and the control alike. The judged
    # ratio is that of the phases' medians in control units (1.0); the plain ratio beside it.
    before = side(trial(0.060, control=0.028), trial(0.061, control=0.028), trial(0.059))
    after = side(
        trial(0.066, control=0.0308), trial(0.0671, control=0.0308), trial(0.0649, control=0.0308)
    )
    out = unpaired(after, before)
    assert out["ratio"] == 1.0
    assert out["cpu_ratio"] == 1.1
    assert out["control_ratio"] == 1.1


def history_result(table_after: float) -> dict[str, Any]:
    none = side(trial(0.065), trial(0.066), trial(0.064))
    grown = side(trial(table_after), trial(table_after), trial(table_after))
    hist = side(trial(0.070), trial(0.071), trial(0.069))
    check = {"modules_checked": 50, "max_relative_error": 1e-15}
    return {
        "history_events": 5_000_000,
        "new_events": 50_000,
        "before": {"no_draft": none, "draft": none},
        "after": {"no_draft": grown, "draft": grown, "history_no_draft": hist},
        "after_draft": {"draft": none, "history_draft": hist},
        "comparisons": {
            "no_draft": {"history": paired(hist, none), "table": unpaired(grown, none)},
            "draft": {"history": paired(hist, none), "table": unpaired(grown, none)},
        },
        "check": {"no_history": check},
    }


def test_a_run_that_grew_with_the_table_fails_the_full_size_case() -> None:
    ok = report_rows({"history": history_result(0.066)}, quick=False)
    grown = report_rows({"history": history_result(0.080)}, quick=False)  # 1.23 × before
    table_rows = [r for r in grown if "more rows in the table" in r.case]
    assert len(table_rows) == 2
    assert {r.verdict for r in table_rows} == {"FAIL"}
    assert all(r.ratio == 1.231 for r in table_rows)  # the control did not move
    assert {r.verdict for r in ok if r.case.startswith("2 ")} == {"pass"}
