"""The scheduler's poll (enqueue_due_learning_runs without a twin) looks only at candidates, not
at every twin: these tests fail if a twin that is due is missed.

Each case is one way a twin becomes due: an event after its cursor (also one whose id was taken
before a later event's but that committed after it), more events than one run takes, a run that
failed, a cursor moved back by hand, a changed evidence generation, a production watch past its
expiry. The poll is called as the worker and pg_cron call it, for every twin; other tests' twins
may be queued too, so each test looks at its own twins' runs only.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable
from datetime import datetime

import psycopg
import pytest

from testkit.world import make_twin, make_users, scalar
from tests.conftest import Stack, User
from tests.integration.helpers import Refusal, pfl, time_passes, worker_env
from worker.runner import Runner

pytestmark = pytest.mark.integration

INTENT = "factual_with_evidence"


def audit(conn: psycopg.Connection, twin_id: str) -> int:
    """An audit of no spec for the twin (evidence for its modules); its event id."""
    return int(scalar(
        conn,
        "insert into public.persona_training_events (twin_id, source, trace_id, passed, "
        "intent_label) values (%s, 'persona_audit', %s, true, %s) returning id",
        twin_id, f"trace-{uuid.uuid4().hex[:8]}", INTENT,
    ))


def poll(db: psycopg.Connection) -> set[str]:
    """One poll for every twin; the twins it queued a run for."""
    rows = db.execute("select twin_id::text from public.enqueue_due_learning_runs()").fetchall()
    return {r[0] for r in rows}


def queued(db: psycopg.Connection, twin_id: str) -> int:
    return int(scalar(
        db, "select count(*) from public.persona_feedback_learning_runs "
        "where twin_id = %s and status = 'queued'", twin_id,
    ))


def marks(db: psycopg.Connection) -> dict[str, int]:
    return dict(db.execute("select name, event_id from private.event_marks").fetchall())


def clear_runs(db: psycopg.Connection, *twin_ids: str) -> None:
    """Forget the twins' queued runs (as if never queued), leaving their evidence pending."""
    db.execute(
        "delete from public.persona_feedback_learning_runs where twin_id = any(%s::uuid[]) "
        "and status = 'queued'", (list(twin_ids),),
    )


@pytest.fixture
def owner(db: psycopg.Connection) -> str:
    return make_users(db, "due")[0].id


def test_an_event_committed_after_a_later_one_is_not_missed(
    stack: Stack, db: psycopg.Connection, owner: str
) -> None:
    """Ids are taken before commit: the event of `slow` (the lower id) commits after the event of
    `fast`. A poll in between sees only `fast`'s; the marks must not pass `slow`'s id, and the
    next poll must queue `slow`."""
    slow = make_twin(db, owner).id
    fast = make_twin(db, owner).id
    poll(db)  # nothing of these twins is due yet; the marks catch up
    with psycopg.connect(stack.database_url) as open_tx:  # its transaction stays open
        slow_event = audit(open_tx, slow)
        fast_event = audit(db, fast)
        assert fast_event > slow_event
        assert fast in poll(db) and queued(db, slow) == 0
        clear_runs(db, fast)
        poll(db)  # would move the marks past both ids if it did not wait for the open insert
        assert marks(db)["scanned"] < slow_event and marks(db)["committed"] < slow_event
        open_tx.commit()
    assert slow in poll(db)
    poll(db)
    assert marks(db)["scanned"] >= fast_event, "quiet polls move the marks to the newest event"
    # Below the scanned mark, a twin still due is found through its run's end
    # (private.learning_due), here the deletion of its queued run.
    clear_runs(db, slow, fast)
    assert {slow, fast} <= poll(db)


def test_a_twin_with_more_events_than_one_run_takes_is_queued_until_learned(
    db: psycopg.Connection, owner: str, make_runner: Callable[..., Runner]
) -> None:
    """Each run learns one event (max_batch_events 1); the events are below the scanned mark
    after the first poll, so only the runs' ends can bring the twin back."""
    twin = make_twin(db, owner, settings={"max_batch_events": 1}).id
    last = max(audit(db, twin) for _ in range(3))
    runner = make_runner()
    runs = [r for r in runner.run_once() if str(r.twin_id) == twin]
    assert [r.status for r in runs] == ["completed"] * 3
    assert scalar(db, "select learned_through_event_id from twins where id = %s", twin) == last
    assert twin not in poll(db)


def queue_one(db: psycopg.Connection, twin_id: str) -> bool:
    """The poll of one twin (enqueue_due_learning_runs(twin), as `run-once --twin` calls it):
    whether it queued a run."""
    return bool(db.execute(
        "select id from public.enqueue_due_learning_runs(%s)", (twin_id,)).fetchall())


