"""The Langfuse mirror end to end: feedback inserted by app users through PostgREST, the outbox
drained by the real worker code (`OutboxDrainer` + `LangfuseSender`, and the `pfl` CLI as a
subprocess) into the Langfuse stand-in on 127.0.0.1.

The outbox is shared by every twin in the database and other tests leave rows in it, so each
test makes its own users and twins and asserts only about its own events and score ids; a
drain here may also carry other tests' due rows, which no assertion depends on. Failure modes
(down, 5xx, hang, 401) are driven through `drain_ours`, a pass that can claim only the test's own
rows (it locks every other row of the outbox meanwhile), so they never mark other tests' rows
retrying or failed. Waiting for a retry (or a claim
window) to become due is never a sleep: `make_due` moves `langfuse_next_attempt_at` back, which
stands for the passage of time, as `end_hold` does for the mirror's hold (private.langfuse_hold,
which holds every drain of the database while Langfuse asks to wait; `no_hold` clears it around
each test, so that one test's hold never stops another's drains).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import re
import signal
import socket
import string
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from postgrest.exceptions import APIError
from postgrest.types import CountMethod
from supabase import Client

from testkit.env import PFL, rows, worker_env
from testkit.standin import GENERATIONS, INGESTION_PATH, Generation, LangfuseStandin, Mode
from tests.conftest import Stack, User, wait_for
from worker import outbox as outbox_module
from worker.config import WorkerSettings
from worker.langfuse_check import LangfuseConfigError, check
from worker.langfuse_sender import LangfuseSender, score_id_for
from worker.outbox import NOT_CONFIGURED, OutboxDrainer
from worker.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

BASE_DELAY = 2.0  # p_base_delay_seconds: the default the worker leaves record_langfuse_deliveries
SLACK = timedelta(milliseconds=50)  # clock rounding between PostgreSQL and the assertions
SenderFactory = Callable[..., LangfuseSender]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(params=GENERATIONS)
def standin(request: pytest.FixtureRequest) -> Iterator[LangfuseStandin]:
    """The stand-in in each server generation in use: every test runs against each."""
    lf = LangfuseStandin(generation=request.param, public_key=f"pk-lf-{uuid.uuid4().hex[:8]}")
    lf.start()
    try:
        yield lf
    finally:
        lf.stop()  # also releases a request left hanging


@pytest.fixture(scope="module")
def store(stack: Stack) -> Iterator[Store]:
    """The worker's own Store, as `pfl` builds it (settings from arguments, not the env)."""
    settings = WorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        supabase_url=stack.url,
        supabase_service_role_key=stack.service_key,  # type: ignore[arg-type]
        pfl_http_timeout_seconds=20.0,
    )
    worker_store = Store.connect(settings)
    yield worker_store
    worker_store.close()


@pytest.fixture
def make_sender(standin: LangfuseStandin) -> Iterator[SenderFactory]:
    made: list[LangfuseSender] = []

    def make(
        *,
        timeout: float = 5.0,
        batch_size: int = 100,
        secret_key: str | None = None,
        checked: bool = True,
    ) -> LangfuseSender:
        """A sender for the stand-in; `checked`: its start-up check already passed (as in a
        worker that started while Langfuse answered), so later failure modes hit the sends."""
        sender = LangfuseSender(
            standin.url,
            standin.public_key,
            secret_key or standin.secret_key,
            timeout,
            environment="production",
            batch_size=batch_size,
        )
        made.append(sender)
        if checked:
            check(sender)
        return sender

    yield make
    for sender in made:
        sender.close()


CLEAR_HOLD = (
    "update private.langfuse_hold"
    " set hold_until = null, reason = null, bare_waits = 0, probe_until = null"
)


@pytest.fixture(autouse=True)
def no_hold(db: psycopg.Connection) -> Iterator[None]:
    """No hold before or after a test: a wait left by one test would hold every other's drain."""
    db.execute(CLEAR_HOLD)
    yield
    db.execute(CLEAR_HOLD)


# -- helpers -----------------------------------------------------------------------------------


