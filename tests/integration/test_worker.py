"""The learning worker against the real stack: runs, learning, the gate and publishing, and what
happens under concurrency, crashes and stale leases."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from datetime import timedelta

import psycopg
import pytest

from tests.conftest import wait_for
from tests.integration.helpers import (
    Twin,
    counts_from_scratch,
    create_twin,
    module_row,
    pfl,
    time_passes,
    worker_env,
)
from worker.learning import beta_mean, classify
from worker.models import LearningSettings, ModuleStatus
from worker.runner import decide
from worker.store import StaleLeaseError

pytestmark = pytest.mark.integration


def vote(user, twin: Twin, trace: str, score: int, intent: str = "factual_with_evidence", **kw):
    row = {"twin_id": twin.id, "trace_id": trace, "score": score, "intent_label": intent, **kw}
    return user.client.table("persona_training_events").insert(row).execute().data[0]


def assert_learned_exactly(db: psycopg.Connection, twin: Twin, key: str, intent: str) -> None:
    row = module_row(db, twin.modules[key])
    assert row["evidence_at"] is not None
    s, f = counts_from_scratch(db, twin.id, key).expected
    assert row["success"] == pytest.approx(s, rel=1e-9, abs=1e-9)
    assert row["failure"] == pytest.approx(f, rel=1e-9, abs=1e-9)


PENDING = (
    "select count(*) from persona_training_events e where e.twin_id = %s"
    " and e.processed_run_id is null"
)


def count(db: psycopg.Connection, sql: str, *params: object) -> int:
    return db.execute(sql, params).fetchone()[0]  # type: ignore[index]


# --------------------------------------------------------------------------- learning


def test_feedback_run_learns_module_history_and_marks_events(
    stack, db, service, make_user, make_runner
):
    owner = make_user("owner")
    twin = create_twin(db, owner.id)
    voters = [make_user("voter") for _ in range(12)]
    # 9 up-votes, 2 down-votes, 1 unsafe down-vote (weight 3): s = 9, f = 5, n = 14.
    for i, user in enumerate(voters):
        score, reason = (1, "helpful") if i < 9 else (-1, "unsafe" if i == 11 else "incorrect")
        vote(user, twin, f"trace-{i}", score, reason=reason)
    vote(voters[0], twin, "trace-neutral", 0)
    vote(voters[1], twin, "trace-x", 1, intent="no_module_serves_this")

    [run] = make_runner().run_once(uuid.UUID(twin.id))

    assert run.status == "completed"
    assert (run.events_scanned, run.events_processed, run.events_unmatched) == (14, 14, 1)
    assert run.modules_updated == 1  # small_talk got no evidence: unchanged
    assert (run.gate_passed, run.publish_decision, run.hold_reason) == (True, "held", "no_draft")

    learned = module_row(db, twin.modules["evidence_answers"])
    assert learned["success"] == pytest.approx(9, rel=1e-6)
    assert learned["failure"] == pytest.approx(5, rel=1e-6)
    assert learned["confidence"] == pytest.approx(beta_mean(learned["success"], learned["failure"]))
    settings = LearningSettings()
    expected = classify(
        learned["success"], learned["failure"], ModuleStatus.insufficient_data, settings
    )
    assert learned["status"] == expected
    assert_learned_exactly(db, twin, "evidence_answers", "factual_with_evidence")
    assert module_row(db, twin.modules["small_talk"])["confidence"] == 0.5

    history = db.execute(
        "select module_id::text, run_id::text, confidence_before, confidence_after, status_before,"
        " status_after from persona_module_changes where twin_id = %s",
        (twin.id,),
    ).fetchall()
    assert history == [
        (
            twin.modules["evidence_answers"],
            str(run.id),
            0.5,
            learned["confidence"],
            "insufficient_data",
            learned["status"],
        )
    ]
    assert (
        count(
            db,
            "select count(*) from persona_training_events e where e.twin_id = %s"
            " and (e.processed_at is null or e.processed_run_id <> %s)",
            twin.id,
            str(run.id),
        )
        == 0
    )


def test_changed_vote_is_relearned_exactly(stack, db, service, make_user, make_runner):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    runner = make_runner()
    vote(voter, twin, "trace-1", 1, reason="helpful")
    runner.run_once(uuid.UUID(twin.id))
    assert module_row(db, twin.modules["evidence_answers"])["success"] > 0.99

    vote(voter, twin, "trace-1", -1, reason="unsafe")  # changes the vote: latest wins
    [run] = runner.run_once(uuid.UUID(twin.id))

    assert run.events_scanned == 1
    row = module_row(db, twin.modules["evidence_answers"])
    assert row["success"] == pytest.approx(0.0, abs=1e-9)  # the +1 is retracted exactly
    assert row["failure"] == pytest.approx(3.0, rel=1e-6)  # the unsafe -1 weighs 3
    assert_learned_exactly(db, twin, "evidence_answers", "factual_with_evidence")


def test_batch_limit_splits_a_backlog_into_runs(stack, db, service, make_user, make_runner):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    service.table("persona_learning_settings").update({"max_batch_events": 4}).eq(
        "twin_id", twin.id
    ).execute()
    for i in range(10):
        vote(voter, twin, f"trace-{i}", 1)

    runs = make_runner().run_once(uuid.UUID(twin.id))

    assert [r.events_scanned for r in runs] == [4, 4, 2]
    assert all(r.status == "completed" for r in runs)
    assert_learned_exactly(db, twin, "evidence_answers", "factual_with_evidence")


# --------------------------------------------------------------------------- owners and gate


def test_owner_requests_a_run_and_reads_it_completed(stack, db, service, make_user, make_runner):
    owner = make_user("owner")
    twin = create_twin(db, owner.id)

    first = owner.client.rpc("request_learning_run", {"p_twin_id": twin.id}).execute().data
    again = owner.client.rpc("request_learning_run", {"p_twin_id": twin.id}).execute().data
    assert first["id"] == again["id"]
    assert (first["status"], first["trigger"], first["safe_mode"]) == (
        "queued",
        "owner_request",
        True,
    )

    [run] = make_runner().run_once(uuid.UUID(twin.id))
    assert str(run.id) == first["id"]

    seen = (
        owner.client.table("persona_feedback_learning_runs")
        .select("*")
        .eq("twin_id", twin.id)
        .execute()
        .data
    )
    assert [(r["id"], r["status"], r["events_scanned"]) for r in seen] == [
        (first["id"], "completed", 0)
    ]


def draft_spec(owner, twin: Twin) -> dict:
    """The owner drafts a spec relying on evidence_answers, through PostgREST."""
    row = {"twin_id": twin.id, "spec": {"modules": ["evidence_answers"]}}
    return owner.client.table("persona_specs").insert(row).execute().data[0]


def audit(
    service, twin: Twin, spec_id: str, traces: list[str], failing: set[str], reason="off_persona"
):
    rows = [
        {
            "twin_id": twin.id,
            "source": "persona_audit",
            "trace_id": t,
            "intent_label": "factual_with_evidence",
            "persona_spec_id": spec_id,
            "passed": t not in failing,
            "reason": reason if t in failing else None,
        }
        for t in traces
    ]
    service.table("persona_training_events").insert(rows, returning="minimal").execute()


def test_gate_publishes_a_passing_draft_and_archives_the_old_spec(
    stack, db, service, make_user, make_runner
):
    owner = make_user("owner")
    twin = create_twin(db, owner.id)
    draft = draft_spec(owner, twin)
    traces = [f"audit-{i}" for i in range(25)]
    # 25 pairs, 5 passed by the draft only: Tango's lower bound 0.0402 >= -0.05
    audit(service, twin, twin.published_spec_id, traces, failing=set(traces[:5]))
    audit(service, twin, draft["id"], traces, failing=set())
    runner = make_runner()

    # Safe mode: the gate passes but nothing is published.
    [held] = runner.run_once(uuid.UUID(twin.id), safe_mode=True, request=True)
    assert (held.gate_passed, held.publish_decision, held.hold_reason) == (
        True,
        "held",
        "safe_mode",
    )
    assert {c["name"]: c["verdict"] for c in held.gate_report["checks"]} == {
        "required_modules_healthy": "pass",
        "audit_non_inferiority": "pass",
        "no_unsafe_regression": "pass",
    }
    [paired] = [c for c in held.gate_report["checks"] if c["name"] == "audit_non_inferiority"]
    assert (paired["method"], paired["evidence"], paired["threshold"]) == (
        "tango_score",
        {"n": 25, "b": 5, "c": 0},
        -0.05,
    )
    assert paired["value"] == pytest.approx(0.040164207255929785, abs=1e-12)
    status = dict(
        db.execute(
            "select id::text, status from persona_specs where twin_id = %s", (twin.id,)
        ).fetchall()
    )
    assert status == {twin.published_spec_id: "published", draft["id"]: "draft"}

    [published] = runner.run_once(uuid.UUID(twin.id), safe_mode=False, request=True)
    assert (published.publish_decision, str(published.published_spec_id)) == (
        "published",
        draft["id"],
    )
    status = dict(
        db.execute(
            "select id::text, status from persona_specs where twin_id = %s", (twin.id,)
        ).fetchall()
    )
    assert status == {twin.published_spec_id: "archived", draft["id"]: "published"}
    # Audits of the draft were processed but moved no module: only the 25 baseline audits count
    # (20 passed, weight 2 each).
    assert_learned_exactly(db, twin, "evidence_answers", "factual_with_evidence")
    assert module_row(db, twin.modules["evidence_answers"])["success"] == pytest.approx(
        40, rel=1e-6
    )


def test_gate_holds_a_regressing_draft(stack, db, service, make_user, make_runner):
    owner = make_user("owner")
    twin = create_twin(db, owner.id)
    draft = draft_spec(owner, twin)
    traces = [f"audit-{i}" for i in range(25)]
    audit(service, twin, twin.published_spec_id, traces, failing=set())
    audit(service, twin, draft["id"], traces, failing={traces[0]}, reason="unsafe")

    [run] = make_runner().run_once(uuid.UUID(twin.id), safe_mode=False, request=True)

    assert (run.gate_passed, run.publish_decision, run.hold_reason) == (
        False,
        "held",
        "gate_failed",
    )
    verdicts = {c["name"]: c["verdict"] for c in run.gate_report["checks"]}
    assert verdicts["no_unsafe_regression"] == "fail"
    assert (
        count(
            db, "select count(*) from persona_specs where id = %s and status = 'draft'", draft["id"]
        )
        == 1
    )


def test_twenty_agreeing_pairs_do_not_prove_non_inferiority(
    stack, db, service, make_user, make_runner
):
    # The Wald bound of 20 agreeing pairs was exactly 0 and published the draft; Tango's is
    # −1.96²/(20 + 1.96²) = −0.1611 < −0.05.
    owner = make_user("owner")
    twin = create_twin(db, owner.id)
    draft = draft_spec(owner, twin)
    traces = [f"audit-{i}" for i in range(20)]
    audit(service, twin, twin.published_spec_id, traces, failing=set())
    audit(service, twin, draft["id"], traces, failing=set())

    [run] = make_runner().run_once(uuid.UUID(twin.id), safe_mode=False, request=True)

    [paired] = [c for c in run.gate_report["checks"] if c["name"] == "audit_non_inferiority"]
    assert (paired["verdict"], paired["evidence"]) == ("fail", {"n": 20, "b": 0, "c": 0})
    assert paired["value"] == pytest.approx(-(1.96**2) / (20 + 1.96**2), abs=1e-11)
    assert (run.gate_passed, run.publish_decision, run.hold_reason) == (
        False,
        "held",
        "gate_failed",
    )
    assert (
        count(
            db, "select count(*) from persona_specs where id = %s and status = 'draft'", draft["id"]
        )
        == 1
    )


def test_too_few_audits_fail_the_gate(stack, db, service, make_user, make_runner):
    owner = make_user("owner")
    twin = create_twin(db, owner.id)
    draft = draft_spec(owner, twin)
    traces = [f"audit-{i}" for i in range(5)]
    audit(service, twin, twin.published_spec_id, traces, failing=set())
    audit(service, twin, draft["id"], traces, failing=set())

    [run] = make_runner().run_once(uuid.UUID(twin.id), safe_mode=False, request=True)

    verdicts = {c["name"]: c["verdict"] for c in run.gate_report["checks"]}
    assert verdicts["audit_non_inferiority"] == "insufficient_evidence"
    assert (run.gate_passed, run.hold_reason) == (False, "gate_failed")


# --------------------------------------------------------------------------- leases and crashes


def test_completion_with_a_stale_token_changes_nothing(stack, db, service, make_user, make_runner):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    vote(voter, twin, "trace-1", 1)
    first, second = make_runner("first"), make_runner("second")
    first.store.enqueue_due_runs(uuid.UUID(twin.id))
    held = first.store.claim_run(first.worker_id, 30, uuid.UUID(twin.id))
    assert held is not None
    batch = first.store.claim_events(held)
    # The first worker stalls past its lease (moving the lease back stands for time passing).
    db.execute(
        "update persona_feedback_learning_runs set lease_expires_at = now() - interval '1 second'"
        " where id = %s",
        (str(held.id),),
    )
    taken = second.store.claim_run(second.worker_id, 30, uuid.UUID(twin.id))
    assert taken is not None and taken.id == held.id and taken.attempts == 2
    decision = decide(batch, safe_mode=True)
    before = module_row(db, twin.modules["evidence_answers"])

    with pytest.raises(StaleLeaseError):
        first.store.complete_run(held, decision)

    assert module_row(db, twin.modules["evidence_answers"]) == before
    assert count(db, PENDING, twin.id) == 1
    row = db.execute(
        "select status, worker_id from persona_feedback_learning_runs where id = %s",
        (str(held.id),),
    ).fetchone()
    assert row == ("running", second.worker_id)

    done = second.process(taken)
    assert (done.status, done.events_processed, done.attempts) == ("completed", 1, 2)


def test_runs_fail_after_max_attempts_and_release_their_events(
    stack, db, service, make_user, make_runner
):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    vote(voter, twin, "trace-1", 1)
    store = make_runner().store
    [queued] = store.enqueue_due_runs(uuid.UUID(twin.id))
    for attempt in (1, 2, 3):
        run = store.claim_run("crashy", 30, uuid.UUID(twin.id))
        assert run is not None and run.id == queued.id and run.attempts == attempt
        after = store.fail_run(run, f"boom {attempt}", retryable=True)
    assert (after.status, after.error) == ("failed", "boom 3")
    assert after.retry_not_before is not None and after.finished_at is not None
    assert (after.retry_not_before - after.finished_at).total_seconds() == 10
    assert store.claim_run("crashy", 30, uuid.UUID(twin.id)) is None
    # Nothing was counted; the event waits for the next run, which learns it once the failed
    # run's not-before time has passed (moved back here: time passing).
    assert count(db, PENDING, twin.id) == 1
    assert make_runner().run_once(uuid.UUID(twin.id)) == []
    time_passes(db, twin.id)
    [run] = make_runner().run_once(uuid.UUID(twin.id))
    assert (run.status, run.events_processed) == ("completed", 1)


def test_a_killed_worker_is_taken_over_and_every_event_counts_once(
    stack, db, service, make_user, make_runner
):
    owner = make_user("owner")
    voters = [make_user("voter") for _ in range(4)]
    twin = create_twin(db, owner.id)
    for i in range(60):
        vote(voters[i % 4], twin, f"trace-{i % 30}", 1 if i % 3 else -1)  # repeats change votes

    # Hold the first worker between its claim and its learning: it blocks reading the modules.
    with psycopg.connect(stack.database_url) as gate:
        gate.execute("lock table persona_modules in access exclusive mode")
        doomed = subprocess.Popen(
            pfl("run-once", "--twin", twin.id),
            env=worker_env(stack, PFL_LEASE_SECONDS="5", PFL_WORKER_ID="doomed"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: count(
                db,
                "select count(*) from persona_feedback_learning_runs where twin_id = %s"
                " and status = 'running' and worker_id = 'doomed'",
                twin.id,
            )
        )
        doomed.send_signal(signal.SIGKILL)
        assert doomed.wait(timeout=10) == -signal.SIGKILL
        gate.rollback()

    survivor = make_runner("survivor", lease=30)
    # The run is taken over once the dead worker's 5 s lease has run out.
    runs = wait_for(lambda: survivor.run_once(uuid.UUID(twin.id)), timeout=30, interval=0.25)

    assert runs[0].status == "completed" and runs[0].attempts == 2
    assert runs[0].worker_id == survivor.worker_id
    assert sum(r.events_processed or 0 for r in runs) == 60
    assert (
        count(
            db,
            PENDING,
            twin.id,
        )
        == 0
    )
    assert_learned_exactly(db, twin, "evidence_answers", "factual_with_evidence")


def test_two_workers_never_run_one_twin_twice_at_a_time(stack, db, service, make_user, tmp_path):
    owner = make_user("owner")
    voters = [make_user("voter") for _ in range(3)]
    twins = [create_twin(db, owner.id) for _ in range(3)]
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    workers = []
    for i, log in enumerate(logs):
        with log.open("w") as sink:  # the child keeps its own copy of the descriptor
            workers.append(
                subprocess.Popen(
                    pfl("serve"),
                    env=worker_env(stack, PFL_WORKER_ID=f"w{i}"),
                    stdout=subprocess.DEVNULL,
                    stderr=sink,
                )
            )
    # Both are polling (their signal handlers are in place) before any evidence arrives.
    wait_for(lambda: all("poller started" in log.read_text() for log in logs))
    try:
        for wave in range(6):  # evidence keeps arriving while both workers poll
            for twin in twins:
                for j, voter in enumerate(voters):
                    vote(voter, twin, f"trace-{(wave + j) % 4}", 1 if (wave + j) % 3 else -1)
        ids = [t.id for t in twins]
        wait_for(
            lambda: (
                count(
                    db,
                    "select count(*) from persona_training_events e"
                    " where e.twin_id = any(%s::uuid[]) and e.processed_run_id is null",
                    ids,
                )
                == 0
                and count(
                    db,
                    "select count(*) from persona_feedback_learning_runs"
                    " where twin_id = any(%s::uuid[]) and status in ('queued', 'running')",
                    ids,
                )
                == 0
            ),
            timeout=60,
        )
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=20) for w in workers]
    assert codes == [0, 0]  # graceful stop

    for twin in twins:
        runs = db.execute(
            "select started_at, finished_at, status, attempts from persona_feedback_learning_runs"
            " where twin_id = %s order by started_at",
            (twin.id,),
        ).fetchall()
        assert runs and all(r[2] == "completed" and r[3] == 1 for r in runs)
        for (_, end), (start, _) in zip(
            [(r[0], r[1]) for r in runs], [(r[0], r[1]) for r in runs[1:]], strict=False
        ):
            assert end <= start + timedelta(0), "two runs of one twin overlapped"
        assert_learned_exactly(db, twin, "evidence_answers", "factual_with_evidence")


def test_serve_stops_gracefully_on_sigint(stack):
    proc = subprocess.Popen(
        pfl("serve"),
        env=worker_env(stack),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()  # the first log line: a poller started
    assert "poller started" in line, line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert err.count('"poller stopped"') == 2  # the run poller and the Langfuse mirror


def test_cli_prints_runs_and_writes_the_artifact(stack, db, make_user, tmp_path):
    owner = make_user("owner")
    twin = create_twin(db, owner.id)
    artifact = tmp_path / "run.json"
    done = subprocess.run(
        pfl("run-once", "--twin", twin.id, "--safe-mode", "--output", str(artifact)),
        env=worker_env(stack),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "events_scanned=0" in done.stdout and "publish_decision=held (no_draft)" in done.stdout
    doc = json.loads(artifact.read_text())
    assert (doc["status"], doc["events_scanned"], doc["gate_passed"]) == ("completed", 0, True)
    listed = subprocess.run(
        pfl("runs", "--twin", twin.id),
        env=worker_env(stack),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (
        listed.returncode == 0 and doc["id"][:8] in listed.stdout and "completed" in listed.stdout
    )


def test_cli_rejects_bad_settings_with_a_clear_error(stack):
    done = subprocess.run(
        pfl("run-once"),
        env=worker_env(stack, PFL_LEASE_SECONDS="-3"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "pfl_lease_seconds" in done.stderr.lower()


def test_a_busy_worker_claims_from_the_queue_before_it_queues_again(
    db: psycopg.Connection, make_user, make_runner
) -> None:
    # `serve`'s step queues what is due only when a claim finds the queue empty (or after
    # queue_every_seconds): while runs wait, each run costs one claim, not a queuing and a claim.
    runner = make_runner("busy")
    runner.queue_every_seconds = 3600
    owner = make_user("owner")
    twins = [create_twin(db, owner.id) for _ in range(3)]
    for i, twin in enumerate(twins):
        vote(owner, twin, f"t{i}", 1)
    calls: list[str] = []
    store = runner.store
    real_enqueue, real_claim = store.enqueue_due_runs, store.claim_run

    def enqueue(twin_id: uuid.UUID | None = None) -> list:
        calls.append("enqueue")
        return real_enqueue(twin_id)

    def claim(*args, **kw):
        run = real_claim(*args, **kw)
        calls.append("claimed" if run else "empty")
        return run

    store.enqueue_due_runs = enqueue  # type: ignore[method-assign]
    store.claim_run = claim  # type: ignore[method-assign]
    busy_steps = 0
    while runner.step():
        busy_steps += 1
        assert busy_steps < 200, "the queue never emptied"

    assert busy_steps >= len(twins)
    assert calls.count("claimed") == busy_steps
    # Queued first, then only after a claim found nothing.
    assert calls[0] == "enqueue"
    assert all(calls[i - 1] == "empty" for i, c in enumerate(calls) if c == "enqueue" and i)
    assert calls.count("enqueue") < busy_steps
    for twin in twins:
        assert db.execute(PENDING, (twin.id,)).fetchone() == (0,)