def fail_next_run(db: psycopg.Connection, twin_id: str) -> float:
    """Claims the twin's queued run and fails it for good, as the worker does when the database
    refuses it (fail_learning_run, not retryable); the seconds from its end to its
    retry_not_before, which private.learning_due holds for the scheduler."""
    run_id, token = db.execute(
        "select id, lease_token from public.claim_learning_run('refused', 30, %s)", (twin_id,)
    ).fetchone() or (None, None)
    assert run_id is not None, "the twin had no run to claim"
    failed = db.execute(
        "select status::text, extract(epoch from retry_not_before - finished_at)::float8,"
        " retry_not_before from public.fail_learning_run(%s, %s, 'refused for the test', false)",
        (run_id, token),
    ).fetchone()
    assert failed is not None
    status, delay, not_before = failed
    assert status == "failed"
    assert held_until(db, twin_id) == not_before
    return float(delay)


def held_until(db: psycopg.Connection, twin_id: str) -> datetime | None:
    """The twin's not-before time in private.learning_due; None when nothing holds it back (no
    row, or -infinity: the next poll takes it)."""
    row = db.execute(
        "select nullif(not_before, '-infinity') from private.learning_due where twin_id = %s",
        (twin_id,),
    ).fetchone()
    return None if row is None else row[0]


def due_rows(db: psycopg.Connection, twin_id: str) -> int:
    return int(scalar(db, "select count(*) from private.learning_due where twin_id = %s", twin_id))


def test_a_failed_run_holds_its_twin_back_until_its_not_before_time(
    db: psycopg.Connection, owner: str
) -> None:
    twin = make_twin(db, owner).id
    event = audit(db, twin)
    assert twin in poll(db)
    poll(db)  # the marks pass the event: only the run's end can bring the twin back
    assert marks(db)["scanned"] >= event
    assert fail_next_run(db, twin) == 10
    # Neither the poll of every twin nor the twin's own queues it before that time, nor does a
    # new event; the marks pass the new event all the same.
    for _ in range(3):
        assert twin not in poll(db) and not queue_one(db, twin)
    newer = audit(db, twin)
    assert twin not in poll(db) and not queue_one(db, twin)
    poll(db)
    assert marks(db)["scanned"] >= newer and queued(db, twin) == 0
    # Once it has passed, the next poll queues the twin without any new event, and takes its row.
    time_passes(db, twin)
    assert twin in poll(db)
    assert due_rows(db, twin) == 0
    [(batch_events,)] = db.execute(
        "select count(*) from public.persona_training_events where twin_id = %s"
        " and id > (select learned_through_event_id from public.twins where id = %s)",
        (twin, twin),
    ).fetchall()
    assert batch_events == 2, "both events wait for the queued run"


def test_failures_in_a_row_double_the_delay_up_to_an_hour_and_a_completed_run_ends_it(
    db: psycopg.Connection, owner: str, make_runner: Callable[..., Runner]
) -> None:
    twin = make_twin(db, owner).id
    audit(db, twin)
    delays = []
    for i in range(12):
        # Queued by the poll of every twin and by the twin's own, in turn.
        assert twin in poll(db) if i % 2 == 0 else queue_one(db, twin)
        delays.append(fail_next_run(db, twin))
        assert twin not in poll(db) and not queue_one(db, twin)
        time_passes(db, twin)
    assert delays == [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600, 3600]

    # Its not-before time passed: the scheduler's run, completed, ends the backoff.
    [done] = make_runner().run_once(uuid.UUID(twin))
    assert (done.status, done.trigger, done.retry_not_before) == ("completed", "schedule", None)
    assert held_until(db, twin) is None and due_rows(db, twin) == 1
    audit(db, twin)
    assert twin in poll(db)
    assert fail_next_run(db, twin) == 10