def hold(db: psycopg.Connection) -> tuple[float | None, str | None, int]:
    """The mirror's hold: (seconds until it ends, None when there is none; the answer that set
    it; the bare waits in a row)."""
    row = db.execute(
        "select extract(epoch from hold_until - now())::float8, reason, bare_waits"
        " from private.langfuse_hold"
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def record(
    service: Client, event_ids: list[int], outcome: str, delay: float | None = None
) -> None:
    """What a worker records after a request: `outcome` for these rows, through the RPC (a
    wait: the server's answer was a 429, with `delay` as its Retry-After, if any)."""
    deliveries = [
        {"event_id": i, "outcome": outcome, "error": "HTTP 429: Rate limit exceeded",
         "retry_after_seconds": delay}
        for i in event_ids
    ]
    service.rpc("record_langfuse_deliveries", {"p_deliveries": deliveries}).execute()


def end_hold(db: psycopg.Connection) -> None:
    """Stands for the passage of time: the hold's end has come (the next claim is the probe)."""
    db.execute(
        "update private.langfuse_hold set hold_until = now() - interval '1 second'"
        " where hold_until is not null"
    )


def open_twin(service: Client, owner: User) -> str:
    """A twin that any signed-in user may send feedback on, made by the service client."""
    row = rows(
        service.table("twins")
        .insert({"owner_id": owner.id, "name": "outbox twin", "feedback_from": "any_user"})
        .execute()
    )[0]
    return str(row["id"])


def vote(
    user: User,
    twin_id: str,
    trace_id: str,
    score: int,
    *,
    reason: str | None = "helpful",
    intent_label: str = "factual_answer",
    comment: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One feedback vote, inserted by the app user through PostgREST."""
    payload: dict[str, Any] = {
        "twin_id": twin_id,
        "trace_id": trace_id,
        "score": score,
        "reason": reason,
        "intent_label": intent_label,
    }
    if comment is not None:
        payload["comment"] = comment
    if metadata is not None:
        payload["metadata"] = metadata
    return rows(user.client.table("persona_training_events").insert(payload).execute())[0]


def outbox(service: Client, event_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The rows of `persona_langfuse_outbox` (read by the service client) for these events."""
    ids = sorted(set(event_ids))
    view = service.table("persona_langfuse_outbox")
    found = {int(r["event_id"]): r for r in rows(view.select("*").in_("event_id", ids).execute())}
    assert sorted(found) == ids, "every feedback vote must stay visible in the outbox view"
    return found


def statuses(service: Client, event_ids: Iterable[int]) -> dict[int, str]:
    return {k: v["status"] for k, v in outbox(service, event_ids).items()}


def due_times(db: psycopg.Connection, event_ids: Iterable[int]) -> dict[int, datetime]:
    rows = db.execute(
        "select id, langfuse_next_attempt_at from public.persona_training_events"
        " where id = any(%s)",
        (list(event_ids),),
    ).fetchall()
    return {int(r[0]): r[1] for r in rows}


def db_now(db: psycopg.Connection) -> datetime:
    return db.execute("select clock_timestamp()").fetchone()[0]  # type: ignore[index]


def make_due(db: psycopg.Connection, event_ids: Iterable[int], ago: str = "1 second") -> None:
    """Stands for the passage of time: the rows' retry delay (or claim window) has run out.
    With a long `ago` they also come first in the claim order (next_attempt_at, id)."""
    db.execute(
        "update public.persona_training_events"
        " set langfuse_next_attempt_at = now() - %s::interval where id = any(%s)",
        (ago, list(event_ids)),
    )


def drain_ours(
    db: psycopg.Connection,
    store: Store,
    sender: LangfuseSender | None,
    event_ids: list[int],
    max_attempts: int = 8,
) -> int:
    """One drain pass over these rows and no other, so that a failure mode under test does not
    touch other tests' rows: they have waited a day (passage of time: due), and for the pass
    every other row of the outbox is locked by this connection, which the claim (`for update
    skip locked`) passes over. So the pass claims only the rows given that are still in the
    outbox (none of a row sent, failed or superseded), whatever else is due."""
    make_due(db, event_ids, "1 day")
    drainer = OutboxDrainer(store, sender, batch_size=len(event_ids), max_attempts=max_attempts)
    with db.transaction():
        db.execute(
            "select 1 from public.persona_training_events"
            " where langfuse_status in ('pending', 'retrying') and id <> all(%s) for update",
            (event_ids,),
        )
        return drainer.drain_once()


def sid(twin_id: str, trace_id: str, user: User | str) -> str:
    return score_id_for(twin_id, trace_id, user.id if isinstance(user, User) else user)


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def request_ids(standin: LangfuseStandin) -> list[set[str]]:
    """The score ids of each score request the stand-in received, in order."""
    return [{s["id"] for s in request.scores} for request in standin.score_requests]


def run_pfl(
    stack: Stack,
    cwd: Path,
    *args: str,
    langfuse: LangfuseStandin | None = None,
    extra: dict[str, str] | None = None,
    status: int = 0,
) -> subprocess.CompletedProcess[str]:
    """The real CLI. Without `langfuse` no LANGFUSE_* variable reaches it (not configured);
    `extra` adds (or, empty, removes) variables; `status` is the exit status expected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "PFL_"))}
    env.update(
        SUPABASE_URL=stack.url,
        SUPABASE_SERVICE_ROLE_KEY=stack.service_key,
        PFL_HTTP_TIMEOUT_SECONDS="20",
    )
    if langfuse is not None:
        env.update(
            LANGFUSE_HOST=langfuse.url,
            LANGFUSE_PUBLIC_KEY=langfuse.public_key,
            LANGFUSE_SECRET_KEY=langfuse.secret_key,
            PFL_LANGFUSE_TIMEOUT_SECONDS="5",
        )
    for name, value in (extra or {}).items():
        if value:
            env[name] = value
        else:
            env.pop(name, None)
    # cwd without a .env file, so that only `env` configures it
    result = subprocess.run(
        [str(PFL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == status, f"pfl {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result


def assert_delivered_once(
    standin: LangfuseStandin, expected: dict[str, tuple[float, datetime]]
) -> None:
    """Each score id arrived exactly once, with its value and timestamp."""
    scores = standin.scores
    for score_id, (value, timestamp) in expected.items():
        versions = scores.get(score_id, [])
        assert len(versions) == 1, f"score {score_id}: {len(versions)} versions"
        assert versions[0]["value"] == value
        assert ts(versions[0]["timestamp"]) == timestamp


# -- 1. not configured ---------------------------------------------------------------------------


def test_not_configured_keeps_feedback_locally_then_requeue_delivers_each_once(
    stack: Stack,
    service: Client,
    make_user: Callable[[str], User],
    store: Store,
    standin: LangfuseStandin,
    tmp_path: Path,
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    in_process = [vote(voter, twin, f"nc-a-{i}", 1) for i in range(3)]
    # sender None: the worker's own "Langfuse is not configured" path
    OutboxDrainer(store, None, batch_size=100, max_attempts=8).drain()
    by_cli = [vote(owner, twin, f"nc-b-{i}", -1, reason="incorrect") for i in range(2)]
    out = run_pfl(stack, tmp_path, "outbox", "drain")
    assert re.search(r"handled \d+ outbox rows", out.stdout)

    events = in_process + by_cli
    ids = [e["id"] for e in events]
    for row in outbox(service, ids).values():
        assert row["status"] == "skipped"
        assert row["last_error"] == NOT_CONFIGURED
        assert row["attempts"] == 0
        assert row["sent_at"] is None
    assert standin.requests == []

    # Langfuse configured now: put the skipped rows back, then drain.
    out = run_pfl(stack, tmp_path, "outbox", "requeue", langfuse=standin)
    match = re.search(r"requeued (\d+) skipped feedback rows", out.stdout)
    assert match and int(match.group(1)) >= len(ids), out.stdout
    for row in outbox(service, ids).values():
        assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    assert standin.requests == []

    run_pfl(stack, tmp_path, "outbox", "drain", langfuse=standin)
    for row in outbox(service, ids).values():
        assert row["status"] == "sent"
        assert row["sent_at"] is not None
        assert row["last_error"] is None
    users = {voter.id: voter, owner.id: owner}
    expected = {
        sid(twin, e["trace_id"], users[e["created_by"]]): (float(e["score"]), ts(e["created_at"]))
        for e in events
    }
    assert_delivered_once(standin, expected)
    # A second drain finds nothing of ours to send again.
    run_pfl(stack, tmp_path, "outbox", "drain", langfuse=standin)
    assert_delivered_once(standin, expected)


# -- 2. ingestion never waits ------------------------------------------------------------------


def test_ingestion_never_waits_for_a_hanging_langfuse(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    timeout = 3.0
    sender = make_sender(timeout=timeout)
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    before = [vote(voter, twin, f"hang-before-{i}", 1) for i in range(3)]
    before_ids = [e["id"] for e in before]

    standin.set_mode("hang")
    outcome: dict[str, Any] = {}

    def drain() -> None:
        try:
            outcome["handled"] = drain_ours(db_worker, store, sender, before_ids)
        except Exception as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    # The drain thread gets its own connection for its "passage of time" update.
    with psycopg.connect(db.info.dsn, autocommit=True) as db_worker:
        worker = threading.Thread(target=drain, name="outbox-drain")
        worker.start()
        try:
            wait_for(lambda: standin.score_requests, timeout=10)  # the drain waits on Langfuse
            during, took = [], []
            for i in range(5):
                started = time.monotonic()
                during.append(vote(voter, twin, f"hang-during-{i}", -1, reason="unhelpful"))
                took.append(time.monotonic() - started)
            assert worker.is_alive(), "the inserts must have happened while the drain hung"
        finally:
            worker.join(timeout + 10)
    assert not worker.is_alive()
    assert outcome == {"handled": len(before_ids)}
    # Each insert answered well under one Langfuse timeout: nothing on the insert path waits.
    assert max(took) < timeout / 3, took

    during_ids = [e["id"] for e in during]
    rows = outbox(service, before_ids + during_ids)
    for event_id in before_ids:  # in the hanging request: kept for a retry
        assert rows[event_id]["status"] == "retrying"
        assert rows[event_id]["attempts"] == 1
        assert "timeout" in rows[event_id]["last_error"]
    for event_id in during_ids:  # arrived meanwhile: waiting their turn
        assert (rows[event_id]["status"], rows[event_id]["attempts"]) == ("pending", 0)
    assert standin.scores == {}

    # Nothing was lost: once Langfuse answers, every vote arrives once.
    standin.set_mode("ok")
    assert drain_ours(db, store, sender, before_ids + during_ids) == len(rows)
    assert set(statuses(service, rows).values()) == {"sent"}
    assert_delivered_once(
        standin,
        {
            sid(twin, e["trace_id"], voter): (float(e["score"]), ts(e["created_at"]))
            for e in before + during
        },
    )


# -- 3. down, then up --------------------------------------------------------------------------


def test_down_then_up_waits_without_attempts_and_delivers_every_score_exactly_once(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    """Langfuse goes down after a good start: the request cannot connect, nothing was sent, so
    the rows wait as they were (as when it is down at start), however long it lasts; once it
    is back, each score arrives once, on the first attempt."""
    sender = make_sender(timeout=5.0)
    owner, alice, bob = make_user("owner"), make_user("alice"), make_user("bob")
    twin = open_twin(service, owner)
    events = [
        (alice, vote(alice, twin, "down-1", 1)),
        (alice, vote(alice, twin, "down-2", -1, reason="outdated")),
        (bob, vote(bob, twin, "down-1", 0, reason="other")),
        (owner, vote(owner, twin, "down-3", 1)),
    ]
    ids = [e["id"] for _, e in events]
    expected = {
        sid(twin, e["trace_id"], user): (float(e["score"]), ts(e["created_at"]))
        for user, e in events
    }

    standin.stop()  # Langfuse down: connections are refused
    for _ in range(3):  # max_attempts=1: an attempt would have failed them
        assert drain_ours(db, store, sender, ids, max_attempts=1) == 0
        for row in outbox(service, ids).values():
            assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    assert standin.score_requests == []

    standin.start()  # up again, on the same port
    assert sender.host == standin.url
    assert drain_ours(db, store, sender, ids) == len(ids)  # checked again, then sent
    for row in outbox(service, ids).values():
        assert row["status"] == "sent"
        assert row["sent_at"] is not None
        assert row["last_error"] is None
        assert row["attempts"] == 1
    assert_delivered_once(standin, expected)
    # Nothing of ours is due any more: another drain sends none of it again.
    OutboxDrainer(store, sender, batch_size=100, max_attempts=8).drain()
    assert_delivered_once(standin, expected)


# -- 4. 500s, then a hang: backoff, no blocking, giving up ---------------------------------------


def test_errors_back_off_exponentially_do_not_block_other_twins_and_finally_fail(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    timeout, max_attempts = 1.0, 4
    # Requests of 2 scores: one pass holds several chunks, so a per-chunk timeout would show.
    sender = make_sender(timeout=timeout, batch_size=2)
    owner_a, owner_b, voter = make_user("owner-a"), make_user("owner-b"), make_user("voter")
    twin_a, twin_b = open_twin(service, owner_a), open_twin(service, owner_b)
    a_events = [vote(voter, twin_a, f"flaky-{i}", 1) for i in range(5)]
    a_ids = [e["id"] for e in a_events]
    a_scores = {sid(twin_a, e["trace_id"], voter) for e in a_events}

    def failing_pass(attempt: int) -> None:
        """One failed delivery of A's rows (due: their delay has passed); checks the delay the
        database chose for the next one."""
        started = db_now(db)
        assert drain_ours(db, store, sender, a_ids, max_attempts) == len(a_ids)
        finished = db_now(db)
        # base * 2^(attempts before this one) * jitter in 0.5..1
        low, high = (timedelta(seconds=BASE_DELAY * 2 ** (attempt - 1) * j) for j in (0.5, 1.0))
        rows = outbox(service, a_ids)
        dues = due_times(db, a_ids)
        assert len(set(dues.values())) > 1, "one record, so only the jitter tells them apart"
        for event_id, due in dues.items():
            assert rows[event_id]["status"] == "retrying"
            assert rows[event_id]["attempts"] == attempt
            assert rows[event_id]["last_error"].startswith("rejected by Langfuse (HTTP 500)")
            # the delay is due - (time of the record), which lies between started and finished
            assert due - started >= low - SLACK, (attempt, due - started)
            assert due - finished <= high + SLACK, (attempt, due - finished)

    # Langfuse's per-event 500 inside the 207 (one event's failure, not an outage: a top-level
    # 500 holds every worker, see section 12): each row backs off on its own.
    standin.set_mode("partial", reject=dict.fromkeys(a_scores, "Internal Server Error"),
                     reject_status=500)
    for attempt in (1, 2, 3):  # delays of 1-2 s, 2-4 s, 4-8 s
        requests_before = len(standin.score_requests)
        failing_pass(attempt)
        assert len(standin.score_requests) == requests_before + 3  # 5 rows, 2 a request
    assert not a_scores & set(standin.scores)

    # Langfuse is back. A day passes for both twins (every delay has run out, the order of the
    # due times is kept): A's old retrying rows and B's new votes are all due, A's rows have the
    # lower ids and outnumber the batch, yet the next pass takes B's votes, which were due first
    # (claims go by next_attempt_at), and the retrying twin blocks nobody.
    standin.set_mode("ok")
    b_events = [vote(voter, twin_b, f"fresh-{i}", -1, reason="incorrect") for i in range(2)]
    b_ids = [e["id"] for e in b_events]
    db.execute(
        "update public.persona_training_events"
        " set langfuse_next_attempt_at = langfuse_next_attempt_at - interval '1 day'"
        " where id = any(%s)",
        (a_ids + b_ids,),
    )
    a_due = due_times(db, a_ids)
    assert max(due_times(db, b_ids).values()) < min(a_due.values()) < db_now(db)
    assert min(b_ids) > max(a_ids) and len(a_ids) > len(b_ids)
    small = OutboxDrainer(store, sender, batch_size=len(b_ids), max_attempts=max_attempts)
    assert small.drain_once() == len(b_ids)
    assert set(statuses(service, b_ids).values()) == {"sent"}
    assert_delivered_once(
        standin,
        {sid(twin_b, e["trace_id"], voter): (-1.0, ts(e["created_at"])) for e in b_events},
    )
    rows = outbox(service, a_ids)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("retrying", 3)}
    assert due_times(db, a_ids) == a_due
    assert not a_scores & set(standin.scores)

    # The last attempt hangs: the pass (3 chunks) costs about one timeout, not one per chunk,
    # and the rows give up after max_attempts.
    standin.set_mode("hang")
    requests_before = len(standin.score_requests)
    started = time.monotonic()
    assert drain_ours(db, store, sender, a_ids, max_attempts) == len(a_ids)
    elapsed = time.monotonic() - started
    assert timeout * 0.9 <= elapsed <= timeout + 0.9, elapsed
    assert len(standin.score_requests) == requests_before + 1
    for row in outbox(service, a_ids).values():
        assert row["status"] == "failed"
        assert row["attempts"] == max_attempts
        assert row["last_error"].startswith(f"gave up after {max_attempts} attempts: timeout")

    # Failed is final: Langfuse answering again does not bring them back.
    standin.set_mode("ok")
    assert drain_ours(db, store, sender, a_ids, max_attempts) == 0
    OutboxDrainer(store, sender, batch_size=100, max_attempts=max_attempts).drain()
    assert {r["status"] for r in outbox(service, a_ids).values()} == {"failed"}
    assert not a_scores & set(standin.scores)


# -- 5. 401 ---------------------------------------------------------------------------------------


def test_keys_refused_at_start_or_later_turn_the_mirror_off_and_keep_rows_pending(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    events = [vote(voter, twin, f"auth-{i}", 1) for i in range(6)]
    ids = [e["id"] for e in events]
    ours = {sid(twin, e["trace_id"], voter) for e in events}

    def error_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]

    def untouched() -> None:
        for row in outbox(service, ids).values():
            assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)

    # Wrong keys from the start: the check says so once, nothing is claimed, rows stay pending.
    wrong = make_sender(batch_size=2, secret_key="sk-lf-wrong", checked=False)
    with caplog.at_level("ERROR", logger="worker.outbox"):
        assert drain_ours(db, store, wrong, ids) == 0
    (line,) = error_lines()
    assert "Langfuse mirror off" in line and "refused the keys: HTTP 401" in line
    assert [(r.path, r.status) for r in standin.requests] == [
        ("/api/public/health", 200),
        ("/api/public/ingestion", 401),
    ]
    untouched()

    # Keys revoked after a good start (a key rotation): the same. One request, one error line,
    # the batch's rows left pending with no attempt spent (max_attempts=1: an attempt would
    # have failed them), no further batch tried.
    revoked = make_sender(batch_size=2)
    standin.set_mode("unauthorized")
    caplog.clear()
    drainer = OutboxDrainer(store, revoked, len(ids), max_attempts=1, recheck_seconds=0)
    make_due(db, ids, "1 day")
    with caplog.at_level("ERROR", logger="worker.outbox"):
        assert drainer.drain() == 0
        (line,) = error_lines()
        assert "Langfuse mirror off" in line and "refused the keys: HTTP 401" in line
        assert "checked again every 0 s" in line
        assert [r.status for r in standin.score_requests] == [401]
        untouched()

        # Checked again later (recheck_seconds=0 stands for the time passing): still refused,
        # nothing claimed, no second line.
        seen = len(standin.requests)
        assert drainer.drain_once() == 0
        assert [(r.path, r.status) for r in standin.requests[seen:]] == [
            ("/api/public/health", 200),
            ("/api/public/ingestion", 401),
        ]
        assert len(error_lines()) == 1
        untouched()

    # The keys work again: the next check passes and every row goes out, each score once.
    standin.set_mode("ok")
    make_due(db, ids, "1 day")  # the refused batch's claim window has passed
    assert drainer.drain_once() == len(ids)
    assert set(statuses(service, ids).values()) == {"sent"}
    assert ours <= set(standin.scores)
    assert all(len(standin.scores[score_id]) == 1 for score_id in ours)


# -- 6. changed votes ----------------------------------------------------------------------------


def test_changed_vote_updates_the_same_score_with_the_first_votes_time(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    drainer = OutboxDrainer(store, make_sender(), batch_size=100, max_attempts=8)
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    score_id = sid(twin, "changed", voter)

    first = vote(
        voter,
        twin,
        "changed",
        1,
        reason="helpful",
        intent_label="billing_question",
        comment="spot on",
        metadata={"app": "web"},
    )
    drainer.drain()
    versions = standin.scores[score_id]
    assert len(versions) == 1
    assert versions[0]["value"] == 1.0
    assert ts(versions[0]["timestamp"]) == ts(first["created_at"])
    assert versions[0]["comment"] == "spot on"
    assert versions[0]["metadata"]["reason"] == "helpful"
    assert versions[0]["metadata"]["intent_label"] == "billing_question"
    assert versions[0]["metadata"]["app"] == "web"

    standin.advance(days=2)  # the vote changes two days later
    second = vote(voter, twin, "changed", -1, reason="incorrect", intent_label="billing_question")
    state = db.execute(
        "select id, superseded_at is not null, supersedes_id, first_vote_id"
        " from public.persona_training_events where id = any(%s) order by id",
        ([first["id"], second["id"]],),
    ).fetchall()
    assert state == [
        (first["id"], True, None, first["id"]),
        (second["id"], False, first["id"], first["id"]),
    ]
    rows = outbox(service, [first["id"], second["id"]])
    # The first vote was delivered before it was replaced: its row keeps saying so.
    assert rows[first["id"]]["status"] == "sent"
    assert rows[second["id"]]["status"] == "pending"

    drainer.drain()  # nothing was in flight: the change goes out at once
    versions = standin.scores[score_id]
    assert len(versions) == 2, "the change goes to the same score id"
    assert versions[1]["id"] == score_id
    assert versions[1]["value"] == -1.0
    assert ts(versions[1]["timestamp"]) == ts(first["created_at"])
    assert versions[1]["metadata"]["reason"] == "incorrect"
    assert versions[1]["metadata"]["intent_label"] == "billing_question"
    assert versions[1]["metadata"]["event_id"] == second["id"]
    assert outbox(service, [second["id"]])[second["id"]]["status"] == "sent"
    # One row in Langfuse's score table (keyed by day, name, id), holding the new vote.
    assert score_id not in standin.duplicates()
    (row,) = [r for (_, _, i), r in standin.table.items() if i == score_id]
    assert row["value"] == -1.0 and row["environment"] == "production"
    # Langfuse merges a score's events: the comment, sent as null, is cleared; a metadata key the
    # new vote no longer has (the app's) stays, as Langfuse's merge keeps it.
    assert row["comment"] is None and row["metadata"]["reason"] == "incorrect"
    assert row["metadata"]["app"] == "web"

    # A vote changed before it was ever sent: the old row is superseded and never sent; the
    # score arrives once, with the new value and the first vote's time.
    early = vote(voter, twin, "changed-early", 1)
    late = vote(voter, twin, "changed-early", 0, reason="other", intent_label="small_talk")
    rows = outbox(service, [early["id"], late["id"]])
    assert rows[early["id"]]["status"] == "superseded"
    assert rows[late["id"]]["status"] == "pending"
    drainer.drain()
    rows = outbox(service, [early["id"], late["id"]])
    assert (rows[early["id"]]["status"], rows[early["id"]]["attempts"]) == ("superseded", 0)
    assert rows[late["id"]]["status"] == "sent"
    early_versions = standin.scores[sid(twin, "changed-early", voter)]
    assert [(v["value"], ts(v["timestamp"])) for v in early_versions] == [
        (0.0, ts(early["created_at"]))
    ]
    assert early_versions[0]["metadata"]["intent_label"] == "small_talk"


def test_a_deleted_first_vote_leaves_the_score_its_time_and_its_one_row(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    """A moderator may delete a vote, the feedback's first one included. The votes after it
    keep the first vote's time (first_vote_at, stored on each row when it is written), so the
    score keeps its timestamp and its one row of Langfuse's table, even once the server's
    stored events have expired and it can no longer merge the change into the old row."""
    drainer = OutboxDrainer(store, make_sender(), batch_size=100, max_attempts=8)
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    score_id = sid(twin, "deleted-first", voter)

    first = vote(voter, twin, "deleted-first", 1)
    cast_at = cast_days_ago(db, first["id"], 3)
    drainer.drain()
    second = vote(voter, twin, "deleted-first", -1, reason="incorrect")
    drainer.drain()

    # The moderator deletes the first vote; the bucket's lifecycle rule expires the stored
    # events; the voter changes their mind again another day.
    db.execute("delete from public.persona_training_events where id = %s", (first["id"],))
    standin.forget_event_log()
    standin.advance(days=1)
    third = vote(voter, twin, "deleted-first", 1, reason="helpful")
    times = db.execute(
        "select id, first_vote_at from public.persona_training_events where id = any(%s)",
        ([second["id"], third["id"]],),
    ).fetchall()
    assert dict(times) == {second["id"]: cast_at, third["id"]: cast_at}
    drainer.drain()

    assert set(statuses(service, [second["id"], third["id"]]).values()) == {"sent"}
    versions = standin.scores[score_id]
    assert [v["value"] for v in versions] == [1.0, -1.0, 1.0]
    assert {ts(v["timestamp"]) for v in versions} == {cast_at}, "one time for every vote"
    (row,) = [r for (_, _, i), r in standin.table.items() if i == score_id]
    assert row["value"] == 1.0
    assert score_id not in standin.duplicates()


def cast_days_ago(db: psycopg.Connection, event_id: int, days: int) -> datetime:
    """Passage of time: the feedback's first vote `event_id` was cast `days` ago (its
    feedback's first vote time kept apart from its votes, then its row, as they would read
    then: an edit may set a vote's first_vote_at only to its feedback's kept time). Returns
    that time."""
    db.execute(
        "update private.feedback_first_votes f"
        " set first_vote_at = f.first_vote_at - make_interval(days => %s)"
        " from public.persona_training_events e where e.id = %s and f.twin_id = e.twin_id"
        " and f.trace_id = e.trace_id and f.created_by = e.created_by",
        (days, event_id),
    )
    cast_at = db.execute(
        "update public.persona_training_events"
        " set created_at = created_at - make_interval(days => %s),"
        "     first_vote_at = first_vote_at - make_interval(days => %s)"
        " where id = %s returning created_at",
        (days, days, event_id),
    ).fetchone()[0]  # type: ignore[index]
    return cast_at  # type: ignore[no-any-return]


def rows_of(standin: LangfuseStandin, score_id: str) -> list[dict[str, Any]]:
    """The rows of the stand-in's score table (Langfuse's: one per day, name and id) for
    `score_id`: more than one is the feedback counted twice."""
    return [r for (_, _, i), r in standin.table.items() if i == score_id]


def assert_sent_into_one_row(
    service: Client, standin: LangfuseStandin, event_id: int, score_id: str, value: float
) -> None:
    """The vote `event_id` was sent, and its score `score_id` is one row of Langfuse's table,
    with the vote's value."""
    assert statuses(service, [event_id]) == {event_id: "sent"}
    assert score_id not in standin.duplicates()
    (row,) = rows_of(standin, score_id)
    assert row["value"] == value


