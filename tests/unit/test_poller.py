"""serve's pollers go on after a pass that raised, and say so (log, count)."""

from __future__ import annotations

import logging
import threading

import pytest

from worker.runner import poll_until_stopped
from worker.store import StoreError


@pytest.mark.timeout(10)
def test_a_pass_that_raises_is_logged_counted_and_the_poller_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception (here a ValueError, as one bad row once raised) and a store
    error each count as an idle pass: the poller logs it (the unexpected one with its
    traceback), tells `on_failure`, and calls the step again."""
    stop = threading.Event()
    calls: list[int] = []
    failures: list[int] = []

    def step() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("Out of range float values are not JSON compliant")
        if len(calls) == 2:
            raise StoreError("database unreachable", "PGRST000")
        if len(calls) == 3:
            return True
        stop.set()
        return False

    with caplog.at_level(logging.INFO, logger="worker.runner"):
        poll_until_stopped("langfuse-outbox", step, stop, 0.001, 0.002,
                           on_failure=lambda: failures.append(1))
    assert len(calls) == 4 and len(failures) == 2
    crashed = [r for r in caplog.records if r.getMessage().startswith("poll crashed")]
    assert len(crashed) == 1 and crashed[0].levelname == "ERROR"
    assert crashed[0].exc_info is not None and crashed[0].exc_info[0] is ValueError
    assert [r.levelname for r in caplog.records if r.getMessage() == "poll failed"] == ["WARNING"]


@pytest.mark.timeout(10)
def test_a_failing_count_does_not_stop_the_poller() -> None:
    stop = threading.Event()
    calls: list[int] = []

    def step() -> bool:
        calls.append(1)
        if len(calls) >= 3:
            stop.set()
        raise RuntimeError("boom")

    def broken() -> None:
        raise RuntimeError("metrics broken")

    poll_until_stopped("learning-runs", step, stop, 0.001, 0.002, on_failure=broken)
    assert len(calls) == 3
