"""After the writes: waiting until everything is learned and delivered."""

from __future__ import annotations

import time

from soak.config import log
from soak.processes import Workers
from testkit.wait import wait_until
from testkit.world import connect

DRAIN_SQL = """
select
  (select count(*) from twins t
    where t.learned_through_event_id
          < coalesce((select max(e.id) from persona_training_events e where e.twin_id = t.id), 0))
    as twins_behind,
  (select count(*) from persona_feedback_learning_runs where status in ('queued', 'running'))
    as active_runs,
  (select count(*) from persona_training_events where langfuse_status in ('pending', 'retrying'))
    as open_outbox,
  (select count(*) from persona_training_events
    where langfuse_status in ('pending', 'retrying') and langfuse_next_attempt_at <= now())
    as due_outbox,
  -- rows not due wait for a retry delay or for the claim window of a worker that died
  (select ceil(extract(epoch from max(langfuse_next_attempt_at) - now()))::int
     from persona_training_events where langfuse_status in ('pending', 'retrying'))
    as last_due_in_s
"""


def drain(
    database_url: str, workers: Workers, deadline_s: float
) -> tuple[bool, float, dict[str, int]]:
    """Waits until every event is learned, no run is queued or running and no outbox row is open
    (pending or retrying, due or waiting for its retry or claim window)."""
    started = time.monotonic()
    last_report = started
    state: dict[str, int] = {}
    names = ("twins_behind", "active_runs", "open_outbox", "due_outbox", "last_due_in_s")

    def drained() -> bool:
        nonlocal last_report
        state.update(zip(names, db.execute(DRAIN_SQL).fetchone() or (), strict=True))
        if not (state["twins_behind"] or state["active_runs"] or state["open_outbox"]):
            return True
        if time.monotonic() - last_report >= 10:
            last_report = time.monotonic()
            log(f"draining: {state}")
        for name in workers.ensure():
            log(f"worker {name} had exited ({workers.exits[name]}); replaced")
        return False

    with connect(database_url) as db:
        try:
            wait_until(drained, deadline_s, "the drain", every=0.5)
        except TimeoutError:
            return False, time.monotonic() - started, state
    return True, time.monotonic() - started, state