def test_a_vote_after_the_current_vote_was_deleted_keeps_the_first_vote_time(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    """A moderator deletes the feedback's current vote (an earlier one stays, superseded), so
    no vote is current. The voter votes again days later: that vote starts no new feedback; it
    goes out with the first vote's time, into the one row Langfuse holds for the score, even
    once the server's stored events have expired."""
    drainer = OutboxDrainer(store, make_sender(), batch_size=100, max_attempts=8)
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    score_id = sid(twin, "current-deleted", voter)

    first = vote(voter, twin, "current-deleted", 1)
    cast_at = cast_days_ago(db, first["id"], 3)
    drainer.drain()
    second = vote(voter, twin, "current-deleted", -1, reason="incorrect")
    drainer.drain()
    assert len(rows_of(standin, score_id)) == 1

    db.execute("delete from public.persona_training_events where id = %s", (second["id"],))
    standin.forget_event_log()
    standin.advance(days=2)
    third = vote(voter, twin, "current-deleted", 0, reason="other")
    drainer.drain()

    assert_sent_into_one_row(service, standin, third["id"], score_id, 0.0)
    versions = standin.scores[score_id]
    assert [v["value"] for v in versions] == [1.0, -1.0, 0.0]
    assert {ts(v["timestamp"]) for v in versions} == {cast_at}, "one time for every vote"
    kept = db.execute(
        "select first_vote_at, supersedes_id from public.persona_training_events where id = %s",
        (third["id"],),
    ).fetchone()
    assert kept == (cast_at, None), "no current vote carried it: the kept time was taken"


def test_a_vote_after_the_only_vote_was_deleted_keeps_the_first_vote_time(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    """The feedback's only vote, already in Langfuse, is deleted by a moderator; the voter
    votes on the same trace a day later. Langfuse still holds the first vote's row: the new
    vote replaces it (the same id and time) instead of adding a row beside it."""
    drainer = OutboxDrainer(store, make_sender(), batch_size=100, max_attempts=8)
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    score_id = sid(twin, "only-deleted", voter)

    only = vote(voter, twin, "only-deleted", -1, reason="incorrect")
    cast_at = cast_days_ago(db, only["id"], 1)
    drainer.drain()
    assert statuses(service, [only["id"]]) == {only["id"]: "sent"}

    db.execute("delete from public.persona_training_events where id = %s", (only["id"],))
    standin.forget_event_log()
    standin.advance(days=1)
    again = vote(voter, twin, "only-deleted", 1)
    drainer.drain()

    assert_sent_into_one_row(service, standin, again["id"], score_id, 1.0)
    versions = standin.scores[score_id]
    assert [(v["value"], ts(v["timestamp"])) for v in versions] == [(-1.0, cast_at), (1.0, cast_at)]


def test_the_kept_first_vote_times_go_with_the_twin_and_with_the_voter(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
) -> None:
    """private.feedback_first_votes keeps a feedback's first vote time past its votes, one row
    per feedback (twin, trace, voter), written by its first vote only; a twin's deletion
    removes its rows, a user's account deletion the user's."""
    owner, voter, other = make_user("owner"), make_user("voter"), make_user("other")
    twin, kept_twin = open_twin(service, owner), open_twin(service, owner)

    def kept(where: str, key: str) -> int:
        found = db.execute(
            f"select count(*) from private.feedback_first_votes where {where} = %s", (key,)
        ).fetchone()
        return int(found[0])  # type: ignore[index]

    first = vote(voter, twin, "kept", 1)
    vote(voter, twin, "kept", -1, reason="incorrect")
    vote(voter, kept_twin, "kept", 1)
    vote(other, twin, "kept", 1)
    assert db.execute(
        "select first_vote_at from private.feedback_first_votes"
        " where twin_id = %s and trace_id = 'kept' and created_by = %s",
        (twin, voter.id),
    ).fetchall() == [(ts(first["created_at"]),)]
    assert (kept("twin_id", twin), kept("created_by", voter.id)) == (2, 2)

    db.execute("delete from public.persona_training_events where twin_id = %s", (twin,))
    assert kept("twin_id", twin) == 2, "a moderator's delete of the votes leaves their times"

    db.execute("delete from auth.users where id = %s", (voter.id,))
    assert (kept("created_by", voter.id), kept("twin_id", kept_twin)) == (0, 0)
    assert kept("twin_id", twin) == 1  # the other voter's
    db.execute("delete from public.twins where id = %s", (twin,))
    assert kept("twin_id", twin) == 0


def kept_time(db: psycopg.Connection, twin_id: str, trace_id: str, user: User) -> datetime | None:
    """The first vote time private.feedback_first_votes keeps for a feedback, if any."""
    found = db.execute(
        "select first_vote_at from private.feedback_first_votes"
        " where twin_id = %s and trace_id = %s and created_by = %s",
        (twin_id, trace_id, user.id),
    ).fetchone()
    return None if found is None else found[0]  # type: ignore[no-any-return]


def test_a_vote_on_a_feedback_with_a_current_vote_but_no_kept_time_supersedes_it(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
) -> None:
    """A vote whose feedback keeps no first vote time yet writes one, and then has nothing to
    supersede, unless a vote of the feedback was stored without one (before the table existed,
    or loaded with triggers off): that vote is still found, superseded and linked, and its time
    is the one kept. Without it the new vote would collide with it on the current-vote index."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    stored = vote(voter, twin, "stored-before", 1)
    cast_at = cast_days_ago(db, stored["id"], 3)
    db.execute(
        "delete from private.feedback_first_votes where twin_id = %s and created_by = %s",
        (twin, voter.id),
    )
    assert kept_time(db, twin, "stored-before", voter) is None

    later = vote(voter, twin, "stored-before", -1, reason="incorrect")

    assert kept_time(db, twin, "stored-before", voter) == cast_at
    assert db.execute(
        "select id, supersedes_id, superseded_at is null, first_vote_id, first_vote_at"
        " from public.persona_training_events where twin_id = %s order by id",
        (twin,),
    ).fetchall() == [
        (stored["id"], None, False, stored["id"], cast_at),
        (later["id"], stored["id"], True, stored["id"], cast_at),
    ]


def first_vote_times(db: psycopg.Connection, event_ids: Iterable[int]) -> dict[int, datetime]:
    found = db.execute(
        "select id, first_vote_at from public.persona_training_events where id = any(%s)",
        (list(event_ids),),
    ).fetchall()
    return {int(r[0]): r[1] for r in found}


def test_a_vote_moved_by_hand_leaves_its_new_feedback_its_time_past_a_delete(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    """An operator moves a vote by hand to another trace (a wrong trace id fixed); the voter
    changes it there, which goes out to Langfuse with the moved vote's time; a moderator then
    deletes the current vote. The next vote on that trace finds no current vote, yet goes out
    with the same time, into the one row Langfuse holds for the score: the move left its time
    for the new feedback. The feedback it left keeps its own time as well."""
    drainer = OutboxDrainer(store, make_sender(), batch_size=100, max_attempts=8)
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    left_id, moved_id = sid(twin, "typo-trace", voter), sid(twin, "right-trace", voter)

    first = vote(voter, twin, "typo-trace", 1)
    cast_at = cast_days_ago(db, first["id"], 3)
    drainer.drain()
    db.execute(
        "update public.persona_training_events set trace_id = 'right-trace' where id = %s",
        (first["id"],),
    )
    assert kept_time(db, twin, "right-trace", voter) == cast_at, "the move left its time"
    assert kept_time(db, twin, "typo-trace", voter) == cast_at, "the old feedback keeps its own"
    changed = vote(voter, twin, "right-trace", -1, reason="incorrect")
    drainer.drain()
    assert_sent_into_one_row(service, standin, changed["id"], moved_id, -1.0)

    db.execute("delete from public.persona_training_events where id = %s", (changed["id"],))
    standin.forget_event_log()
    standin.advance(days=2)
    again = vote(voter, twin, "right-trace", 0, reason="other")
    back = vote(voter, twin, "typo-trace", 1)
    drainer.drain()

    assert first_vote_times(db, [again["id"], back["id"]]) == {
        again["id"]: cast_at,
        back["id"]: cast_at,
    }
    assert_sent_into_one_row(service, standin, again["id"], moved_id, 0.0)
    assert {ts(v["timestamp"]) for v in standin.scores[moved_id]} == {cast_at}
    assert_sent_into_one_row(service, standin, back["id"], left_id, 1.0)
    assert {ts(v["timestamp"]) for v in standin.scores[left_id]} == {cast_at}


def test_a_vote_moved_into_a_feedback_takes_that_feedbacks_time(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    """A feedback's only vote, in Langfuse, was deleted by a moderator; an operator then moves
    another vote of the voter into that feedback (by twin and trace at once). The moved vote
    takes the feedback's first vote time, whatever time it carried, so it goes out into the
    row Langfuse already holds for the score instead of adding a second one."""
    drainer = OutboxDrainer(store, make_sender(), batch_size=100, max_attempts=8)
    owner, voter = make_user("owner"), make_user("voter")
    twin, other_twin = open_twin(service, owner), open_twin(service, owner)
    score_id = sid(twin, "merged", voter)

    earlier = vote(voter, twin, "merged", 1)
    cast_at = cast_days_ago(db, earlier["id"], 5)
    drainer.drain()
    db.execute("delete from public.persona_training_events where id = %s", (earlier["id"],))
    elsewhere = vote(voter, other_twin, "stray", -1, reason="incorrect")
    assert first_vote_times(db, [elsewhere["id"]]) == {elsewhere["id"]: ts(elsewhere["created_at"])}

    db.execute(
        "update public.persona_training_events set twin_id = %s, trace_id = 'merged' where id = %s",
        (twin, elsewhere["id"]),
    )
    assert first_vote_times(db, [elsewhere["id"]]) == {elsewhere["id"]: cast_at}
    standin.forget_event_log()
    standin.advance(days=1)
    drainer.drain()

    assert_sent_into_one_row(service, standin, elsewhere["id"], score_id, -1.0)
    assert {ts(v["timestamp"]) for v in standin.scores[score_id]} == {cast_at}
    assert sid(other_twin, "stray", voter) not in standin.scores, "it went out moved, once"


def vote_in_background(
    voter: User, twin_id: str, trace_id: str, score: int
) -> Callable[[], dict[str, Any]]:
    """Sends a vote (reason `other`) through the API from a thread of its own, as a second device
    would while a transaction holds what it needs. The function returned waits for it (20 s at
    most) and gives its row, or fails the test with the error the vote met."""
    got: dict[str, Any] = {}

    def cast() -> None:
        try:
            got["vote"] = vote(voter, twin_id, trace_id, score, reason="other")
        except Exception as exc:  # the result shows it
            got["error"] = exc

    thread = threading.Thread(target=cast)
    thread.start()

    def result() -> dict[str, Any]:
        thread.join(20)
        assert "error" not in got, got.get("error")
        return got["vote"]  # type: ignore[no-any-return]

    return result


def wait_for_lock_waits(db: psycopg.Connection, holder_pid: int, waiting: int = 1) -> None:
    """Waits until `waiting` sessions other than `holder_pid` wait on a lock in a statement on the
    events table (a vote queued behind a transaction still open)."""
    wait_for(lambda: db.execute(
        "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
        " and query like '%%persona_training_events%%' and pid <> %s", (holder_pid,),
    ).fetchone() == (waiting,))


@pytest.mark.parametrize("moved_is_current", [True, False], ids=["current", "superseded"])
def test_a_vote_cast_while_a_vote_is_moved_into_its_feedback_takes_turns_with_the_move(
    stack: Stack,
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    moved_is_current: bool,
) -> None:
    """An operator moves a vote (cast three days ago) into a feedback no vote has touched, in
    a transaction still open, while the voter votes on that feedback through the API. The vote
    waits for the move (both lock the feedback's kept time), then takes the moved vote's time
    and, when the moved vote is current, supersedes it, instead of going out with its own time
    or colliding with it on the current-vote index."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    moved = vote(voter, twin, "moved-from", 1)
    cast_at = cast_days_ago(db, moved["id"], 3)
    if not moved_is_current:
        vote(voter, twin, "moved-from", -1, reason="incorrect")
    with psycopg.connect(stack.database_url) as operator:
        operator.execute(
            "update public.persona_training_events set trace_id = 'moved-to' where id = %s",
            (moved["id"],),
        )
        voted = vote_in_background(voter, twin, "moved-to", 0)
        wait_for_lock_waits(db, operator.info.backend_pid)
        operator.commit()
    new = voted()
    assert first_vote_times(db, [moved["id"], new["id"]]) == {
        moved["id"]: cast_at,
        new["id"]: cast_at,
    }
    assert kept_time(db, twin, "moved-to", voter) == cast_at
    links = db.execute(
        "select supersedes_id from public.persona_training_events where id = %s", (new["id"],)
    ).fetchone()
    assert links == ((moved["id"] if moved_is_current else None),)


def test_an_edit_of_a_first_vote_time_against_its_feedbacks_is_refused(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """A vote's first_vote_at is its feedback's kept time (the Langfuse score's timestamp): an
    edit setting another time, by hand or by the service role through the API, is refused with
    a clear error naming the column, and changes nothing. Changed first where it is kept, the
    votes follow."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    first = vote(voter, twin, "fixed-time", 1)
    second = vote(voter, twin, "fixed-time", -1, reason="incorrect")
    cast_at = ts(first["created_at"])
    before = first_vote_times(db, [first["id"], second["id"]])
    assert before == {first["id"]: cast_at, second["id"]: cast_at}

    with pytest.raises(psycopg.errors.CheckViolation) as refused, db.transaction():
        db.execute(
            "update public.persona_training_events"
            " set first_vote_at = first_vote_at - interval '1 day' where id = %s",
            (second["id"],),
        )
    assert refused.value.diag.column_name == "first_vote_at"
    assert "its Langfuse score's timestamp" in str(refused.value)
    with pytest.raises(APIError) as via_api:
        service.table("persona_training_events").update(
            {"first_vote_at": "2020-01-01T00:00:00+00:00"}
        ).eq("id", first["id"]).execute()
    assert via_api.value.code == "23514"
    assert "first_vote_at" in str(via_api.value.message)
    assert first_vote_times(db, [first["id"], second["id"]]) == before
    assert kept_time(db, twin, "fixed-time", voter) == cast_at

    shifted = cast_days_ago(db, first["id"], 2)
    db.execute(
        "update public.persona_training_events set first_vote_at = %s where id = %s",
        (shifted, second["id"]),
    )
    assert first_vote_times(db, [first["id"], second["id"]]) == {
        first["id"]: shifted,
        second["id"]: shifted,
    }


def test_a_move_naming_a_time_of_its_own_or_a_future_time_is_refused(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """A move into a feedback that keeps a time, naming another time in the same edit, is refused
    as any edit of that time is (it was silently given the kept one); a first vote time in the
    future is refused, even for a feedback the move starts, which would keep it. Nothing
    changes."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    kept = vote(voter, twin, "keeps-a-time", 1)
    cast_days_ago(db, kept["id"], 2)
    stray = vote(voter, twin, "stray", -1, reason="incorrect")
    vote(voter, twin, "stray", 1)  # the stray vote superseded: a move of it collides with none
    before = first_vote_times(db, [kept["id"], stray["id"]])
    kept_rows = "select count(*) from private.feedback_first_votes where twin_id = %s"
    rows_before = db.execute(kept_rows, (twin,)).fetchone()
    for trace, at in (("keeps-a-time", "2024-01-01T00:00:00+00:00"),
                      ("new-feedback", "2999-01-01T00:00:00+00:00")):
        with pytest.raises(APIError) as refused:
            service.table("persona_training_events").update(
                {"trace_id": trace, "first_vote_at": at}).eq("id", stray["id"]).execute()
        assert refused.value.code == "23514"
        assert str(refused.value.message).startswith(f"first_vote_at: event {stray['id']} ")
    assert "in the future" in str(refused.value.message)
    assert first_vote_times(db, [kept["id"], stray["id"]]) == before
    assert db.execute(
        "select trace_id from public.persona_training_events where id = %s", (stray["id"],)
    ).fetchone() == ("stray",)
    assert db.execute(kept_rows, (twin,)).fetchone() == rows_before


# Random characters: a repeated one compresses to a key short enough for any index.
@pytest.mark.parametrize("trace_id", [
    "".join(random.Random(1).choices(string.ascii_letters, k=3000)),
    "".join(random.Random(2).choices([chr(c) for c in range(0x4E00, 0x9FA5)], k=3000)),
], ids=["ascii", "cjk"])
def test_a_trace_id_too_long_for_any_key_is_refused_by_the_events_tables_check(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection, trace_id: str
) -> None:
    """A trace id far past 200 characters (past what an index key can hold) is refused with the
    events table's own check, 400, as a 201-character one is, by a voter's insert and by the
    service role's move alike: the kept first vote time is not written first (its key's limit
    answered 413, naming a private table). Nothing is stored."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    stray = vote(voter, twin, "stray", 1)
    counts = (
        "select (select count(*) from public.persona_training_events where twin_id = %s),"
        " (select count(*) from private.feedback_first_votes where twin_id = %s)"
    )
    before = db.execute(counts, (twin, twin)).fetchone()
    with pytest.raises(APIError) as by_voter:
        vote(voter, twin, trace_id, 1)
    with pytest.raises(APIError) as by_move:
        service.table("persona_training_events").update({"trace_id": trace_id}).eq(
            "id", stray["id"]).execute()
    for refused in (by_voter, by_move):
        assert refused.value.code == "23514"
        assert "trace_id_1_to_200_chars" in str(refused.value.message)
    assert db.execute(counts, (twin, twin)).fetchone() == before
    assert db.execute(
        "select trace_id from public.persona_training_events where id = %s", (stray["id"],)
    ).fetchone() == ("stray",)


def test_a_vote_waits_for_an_operator_who_moves_a_vote_in_then_edits_the_current_one(
    stack: Stack,
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
) -> None:
    """An operator's transaction moves an earlier vote of the voter's into a feedback, and, while
    a vote on that feedback waits for it, moves the feedback's current vote away. The vote waits
    on the feedback's kept time, holding nothing the operator needs, then lands (locking the
    current vote first, it deadlocked with this order: the vote was lost with a 500). It keeps the
    feedback's time."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    current = vote(voter, twin, "busy", 1)
    cast_at = cast_days_ago(db, current["id"], 3)
    earlier = vote(voter, twin, "elsewhere", 1)
    vote(voter, twin, "elsewhere", -1, reason="incorrect")
    with psycopg.connect(stack.database_url) as operator:
        operator.execute(
            "update public.persona_training_events set trace_id = 'busy' where id = %s",
            (earlier["id"],),
        )
        voted = vote_in_background(voter, twin, "busy", 0)
        wait_for_lock_waits(db, operator.info.backend_pid)
        operator.execute(
            "update public.persona_training_events set trace_id = 'moved-away' where id = %s",
            (current["id"],),
        )
        operator.commit()
    new = voted()
    assert first_vote_times(db, [new["id"]]) == {new["id"]: cast_at}
    assert kept_time(db, twin, "busy", voter) == cast_at
    current_votes = db.execute(
        "select id, supersedes_id from public.persona_training_events where twin_id = %s"
        " and trace_id = 'busy' and superseded_at is null", (twin,)
    ).fetchall()
    assert current_votes == [(new["id"], None)]


def test_three_votes_on_one_feedback_take_turns_across_a_move_and_a_restored_vote(
    stack: Stack,
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
) -> None:
    """Votes of one feedback take turns on its kept time, locked first. An operator moves a vote
    into a feedback with no current vote (a transaction still open: it holds the kept time); a
    vote waits for it; a moderator restores an earlier vote as current; a third vote comes. When
    votes locked the current vote first, the second vote, holding the kept time, wanted the
    restored vote the third had locked, and the third wanted the kept time: a deadlock, one vote
    lost (500). Both land, one after the other, each the feedback's current vote in turn."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    earlier = vote(voter, twin, "f", 1)
    cast_at = cast_days_ago(db, earlier["id"], 2)
    deleted = vote(voter, twin, "f", -1, reason="incorrect")
    moved = vote(voter, twin, "g", 1)
    vote(voter, twin, "g", 0, reason="other")  # `moved` superseded
    db.execute("delete from public.persona_training_events where id = %s", (deleted["id"],))
    with psycopg.connect(stack.database_url) as operator:
        operator.execute(
            "update public.persona_training_events set trace_id = 'f' where id = %s",
            (moved["id"],),
        )
        second_voted = vote_in_background(voter, twin, "f", 1)
        wait_for_lock_waits(db, operator.info.backend_pid)
        db.execute(
            "update public.persona_training_events set superseded_at = null where id = %s",
            (earlier["id"],),
        )
        third_voted = vote_in_background(voter, twin, "f", -1)
        wait_for_lock_waits(db, operator.info.backend_pid, waiting=2)
        operator.commit()
    second, third = second_voted(), third_voted()
    chain = db.execute(
        "select id, supersedes_id, superseded_at is null, first_vote_at"
        " from public.persona_training_events where twin_id = %s and trace_id = 'f'"
        " and id <> %s order by id", (twin, moved["id"]),
    ).fetchall()
    assert chain == [
        (earlier["id"], None, False, cast_at),
        (second["id"], earlier["id"], False, cast_at),
        (third["id"], second["id"], True, cast_at),
    ]


def test_changed_vote_after_delivery_is_sent_by_the_next_drain(
    service: Client,
    make_user: Callable[[str], User],
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    drainer = OutboxDrainer(store, make_sender(), batch_size=100, max_attempts=8)
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    vote(voter, twin, "flip", 1)
    drainer.drain()
    second = vote(voter, twin, "flip", -1, reason="incorrect")
    drainer.drain()  # the first delivery is confirmed: nothing is in flight any more
    assert outbox(service, [second["id"]])[second["id"]]["status"] == "sent"
    assert [v["value"] for v in standin.scores[sid(twin, "flip", voter)]] == [1.0, -1.0]


# -- 7. 1,000 rows in batches --------------------------------------------------------------------


def test_a_thousand_rows_drain_in_batches_each_score_once(
    service: Client,
    make_user: Callable[[str], User],
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    batch = 100
    owner = make_user("owner")
    voters = [make_user(f"voter{i}") for i in range(4)]
    twin = open_twin(service, owner)
    payload = [
        {
            "twin_id": twin,
            "trace_id": f"bulk-{i}",
            "created_by": voters[i % len(voters)].id,  # allowed for service_role
            "score": (i % 3) - 1,
            "reason": "helpful",
            "intent_label": "factual_answer",
        }
        for i in range(1000)
    ]
    inserted = rows(service.table("persona_training_events").insert(payload).execute())
    assert len(inserted) == 1000
    pending = (
        service.table("persona_langfuse_outbox")
        .select("event_id", count=CountMethod.exact, head=True)
        .eq("twin_id", twin)
        .eq("status", "pending")
        .execute()
    )
    assert pending.count == 1000

    drainer = OutboxDrainer(store, make_sender(batch_size=batch), batch_size=batch, max_attempts=8)
    handled = drainer.drain()
    assert handled >= 1000

    expected = {
        sid(twin, e["trace_id"], e["created_by"]): (float(e["score"]), ts(e["created_at"]))
        for e in inserted
    }
    assert len(expected) == 1000
    assert_delivered_once(standin, expected)
    per_request = request_ids(standin)
    assert all(len(ids) <= batch for ids in per_request)
    carrying_ours = [ids for ids in per_request if ids & expected.keys()]
    assert len(carrying_ours) <= 1000 / 50
    # One request per pass of `batch` rows; other tests' due rows may shift the boundaries.
    assert len(per_request) == math.ceil(handled / batch)
    assert len(carrying_ours) <= math.ceil(1000 / batch) + 1
    if handled == 1000:
        assert len(carrying_ours) == 10
    sent = (
        service.table("persona_langfuse_outbox")
        .select("event_id", count=CountMethod.exact, head=True)
        .eq("twin_id", twin)
        .eq("status", "sent")
        .execute()
    )
    assert sent.count == 1000


# -- 8. 207 partial ------------------------------------------------------------------------------


def test_partial_rejection_fails_only_the_rejected_score(
    service: Client,
    make_user: Callable[[str], User],
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    drainer = OutboxDrainer(store, make_sender(), batch_size=100, max_attempts=8)
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    events = [vote(voter, twin, f"partial-{i}", 1) for i in range(5)]
    rejected = events[2]
    rejected_sid = sid(twin, rejected["trace_id"], voter)
    standin.set_mode("partial", reject={rejected_sid: "trace not found"})

    drainer.drain()
    rows = outbox(service, [e["id"] for e in events])
    bad = rows.pop(rejected["id"])
    assert bad["status"] == "failed"
    assert bad["attempts"] == 1
    assert bad["last_error"].startswith("rejected by Langfuse (HTTP 400)")
    assert "trace not found" in bad["last_error"]
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert all(r["sent_at"] is not None for r in rows.values())

    scores = standin.scores
    assert rejected_sid not in scores
    for e in events:
        if e is rejected:
            continue
        (version,) = scores[sid(twin, e["trace_id"], voter)]  # one request: nothing re-sent
        assert (version["value"], ts(version["timestamp"])) == (1.0, ts(e["created_at"]))
    assert len(standin.score_requests) == 1


# -- 9. Langfuse down when the worker starts -------------------------------------------------------


def test_down_at_start_touches_nothing_until_the_check_passes(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    events = [vote(voter, twin, f"start-down-{i}", 1) for i in range(3)]
    ids = [e["id"] for e in events]
    standin.stop()
    sender = make_sender(checked=False)

    assert drain_ours(db, store, sender, ids) == 0  # not checked: no row claimed
    for row in outbox(service, ids).values():
        assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)

    standin.start()
    assert drain_ours(db, store, sender, ids) == len(ids)
    assert set(statuses(service, ids).values()) == {"sent"}
    assert sender.version is not None


@pytest.mark.parametrize(
    ("cause", "level", "line"),
    [
        ("closed port", "WARNING", "Langfuse not reachable ("),
        ("unresolvable name", "ERROR", "the host name langfuse.invalid does not resolve"),
        ("https to a plain-HTTP port", "ERROR", "the TLS handshake failed"),
    ],
)
def test_a_connection_that_fails_mid_run_spends_no_attempt(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    caplog: pytest.LogCaptureFixture,
    cause: str,
    level: str,
    line: str,
) -> None:
    """The worker started against a working Langfuse; then the server goes away, its name
    stops resolving, or TLS fails (the real client, real sockets). The request never left, so
    the rows wait as they were (pending, no attempt: max_attempts=1 would have failed them),
    however many passes it lasts, with one line naming the cause; once it is fixed they go."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"mid-run-{i}", 1)["id"] for i in range(3)]
    with (
        LangfuseStandin(generation="v4") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0) as sender,
    ):
        check(sender)  # the start succeeded
        if cause == "closed port":
            lf.stop()
        elif cause == "unresolvable name":
            sender.host = f"http://langfuse.invalid:{lf.port}"
        else:
            sender.host = lf.url.replace("http://", "https://")
        drainer = OutboxDrainer(store, sender, len(ids), max_attempts=1, recheck_seconds=0)
        with caplog.at_level("WARNING", logger="worker.outbox"):
            for _ in range(3):
                make_due(db, ids, "30 days")
                assert drainer.drain_once() == 0
                for row in outbox(service, ids).values():
                    assert (row["status"], row["attempts"], row["last_error"]) == (
                        "pending", 0, None
                    )
        (said,) = [r for r in caplog.records if r.name == "worker.outbox"]
        assert (said.levelname, line in said.getMessage()) == (level, True), said.getMessage()
        assert lf.score_requests == []

        if cause == "closed port":
            lf.start()
        else:
            sender.host = lf.url
        make_due(db, ids, "30 days")
        assert drainer.drain_once() == len(ids)
    rows_ = outbox(service, ids)
    assert {(r["status"], r["attempts"]) for r in rows_.values()} == {("sent", 1)}


@pytest.mark.parametrize(
    ("mode", "line"),
    [
        ("proxy_forbidden", "refused by something in front of Langfuse, not Langfuse"),
        ("proxy_not_allowed", "method not allowed, though Langfuse takes POST"),
    ],
)
def test_a_proxys_refusal_mid_run_says_what_it_is_and_keeps_rows_pending(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    caplog: pytest.LogCaptureFixture,
    mode: Mode,
    line: str,
) -> None:
    """A proxy's 403 page or a 405 (no Langfuse error body) after a good start: the mirror goes
    off with a line that names a proxy, a firewall or a wrong host, not the keys; no row is
    failed or spends an attempt."""
    owner, voter = make_user("owner"), make_user("voter")
    ids = [vote(voter, open_twin(service, owner), f"{mode}-{i}", 1)["id"] for i in range(2)]
    with (
        LangfuseStandin(generation="v3") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0) as sender,
    ):
        check(sender)
        lf.set_mode(mode)
        make_due(db, ids, "30 days")
        drainer = OutboxDrainer(store, sender, len(ids), max_attempts=1)
        with caplog.at_level("ERROR", logger="worker.outbox"):
            assert drainer.drain_once() == 0
        (said,) = caplog.messages
        assert said.startswith("Langfuse mirror off: LANGFUSE_HOST=") and line in said
        assert "keys" not in said
    for row in outbox(service, ids).values():
        assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)


