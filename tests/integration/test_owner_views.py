"""The owner views (supabase/schemas/700_owner_views.sql) read through the real HTTP path with
the owner's JWT: each figure equals what the worker learned, recomputed here from the votes."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime

import psycopg
import pytest
from pydantic import SecretStr

from testkit.env import rows as rest_rows
from testkit.oracle import daily_from_scratch, daily_summary
from tests.conftest import ROOT, Stack, User
from tests.integration.helpers import Twin, create_twin, scalar, time_passes
from worker.config import WorkerSettings
from worker.learning import wilson_bounds
from worker.runner import Runner
from worker.store import RebuildProgress, Run, RunBatch, Store

pytestmark = pytest.mark.integration


@pytest.fixture
def runner(stack: Stack) -> Iterator[Runner]:
    settings = WorkerSettings(
        supabase_url=stack.url, supabase_service_role_key=SecretStr(stack.service_key),
        pfl_worker_id=f"views-{uuid.uuid4().hex[:6]}", pfl_store_attempts=2,
    )
    r = Runner(Store.connect(settings), settings.pfl_worker_id, 30)
    yield r
    r.store.close()


def vote(user: User, twin: Twin, trace: str, score: int, reason: str | None,
         intent: str = "factual_with_evidence", **kw: object) -> dict:
    row = {"twin_id": twin.id, "trace_id": trace, "score": score, "reason": reason,
           "intent_label": intent, **kw}
    return rest_rows(user.client.table("persona_training_events").insert(row).execute())[0]


def rows(user: User, view: str, **eq: str) -> list[dict]:
    query = user.client.table(view).select("*")
    for column, value in eq.items():
        query = query.eq(column, value)
    return rest_rows(query.execute())


@pytest.fixture
def learned(
    service, db: psycopg.Connection, make_user: Callable[[str], User], runner: Runner
) -> dict:
    """A twin with two modules; five voters vote on factual answers (one changes their vote),
    one on small talk; one run learns it all."""
    owner = make_user("owner")
    voters = [make_user(f"voter{i}") for i in range(5)]
    twin = create_twin(db, owner.id)
    vote(voters[0], twin, "t1", -1, "incorrect")
    vote(voters[1], twin, "t2", -1, "incorrect")
    vote(voters[2], twin, "t3", -1, "outdated")
    vote(voters[3], twin, "t4", 1, "helpful")
    vote(voters[4], twin, "t5", 1, None)
    vote(voters[2], twin, "t3", 1, "helpful")  # changes "outdated" to "helpful"
    vote(voters[0], twin, "c1", 0, None, intent="casual_chat")
    service.table("persona_training_events").insert({
        "twin_id": twin.id, "source": "persona_audit", "trace_id": "t1", "passed": False,
        "reason": "incorrect", "intent_label": "factual_with_evidence",
        "persona_spec_id": twin.published_spec_id,
    }).execute()
    [run] = runner.run_once(uuid.UUID(twin.id))
    assert run.status == "completed"
    return {"owner": owner, "voters": voters, "twin": twin, "run": run}


def test_feedback_by_module_and_reason_counts_current_votes(learned: dict) -> None:
    owner, twin = learned["owner"], learned["twin"]
    reasons = {(r["module_key"], r["reason"]): (r["votes_7d"], r["up_7d"], r["down_7d"],
                                                r["votes_30d"])
               for r in rows(owner, "persona_module_feedback_reasons", twin_id=twin.id)}
    # The changed vote counts once, under its new reason; "outdated" is gone.
    assert reasons == {
        ("evidence_answers", "incorrect"): (2, 0, 2, 2),
        ("evidence_answers", "helpful"): (2, 2, 0, 2),
        ("evidence_answers", None): (1, 1, 0, 1),
        ("small_talk", None): (1, 0, 0, 1),
    }
    feedback = {r["module_key"]: r for r in rows(owner, "persona_module_feedback",
                                                  twin_id=twin.id)}
    factual = feedback["evidence_answers"]
    assert (factual["votes_7d"], factual["up_7d"], factual["down_7d"]) == (5, 3, 2)
    assert factual["approval_rate_7d"] == pytest.approx(3 / 5)
    lower, upper = wilson_bounds(3, 2, 1.96)
    assert factual["approval_lower_7d"] == pytest.approx(lower, abs=1e-12)
    assert factual["approval_upper_7d"] == pytest.approx(upper, abs=1e-12)
    assert factual["approval_lower_30d"] == pytest.approx(lower, abs=1e-12)
    assert factual["top_negative_reason_30d"] == "incorrect"
    # A neutral vote only: counted, no approval rate.
    chat = feedback["small_talk"]
    assert (chat["votes_7d"], chat["approval_rate_7d"], chat["approval_lower_7d"]) == (1, None,
                                                                                        None)


def test_trend_is_the_change_history_with_its_bounds(learned: dict, db: psycopg.Connection
                                                     ) -> None:
    owner, twin, run = learned["owner"], learned["twin"], learned["run"]
    [point] = [p for p in rows(owner, "persona_module_trend", twin_id=twin.id)
               if p["module_key"] == "evidence_answers"]
    module = db.execute(
        "select success_weight, failure_weight, confidence, status::text "
        "from persona_modules where id = %s", (twin.modules["evidence_answers"],)).fetchone()
    assert module is not None
    s, f, confidence, status = module
    assert (point["run_id"], point["confidence"], point["status"]) == (str(run.id), confidence,
                                                                       status)
    assert (point["success_weight"], point["failure_weight"]) == (s, f)
    assert point["confidence_before"] == 0.5
    assert datetime.fromisoformat(point["measured_at"]) == run.learning_time
    lower, upper = wilson_bounds(s, f, 1.96)
    assert point["wilson_lower"] == pytest.approx(lower, abs=1e-12)
    assert point["wilson_upper"] == pytest.approx(upper, abs=1e-12)


def test_run_evidence_says_what_moved_each_module(learned: dict) -> None:
    owner, run = learned["owner"], learned["run"]
    twin: Twin = learned["twin"]
    got = {(r["module_id"], r["source"], r["reason"], r["outcome"]): (r["events"],
                                                                      r["vote_changes"])
           for r in rows(owner, "persona_run_evidence", run_id=str(run.id))}
    factual, chat = twin.modules["evidence_answers"], twin.modules["small_talk"]
    # The batch holds every vote cast, the replaced one too (the run retracted it); the audit of
    # the published spec moves the module.
    assert got == {
        (factual, "user_feedback", "incorrect", "failure"): (2, 0),
        (factual, "user_feedback", "outdated", "failure"): (1, 0),
        (factual, "user_feedback", "helpful", "success"): (2, 1),
        (factual, "user_feedback", None, "success"): (1, 0),
        (factual, "persona_audit", "incorrect", "failure"): (1, 0),
        (chat, "user_feedback", None, "neutral"): (1, 0),
    }


def test_overview_and_processed_state(learned: dict, db: psycopg.Connection) -> None:
    owner, twin, run = learned["owner"], learned["twin"], learned["run"]
    [o] = rows(owner, "persona_twin_overview", twin_id=twin.id)
    assert (o["modules"], o["published_spec_id"], o["published_version"]) == (
        2, twin.published_spec_id, 1)
    assert (o["last_run_id"], o["last_run_status"], o["last_run_gate_passed"],
            o["last_run_publish_decision"], o["last_run_hold_reason"]) == (
        str(run.id), "completed", True, "held", "no_draft")
    assert (o["pending_events"], o["pending_since"]) == (0, None)
    assert sum(o[f"modules_{s}"] for s in ("active", "probation", "disabled",
                                            "insufficient_data")) == 2

    waiting = vote(learned["voters"][4], twin, "t9", -1, "unsafe")
    [o] = rows(owner, "persona_twin_overview", twin_id=twin.id)
    assert o["pending_events"] == 1
    events = {e["id"]: e for e in rows(owner, "persona_training_events_state", twin_id=twin.id)}
    assert len(events) == scalar(db, "select count(*) from persona_training_events "
                                     "where twin_id = %s", twin.id)
    assert (events[waiting["id"]]["processed"], events[waiting["id"]]["processed_run_id"],
            events[waiting["id"]]["processed_at"]) == (False, None, None)
    processed = [e for i, e in events.items() if i != waiting["id"]]
    assert all(e["processed"] and e["processed_run_id"] == str(run.id) for e in processed)
    assert {datetime.fromisoformat(e["processed_at"]) for e in processed} == {run.finished_at}

    # A run queued since does not hide the last run's gate outcome; it shows beside it.
    queued = scalar(db, "select id from enqueue_learning_run(%s, true)", twin.id)
    try:
        [o] = rows(owner, "persona_twin_overview", twin_id=twin.id)
        assert (o["last_run_id"], o["last_run_status"], o["last_run_gate_passed"],
                o["next_run_status"], o["watch_state"]) == (
            str(run.id), "completed", True, "queued", None)
    finally:
        db.execute("delete from persona_feedback_learning_runs where id = %s", (queued,))


def test_deleting_a_voter_rebuilds_the_feedback_summary(
    learned: dict, db: psycopg.Connection
) -> None:
    owner, twin, voters = learned["owner"], learned["twin"], learned["voters"]
    db.execute("delete from auth.users where id = %s", (voters[0].id,))  # cascades to votes
    reasons = {(r["module_key"], r["reason"]): r["votes_30d"]
               for r in rows(owner, "persona_module_feedback_reasons", twin_id=twin.id)}
    assert reasons == {("evidence_answers", "incorrect"): 1, ("evidence_answers", "helpful"): 2,
                       ("evidence_answers", None): 1}


def test_deleting_an_unlearned_vote_change_keeps_the_learned_vote_out(
    learned: dict, service, runner: Runner
) -> None:
    # voter 1's learned "incorrect" is changed to "helpful", and the change is deleted (by
    # moderation) before any run learns it: learning keeps the "incorrect" vote retracted (the
    # twin is recounted), and so must the feedback figures, at once and after the next run.
    owner, twin, voters = learned["owner"], learned["twin"], learned["voters"]
    change = vote(voters[1], twin, "t2", 1, "helpful")
    service.table("persona_training_events").delete().eq("id", change["id"]).execute()
    expected = {("evidence_answers", "incorrect"): 1, ("evidence_answers", "helpful"): 2,
                ("evidence_answers", None): 1, ("small_talk", None): 1}

    def reasons() -> dict:
        return {(r["module_key"], r["reason"]): r["votes_30d"]
                for r in rows(owner, "persona_module_feedback_reasons", twin_id=twin.id)}

    assert reasons() == expected
    [run] = runner.run_once(uuid.UUID(twin.id), request=True)
    assert run.status == "completed"
    assert reasons() == expected


def test_a_hand_edit_of_a_votes_links_recounts_the_feedback_summary(
    learned: dict, db: psycopg.Connection, runner: Runner
) -> None:
    # Marking a learned vote superseded by hand (no vote replaces it) takes it out of what
    # counts, and clearing the mark puts it back: the summary follows at once, as learning does
    # at its next run; a vote recorded meanwhile moves only its own bucket.
    owner, twin, voters = learned["owner"], learned["twin"], learned["voters"]
    t4 = scalar(db, "select id from persona_training_events where twin_id = %s and trace_id = 't4'",
                twin.id)

    def reasons() -> dict:
        return {(r["module_key"], r["reason"]): r["votes_30d"]
                for r in rows(owner, "persona_module_feedback_reasons", twin_id=twin.id)}

    before = reasons()
    assert before[("evidence_answers", "helpful")] == 2
    db.execute("update persona_training_events set superseded_at = now() where id = %s", (t4,))
    assert daily_summary(db, twin.id) == daily_from_scratch(db, twin.id)
    assert reasons() == {**before, ("evidence_answers", "helpful"): 1}
    [run] = runner.run_once(uuid.UUID(twin.id), request=True)
    assert run.status == "completed" and run.rebuilt_modules
    assert reasons() == {**before, ("evidence_answers", "helpful"): 1}

    db.execute("update persona_training_events set superseded_at = null where id = %s", (t4,))
    assert reasons() == before
    vote(voters[4], twin, "t5", -1, "incorrect")  # the recorder's own link write
    [run] = runner.run_once(uuid.UUID(twin.id))
    assert run.status == "completed"
    assert daily_summary(db, twin.id) == daily_from_scratch(db, twin.id)
    after = reasons()
    assert after[("evidence_answers", "incorrect")] == before[("evidence_answers", "incorrect")] + 1
    assert after.get(("evidence_answers", None), 0) == before[("evidence_answers", None)] - 1


def test_a_run_read_without_its_batch_summary_reads_the_batch_again(
    db: psycopg.Connection, make_user: Callable[[str], User], runner: Runner
) -> None:
    # The claim counts the owner views' summaries of the batch into a scratch row that the
    # completion takes. A run whose claim left none (a worker that read the batch before the
    # schema kept them) is refused (PT412) and reads again; the summaries count each vote once.
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    vote(voter, twin, "t1", -1, "incorrect")
    vote(voter, twin, "t1", 1, "helpful")  # a change inside the batch: only "helpful" counts
    claims: list[str] = []
    real_claim = runner.store.claim_events

    def claim_then_lose_the_summary(run: Run) -> RunBatch | RebuildProgress:
        found = real_claim(run)
        claims.append(str(run.id))
        if len(claims) == 1:
            db.execute("delete from private.learning_run_summaries where run_id = %s", (run.id,))
        return found

    runner.store.claim_events = claim_then_lose_the_summary  # type: ignore[method-assign]
    [run] = runner.run_once(uuid.UUID(twin.id))

    assert run.status == "completed"
    assert claims == [str(run.id), str(run.id)]
    assert {(r["module_key"], r["reason"]): r["votes_30d"]
            for r in rows(owner, "persona_module_feedback_reasons", twin_id=twin.id)} == {
        ("evidence_answers", "helpful"): 1}
    assert scalar(db, "select sum(events) from persona_run_evidence where run_id = %s",
                  str(run.id)) == 2
    assert scalar(db, "select count(*) from private.learning_run_summaries s"
                  " join persona_feedback_learning_runs r on r.id = s.run_id"
                  " where r.twin_id = %s", twin.id) == 0


def test_a_claim_drops_what_an_unfinished_run_of_the_twin_left(
    db: psycopg.Connection, make_user: Callable[[str], User], runner: Runner
) -> None:
    # A run reads its batch (its summaries kept for its completion) and fails for good; the
    # twin's next run's claim drops that row: one scratch row per twin at most.
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id)
    other = create_twin(db, owner.id)
    vote(voter, twin, "t1", -1, "incorrect")
    vote(owner, other, "t1", 1, "helpful")
    store = runner.store

    def read(twin_id: str) -> Run:
        store.enqueue_due_runs(uuid.UUID(twin_id))
        run = store.claim_run(runner.worker_id, 30, uuid.UUID(twin_id))
        assert run is not None
        assert isinstance(store.claim_events(run), RunBatch)
        return run

    def scratch() -> set[str]:
        return {str(r[0]) for r in db.execute(
            "select run_id from private.learning_run_summaries").fetchall()}

    first, elsewhere = read(twin.id), read(other.id)
    assert {str(first.id), str(elsewhere.id)} <= scratch()
    store.fail_run(first, "worker gave up", retryable=False)
    # The failed run holds its twin back (10 s).
    time_passes(db, twin.id)
    second = read(twin.id)
    assert second.id != first.id
    assert str(first.id) not in scratch()
    assert {str(second.id), str(elsewhere.id)} <= scratch()  # another twin's row stays


def test_a_retraction_no_daily_bucket_holds_counts_the_summary_again(
    learned: dict, db: psycopg.Connection, runner: Runner
) -> None:
    # Should a bucket go missing (here: a hand delete of the summary), the run that retracts a
    # vote from it counts the twin's summary again instead of completing on a wrong count.
    twin, voters = learned["twin"], learned["voters"]
    db.execute(
        "delete from persona_feedback_daily where twin_id = %s and reason = 'incorrect'"
        " and score = -1", (twin.id,),
    )
    vote(voters[1], twin, "t2", 1, "helpful")  # retracts voter 1's learned "incorrect"
    [run] = runner.run_once(uuid.UUID(twin.id))
    assert run.status == "completed"
    summary = daily_summary(db, twin.id)
    assert summary == daily_from_scratch(db, twin.id)
    assert [r[5] for r in summary if r[3] == "incorrect"] == [1]  # voter 0's, counted again


def test_pfl_runs_explains_the_moves(learned: dict, stack: Stack) -> None:
    twin = learned["twin"]
    env = {"SUPABASE_URL": stack.url, "SUPABASE_SERVICE_ROLE_KEY": stack.service_key,
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "pfl"), "runs", "--twin", twin.id],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "What moved:" in out
    [line] = [x for x in out.splitlines() if "evidence_answers" in x]
    assert line.strip().startswith(str(learned["run"].id)[:8])
    assert ("after new evidence: 3 votes down (2 incorrect, 1 outdated), 3 up and 1 failed "
            "audit (1 of the votes changed an earlier one)") in line
