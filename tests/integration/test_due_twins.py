"""The scheduler's poll (enqueue_due_learning_runs without a twin) looks only at candidates, not
at every twin: these tests fail if a twin that is due is missed.

Each case is one way a twin becomes due: an event after its cursor (also one whose id was taken
before a later event's but that committed after it), more events than one run takes, a run that
failed, a cursor moved back by hand, a changed evidence generation, a production watch past its
expiry. The poll is called as the worker and pg_cron call it, for every twin; other tests' twins
may be queued too, so each test looks at its own twins' runs only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg
import pytest

from testkit.world import make_twin, make_users, scalar
from tests.conftest import Stack
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
    db: psycopg.Connection, owner: str, make_runner: Callable[[], Runner]
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


def test_a_failed_run_is_queued_again(db: psycopg.Connection, owner: str) -> None:
    twin = make_twin(db, owner).id
    event = audit(db, twin)
    assert twin in poll(db)
    poll(db)  # the marks pass the event: only the run's end can bring the twin back
    assert marks(db)["scanned"] >= event
    db.execute(
        "update public.persona_feedback_learning_runs set status = 'failed', "
        "finished_at = now(), error = 'test' where twin_id = %s and status = 'queued'", (twin,),
    )
    assert twin in poll(db)


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