# -- 10. bad configuration: one clear line, rows kept ------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no scheme", "LANGFUSE_HOST='127.0.0.1:"),
        # Langfuse's SDK reads LANGFUSE_BASE_URL before LANGFUSE_HOST, and so does the worker
        ("base URL wins", "LANGFUSE_BASE_URL='127.0.0.1:"),
        ("wrong keys", "refused the keys: HTTP 401"),
        ("too old", "is too old: score metadata and environments need 3.49.0"),
        ("half configured", "LANGFUSE_SECRET_KEY not set"),
        ("bad environment", "environment 'Prod Env'"),
    ],
)
def test_bad_configuration_says_why_once_and_keeps_rows_pending(
    stack: Stack,
    service: Client,
    make_user: Callable[[str], User],
    tmp_path: Path,
    case: str,
    expected: str,
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    events = [vote(voter, twin, f"config-{i}", 1) for i in range(2)]
    ids = [e["id"] for e in events]
    with LangfuseStandin(version="3.48.2" if case == "too old" else None) as lf:
        extra = {
            "no scheme": {"LANGFUSE_HOST": lf.url.removeprefix("http://")},
            "base URL wins": {"LANGFUSE_BASE_URL": lf.url.removeprefix("http://")},
            "wrong keys": {"LANGFUSE_SECRET_KEY": "sk-lf-wrong"},
            "too old": {},
            "half configured": {"LANGFUSE_SECRET_KEY": ""},
            "bad environment": {"PFL_LANGFUSE_ENVIRONMENT": "Prod Env"},
        }[case]
        out = run_pfl(stack, tmp_path, "outbox", "drain", langfuse=lf, extra=extra, status=1)
        assert lf.score_requests == []
    assert expected in out.stderr
    errors = [line for line in out.stderr.splitlines() if "Langfuse mirror off" in line]
    assert len(errors) == 1, out.stderr
    assert expected in errors[0]
    if "scheme" in case or "URL" in case:
        assert "needs a scheme (http:// or https://) and a host" in errors[0]
    # a one-shot drain promises no second check
    assert errors[0].endswith("feedback stays pending, not sent by this drain"), errors[0]
    for row in outbox(service, ids).values():
        assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)


