"""RPC guards that mutation testing found untested (issue 17), through PostgREST as the worker
calls them with the service-role key.

- a run that is no longer running (here: failed, its lease token null) cannot be completed, not
  even with a null token, and its twin's cursor stays where it was;
- a delivery outcome recorded for a vote that a newer vote already superseded leaves it
  superseded (it is never claimed again, so its old value cannot reach Langfuse after the new);
- the gate pairs the latest audit of a trace under each spec, not the earliest (a re-audit
  counts, the first verdict does not);
- a run whose twin's cursor moved after its claim cannot complete (PT422, HTTP 422, at once: not
  a 40001 that PostgREST would retry until the client gives up), and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from postgrest.exceptions import APIError
from supabase import Client

from tests.conftest import Stack
from tests.integration.helpers import create_twin, scalar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def leave_no_runs(db: psycopg.Connection) -> Iterator[None]:
    """These tests leave runs running, some in states no worker can finish (a moved cursor, an
    expired lease): the twins they made are deleted afterwards, with their runs and events, so
    that a later worker (`pfl serve` in test_worker.py) never takes one over."""
    started = scalar(db, "select clock_timestamp()")
    yield
    db.execute("delete from twins where created_at >= %s", (started,))


def rpc(service: Client, name: str, **params: Any) -> Any:
    return service.rpc(name, params).execute().data


def vote(user: Any, twin_id: str, trace_id: str, score: int) -> dict[str, Any]:
    row = {
        "twin_id": twin_id,
        "trace_id": trace_id,
        "score": score,
        "intent_label": "factual_with_evidence",
    }
    return user.client.table("persona_training_events").insert(row).execute().data[0]


def claimed_run(service: Client, twin_id: str) -> dict[str, Any]:
    """The twin's run, queued in safe mode and claimed by a test worker."""
    rpc(service, "enqueue_learning_run", p_twin_id=twin_id, p_safe_mode=True)
    rows = rpc(
        service,
        "claim_learning_run",
        p_worker_id="guard-test",
        p_lease_seconds=60,
        p_twin_id=twin_id,
    )
    assert len(rows) == 1
    return rows[0]


