"""serve's health rule and metrics, with a clock and a store of the test's own."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from uuid import uuid4

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import MetricsServer, WorkerMetrics
from worker.store import OutboxBacklog, Run, StoreError, TransientStoreError


class FakeStore:
    def __init__(self) -> None:
        self.backlog: OutboxBacklog | StoreError = OutboxBacklog(rows=0)

    def outbox_backlog(self) -> OutboxBacklog:
        if isinstance(self.backlog, StoreError):
            raise self.backlog
        return self.backlog


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(metrics: WorkerMetrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def make(store: FakeStore, clock: Clock, max_age: float = 90.0) -> WorkerMetrics:
    return WorkerMetrics(store, max_age, clock=clock)  # type: ignore[arg-type]


def run(status: str, processed: int | None) -> Run:
    return Run(id=uuid4(), twin_id=uuid4(), status=status, trigger="schedule",  # type: ignore[arg-type]
               safe_mode=True, attempts=1, max_attempts=3, events_processed=processed,
               created_at=datetime.now(UTC))


def test_health_follows_the_age_of_the_last_successful_poll_for_runs() -> None:
    clock = Clock(1000.0)
    metrics = make(FakeStore(), clock)
    healthy, facts = metrics.health()
    assert (healthy, facts["status"], facts["last_successful_poll_age_seconds"]) == (
        False, "unhealthy", None)
    assert facts["max_age_seconds"] == 90.0
    metrics.poll_succeeded("langfuse-outbox")  # the mirror's polls do not make it healthy
    assert metrics.health()[0] is False
    metrics.poll_succeeded("learning-runs")
    clock.now = 1090.0
    healthy, facts = metrics.health()
    assert (healthy, facts["status"], facts["last_successful_poll_age_seconds"]) == (
        True, "ok", 90.0)
    clock.now = 1090.5
    healthy, facts = metrics.health()
    assert not healthy and facts["last_successful_poll_age_seconds"] == 90.5
    metrics.poll_succeeded("learning-runs")
    assert metrics.health()[0] is True


def test_a_failing_mirror_turns_health_unhealthy_and_is_counted() -> None:
    """The mirror's poller failing (every pass raising) for longer than the bound makes the
    worker unhealthy, though runs go on; a slow or idle mirror (no poll for a while, none
    failed) does not; a success makes it healthy again. Failures are counted per poller."""
    clock = Clock(1000.0)
    metrics = make(FakeStore(), clock)
    metrics.poll_succeeded("learning-runs")
    metrics.poll_succeeded("langfuse-outbox")
    clock.now = 1080.0
    metrics.poll_succeeded("learning-runs")
    assert metrics.health()[0] is True  # no mirror poll for 80 s, none failed: fine
    metrics.poll_failed("langfuse-outbox")
    metrics.poll_failed("langfuse-outbox")
    assert metrics.health()[0] is True  # failing, but only 80 s since its last success
    clock.now = 1090.5
    metrics.poll_succeeded("learning-runs")
    healthy, facts = metrics.health()
    assert not healthy and facts["status"] == "unhealthy"
    assert facts["pollers"]["langfuse-outbox"] == {  # type: ignore[index]
        "last_successful_poll_age_seconds": 90.5, "failures": 2, "failing": True,
        "pass_age_seconds": None}
    assert facts["pollers"]["learning-runs"]["failing"] is False  # type: ignore[index]
    values = samples(metrics)
    assert values['pfl_poll_failures_total{poller=langfuse-outbox}'] == 2
    assert values['pfl_poll_failures_total{poller=learning-runs}'] == 0
    metrics.poll_succeeded("langfuse-outbox")
    assert metrics.health()[0] is True


def test_a_mirror_pass_running_longer_than_the_bound_is_failing() -> None:
    """A pass stuck (in a request, a store call) is failing once it has run for longer than
    the bound, though no pass failed and runs go on; its end makes the worker healthy again."""
    clock = Clock(1000.0)
    metrics = make(FakeStore(), clock)
    metrics.poll_succeeded("learning-runs")
    metrics.poll_succeeded("langfuse-outbox")
    metrics.poll_started("langfuse-outbox")
    clock.now = 1090.0
    metrics.poll_succeeded("learning-runs")
    healthy, facts = metrics.health()
    assert healthy  # 90 s into the pass: not beyond the bound yet
    assert facts["pollers"]["langfuse-outbox"]["pass_age_seconds"] == 90.0  # type: ignore[index]
    clock.now = 1090.5
    metrics.poll_succeeded("learning-runs")
    healthy, facts = metrics.health()
    assert not healthy and facts["pollers"]["langfuse-outbox"]["failing"]  # type: ignore[index]
    metrics.poll_succeeded("langfuse-outbox")  # the pass ended
    assert metrics.health()[0] is True
    metrics.poll_started("langfuse-outbox")
    clock.now = 1200.0
    metrics.poll_started("learning-runs")
    metrics.poll_failed("langfuse-outbox")  # ended by failing: no pass in progress, one failure
    healthy, facts = metrics.health()
    assert facts["pollers"]["langfuse-outbox"]["pass_age_seconds"] is None  # type: ignore[index]
    assert not healthy  # the runs' last success is 109.5 s old


def test_a_mirror_that_never_succeeded_is_failing_once_the_bound_passes() -> None:
    clock = Clock(1000.0)
    metrics = make(FakeStore(), clock)
    metrics.poll_failed("langfuse-outbox")  # its first pass crashed, and every one after
    clock.now = 1091.0
    metrics.poll_succeeded("learning-runs")
    healthy, facts = metrics.health()
    assert not healthy and facts["pollers"]["langfuse-outbox"]["failing"]  # type: ignore[index]


def test_runs_are_counted_by_outcome_with_their_events_and_durations() -> None:
    metrics = make(FakeStore(), Clock(0.0))
    metrics.observe_run("completed", run("completed", 7), 0.2)
    metrics.observe_run("completed", run("completed", 3), 3.0)
    metrics.observe_run("failed", run("failed", None), 0.01)
    metrics.observe_run("retried", run("queued", None), 0.02)
    m = samples(metrics)
    assert m["pfl_learning_runs_total{outcome=completed}"] == 2
    assert m["pfl_learning_runs_total{outcome=failed}"] == 1
    assert m["pfl_learning_runs_total{outcome=retried}"] == 1
    assert m["pfl_learning_runs_total{outcome=lease_lost}"] == 0
    assert m["pfl_learning_events_total"] == 10  # only completed runs' events
    assert m["pfl_learning_run_duration_seconds_count"] == 4
    assert m["pfl_learning_run_duration_seconds_bucket{le=0.25}"] == 3
    assert m["pfl_learning_run_duration_seconds_sum"] == pytest.approx(3.23)
    assert not any(name.endswith("_created") for name in m)


def test_the_outbox_gauges_are_read_at_scrape_time_and_left_out_when_the_read_fails() -> None:
    store = FakeStore()
    metrics = make(store, Clock(0.0))
    gauges = ("pfl_outbox_backlog", "pfl_outbox_oldest_pending_age_seconds",
              "pfl_outbox_hold_seconds")
    assert tuple(samples(metrics)[g] for g in gauges) == (0, 0, 0)
    # Langfuse asked to wait: the hold's seconds left are the third gauge
    store.backlog = OutboxBacklog(rows=42, oldest_seconds=17.5, hold_seconds=12.5,
                                  hold_reason="HTTP 429: Rate limit exceeded")
    m = samples(metrics)
    assert tuple(m[g] for g in gauges) == (42, 17.5, 12.5)
    store.backlog = TransientStoreError("unreachable")
    m = samples(metrics)
    assert not any(g in m for g in gauges)
    assert "pfl_learning_runs_total{outcome=completed}" in m


@pytest.mark.parametrize(("host", "family"), [
    ("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6), ("::", socket.AF_INET6)])
def test_the_metrics_server_listens_on_an_ipv4_or_ipv6_address(host: str, family: int) -> None:
    """PFL_METRICS_HOST may be an IPv6 address (a scraper in an IPv6-only network): the server
    takes the address's family. Only bound, not connected to: tests reach 127.0.0.1 alone."""
    server = MetricsServer(make(FakeStore(), Clock(0.0)), host, 0)
    try:
        sock = server._server.socket
        assert (sock.family, sock.getsockname()[0]) == (family, host)
        assert sock.getsockname()[1] > 0
    finally:
        server._server.server_close()