def test_environment_defaults_to_langfuses_own_variable(
    stack: Stack, service: Client, make_user: Callable[[str], User], tmp_path: Path
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    first = vote(voter, twin, "env-1", 1)
    with LangfuseStandin(generation="v4") as lf:
        # kept as Langfuse keeps it: its traces sent as "Staging" are in "staging"
        tracing = {"LANGFUSE_TRACING_ENVIRONMENT": "Staging"}
        run_pfl(stack, tmp_path, "outbox", "drain", langfuse=lf, extra=tracing)
        second = vote(voter, twin, "env-2", 1)
        ours = {"PFL_LANGFUSE_ENVIRONMENT": "prod-eu", **tracing}
        run_pfl(stack, tmp_path, "outbox", "drain", langfuse=lf, extra=ours)
        scores = lf.scores
    assert scores[sid(twin, "env-1", voter)][-1]["environment"] == "staging"
    assert scores[sid(twin, "env-2", voter)][-1]["environment"] == "prod-eu"
    assert set(statuses(service, [first["id"], second["id"]]).values()) == {"sent"}


# -- 11. Langfuse asks to wait: one hold for every worker; redirects are refused ---------------


@pytest.mark.parametrize(
    ("generation", "mode", "holds"),
    [
        # Langfuse Cloud's rate limit: Retry-After 2 (the stand-in's), each time
        ("cloud", "rate_limited", [(2.0, 2.0)] * 3),
        # Cloud's usage suspension: looked at again every 5 minutes
        ("cloud", "suspended", [(300.0, 300.0)] * 3),
        # a proxy's bare 429 in front of any generation: 1-2 s, then twice as long each time
        ("v3", "proxy_rate_limited", [(1.0, 2.0), (2.0, 4.0), (4.0, 8.0)]),
        # langfuse-web restarting behind its proxy (502): an outage, backed off the same way
        ("v4", "proxy_bad_gateway", [(1.0, 2.0), (2.0, 4.0), (4.0, 8.0)]),
    ],
    ids=["retry-after", "suspended", "bare-429", "bare-502"],
)
def test_a_wait_holds_every_send_one_probe_per_hold_until_it_lifts(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    caplog: pytest.LogCaptureFixture,
    generation: Generation,
    mode: Mode,
    holds: list[tuple[float, float]],
) -> None:
    """A backlog of three batches meets a rate limit or a suspension. The first request's
    answer holds the whole outbox: passes during the hold claim nothing and send nothing; when
    it ends, one request (the next batch) probes, and each limited probe sets the next hold.
    No attempt is spent (max_attempts=1: one would fail the rows); once the limit lifts every
    score goes out."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"hold-{mode}-{i}", 1)["id"] for i in range(6)]
    make_due(db, ids, "30 days")  # ours first in the claim order, two by two
    with (
        LangfuseStandin(generation=generation) as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0, batch_size=2) as sender,
    ):
        check(sender)
        drainer = OutboxDrainer(store, sender, batch_size=2, max_attempts=1)
        lf.set_mode(mode)
        with caplog.at_level("INFO", logger="worker.outbox"):
            for n, (low, high) in enumerate(holds):
                if n:
                    end_hold(db)  # the hold has run out: the next pass is the probe
                seen = len(lf.requests)
                assert drainer.drain_once() == 2
                seconds, reason, _ = hold(db)
                assert seconds is not None and low - 1.0 <= seconds <= high, (n, seconds)
                assert reason is not None and str(lf.requests[-1].status) in reason
                until = db.execute("select hold_until from private.langfuse_hold").fetchall()
                batch = [int(s["metadata"]["event_id"]) for s in lf.requests[-1].scores]
                assert batch == ids[2 * n : 2 * n + 2]
                assert set(due_times(db, batch).values()) == {until[0][0]}  # due at its end
                # However slow the passes below, they fall inside the hold.
                db.execute("update private.langfuse_hold set hold_until = now() + interval '1h'")
                assert [drainer.drain_once() for _ in range(5)] == [0] * 5
                assert drainer.drain() == 0
                assert len(lf.requests) == seen + 1, "exactly one request per hold"
            rows = outbox(service, ids)
            assert {(r["status"], r["attempts"]) for r in rows.values()} == {("retrying", 0)}
            assert [r.status for r in lf.score_requests] == [lf.requests[-1].status] * 3

            lf.set_mode("ok")  # the limit lifts
            end_hold(db)
            make_due(db, ids, "30 days")
            drainer.drain()
        lines = [(r.levelname, r.getMessage()) for r in caplog.records
                 if r.getMessage().startswith("Langfuse asked to wait")]
    assert [level for level, _ in lines] == ["WARNING", "INFO", "INFO"]  # one line per hold
    assert "no request to it before" in lines[0][1]
    assert "Langfuse takes scores again after its wait" in caplog.messages
    rows = outbox(service, ids)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("sent", 1)}
    assert hold(db) == (None, None, 0)  # a success ends the hold and the count of bare waits


def test_after_a_hold_one_claim_at_a_time_is_the_probe(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """Several workers drain one outbox: the hold one worker's answer set holds the others'
    claims too, and when it ends only one of them sends (the probe) until its answer is in."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"probe-{i}", 1)["id"] for i in range(6)]
    make_due(db, ids, "30 days")

    def claim() -> list[int]:
        answer = service.rpc(
            "claim_langfuse_outbox", {"p_limit": 2, "p_visibility_seconds": 60}
        ).execute()
        return [r["event_id"] for r in rows(answer)]

    first = claim()  # worker A
    assert first == ids[:2]
    record(service, first, "wait", 30.0)  # A's request met a 429, Retry-After: 30
    seconds, _, bare = hold(db)
    assert seconds is not None and 29 <= seconds <= 30 and bare == 0
    assert claim() == []  # worker B: held

    end_hold(db)
    probe = claim()  # A (or B): the probe
    assert probe == ids[2:4]
    assert claim() == []  # the other, though ids[4:] are due: the probe is in flight
    record(service, probe, "sent")
    assert hold(db) == (None, None, 0)
    assert claim() == ids[4:]  # every worker claims again
    make_due(db, first, "30 days")
    assert claim() == first


def test_a_worker_started_during_a_hold_sends_nothing_not_even_its_check(
    stack: Stack,
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    tmp_path: Path,
) -> None:
    """Another worker's request met a 429 (Retry-After: 60): `pfl outbox drain` started now
    asks the database first and sends Langfuse nothing, its start-up check included, with one
    line saying until when; after the hold it checks, and the rows go."""
    owner, voter = make_user("owner"), make_user("voter")
    event = vote(voter, open_twin(service, owner), "started-held", 1)
    record(service, [event["id"]], "wait", 60.0)
    with LangfuseStandin(generation="cloud") as lf:
        out = run_pfl(stack, tmp_path, "outbox", "drain", langfuse=lf)
        assert lf.requests == []
        (line,) = [x for x in out.stderr.splitlines() if "Langfuse asked to wait" in x]
        assert "HTTP 429: Rate limit exceeded" in line and "no request to it before" in line
        assert "handled 0 outbox rows" in out.stdout
        end_hold(db)
        make_due(db, [event["id"]], "30 days")
        run_pfl(stack, tmp_path, "outbox", "drain", langfuse=lf)
        assert [r.path for r in lf.requests[:2]] == ["/api/public/health", INGESTION_PATH]
    assert statuses(service, [event["id"]]) == {event["id"]: "sent"}


def test_a_proxys_bare_429s_double_the_hold_and_a_success_starts_again(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """The count of bare waits (429 without a delay) lives in the database, so it is the same
    for every worker: each one in a row doubles the hold (equal jitter, at most 300 s), a
    delay the server gives sets its own hold without counting, a success starts again."""
    owner, voter = make_user("owner"), make_user("voter")
    event = vote(voter, open_twin(service, owner), "bare", 1)

    for n in range(10):
        record(service, [event["id"]], "wait")
        seconds, _, bare = hold(db)
        low, high = (min(2.0 * 2**n, 300.0) * j for j in (0.5, 1.0))
        assert seconds is not None and low - 1.0 <= seconds <= high, (n, seconds)
        assert bare == n + 1
        end_hold(db)
    record(service, [event["id"]], "wait", 7.0)  # a delay given: its hold, the count kept
    seconds, _, bare = hold(db)
    assert seconds is not None and 6.0 <= seconds <= 7.0 and bare == 10
    end_hold(db)
    record(service, [event["id"]], "sent")
    assert hold(db) == (None, None, 0)
    record(service, [event["id"]], "wait")
    seconds, _, bare = hold(db)
    assert seconds is not None and 0.0 <= seconds <= 2.0 and bare == 1


def test_serve_sends_one_request_per_hold_until_the_limit_lifts(
    stack: Stack, service: Client, make_user: Callable[[str], User], tmp_path: Path
) -> None:
    """`pfl serve` against Langfuse Cloud's rate limit (Retry-After: 2): the start-up check's
    empty batch meets the first 429, which holds like a send's; after it the requests come one
    per hold (the check's empty batch, the hold's probe), at least two seconds apart, and
    nothing else is sent meanwhile; when the limit lifts the check passes once and every score
    goes out, none failed."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"serve-hold-{i}", 1)["id"] for i in range(6)]
    log = tmp_path / "serve.log"
    with LangfuseStandin(generation="cloud") as lf:
        lf.set_mode("rate_limited")
        env = worker_env(
            stack,
            LANGFUSE_HOST=lf.url, LANGFUSE_PUBLIC_KEY=lf.public_key,
            LANGFUSE_SECRET_KEY=lf.secret_key, PFL_LANGFUSE_BATCH_SIZE="2",
            PFL_LANGFUSE_MAX_ATTEMPTS="1", PFL_POLL_MIN_SECONDS="0.05",
            PFL_POLL_MAX_SECONDS="0.2", PFL_LOG_FORMAT="json",
        )
        with log.open("w") as sink:
            proc = subprocess.Popen([str(PFL), "serve"], cwd=tmp_path, env=env,
                                    stdout=subprocess.DEVNULL, stderr=sink)
        try:
            wait_for(lambda: sum(r.status == 429 for r in lf.requests) >= 4, timeout=30)
            lf.set_mode("ok")
            wait_for(lambda: set(statuses(service, ids).values()) == {"sent"}, timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    # The start-up check's empty batch met the first 429: its wait set the hold, and each
    # probe after it is one request (the check's empty batch again, no health read), until one
    # passes; then the scores go.
    first = next(i for i, r in enumerate(lf.requests) if r.status == 429)
    last = max(i for i, r in enumerate(lf.requests) if r.status == 429)
    during = lf.requests[first : last + 1]
    assert all(r.status == 429 and r.path == INGESTION_PATH for r in during), (
        "only the probes, nothing else")
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(during)]
    assert len(gaps) >= 3 and min(gaps) >= 1.9, gaps
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    holds = [e for e in events if e["event"].startswith("Langfuse asked to wait")]
    assert [e["level"] for e in holds][:1] == ["warning"] and len(holds) >= len(during)
    assert [e["event"] for e in events].count("Langfuse mirror ready") == 1
    rows_ = outbox(service, ids)
    assert {(r["status"], r["attempts"]) for r in rows_.values()} == {("sent", 1)}


def test_a_redirect_mid_run_turns_the_mirror_off_as_at_start_and_spends_nothing(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A proxy starts redirecting http:// to https:// while the worker runs: one error line
    saying where to, no attempt spent, no request per pass (the mirror is off), checked again
    every `recheck_seconds`; once the host answers again, the rows go."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"redirected-{i}", 1)["id"] for i in range(2)]
    sender = make_sender()
    standin.set_mode("redirect")
    make_due(db, ids, "400 days")
    drainer = OutboxDrainer(store, sender, batch_size=len(ids), max_attempts=1,
                            recheck_seconds=3600)
    with caplog.at_level("ERROR", logger="worker.outbox"):
        assert drainer.drain_once() == 0
        seen = len(standin.requests)
        assert [drainer.drain_once() for _ in range(5)] == [0] * 5
    assert len(standin.requests) == seen, "off: no request per pass"
    (line,) = [m for m in caplog.messages if "Langfuse mirror off" in m]
    assert "redirected to https://" in line and "set LANGFUSE_HOST to https://" in line
    rows_ = outbox(service, ids)
    assert {(r["status"], r["attempts"], r["last_error"]) for r in rows_.values()} == {
        ("pending", 0, None)
    }
    assert [(r.method, r.status) for r in standin.requests[-1:]] == [("POST", 301)]
    standin.set_mode("ok")
    drainer.recheck_seconds = 0
    drainer._recheck_at = 0.0  # the recheck is due (stands for the passage of time)
    make_due(db, ids, "400 days")
    assert drainer.drain_once() == len(ids)
    assert set(statuses(service, ids).values()) == {"sent"}


def test_a_200_page_from_something_else_confirms_nothing(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    """A proxy or a web app answering 200 in Langfuse's place (after the start-up check
    passed): no row is sent; each retries with an error that says the answer was not
    Langfuse's, and after the last attempt fails (requeue brings it back)."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"proxied-{i}", 1)["id"] for i in range(3)]
    sender = make_sender()
    standin.set_mode("proxy_page")

    assert drain_ours(db, store, sender, ids) == len(ids)
    rows = outbox(service, ids)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("retrying", 1)}
    assert "HTTP 200 without the ingestion result" in rows[ids[0]]["last_error"]
    assert drain_ours(db, store, sender, ids, max_attempts=2) == len(ids)
    rows = outbox(service, ids)
    assert {r["status"] for r in rows.values()} == {"failed"}
    assert rows[ids[0]]["last_error"].startswith("gave up after 2 attempts: HTTP 200")
    assert standin.scores == {}


