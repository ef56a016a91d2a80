"""The batched path's pieces that need no database: one run's error in a batched answer, the
requests' size bound, the setting's bounds."""

import json

import pytest
from pydantic import SecretStr, ValidationError

from worker.config import WorkerSettings
from worker.runner import MAX_CLAIM_RUNS, Runner
from worker.store import (
    BATCH_BODY_BYTES,
    BatchChangedError,
    StaleLeaseError,
    StoreError,
    _chunks,
    _run_error,
)


@pytest.mark.parametrize(
    ("code", "expected"),
    [("PT409", StaleLeaseError), ("PT412", BatchChangedError), ("PT422", StoreError),
     ("22023", StoreError)],
)
def test_a_runs_error_in_a_batched_answer_is_the_one_run_calls_error(code, expected):
    error = _run_error({"code": code, "message": "run x: refused"})
    assert type(error) is expected
    assert (error.code, str(error)) == (code, "run x: refused")


def test_requests_stay_under_the_body_bound_in_order():
    items = [{"run_id": str(i), "pad": "x" * 700} for i in range(40)]
    chunks = list(_chunks(items))  # type: ignore[arg-type]
    assert [item for chunk in chunks for item in chunk] == items
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(json.dumps(chunk, separators=(",", ":"))) <= BATCH_BODY_BYTES


def test_an_item_larger_than_the_bound_goes_alone():
    big = {"pad": "x" * (2 * BATCH_BODY_BYTES)}
    assert list(_chunks([{"a": 1}, big, {"b": 2}])) == [[{"a": 1}], [big], [{"b": 2}]]


@pytest.mark.parametrize("runs", [0, -1, MAX_CLAIM_RUNS + 1])
def test_a_runner_refuses_a_bad_number_of_runs_per_call(runs):
    with pytest.raises(ValueError, match="claim_runs must be 1 to 100"):
        Runner(store=None, worker_id="w", lease_seconds=60, claim_runs=runs)  # type: ignore[arg-type]


@pytest.mark.parametrize("runs", ["0", "101", "x"])
def test_the_setting_refuses_a_bad_number_of_runs_per_call(runs, monkeypatch):
    monkeypatch.setenv("PFL_CLAIM_RUNS", runs)
    with pytest.raises(ValidationError, match="pfl_claim_runs"):
        WorkerSettings(supabase_url="http://127.0.0.1:1", supabase_service_role_key=SecretStr("k"))


def test_the_setting_defaults_to_sixteen(monkeypatch):
    monkeypatch.delenv("PFL_CLAIM_RUNS", raising=False)
    settings = WorkerSettings(
        supabase_url="http://127.0.0.1:1", supabase_service_role_key=SecretStr("k"))
    assert settings.pfl_claim_runs == 16