def test_requests_are_not_held_back_and_their_failures_count(
    stack: Stack,
    db: psycopg.Connection,
    make_user: Callable[[str], User],
    make_runner: Callable[..., Runner],
) -> None:
    owner = make_user("owner")
    twin = make_twin(db, owner.id).id
    audit(db, twin)
    assert twin in poll(db)
    assert fail_next_run(db, twin) == 10
    # An owner's request (POST /rest/v1/rpc/request_learning_run) is queued at once ...
    requested = owner.client.rpc("request_learning_run", {"p_twin_id": twin}).execute().data
    assert isinstance(requested, dict)
    assert (requested["status"], requested["trigger"]) == ("queued", "owner_request")
    assert fail_next_run(db, twin) == 20  # ... and its failure is one more in a row
    # ... as is an operator's (enqueue_learning_run).
    operator = db.execute(
        "select status::text, trigger::text from public.enqueue_learning_run(%s)", (twin,)
    ).fetchone()
    assert operator == ("queued", "manual")
    assert fail_next_run(db, twin) == 40
    assert twin not in poll(db) and not queue_one(db, twin)
    # The owner sees until when (persona_twin_overview, through the API).
    [seen] = owner.client.table("persona_twin_overview").select(
        "last_run_status,last_run_retry_not_before").eq("twin_id", twin).execute().data
    assert isinstance(seen, dict) and seen["last_run_status"] == "failed"
    assert datetime.fromisoformat(str(seen["last_run_retry_not_before"])) == held_until(db, twin)
    # `pfl run-once --twin ID` says why it ran nothing.
    held = subprocess.run(
        pfl("run-once", "--twin", twin), env=worker_env(stack), capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert held.returncode == 0, held.stderr
    assert "its last run failed, so no run is scheduled before" in held.stdout
    # `pfl run-once --twin ID --request`: run now, whatever the backoff; it completes and ends it.
    [done] = make_runner().run_once(uuid.UUID(twin), request=True)
    assert (done.status, done.trigger, done.events_processed) == ("completed", "manual", 1)
    assert held_until(db, twin) is None


def test_run_once_runs_a_refused_twin_once_and_ends(
    db: psycopg.Connection, owner: str, make_runner: Callable[..., Runner]
) -> None:
    """`run-once` queues what is due again after every run it executed; the twin whose run
    failed is held back, so the burst ends after one failed run of it (with or without --twin)."""
    twin = make_twin(db, owner).id
    audit(db, twin)
    refusal = Refusal(db, twin)
    try:
        ours = [r.status for r in make_runner().run_once() if str(r.twin_id) == twin]
        assert ours == ["failed"]
        assert make_runner().run_once(uuid.UUID(twin)) == []
        assert queued(db, twin) == 0
    finally:
        refusal.lift()


def test_serve_runs_a_refused_twin_once_and_then_waits_for_its_not_before_time(
    db: psycopg.Connection, owner: str, make_runner: Callable[..., Runner]
) -> None:
    """`serve`'s loop (Runner.step): a twin whose run the database refuses was queued again at
    every poll (about 80 failed runs a second); now it fails once, and the poll finds nothing to
    do (step returns False: serve waits) until its not-before time."""
    twin = make_twin(db, owner).id
    audit(db, twin)
    refusal = Refusal(db, twin)
    runner = make_runner("backoff")
    runner.claim_runs = 16  # serve's default (PFL_CLAIM_RUNS)

    def drain() -> int:
        """Steps until one finds nothing to do (serve then waits); the busy steps."""
        busy = 0
        while runner.step():
            busy += 1
            assert busy < 500, "serve never found the queue empty"
        return busy

    def delays() -> list[float]:
        """The twin's runs' delays from their end to their retry_not_before, oldest first."""
        return [d for (d,) in db.execute(
            "select extract(epoch from retry_not_before - finished_at)::float8"
            " from public.persona_feedback_learning_runs where twin_id = %s order by created_at",
            (twin,)).fetchall()]

    try:
        drain()  # whatever other tests left due is drained too
        assert delays() == [10]
        for _ in range(30):  # serve's next polls, quick or slow: the twin is held back
            runner.step()
        assert delays() == [10]
        [(error,)] = db.execute(
            "select error from public.persona_feedback_learning_runs where twin_id = %s",
            (twin,)).fetchall()
        assert "refused for the test" in error
        time_passes(db, twin)
        drain()
        assert delays() == [10, 20]
    finally:
        refusal.lift()
    time_passes(db, twin)
    drain()
    statuses = db.execute(
        "select status::text from public.persona_feedback_learning_runs where twin_id = %s"
        " order by created_at", (twin,)).fetchall()
    assert [s for (s,) in statuses] == ["failed", "failed", "completed"]
    assert held_until(db, twin) is None


def test_a_cursor_moved_back_by_hand_is_queued(db: psycopg.Connection, owner: str) -> None:
    twin = make_twin(db, owner).id
    last = audit(db, twin)
    db.execute("update twins set learned_through_event_id = %s where id = %s", (last, twin))
    assert twin not in poll(db)
    poll(db)  # the marks pass the event
    assert marks(db)["scanned"] >= last
    db.execute("update twins set learned_through_event_id = 0 where id = %s", (twin,))
    assert twin in poll(db)


def test_a_changed_evidence_generation_is_queued(db: psycopg.Connection, owner: str) -> None:
    twin = make_twin(db, owner).id
    assert twin not in poll(db)
    db.execute(
        "update twins set evidence_generation = evidence_generation + 1 where id = %s", (twin,)
    )
    assert twin in poll(db)


def test_a_watch_past_its_expiry_is_queued_and_one_in_time_is_not(
    db: psycopg.Connection, owner: str
) -> None:
    expired = make_twin(db, owner, settings={"watch_expire_days": 1})
    in_time = make_twin(db, owner, settings={"watch_expire_days": 3})
    off = make_twin(db, owner, settings={"watch_expire_days": 1, "watch_mode": "off"})
    for twin in (expired, in_time, off):
        db.execute(
            "insert into public.persona_spec_watches (twin_id, spec_id, published_at) "
            "values (%s, %s, now() - interval '2 days')", (twin.id, twin.published_spec_id),
        )
    queued_now = poll(db)
    assert expired.id in queued_now
    assert in_time.id not in queued_now and off.id not in queued_now