def test_a_host_without_the_ingestion_route_keeps_rows_waiting(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    make_sender: SenderFactory,
) -> None:
    """Every Langfuse serves the ingestion route for scores (Cloud too after its v3 ingestion
    sunset), but a proxy in front of it may answer 404 there: such a host is refused at start,
    and if it starts answering 404 later the rows wait (no attempt spent, never failed) with
    the reason on each row."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"no-route-{i}", 1)["id"] for i in range(2)]
    sender = make_sender()
    standin.set_mode("no_route")
    with pytest.raises(LangfuseConfigError, match="answered 404 to POST /api/public/ingestion"):
        check(make_sender(checked=False))

    started = db_now(db)
    assert drain_ours(db, store, sender, ids, max_attempts=1) == len(ids)
    rows = outbox(service, ids)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("retrying", 0)}
    assert "no POST /api/public/ingestion" in rows[ids[0]]["last_error"]
    due = due_times(db, ids).values()
    assert all(when - started >= timedelta(seconds=300) - SLACK for when in due)
    assert standin.scores == {}
    standin.set_mode("ok")
    assert drain_ours(db, store, sender, ids) == 0  # held: asked again in 5 minutes
    end_hold(db)
    assert drain_ours(db, store, sender, ids) == len(ids)
    assert set(statuses(service, ids).values()) == {"sent"}


@pytest.mark.parametrize(
    "delivery",
    [
        {"outcome": "wait", "retry_after_seconds": -1},
        {"outcome": "retry", "retry_after_seconds": 86401},
        {"outcome": "later"},
        {"outcome": "sent", "hold": True},
        {"outcome": "retry", "hold": "yes"},
        {"outcome": "sent", "unsent": True},
        {"outcome": "wait", "unsent": True},
        {"outcome": "failed", "unsent": "yes"},
    ],
)
def test_record_refuses_an_unknown_outcome_or_delay_and_changes_nothing(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    delivery: dict[str, Any],
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    event = vote(voter, open_twin(service, owner), "bad-record", 1)
    before = outbox(service, [event["id"]])
    refused = "retry_after_seconds of 0.*hold.*unsent"
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=refused):
        db.execute(
            "select public.record_langfuse_deliveries(%s::jsonb)",
            (json.dumps([{"event_id": event["id"], "error": "x", **delivery}]),),
        )
    assert outbox(service, [event["id"]]) == before
    assert hold(db) == (None, None, 0)


# -- 12. Outages: a 5xx holds every worker; the bare backoff counts holds; ending one early ----


def claim_ids(service: Client, limit: int = 2) -> list[int]:
    """One worker's claim, as `claim_langfuse_outbox` answers it: the event ids."""
    answer = service.rpc(
        "claim_langfuse_outbox", {"p_limit": limit, "p_visibility_seconds": 60}
    ).execute()
    return [r["event_id"] for r in rows(answer)]


def test_langfuses_500_holds_every_worker_and_spends_one_attempt_per_hold(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
) -> None:
    """Langfuse's catch-all 500 (its storage or queue down): the first request's answer holds
    every worker (no request per batch, per worker, per poll), and each hold costs its rows one
    attempt (a body that breaks the server still fails after max_attempts); the rows are due
    no earlier than the hold's end."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"five-hundred-{i}", 1)["id"] for i in range(6)]
    make_due(db, ids, "30 days")
    with (
        LangfuseStandin(generation="v3") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0, batch_size=2) as sender,
    ):
        check(sender)
        drainer = OutboxDrainer(store, sender, batch_size=2, max_attempts=8)
        lf.set_mode("error")
        seen = len(lf.requests)
        assert drainer.drain_once() == 2
        seconds, reason, bare = hold(db)
        assert seconds is not None and 0.5 <= seconds <= 2.0 and bare == 1
        assert reason is not None and "HTTP 500" in reason
        assert drainer.holding
        first = ids[:2]
        rows_ = outbox(service, first)
        assert {(r["status"], r["attempts"]) for r in rows_.values()} == {("retrying", 1)}
        until = db.execute("select hold_until from private.langfuse_hold").fetchone()
        assert until is not None
        assert all(when >= until[0] for when in due_times(db, first).values())
        db.execute("update private.langfuse_hold set hold_until = now() + interval '1h'")
        assert claim_ids(service) == []  # another worker: held too
        assert drainer.drain() == 0
        assert len(lf.requests) == seen + 1, "one request, not one per batch"
        end_hold(db)
        assert drainer.drain_once() == 2  # the probe meets the 500 again: the next hold, longer
        seconds, _, bare = hold(db)
        assert seconds is not None and 1.0 <= seconds <= 4.0 and bare == 2
        lf.set_mode("ok")
        end_hold(db)
        make_due(db, ids, "30 days")
        drainer.drain()
    rows_ = outbox(service, ids)
    assert {r["status"] for r in rows_.values()} == {"sent"}
    assert hold(db) == (None, None, 0)


def test_the_bare_backoff_counts_holds_not_answers_and_only_a_success_resets_it(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """Four workers meet the same bare 429 at once: one hold, counted once (the first hold
    stays 1-2 s); a retry (a timeout, say) after the hold ends it but keeps the count; only a
    success starts the count again."""
    owner, voter = make_user("owner"), make_user("voter")
    event = vote(voter, open_twin(service, owner), "count-holds", 1)
    for _ in range(4):  # the same answer, recorded by four workers while the hold is in force
        record(service, [event["id"]], "wait")
    seconds, _, bare = hold(db)
    assert seconds is not None and 0.5 <= seconds <= 2.0 and bare == 1
    end_hold(db)
    record(service, [event["id"]], "retry")  # the probe timed out: not a success
    assert hold(db) == (None, None, 1)
    record(service, [event["id"]], "wait")  # the next bare answer: twice as long
    seconds, _, bare = hold(db)
    assert seconds is not None and 1.0 <= seconds <= 4.0 and bare == 2
    end_hold(db)
    record(service, [event["id"]], "sent")
    assert hold(db) == (None, None, 0)


def test_a_retry_after_of_zero_still_holds_a_second_and_drain_stops_after_a_held_pass(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
) -> None:
    """`Retry-After: 0` (or a date gone by) holds at least a second, so the next claim is not
    a probe at once; and `outbox drain` stops after a pass that met a hold, however short:
    even if the hold has run out by the next pass, it sends one request, not one per batch."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    event = vote(voter, twin, "retry-after-zero", 1)
    record(service, [event["id"]], "wait", 0.0)
    seconds, _, _ = hold(db)
    assert seconds is not None and 0.5 <= seconds <= 1.0
    assert claim_ids(service) == []

    db.execute(CLEAR_HOLD)
    ids = [vote(voter, twin, f"drain-stops-{i}", 1)["id"] for i in range(6)]
    make_due(db, ids, "30 days")

    class HoldRunsOut(Store):
        """The worker's store, where every hold has run out by the next pass."""

        def record_deliveries(self, deliveries: Any, max_attempts: int) -> int:
            recorded = super().record_deliveries(deliveries, max_attempts)
            end_hold(db)
            return recorded

    quick = object.__new__(HoldRunsOut)
    quick.__dict__.update(store.__dict__)
    with (
        LangfuseStandin(generation="v3") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0, batch_size=2) as sender,
    ):
        check(sender)
        lf.set_mode("proxy_rate_limited")
        seen = len(lf.requests)
        assert OutboxDrainer(quick, sender, batch_size=2, max_attempts=1).drain() == 2
        assert len(lf.requests) == seen + 1
    # the rows left due no longer stand ahead of other tests' rows in the claim order
    db.execute(
        "update public.persona_training_events set langfuse_next_attempt_at = now()"
        " where id = any(%s)", (ids,),
    )