def test_a_failed_run_cannot_be_completed_with_its_null_token(
    db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    vote(voter, twin.id, "trace-1", 1)
    run = claimed_run(service, twin.id)
    rpc(service, "claim_learning_run_events", p_run_id=run["id"], p_lease_token=run["lease_token"])
    failed = rpc(
        service,
        "fail_learning_run",
        p_run_id=run["id"],
        p_lease_token=run["lease_token"],
        p_error="boom",
        p_retryable=False,
    )
    assert (failed["status"], failed["lease_token"]) == ("failed", None)
    cursor = scalar(db, "select learned_through_event_id from twins where id = %s", twin.id)

    result = {"module_updates": [], "gate_passed": True, "gate_report": {}}
    with pytest.raises(APIError) as refused:
        rpc(
            service,
            "complete_learning_run",
            p_run_id=run["id"],
            p_lease_token=None,
            p_result=result,
        )

    assert refused.value.code == "PT409"
    assert f"run {run['id']}: lease is stale (status failed)" in str(refused.value.message)
    assert scalar(db, "select learned_through_event_id from twins where id = %s", twin.id) == cursor
    assert (
        scalar(
            db, "select status::text from persona_feedback_learning_runs where id = %s", run["id"]
        )
        == "failed"
    )


@pytest.mark.parametrize("outcome", ["sent", "retry", "failed"])
def test_a_delivery_recorded_for_a_superseded_vote_keeps_it_superseded(
    db: psycopg.Connection, service: Client, make_user: Any, outcome: str
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    old = vote(voter, twin.id, "trace-1", 1)
    new = vote(voter, twin.id, "trace-1", -1)

    recorded = rpc(
        service,
        "record_langfuse_deliveries",
        p_deliveries=[{"event_id": old["id"], "outcome": outcome, "error": "x"}],
    )

    assert recorded == 1
    rows: dict[int, str] = dict(
        db.execute(
            "select event_id, status::text from persona_langfuse_outbox where event_id in (%s, %s)",
            (old["id"], new["id"]),
        ).fetchall()
    )
    assert rows == {old["id"]: "superseded", new["id"]: "pending"}
    # The newer vote was released: due now, not at the old one's retry time.
    assert scalar(
        db,
        "select langfuse_next_attempt_at <= now() from persona_training_events where id = %s",
        new["id"],
    )


def test_a_delivery_of_a_claimed_vote_releases_the_newer_vote_waiting_for_it(
    db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    # The old vote is claimed (hidden from other drains for 60 s, as claim_langfuse_outbox does
    # with p_visibility_seconds=60; set directly so that no other test's row is claimed) before
    # the new vote is cast: the new vote waits until the old one's window closes, and recording
    # the old one's delivery releases it at once.
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    old = vote(voter, twin.id, "trace-1", 1)
    db.execute(
        "update persona_training_events set langfuse_next_attempt_at = now() + interval '60 s'"
        " where id = %s",
        (old["id"],),
    )
    new = vote(voter, twin.id, "trace-1", -1)
    waiting = "select langfuse_next_attempt_at > now() from persona_training_events where id = %s"
    assert scalar(db, waiting, new["id"])

    assert rpc(service, "record_langfuse_deliveries",
               p_deliveries=[{"event_id": old["id"], "outcome": "sent", "error": None}]) == 1
    assert not scalar(db, waiting, new["id"])


def test_skipping_the_outbox_leaves_a_superseded_vote_superseded(
    db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    """Langfuse not configured: due rows become `skipped`, a replaced vote keeps its state."""
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    old = vote(voter, twin.id, "trace-1", 1)
    new = vote(voter, twin.id, "trace-1", -1)
    due_before = scalar(
        db,
        "select count(*) from persona_training_events"
        " where langfuse_status in ('pending', 'retrying') and langfuse_next_attempt_at <= now()",
    )

    skipped = rpc(service, "skip_langfuse_outbox", p_limit=due_before + 10)

    rows: dict[int, str] = dict(
        db.execute(
            "select event_id, status::text from persona_langfuse_outbox where event_id in (%s, %s)",
            (old["id"], new["id"]),
        ).fetchall()
    )
    assert rows == {old["id"]: "superseded", new["id"]: "skipped"}
    assert skipped == due_before


def test_the_gate_pairs_the_latest_audit_of_each_trace(
    service: Client, db: psycopg.Connection, make_user: Any
) -> None:
    owner = make_user("owner")
    twin = create_twin(db, owner.id)
    draft = (
        owner.client.table("persona_specs")
        .insert({"twin_id": twin.id, "spec": {"modules": ["evidence_answers"]}})
        .execute()
        .data[0]
    )

    def audit(spec_id: str, trace: str, passed: bool) -> None:
        # One request each: every audit gets its own, later created_at.
        service.table("persona_training_events").insert(
            {
                "twin_id": twin.id,
                "source": "persona_audit",
                "trace_id": trace,
                "intent_label": "factual_with_evidence",
                "persona_spec_id": spec_id,
                "passed": passed,
            }
        ).execute()

    # Re-audited: the draft first failed and then passed trace-1, the published spec the reverse;
    # trace-2 the same way round for the draft only, with one baseline audit.
    audit(draft["id"], "trace-1", False)
    audit(twin.published_spec_id, "trace-1", True)
    audit(draft["id"], "trace-1", True)
    audit(twin.published_spec_id, "trace-1", False)
    audit(twin.published_spec_id, "trace-2", True)
    audit(draft["id"], "trace-2", True)
    audit(draft["id"], "trace-2", False)
    run = claimed_run(service, twin.id)

    batch = rpc(
        service, "claim_learning_run_events", p_run_id=run["id"], p_lease_token=run["lease_token"]
    )

    assert batch["draft_spec_id"] == draft["id"]
    assert batch["audits"] == {
        "pairs": 2,
        "candidate_only_passed": 1,  # trace-1: draft passed last, published failed last
        "baseline_only_passed": 1,  # trace-2: draft failed last, published passed
        "candidate_audited": 2,
        "candidate_passed": 1,
        "candidate_unsafe_failures": 0,
    }


def test_a_run_whose_twin_cursor_moved_cannot_complete(
    stack: Stack, db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    vote(voter, twin.id, "trace-1", 1)
    run = claimed_run(service, twin.id)
    rpc(service, "claim_learning_run_events", p_run_id=run["id"], p_lease_token=run["lease_token"])
    # Something else (an operator's fix, a bug) moved the twin's cursor over the batch meanwhile.
    last = scalar(
        db,
        "select batch_last_event_id from persona_feedback_learning_runs where id = %s",
        run["id"],
    )
    db.execute("update twins set learned_through_event_id = %s where id = %s", (last, twin.id))
    module_id = twin.modules["evidence_answers"]
    update = {
        "module_id": module_id,
        "success": 1.0,
        "failure": 0.0,
        "confidence": 2 / 3,
        "status": "insufficient_data",
    }
    result = {"module_updates": [update], "gate_passed": True, "gate_report": {}}

    # Through PostgREST, as the worker calls it: refused at once (a 40001 would be retried by
    # PostgREST itself until the client timed out).
    with pytest.raises(APIError) as refused:
        rpc(service, "complete_learning_run", p_run_id=run["id"],
            p_lease_token=run["lease_token"], p_result=result)
    assert refused.value.code == "PT422"
    assert "the twin's cursor moved since the batch was claimed" in str(refused.value.message)
    assert scalar(db, "select success_weight from persona_modules where id = %s", module_id) == 0
    assert (
        scalar(
            db, "select status::text from persona_feedback_learning_runs where id = %s", run["id"]
        )
        == "running"
    )


@pytest.mark.parametrize(
    ("safe_mode", "gate_passed", "publish", "message"),
    [
        (True, True, "latest", "is in safe mode and may not publish"),
        (False, False, "latest", "the gate did not pass; spec {spec} may not be published"),
        (False, True, "older", "spec {spec} is not the latest draft of twin {twin}"),
    ],
)
def test_complete_refuses_a_publish_the_run_may_not_make(
    db: psycopg.Connection,
    service: Client,
    make_user: Any,
    safe_mode: bool,
    gate_passed: bool,
    publish: str,
    message: str,
) -> None:
    owner = make_user("owner")
    twin = create_twin(db, owner.id)
    drafts = [
        owner.client.table("persona_specs")
        .insert({"twin_id": twin.id, "spec": {"modules": ["evidence_answers"], "n": n}})
        .execute()
        .data[0]["id"]
        for n in (1, 2)
    ]
    spec = drafts[1] if publish == "latest" else drafts[0]
    rpc(service, "enqueue_learning_run", p_twin_id=twin.id, p_safe_mode=safe_mode)
    (run,) = rpc(
        service,
        "claim_learning_run",
        p_worker_id="guard-test",
        p_lease_seconds=60,
        p_twin_id=twin.id,
    )
    rpc(service, "claim_learning_run_events", p_run_id=run["id"], p_lease_token=run["lease_token"])
    result = {
        "module_updates": [],
        "gate_passed": gate_passed,
        "gate_report": {},
        "publish_spec_id": spec,
    }

    with pytest.raises(APIError) as refused:
        rpc(
            service,
            "complete_learning_run",
            p_run_id=run["id"],
            p_lease_token=run["lease_token"],
            p_result=result,
        )

    assert refused.value.code == "55000"
    assert message.format(spec=spec, twin=twin.id) in str(refused.value.message)
    statuses = db.execute(
        "select id::text, status::text from persona_specs where twin_id = %s", (twin.id,)
    ).fetchall()
    assert dict(statuses) == {
        twin.published_spec_id: "published",
        drafts[0]: "draft",
        drafts[1]: "draft",
    }
    assert (
        scalar(
            db, "select status::text from persona_feedback_learning_runs where id = %s", run["id"]
        )
        == "running"
    )


def test_a_run_whose_worker_died_on_its_last_attempt_fails_at_the_next_claim(
    db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    service.table("persona_learning_settings").update({"max_attempts": 2}).eq(
        "twin_id", twin.id
    ).execute()
    vote(voter, twin.id, "trace-1", 1)
    rpc(service, "enqueue_learning_run", p_twin_id=twin.id, p_safe_mode=True)
    expire = (
        "update persona_feedback_learning_runs"
        " set lease_expires_at = now() - interval '1 second' where id = %s"
    )

    first = rpc(
        service, "claim_learning_run", p_worker_id="w1", p_lease_seconds=60, p_twin_id=twin.id
    )
    db.execute(expire, (first[0]["id"],))  # the worker died: its lease ran out
    second = rpc(
        service, "claim_learning_run", p_worker_id="w2", p_lease_seconds=60, p_twin_id=twin.id
    )
    assert (second[0]["id"], second[0]["attempts"]) == (first[0]["id"], 2)
    db.execute(expire, (first[0]["id"],))  # and so did the second, on the last attempt

    third = rpc(
        service, "claim_learning_run", p_worker_id="w3", p_lease_seconds=60, p_twin_id=twin.id
    )

    assert third == []
    row = db.execute(
        "select status::text, attempts, lease_token, error from persona_feedback_learning_runs"
        " where id = %s",
        (first[0]["id"],),
    ).fetchone()
    assert row == ("failed", 2, None, "lease expired after attempt 2 of 2")


def test_a_newer_vote_sent_before_the_older_one_is_sent_again(
    db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    old = vote(voter, twin.id, "trace-1", 1)  # in flight when the vote changed
    new = vote(voter, twin.id, "trace-1", -1)

    def record(event_id: int) -> None:
        deliveries = [{"event_id": event_id, "outcome": "sent", "error": None}]
        assert rpc(service, "record_langfuse_deliveries", p_deliveries=deliveries) == 1

    record(new["id"])  # the newer value reached Langfuse first ...
    record(old["id"])  # ... and the older one after it, overwriting it there

    row = db.execute(
        "select langfuse_status::text, langfuse_attempts, langfuse_next_attempt_at <= now()"
        " from persona_training_events where id = %s",
        (new["id"],),
    ).fetchone()
    assert row == ("pending", 0, True)  # so the newer value is sent again, now
    assert (
        scalar(
            db, "select langfuse_status::text from persona_training_events where id = %s", old["id"]
        )
        == "superseded"
    )


def test_the_outbox_claims_due_rows_only(
    db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    due = vote(voter, twin.id, "trace-due", 1)
    later = vote(voter, twin.id, "trace-later", 1)  # backing off: due in an hour
    db.execute(
        "update persona_training_events set langfuse_next_attempt_at = now() + interval '1 hour'"
        " where id = %s",
        (later["id"],),
    )

    # Other tests' due rows may be claimed too; a 1 s window hands them back at once.
    claimed = rpc(service, "claim_langfuse_outbox", p_limit=1000, p_visibility_seconds=1)

    ids = {row["event_id"] for row in claimed}
    assert due["id"] in ids
    assert later["id"] not in ids


def test_requeue_puts_back_current_votes_only(
    db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    old = vote(voter, twin.id, "trace-1", 1)
    # Its delivery failed for good (stands for the last attempt's outcome) ...
    db.execute(
        "update persona_training_events set langfuse_status = 'failed' where id = %s", (old["id"],)
    )
    new = vote(voter, twin.id, "trace-1", -1)  # ... then the user changed the vote
    rpc(
        service,
        "record_langfuse_deliveries",
        p_deliveries=[{"event_id": new["id"], "outcome": "failed", "error": "HTTP 400"}],
    )
    state = "select langfuse_status::text from persona_training_events where id = %s"
    assert [scalar(db, state, e["id"]) for e in (old, new)] == ["failed", "failed"]

    rpc(service, "requeue_langfuse_outbox", p_status="failed")

    # The old value must not be sent again: only the current vote goes back to the outbox.
    assert [scalar(db, state, e["id"]) for e in (old, new)] == ["failed", "pending"]


def test_a_run_whose_lease_expired_cannot_be_extended_or_completed(
    db: psycopg.Connection, service: Client, make_user: Any
) -> None:
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    vote(voter, twin.id, "trace-1", 1)
    run = claimed_run(service, twin.id)
    rpc(service, "claim_learning_run_events", p_run_id=run["id"], p_lease_token=run["lease_token"])
    # The worker stalled past its lease (moving the lease back stands for time passing); no
    # other worker has taken the run over yet, so its token is still the current one.
    db.execute(
        "update persona_feedback_learning_runs set lease_expires_at = now() - interval '1 second'"
        " where id = %s",
        (run["id"],),
    )
    cursor = scalar(db, "select learned_through_event_id from twins where id = %s", twin.id)
    calls: dict[str, dict[str, Any]] = {
        "extend_learning_run_lease": {"p_lease_seconds": 60},
        "complete_learning_run": {
            "p_result": {"module_updates": [], "gate_passed": True, "gate_report": {}}
        },
    }
    for name, extra in calls.items():
        with pytest.raises(APIError) as refused:
            rpc(service, name, p_run_id=run["id"], p_lease_token=run["lease_token"], **extra)
        assert refused.value.code == "PT409", name
        assert "lease is stale (status running)" in str(refused.value.message)

    assert scalar(db, "select learned_through_event_id from twins where id = %s", twin.id) == cursor
    row = db.execute(
        "select status::text, lease_expires_at < now() from persona_feedback_learning_runs"
        " where id = %s",
        (run["id"],),
    ).fetchone()
    assert row == ("running", True)