def test_ending_a_hold_early_makes_its_waiting_rows_due(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """The plan upgraded: `select public.end_langfuse_hold()` ends the hold and makes the rows
    that waited for it due now, so the next claim takes them (clearing private.langfuse_hold
    alone left them waiting until the hold's old end); without a hold it changes nothing."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"end-early-{i}", 1)["id"] for i in range(2)]
    make_due(db, ids, "400 days")  # ahead of other tests' due rows
    assert claim_ids(service) == ids
    record(service, ids, "wait", 3600.0)  # a suspension, say: an hour
    later = vote(voter, twin, "end-early-not-waiting", 1)["id"]
    db.execute(
        "update public.persona_training_events set langfuse_next_attempt_at = now() + "
        "interval '2 hours' where id = %s", (later,),
    )  # a retry whose backoff outlasts the hold: left as it is
    released = service.rpc("end_langfuse_hold", {}).execute().data
    assert isinstance(released, int) and released >= 2
    assert hold(db) == (None, None, 0)
    now = db_now(db)
    assert all(when <= now for when in due_times(db, ids).values())
    assert due_times(db, [later])[later] > now + timedelta(hours=1)
    make_due(db, ids, "400 days")
    assert claim_ids(service) == ids
    assert service.rpc("end_langfuse_hold", {}).execute().data == 0
    assert {r["attempts"] for r in outbox(service, ids).values()} == {0}


def test_a_proxys_429_on_the_health_route_at_start_holds_every_worker(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
) -> None:
    """A proxy's rate limit answers even the start-up check (its bare 429 on every path): that
    sets the database's hold, as on a send, so no worker asks again before it ends (not a
    check per pass per worker); after it, the check passes and the rows go."""
    owner, voter = make_user("owner"), make_user("voter")
    ids = [vote(voter, open_twin(service, owner), f"health-429-{i}", 1)["id"] for i in range(2)]
    with (
        LangfuseStandin(generation="v4") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0) as sender,
    ):
        lf.set_mode("proxy_rate_limited")
        drainer = OutboxDrainer(store, sender, batch_size=len(ids), max_attempts=1)
        assert drainer.drain_once() == 0
        seconds, reason, bare = hold(db)
        assert seconds is not None and 0.5 <= seconds <= 2.0 and bare == 1
        assert reason is not None and "HTTP 429" in reason
        assert [(r.path, r.status) for r in lf.requests] == [("/api/public/health", 429)]
        other = OutboxDrainer(store, sender, batch_size=len(ids), max_attempts=1)
        assert other.drain_once() == drainer.drain_once() == 0
        assert len(lf.requests) == 1, "nothing before the hold ends, from any worker"
        lf.set_mode("ok")
        end_hold(db)
        make_due(db, ids, "400 days")
        assert drainer.drain_once() == len(ids)
    assert set(statuses(service, ids).values()) == {"sent"}
    assert {r["attempts"] for r in outbox(service, ids).values()} == {1}


@pytest.mark.parametrize("mode", ["no_route", "proxy_page"])
def test_no_langfuse_at_start_is_checked_again_without_a_restart(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    caplog: pytest.LogCaptureFixture,
    mode: Mode,
) -> None:
    """A proxy with no route to Langfuse yet (Traefik before the container is healthy answers
    404; or a page of its own): the mirror is off with one line, and checked again every
    `recheck_seconds`, so it comes back once Langfuse answers, no restart needed; the rows
    stay pending meanwhile."""
    owner, voter = make_user("owner"), make_user("voter")
    ids = [vote(voter, open_twin(service, owner), f"start-{mode}-{i}", 1)["id"] for i in range(2)]
    with (
        LangfuseStandin(generation="v4") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0) as sender,
        caplog.at_level("ERROR", logger="worker.outbox"),
    ):
        lf.set_mode(mode)
        drainer = OutboxDrainer(store, sender, batch_size=len(ids), max_attempts=1,
                                recheck_seconds=0)
        assert drainer.drain_once() == 0
        assert drainer.config_error is not None
        (line,) = [m for m in caplog.messages if "Langfuse mirror off" in m]
        assert "checked again every 0 s" in line
        assert {(r["status"], r["attempts"]) for r in outbox(service, ids).values()} == {
            ("pending", 0)
        }
        lf.set_mode("ok")
        make_due(db, ids, "400 days")
        assert drainer.drain_once() == len(ids)
    assert set(statuses(service, ids).values()) == {"sent"}


# -- 13. One bad row, an unreadable answer, DNS, the check in the hold, and the hold's end ------


BAD_NUMBERS_TRIGGER = "persona_training_events_check_metadata_numbers"
EVENTS = "public.persona_training_events"


def store_metadata_as_before_the_rule(db: psycopg.Connection, event_id: int, metadata: str) -> None:
    """Stands for a row stored before the database refused metadata numbers beyond a double:
    the rule's trigger is off for this one update (one transaction, as the table's owner)."""
    with db.transaction():
        db.execute(f"alter table {EVENTS} disable trigger {BAD_NUMBERS_TRIGGER}")
        db.execute(
            "update public.persona_training_events set metadata = %s::jsonb where id = %s",
            (metadata, event_id),
        )
        db.execute(f"alter table {EVENTS} enable trigger {BAD_NUMBERS_TRIGGER}")


def test_a_row_langfuse_cannot_take_fails_alone_and_the_rest_of_the_batch_goes_out(
    stack: Stack,
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    make_sender: SenderFactory,
    standin: LangfuseStandin,
    tmp_path: Path,
) -> None:
    """A vote stored with a metadata number beyond a double (before the database refused them)
    reads as Infinity, which no JSON score can carry: its row is recorded failed with the
    reason (a permanent refusal, one attempt), the batch's other rows are sent, and `pfl outbox
    drain` ends normally (it once crashed on it, as did serve's mirror thread)."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"poison-{i}", 1)["id"] for i in range(3)]
    # 10^309 + 0.5 (310 digits): Python, as JavaScript, reads it as Infinity
    store_metadata_as_before_the_rule(db, ids[1], '{"x": 1' + "0" * 309 + '.5}')
    sender = make_sender()
    assert drain_ours(db, store, sender, ids) == 3
    rows_ = outbox(service, ids)
    assert (rows_[ids[1]]["status"], rows_[ids[1]]["attempts"]) == ("failed", 1)
    error = rows_[ids[1]]["last_error"]
    assert error.startswith("not sent: Langfuse cannot take this row (metadata")
    assert "JSON" in error
    others = [(rows_[i]["status"], rows_[i]["attempts"]) for i in (ids[0], ids[2])]
    assert others == [("sent", 1)] * 2
    assert sid(twin, "poison-1", voter) not in standin.scores
    assert {sid(twin, f"poison-{i}", voter) for i in (0, 2)} <= set(standin.scores)

    # the CLI, as a fresh process: the row is failed for good, a requeue brings it back, and
    # the drain fails it again without stopping
    run_pfl(stack, tmp_path, "outbox", "requeue", "--failed", langfuse=standin)
    make_due(db, [ids[1]], "1 day")
    out = run_pfl(stack, tmp_path, "outbox", "drain", langfuse=standin)
    assert "handled" in out.stdout
    assert statuses(service, [ids[1]]) == {ids[1]: "failed"}


def test_a_legacy_integer_beyond_a_double_fails_alone_as_the_database_would_refuse_it(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    make_sender: SenderFactory,
    standin: LangfuseStandin,
) -> None:
    """jsonb keeps 1e309 as a 310-digit integer, which Python reads exactly but JavaScript
    (Langfuse) as Infinity: a row stored so before the rule fails alone with the reason, as
    one with a fraction does, and the batch's other row is sent."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"big-int-{i}", 1)["id"] for i in range(2)]
    store_metadata_as_before_the_rule(db, ids[1], '{"n": {"x": -1e309}}')
    stored = db.execute(f"select metadata #>> '{{n,x}}' from {EVENTS} where id = %s", (ids[1],))
    assert stored.fetchone() == ("-1" + "0" * 309,)  # an integer, no exponent
    assert drain_ours(db, store, make_sender(), ids) == 2
    rows_ = outbox(service, ids)
    assert (rows_[ids[1]]["status"], rows_[ids[1]]["attempts"]) == ("failed", 1)
    assert "beyond the range of a double" in rows_[ids[1]]["last_error"]
    assert rows_[ids[0]]["status"] == "sent"
    assert sid(twin, "big-int-1", voter) not in standin.scores


def test_a_probe_claim_of_only_unsendable_rows_neither_ends_nor_sets_the_hold(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
) -> None:
    """After a hold, the claim that is its probe takes only a row the worker cannot send: it is
    recorded failed (unsent) without a request, which is no answer of Langfuse's, so the hold
    stays (it once ended it) and the probe is freed: the next claim is the probe, and
    Langfuse's answer to it (still a 429) sets the next hold."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    bad, good = (vote(voter, twin, f"unsent-probe-{i}", 1)["id"] for i in range(2))
    store_metadata_as_before_the_rule(db, bad, '{"x": 1' + "0" * 309 + '.5}')
    make_due(db, [bad], "60 days")  # first in the claim order
    make_due(db, [good], "59 days")
    with (
        LangfuseStandin(generation="cloud") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0, batch_size=1) as sender,
    ):
        check(sender)
        lf.set_mode("rate_limited")  # Langfuse still limits
        requests = len(lf.requests)
        record_check(service, "wait", 1.0, "HTTP 429: Rate limit exceeded")
        end_hold(db)  # the next claim is the probe
        drainer = OutboxDrainer(store, sender, batch_size=1, max_attempts=8)
        assert drainer.drain_once() == 1  # the bad row alone, failed without a request
        assert len(lf.requests) == requests
        assert statuses(service, [bad]) == {bad: "failed"}
        state = db.execute(
            "select hold_until <= now(), reason, probe_until from private.langfuse_hold"
        ).fetchone()
        assert state == (True, "HTTP 429: Rate limit exceeded", None)  # kept, probe freed
        assert drainer.drain_once() == 1  # the good row is the probe: Langfuse answers 429
        assert len(lf.requests) == requests + 1
        seconds, reason, _ = hold(db)
        assert seconds is not None and seconds > 0 and reason is not None and "429" in reason
        assert statuses(service, [good]) == {good: "retrying"}


def test_an_answer_whose_body_cannot_be_read_is_an_unconfirmed_retry(
    stack: Stack,
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    make_sender: SenderFactory,
    standin: LangfuseStandin,
    tmp_path: Path,
) -> None:
    """A proxy marks Langfuse's 207 gzip without compressing it: the client cannot read it
    (httpx's DecodingError, no TransportError). The drain goes on: each row is a retry (an
    attempt: nothing confirmed, resending is harmless), and once the answers are readable the
    scores are confirmed; `pfl outbox drain` exits 0 meanwhile."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"bad-gzip-{i}", 1)["id"] for i in range(2)]
    sender = make_sender()
    standin.set_mode("proxy_bad_encoding")
    assert drain_ours(db, store, sender, ids) == 2
    rows_ = outbox(service, ids)
    assert {(r["status"], r["attempts"]) for r in rows_.values()} == {("retrying", 1)}
    assert all("HTTP 207 with a body that could not be read" in r["last_error"]
               for r in rows_.values())
    make_due(db, ids, "1 day")
    out = run_pfl(stack, tmp_path, "outbox", "drain", langfuse=standin)
    assert "handled" in out.stdout
    standin.set_mode("ok")
    assert drain_ours(db, store, sender, ids) == 2
    rows_ = outbox(service, ids)
    assert {r["status"] for r in rows_.values()} == {"sent"}


def test_a_temporary_dns_failure_is_not_reachable_not_a_setting(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    standin: LangfuseStandin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One "temporary failure in name resolution" (EAI_AGAIN) at the check: the rows wait
    (untouched), "not reachable" is logged, the mirror is not turned off for minutes, and the
    next pass (the resolver answering again) checks and sends."""
    owner, voter = make_user("owner"), make_user("voter")
    ids = [vote(voter, open_twin(service, owner), f"eai-again-{i}", 1)["id"] for i in range(2)]
    real = socket.getaddrinfo
    failures = {"left": 1}

    def flaky(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost" and failures["left"]:
            failures["left"] -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", flaky)
    url = standin.url.replace("127.0.0.1", "localhost")
    with LangfuseSender(url, standin.public_key, standin.secret_key, 5.0) as sender:
        make_due(db, ids, "1 day")
        drainer = OutboxDrainer(store, sender, batch_size=len(ids), max_attempts=8)
        with caplog.at_level("WARNING", logger="worker.outbox"):
            assert drainer.drain_once() == 0
        assert failures["left"] == 0 and drainer.config_error is None
        assert any("Langfuse not reachable" in m and "Temporary failure" in m
                   for m in caplog.messages)
        assert not any("Langfuse mirror off" in m for m in caplog.messages)
        assert {(r["status"], r["attempts"]) for r in outbox(service, ids).values()} == {
            ("pending", 0)}
        make_due(db, ids, "1 day")
        assert drainer.drain_once() == len(ids)
        assert set(statuses(service, ids).values()) == {"sent"}

        # the same on a send, once the check has passed: a new connection (a fresh client, as
        # after a dropped keep-alive) meets EAI_AGAIN; the batch is left as it was, no attempt
        later = [vote(voter, open_twin(service, owner), f"eai-again-send-{i}", 1)["id"]
                 for i in range(2)]
        sender.http.close()
        sender.http = httpx.Client(auth=(standin.public_key, standin.secret_key), timeout=5.0)
        failures["left"] = 1
        seen = len(standin.requests)
        make_due(db, later, "1 day")
        drainer.batch_size = len(later)
        assert drainer.drain_once() == 0
        assert failures["left"] == 0 and drainer.config_error is None
        assert len(standin.requests) == seen
        assert {(r["status"], r["attempts"]) for r in outbox(service, later).values()} == {
            ("pending", 0)}
        make_due(db, later, "1 day")
        assert drainer.drain_once() == len(later)  # checked again, then sent
    assert set(statuses(service, later).values()) == {"sent"}


def check_turn(service: Client) -> dict[str, Any]:
    answer = service.rpc("claim_langfuse_check", {"p_visibility_seconds": 60}).execute().data
    assert isinstance(answer, dict)
    return answer


def record_check(
    service: Client, outcome: str, delay: float | None = None, error: str | None = None
) -> float:
    answer = service.rpc(
        "record_langfuse_check",
        {"p_outcome": outcome, "p_error": error, "p_retry_after_seconds": delay},
    ).execute().data
    assert isinstance(answer, int | float)
    return float(answer)


def test_after_a_hold_one_check_or_claim_at_a_time_is_the_probe(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """The start-up check takes part in the hold as a claim does: none while it holds; once it
    has passed one check is the probe, and no other check or claim goes out until its answer
    is recorded: failed frees the probe, passed ends the hold, a wait sets the next one."""
    owner, voter = make_user("owner"), make_user("voter")
    ids = [vote(voter, open_twin(service, owner), f"check-probe-{i}", 1)["id"] for i in range(2)]
    make_due(db, ids, "400 days")
    assert check_turn(service) == {"turn": "check", "hold_seconds": 0, "hold_reason": None}
    assert record_check(service, "wait", 30.0, "HTTP 429: Rate limit exceeded") == pytest.approx(
        30.0, abs=1.0)
    turn = check_turn(service)
    assert turn["turn"] == "held" and 29.0 <= turn["hold_seconds"] <= 30.0
    assert turn["hold_reason"] == "HTTP 429: Rate limit exceeded"
    assert claim_ids(service) == []

    end_hold(db)
    assert check_turn(service)["turn"] == "probe"  # worker A's check
    assert check_turn(service) == {"turn": "held", "hold_seconds": 0,
                                   "hold_reason": "HTTP 429: Rate limit exceeded"}  # B's
    assert claim_ids(service) == [], "no claim while a check is the probe"
    record_check(service, "failed")  # A's check met a closed port: another may probe
    assert check_turn(service)["turn"] == "probe"  # B's check
    assert check_turn(service)["turn"] == "held"
    assert record_check(service, "passed") == 0.0  # B's check passed: the hold is over
    assert hold(db) == (None, None, 0)
    assert check_turn(service)["turn"] == "check"
    assert claim_ids(service) == ids
    assert {r["attempts"] for r in outbox(service, ids).values()} == {0}


def test_a_checks_wait_sets_the_hold_by_the_same_rules_as_a_sends(
    service: Client, db: psycopg.Connection
) -> None:
    """record_langfuse_check's wait: the longest delay given, never shortened; without one the
    bare backoff, counted once per hold; at least 1 s. Passed ends only a hold that has passed;
    bad input is refused and changes nothing."""
    record_check(service, "wait", 0.0, "HTTP 429")
    seconds, reason, bare = hold(db)
    assert seconds is not None and 0.5 <= seconds <= 1.0 and reason == "HTTP 429" and bare == 0
    record_check(service, "wait", 20.0, "HTTP 429")
    record_check(service, "wait", 5.0, "HTTP 429")  # a shorter one does not shorten it
    seconds, _, _ = hold(db)
    assert seconds is not None and 19.0 <= seconds <= 20.0
    assert record_check(service, "passed") > 19.0  # a hold in force is not ended by a pass
    db.execute(CLEAR_HOLD)
    for n in range(3):
        record_check(service, "wait", None, "HTTP 429: proxy")
        record_check(service, "wait", None, "HTTP 429: proxy")  # same hold: counted once
        seconds, _, bare = hold(db)
        low, high = (2.0 * 2**n * j for j in (0.5, 1.0))
        assert seconds is not None and low - 1.0 <= seconds <= high and bare == n + 1, (n, seconds)
        end_hold(db)
    raw = "select hold_until, reason, bare_waits, probe_until from private.langfuse_hold"
    before = db.execute(raw).fetchall()
    for params in (
        {"p_outcome": "sent"},
        {"p_outcome": "wait", "p_retry_after_seconds": -1},
        {"p_outcome": "wait", "p_retry_after_seconds": 86401},
        {"p_outcome": "wait", "p_base_delay_seconds": 0},
    ):
        with pytest.raises(APIError) as raised:
            service.rpc("record_langfuse_check", params).execute()
        assert raised.value.code == "22023"
    assert db.execute(raw).fetchall() == before


def test_workers_started_during_a_hold_send_one_probe_per_hold(
    stack: Stack, service: Client, make_user: Callable[[str], User], db: psycopg.Connection,
    tmp_path: Path,
) -> None:
    """Three `pfl serve` workers start during a hold, and Langfuse Cloud still rate-limits when
    it ends: at each hold's end one request goes out (a check's empty batch, or its health read
    and empty batch the first time a worker probes), never one per worker, and none in
    between; when the limit lifts every score goes out once."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"three-workers-{i}", 1)["id"] for i in range(6)]
    db.execute("update private.langfuse_hold set hold_until = now() + interval '2 seconds',"
               " reason = 'HTTP 429: seeded'")
    with LangfuseStandin(generation="cloud") as lf:
        lf.set_mode("rate_limited")
        env = worker_env(
            stack,
            LANGFUSE_HOST=lf.url, LANGFUSE_PUBLIC_KEY=lf.public_key,
            LANGFUSE_SECRET_KEY=lf.secret_key, PFL_LANGFUSE_BATCH_SIZE="2",
            PFL_POLL_MIN_SECONDS="0.05", PFL_POLL_MAX_SECONDS="0.1",
        )
        logs = [tmp_path / f"w{i}.log" for i in range(3)]
        procs = []
        for log in logs:
            with log.open("w") as sink:
                procs.append(subprocess.Popen([str(PFL), "serve"], cwd=tmp_path, env=env,
                                              stdout=subprocess.DEVNULL, stderr=sink))
        try:
            wait_for(lambda: sum(r.status == 429 for r in lf.requests) >= 4, timeout=40)
            lf.set_mode("ok")
            wait_for(lambda: set(statuses(service, ids).values()) == {"sent"}, timeout=30)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc, log in zip(procs, logs, strict=True):
                assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    limited = [r for r in lf.requests if r.status == 429]
    last = lf.requests.index(limited[-1])
    during = lf.requests[: last + 1]
    assert all(r.status in (200, 429) for r in during)
    # a health read (a worker's first probe) is followed at once by its empty batch
    probes = [r for r in during if r.method == "POST"]
    assert all(r.status == 429 and r.path == INGESTION_PATH and not r.scores for r in probes)
    assert len([r for r in during if r.method == "GET"]) <= 3
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(probes)]
    assert len(gaps) >= 3 and min(gaps) >= 1.9, gaps  # one request per hold, from any worker
    rows_ = outbox(service, ids)
    assert {(r["status"], r["attempts"]) for r in rows_.values()} == {("sent", 1)}
    assert_delivered_once(lf, {
        sid(twin, f"three-workers-{i}", voter): (1.0, ts(rows_[ids[i]]["created_at"]))
        for i in range(6)
    })


def test_a_wait_answered_to_the_checks_empty_batch_holds_every_worker(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection, store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Langfuse Cloud's 429 to the start-up check's empty batch: not "ready"; the database's
    hold is set with its Retry-After (2 s), nothing else goes out before it ends, and no
    attempt is spent."""
    owner, voter = make_user("owner"), make_user("voter")
    ids = [vote(voter, open_twin(service, owner), f"check-429-{i}", 1)["id"] for i in range(2)]
    with (
        LangfuseStandin(generation="cloud") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0) as sender,
    ):
        lf.set_mode("rate_limited")
        drainer = OutboxDrainer(store, sender, batch_size=len(ids), max_attempts=1)
        with caplog.at_level("INFO", logger="worker.outbox"):
            assert drainer.drain_once() == 0
        assert "Langfuse mirror ready" not in caplog.messages
        assert any(m.startswith("Langfuse asked to wait (HTTP 429") for m in caplog.messages)
        seconds, reason, bare = hold(db)
        assert seconds is not None and 1.0 <= seconds <= 2.0 and bare == 0
        assert reason is not None and reason.startswith("HTTP 429")
        assert [(r.method, r.status) for r in lf.requests] == [("GET", 200), ("POST", 429)]
        assert OutboxDrainer(store, sender, batch_size=2, max_attempts=1).drain_once() == 0
        assert len(lf.requests) == 2
        lf.set_mode("ok")
        end_hold(db)
        make_due(db, ids, "400 days")
        assert drainer.drain_once() == len(ids)
        # the probe: the empty batch again (the version read before is kept), then the scores
        assert [(r.method, r.status) for r in lf.requests[2:]] == [("POST", 207), ("POST", 207)]
    assert {(r["status"], r["attempts"]) for r in outbox(service, ids).values()} == {("sent", 1)}
    assert hold(db) == (None, None, 0)


def test_ending_a_hold_early_leaves_rows_in_flight_alone(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """Worker A has a row in flight (claimed, its request not answered yet) when worker B's
    request meets a suspension and the operator then ends the hold: only B's row, which waited
    for the hold, is due again; A's stays claimed, so no worker C sends it a second time."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    a_row, b_row = (vote(voter, twin, f"in-flight-{i}", 1)["id"] for i in range(2))
    make_due(db, [a_row, b_row], "400 days")
    claim = lambda: [r["event_id"] for r in rows(service.rpc(  # noqa: E731
        "claim_langfuse_outbox", {"p_limit": 1, "p_visibility_seconds": 120}).execute())]
    assert claim() == [a_row]  # worker A: in flight
    assert claim() == [b_row]  # worker B
    record(service, [b_row], "wait", 300.0)  # B: Langfuse suspended, 5 minutes
    in_flight = due_times(db, [a_row])[a_row]
    assert service.rpc("end_langfuse_hold", {}).execute().data == 1
    assert due_times(db, [a_row])[a_row] == in_flight
    assert due_times(db, [b_row])[b_row] <= db_now(db)
    make_due(db, [b_row], "400 days")
    assert claim() == [b_row]  # worker C takes B's row, not A's
    assert claim() != [a_row]


def test_a_probe_claim_that_cannot_connect_frees_the_probe_at_once(
    service: Client,
    make_user: Callable[[str], User],
    db: psycopg.Connection,
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a hold, the claim that is its probe meets a refused connection: its rows stay as
    they were (no attempt) and the probe is freed, so the next pass (this worker's, checking
    Langfuse again) probes at once instead of every worker waiting for the visibility."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    ids = [vote(voter, twin, f"probe-refused-{i}", 1)["id"] for i in range(2)]
    make_due(db, ids, "30 days")
    with (
        LangfuseStandin(generation="v3") as lf,
        LangfuseSender(lf.url, lf.public_key, lf.secret_key, 5.0, batch_size=2) as sender,
    ):
        check(sender)
        drainer = OutboxDrainer(store, sender, batch_size=2, max_attempts=1)
        lf.stop()  # Langfuse down: connections are refused
        record_check(service, "wait", 1.0, "HTTP 429: Rate limit exceeded")
        end_hold(db)  # the next claim is the probe
        assert drainer.drain_once() == 0
        for row in outbox(service, ids).values():
            assert (row["status"], row["attempts"]) == ("pending", 0)
        probe = db.execute(
            "select hold_until <= now(), probe_until from private.langfuse_hold"
        ).fetchone()
        assert probe == (True, None), "the probe that reached nothing is freed"
        lf.start()  # back at once, on the same port
        make_due(db, ids, "30 days")  # as the visibility's end would (no attempt was spent)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="worker.outbox"):
            assert drainer.drain_once() == 2  # its check is the probe, then it sends
        assert "another worker's request is its probe" not in caplog.text
        assert hold(db) == (None, None, 0)
        assert {row["status"] for row in outbox(service, ids).values()} == {"sent"}


def test_a_checks_probe_lasts_two_langfuse_timeouts_and_a_margin_not_the_visibility(
    service: Client, db: psycopg.Connection, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up check that is a hold's probe is two requests, each bounded by the Langfuse
    timeout: its probe window is that (and a margin), not the outbox's visibility, so a worker
    killed while checking holds the others seconds, not minutes."""
    record_check(service, "wait", 1.0, "HTTP 429: Rate limit exceeded")
    end_hold(db)
    seen: list[float] = []

    def killed_while_checking(sender: LangfuseSender) -> tuple[int, int, int]:
        row = db.execute(
            "select extract(epoch from probe_until - now())::float8 from private.langfuse_hold"
        ).fetchone()
        assert row is not None
        seen.append(row[0])
        raise KeyboardInterrupt  # stands for the worker killed mid-check

    monkeypatch.setattr(outbox_module, "check", killed_while_checking)
    with LangfuseSender("http://127.0.0.1:9", "pk", "sk", 3.0) as sender:
        drainer = OutboxDrainer(store, sender, 1, max_attempts=1, visibility_seconds=600)
        with pytest.raises(KeyboardInterrupt):
            drainer.drain_once()
    (window,) = seen
    assert 2 * 3.0 < window <= 2 * 3.0 + outbox_module.CHECK_MARGIN_SECONDS
    assert outbox_module.check_window(3.0) == 6 + outbox_module.CHECK_MARGIN_SECONDS
    assert outbox_module.check_window(0.2) == 1 + outbox_module.CHECK_MARGIN_SECONDS
    assert outbox_module.check_window(10_000) == 3600


def test_a_claim_that_finds_nothing_after_a_hold_arms_no_probe(
    service: Client, make_user: Callable[[str], User], db: psycopg.Connection
) -> None:
    """A hold ends with nothing due: the claims that find nothing arm no probe, so a vote sent
    next is claimed at once (it once waited for a probe nobody would answer, up to the
    visibility); the claim that takes it is the probe, and its answer ends the hold."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = open_twin(service, owner)
    # nothing due in the whole outbox for this test: other tests' due rows wait a day meanwhile
    saved = db.execute(
        "select id, langfuse_next_attempt_at from public.persona_training_events"
        " where langfuse_status in ('pending', 'retrying') and langfuse_next_attempt_at <= now()"
    ).fetchall()
    db.execute(
        "update public.persona_training_events set langfuse_next_attempt_at = now() + '1 day'"
        " where id = any(%s)", ([r[0] for r in saved],),
    )
    try:
        record_check(service, "wait", 1.0, "HTTP 429")
        end_hold(db)
        assert claim_ids(service) == [] and claim_ids(service) == []
        probe_until = db.execute("select probe_until from private.langfuse_hold").fetchone()
        assert probe_until == (None,)
        event = vote(voter, twin, "after-an-empty-claim", 1)["id"]
        assert claim_ids(service) == [event]  # the probe
        assert claim_ids(service) == []  # its answer is not in yet
        record(service, [event], "sent")
        assert hold(db) == (None, None, 0)
    finally:
        with db.transaction():
            for event_id, due in saved:
                db.execute(
                    "update public.persona_training_events set langfuse_next_attempt_at = %s"
                    " where id = %s", (due, event_id),
                )
