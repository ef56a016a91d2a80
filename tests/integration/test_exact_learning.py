"""Issue 11: learned confidence stays exact whatever changes between runs — deletions, module
edits, spec changes, skewed clocks — and the issue's numbered failing inputs, each a named test.
Every check of module counts goes through the from-scratch oracle in oracle_exact.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from postgrest.exceptions import APIError

from testkit.oracle import assert_modules_exact, daily_from_scratch, daily_summary
from testkit.oracle import modules_by_key as modules_now
from tests.integration.helpers import Twin, create_twin
from worker.models import RunDecision
from worker.runner import Runner, decide
from worker.store import BatchChangedError, RebuildProgress, Run, RunBatch, Store

pytestmark = pytest.mark.integration


def vote(user, twin: Twin, trace: str, score: int, intent: str, **kw: Any) -> dict:
    row = {"twin_id": twin.id, "trace_id": trace, "score": score, "intent_label": intent, **kw}
    return user.client.table("persona_training_events").insert(row).execute().data[0]


def learn(runner: Runner, twin: Twin) -> list[Run]:
    """Runs until nothing is due for the twin; every run must complete."""
    runs = runner.run_once(uuid.UUID(twin.id))
    assert [r.status for r in runs] == ["completed"] * len(runs), [r.error for r in runs]
    return runs


def count(db: psycopg.Connection, sql: str, *args: object) -> int:
    return db.execute(sql, args).fetchone()[0]  # type: ignore[index]


def counts(db: psycopg.Connection, twin: Twin) -> tuple[int, int, int]:
    """(events, module changes, runs) of the twin: what bad input must leave alone."""
    return (
        count(db, "select count(*) from persona_training_events where twin_id = %s", twin.id),
        count(db, "select count(*) from persona_module_changes where twin_id = %s", twin.id),
        count(db, "select count(*) from persona_feedback_learning_runs where twin_id = %s",
              twin.id),
    )


def sf(db: psycopg.Connection, twin: Twin, key: str) -> tuple[float, float]:
    m = modules_now(db, twin.id)[key]
    return round(m.success, 4), round(m.failure, 4)


# --------------------------------------------------------------------------- failing input 1


def test_input_1_a_deleted_voters_learned_votes_leave_the_module(
    db, service, make_user, make_runner
):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    for i in range(12):
        vote(voter, twin, f"t{i}", -1, "a", reason="incorrect")
    learn(runner, twin)
    assert sf(db, twin, "m") == (0, 12)
    assert modules_now(db, twin.id)["m"].status == "disabled"

    db.execute("delete from auth.users where id = %s", (voter.id,))
    vote(owner, twin, "t-owner", 1, "a")
    [run] = learn(runner, twin)

    assert sf(db, twin, "m") == (1, 0)
    assert modules_now(db, twin.id)["m"].status == "insufficient_data"
    assert run.events_processed == 1
    assert count(db, "select count(*) from persona_feedback_learning_runs where id = %s"
                 " and rebuilt_modules", str(run.id)) == 1
    assert_modules_exact(db, twin.id)


def test_input_1_a_moderated_vote_leaves_the_module(db, service, make_user, make_runner):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    rows = [vote(voter, twin, f"t{i}", -1, "a") for i in range(3)]
    vote(owner, twin, "t-owner", 1, "a")
    learn(runner, twin)
    assert sf(db, twin, "m") == (1, 3)

    # Moderation: the service role deletes one vote through the API.
    service.table("persona_training_events").delete().eq("id", rows[0]["id"]).execute()
    # No new evidence: the scheduler still queues the twin, whose modules must be rebuilt.
    [run] = learn(runner, twin)
    assert run.events_scanned == 0
    assert sf(db, twin, "m") == (1, 2)
    assert_modules_exact(db, twin.id)


def test_input_1_an_account_deleted_mid_run_is_neither_learned_nor_processed(
    db, service, make_user, make_runner
):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    for i in range(12):
        vote(voter, twin, f"t{i}", -1, "a")
    vote(owner, twin, "t-owner", 1, "a")
    runner = make_runner()
    store = runner.store
    store.enqueue_due_runs(uuid.UUID(twin.id))
    run = store.claim_run(runner.worker_id, 30, uuid.UUID(twin.id))
    assert run is not None
    decision = decide(store.claim_events(run), safe_mode=run.safe_mode)
    assert decision.events_scanned == 13

    db.execute("delete from auth.users where id = %s", (voter.id,))
    before = modules_now(db, twin.id)["m"]
    with pytest.raises(BatchChangedError, match="read the batch again"):
        store.complete_run(run, decision)
    # The refused completion changed nothing.
    assert modules_now(db, twin.id)["m"] == before
    assert count(db, "select learned_through_event_id from twins where id = %s", twin.id) == 0
    assert count(db, "select count(*) from persona_module_changes where twin_id = %s",
                 twin.id) == 0

    done = runner.process(run)  # the same attempt reads the batch again and completes
    assert done.status == "completed" and done.attempts == 1
    assert (done.events_scanned, done.events_processed) == (1, 1)
    assert sf(db, twin, "m") == (1, 0)
    assert_modules_exact(db, twin.id)


class DeletingStore(Store):
    """A store whose first completion is preceded by a deletion committed by someone else."""

    before_first_completion: Callable[[], None] = staticmethod(lambda: None)
    completions = 0

    def complete_run(self, run: Run, decision: RunDecision) -> Run:
        DeletingStore.completions += 1
        if DeletingStore.completions == 1:
            DeletingStore.before_first_completion()
        return super().complete_run(run, decision)


def test_input_1_the_runner_reads_the_batch_again_when_a_voter_vanishes(
    db, service, make_user, make_runner
):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    for i in range(5):
        vote(voter, twin, f"t{i}", -1, "a")
    vote(owner, twin, "t-owner", 1, "a")
    DeletingStore.completions = 0
    DeletingStore.before_first_completion = staticmethod(
        lambda: db.execute("delete from auth.users where id = %s", (voter.id,))
    )
    [run] = learn(make_runner(store_class=DeletingStore), twin)
    assert DeletingStore.completions == 2
    assert (run.attempts, run.events_scanned, run.events_processed) == (1, 1, 1)
    assert sf(db, twin, "m") == (1, 0)
    assert_modules_exact(db, twin.id)


# --------------------------------------------------------------------------- failing input 2


@pytest.mark.parametrize("edit", ["add", "re_intent", "rename", "delete_and_recreate"])
def test_input_2_a_retraction_subtracts_only_what_the_module_received(
    db, service, make_user, make_runner, edit
):
    owner, a, b = make_user("owner"), make_user("a"), make_user("b")
    start = {
        "add": {"other": "elsewhere"},
        "re_intent": {"small_talk": "elsewhere"},
        "rename": {"old_key": "chat"},
        "delete_and_recreate": {"small_talk": "chat"},
    }[edit]
    twin = create_twin(db, owner.id, start)
    runner = make_runner()
    by_key = {"module_key": "small_talk"} if edit == "rename" else {}
    vote(b, twin, "t-b", 1, "chat", **by_key)
    learn(runner, twin)

    modules = service.table("persona_modules")
    if edit == "add":
        modules.insert({"twin_id": twin.id, "module_key": "small_talk",
                        "intent_label": "chat"}).execute()
    elif edit == "re_intent":
        modules.update({"intent_label": "chat"}).eq("twin_id", twin.id).eq(
            "module_key", "small_talk").execute()
    elif edit == "rename":
        modules.update({"module_key": "small_talk"}).eq("twin_id", twin.id).eq(
            "module_key", "old_key").execute()
    else:
        modules.delete().eq("twin_id", twin.id).eq("module_key", "small_talk").execute()
        modules.insert({"twin_id": twin.id, "module_key": "small_talk",
                        "intent_label": "chat"}).execute()

    vote(a, twin, "t-a", 1, "chat", **by_key)
    learn(runner, twin)
    assert sf(db, twin, "small_talk") == (2, 0)  # B's vote exists and now matches the module
    assert_modules_exact(db, twin.id)

    vote(b, twin, "t-b", -1, "chat", **by_key)  # B changes the vote
    learn(runner, twin)
    assert sf(db, twin, "small_talk") == (1, 1)
    assert_modules_exact(db, twin.id)


# --------------------------------------------------------------------------- failing input 3


def test_input_3_a_voter_reads_the_true_processed_at(db, service, make_user, make_runner):
    owner, voter, stranger = make_user("owner"), make_user("voter"), make_user("stranger")
    twin = create_twin(db, owner.id, {"m": "a"}, feedback_from="any_user")
    row = vote(voter, twin, "t1", 1, "a")

    def read(user) -> list[dict]:
        return (user.client.table("persona_training_events")
                .select("id,processed_at,processed_run_id").eq("id", row["id"]).execute().data)

    waiting = {"id": row["id"], "processed_at": None, "processed_run_id": None}
    assert read(voter) == [waiting] and read(owner) == [waiting]
    [run] = learn(make_runner(), twin)

    seen_by_owner = read(owner)
    assert seen_by_owner[0]["processed_run_id"] == str(run.id)
    assert seen_by_owner[0]["processed_at"] is not None
    assert read(voter) == seen_by_owner
    assert read(stranger) == []  # the event itself stays hidden from others


# --------------------------------------------------------------------------- failing input 4


def compact(metadata: dict) -> bytes:
    """What JSON.stringify sends: no whitespace between tokens, UTF-8."""
    return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode()


def metadata_of_size(size: int) -> dict:
    """Many short keys (as a client's tags would be), padded to `size` bytes of compact JSON."""
    metadata: dict[str, Any] = {f"k{i}": 0 for i in range(380)}
    metadata["pad"] = ""
    metadata["pad"] = "é" * ((size - len(compact(metadata))) // 2)
    if (size - len(compact(metadata))) % 2:
        metadata["pad"] += "x"
    assert len(compact(metadata)) == size
    return metadata


def test_input_4_metadata_is_measured_as_the_client_sends_it(db, service, make_user):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    sent = metadata_of_size(3421)
    stored_text = db.execute("select %s::jsonb::text", (json.dumps(sent),)).fetchone()[0]
    assert len(stored_text.encode()) > 4096  # the old rule's measure refused it
    vote(owner, twin, "t-3421", 1, "a", metadata=sent)
    vote(owner, twin, "t-4096", 1, "a", metadata=metadata_of_size(4096))

    before = counts(db, twin)
    with pytest.raises(APIError) as refused:
        vote(owner, twin, "t-4097", 1, "a", metadata=metadata_of_size(4097))
    assert refused.value.code == "23514"
    assert "metadata_object_at_most_4096_compact_json_bytes" in refused.value.message
    assert counts(db, twin) == before


# --------------------------------------------------------------------------- skewed clocks


def audit_row(twin: Twin, trace: str, passed: bool, spec_id: str | None, **kw: Any) -> dict:
    return {"twin_id": twin.id, "source": "persona_audit", "trace_id": trace,
            "intent_label": "a", "passed": passed, "persona_spec_id": spec_id, **kw}


def test_a_future_audit_time_is_refused_and_changes_nothing(db, service, make_user):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    events = service.table("persona_training_events")
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    before = counts(db, twin)
    with pytest.raises(APIError) as refused:
        events.insert(audit_row(twin, "t1", True, twin.published_spec_id,
                                created_at=future)).execute()
    assert refused.value.code == "22008"
    assert refused.value.message.startswith("created_at: ")
    assert "ahead of the server's clock" in refused.value.message
    assert counts(db, twin) == before

    # An update to a future time is refused the same way, and the row keeps its time.
    row = events.insert(audit_row(twin, "t2", True, twin.published_spec_id)).execute().data[0]
    with pytest.raises(APIError) as refused:
        events.update({"created_at": future}).eq("id", row["id"]).execute()
    assert refused.value.code == "22008"
    assert count(db, "select count(*) from persona_training_events where id = %s"
                 " and created_at = %s", row["id"], row["created_at"]) == 1


def test_a_time_within_the_skew_is_stored_as_the_servers_and_the_skew_is_a_setting(
    db, service, make_user
):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    events = service.table("persona_training_events")
    ahead = (datetime.now(UTC) + timedelta(seconds=20)).isoformat()
    row = events.insert(audit_row(twin, "t1", True, None, created_at=ahead)).execute().data[0]
    assert count(db, "select count(*) from persona_training_events where id = %s"
                 " and created_at <= now()", row["id"]) == 1

    service.table("persona_learning_settings").update({"max_clock_skew_seconds": 0}).eq(
        "twin_id", twin.id).execute()
    before = counts(db, twin)
    with pytest.raises(APIError) as refused:
        events.insert(audit_row(twin, "t2", True, None, created_at=ahead)).execute()
    assert refused.value.code == "22008" and "more than 0 s ahead" in refused.value.message
    assert counts(db, twin) == before


def test_a_skewed_clock_cannot_capture_the_gates_latest_audit(
    db, service, make_user, make_runner
):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    draft = owner.client.table("persona_specs").insert(
        {"twin_id": twin.id, "spec": {"modules": ["m"]}}).execute().data[0]
    events = service.table("persona_training_events")
    skewed = (datetime.now(UTC) + timedelta(seconds=50)).isoformat()
    # A pipeline with a fast clock fails the trace; a correct one passes it a moment later.
    events.insert(audit_row(twin, "t1", False, draft["id"], created_at=skewed)).execute()
    events.insert(audit_row(twin, "t1", True, draft["id"])).execute()

    runner = make_runner()
    runner.store.enqueue_run(uuid.UUID(twin.id), safe_mode=True)
    run = runner.store.claim_run(runner.worker_id, 30, uuid.UUID(twin.id))
    assert run is not None
    batch = runner.store.claim_events(run)
    assert (batch.audits.candidate_audited, batch.audits.candidate_passed) == (1, 1)
    assert runner.process(run).status == "completed"


# --------------------------------------------------------------------------- specs


def test_audits_of_a_draft_stay_gate_evidence_whatever_becomes_of_the_draft(
    db, service, make_user, make_runner
):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    specs, events = service.table("persona_specs"), service.table("persona_training_events")
    draft = owner.client.table("persona_specs").insert(
        {"twin_id": twin.id, "spec": {"modules": ["m"]}}).execute().data[0]
    doomed = owner.client.table("persona_specs").insert(
        {"twin_id": twin.id, "spec": {"modules": ["m"]}}).execute().data[0]
    events.insert([audit_row(twin, f"d{i}", False, draft["id"]) for i in range(3)]).execute()
    events.insert([audit_row(twin, f"x{i}", False, doomed["id"]) for i in range(2)]).execute()
    events.insert(audit_row(twin, "p0", True, twin.published_spec_id)).execute()
    learn(runner, twin)
    assert sf(db, twin, "m") == (2, 0)  # only the published spec's audit moves the module

    # The draft is published by hand, the old spec deleted, the other draft deleted.
    specs.update({"status": "archived"}).eq("id", twin.published_spec_id).execute()
    specs.update({"status": "published"}).eq("id", draft["id"]).execute()
    specs.delete().eq("id", twin.published_spec_id).execute()
    specs.delete().eq("id", doomed["id"]).execute()
    events.insert(audit_row(twin, "n0", False, draft["id"])).execute()  # now production
    learn(runner, twin)
    assert sf(db, twin, "m") == (2, 2)
    assert_modules_exact(db, twin.id)


def test_a_vote_whose_replacement_was_deleted_stays_out_of_a_later_batch(
    db, service, make_user, make_runner
):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    # A run claimed before any vote (its batch is fixed, empty); its worker dies.
    runner.store.enqueue_run(uuid.UUID(twin.id), safe_mode=True)
    run = runner.store.claim_run(runner.worker_id, 30, uuid.UUID(twin.id))
    assert run is not None
    db.execute("update persona_feedback_learning_runs set lease_expires_at = now()"
               " - interval '1 second' where id = %s", (str(run.id),))
    first, middle, last = (vote(voter, twin, "t1", -1, "a") for _ in range(3))
    service.table("persona_training_events").delete().eq("id", middle["id"]).execute()
    # The takeover rebuilds over its batch (empty, fixed before the votes); the next run learns
    # the votes, incrementally.
    takeover, later = learn(runner, twin)
    assert takeover.id == run.id and takeover.events_scanned == 0
    assert later.events_scanned == 2
    # The first vote was replaced (its replacement since deleted): only the last one counts.
    assert sf(db, twin, "m") == (0, 1)
    assert_modules_exact(db, twin.id)


def test_a_new_weighting_rebuilds_the_modules_with_it(db, service, make_user, make_runner):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    vote(voter, twin, "t1", -1, "a", reason="unsafe")
    vote(owner, twin, "t2", 1, "a")
    learn(runner, twin)
    assert sf(db, twin, "m") == (1, 3)  # the unsafe failure weighs 3 by default
    owner.client.table("persona_learning_settings").update(
        {"unsafe_multiplier": 5, "feedback_weight": 2}).eq("twin_id", twin.id).execute()
    [run] = learn(runner, twin)  # no new evidence: the weighting alone marks the twin
    assert count(db, "select count(*) from persona_feedback_learning_runs where id = %s"
                 " and rebuilt_modules", str(run.id)) == 1
    assert sf(db, twin, "m") == (2, 10)
    assert_modules_exact(db, twin.id)
    # Settings that do not weigh evidence leave the twin as it is.
    owner.client.table("persona_learning_settings").update({"min_evidence": 3}).eq(
        "twin_id", twin.id).execute()
    assert count(db, "select evidence_generation - learned_generation from twins where id = %s",
                 twin.id) == 0


def test_an_edited_learned_vote_is_relearned_exactly(db, service, make_user, make_runner):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a", "n": "b"})
    runner = make_runner()
    row = vote(owner, twin, "t1", 1, "a")
    learn(runner, twin)
    service.table("persona_training_events").update({"intent_label": "b", "score": -1}).eq(
        "id", row["id"]).execute()
    learn(runner, twin)
    assert (sf(db, twin, "m"), sf(db, twin, "n")) == ((0, 0), (0, 1))
    assert_modules_exact(db, twin.id)


def test_appends_and_vote_changes_stay_incremental(db, service, make_user, make_runner):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    vote(owner, twin, "t1", 1, "a")
    learn(runner, twin)
    vote(owner, twin, "t1", -1, "a")
    vote(owner, twin, "t2", 1, "a")
    [run] = learn(runner, twin)
    assert count(db, "select count(*) from persona_feedback_learning_runs where id = %s"
                 " and not rebuilt_modules", str(run.id)) == 1
    assert sf(db, twin, "m") == (1, 1)
    assert_modules_exact(db, twin.id)


def test_a_rebuilt_module_takes_votes_by_key_and_by_intent(db, service, make_user, make_runner):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    vote(owner, twin, "t1", 1, "a")
    vote(owner, twin, "t2", -1, "other", module_key="m")
    learn(runner, twin)
    service.table("persona_modules").insert(
        {"twin_id": twin.id, "module_key": "n", "intent_label": "a"}).execute()
    [run] = learn(runner, twin)  # rebuilt: m takes its key's and its intent's votes
    assert count(db, "select count(*) from persona_feedback_learning_runs where id = %s"
                 " and rebuilt_modules", str(run.id)) == 1
    assert (sf(db, twin, "m"), sf(db, twin, "n")) == ((1, 1), (1, 0))
    assert_modules_exact(db, twin.id)


def test_a_rebuild_matches_an_intent_label_to_intents_only(db, service, make_user, make_runner):
    """A vote without a module_key counts for the modules serving its intent label, never for
    a module whose key happens to equal that label (DESIGN.md, Learning: matching)."""
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"a": "b", "n": "a"})
    runner = make_runner()
    vote(owner, twin, "t1", 1, "a")  # intent a: module n only
    vote(owner, twin, "t2", -1, "b", module_key="a")  # names module a
    learn(runner, twin)
    service.table("persona_modules").update({"intent_label": "b"}).eq(
        "twin_id", twin.id).eq("module_key", "a").execute()  # an edit: the next run rebuilds
    [run] = learn(runner, twin)
    assert count(db, "select count(*) from persona_feedback_learning_runs where id = %s"
                 " and rebuilt_modules", str(run.id)) == 1
    assert (sf(db, twin, "a"), sf(db, twin, "n")) == ((0, 1), (1, 0))
    assert_modules_exact(db, twin.id)


# ----------------------------------------------------- the rebuild, one bounded step per call


def marked_twin(db, service, make_user, make_runner, votes: int, step: int) -> tuple[Twin, Runner]:
    """A twin whose `votes` up-votes (trace t0…) on module m were learned, one of them then
    deleted by moderation (so its next run rebuilds), with rebuild_step_events = `step`."""
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    rows = [vote(owner, twin, f"t{i}", 1, "a") for i in range(votes)]
    learn(runner, twin)
    service.table("persona_learning_settings").update({"rebuild_step_events": step}).eq(
        "twin_id", twin.id).execute()
    service.table("persona_training_events").delete().eq("id", rows[0]["id"]).execute()
    return twin, runner


def claimed(runner: Runner, twin: Twin) -> Run:
    runner.store.enqueue_due_runs(uuid.UUID(twin.id))
    run = runner.store.claim_run(runner.worker_id, 30, uuid.UUID(twin.id))
    assert run is not None
    return run


def test_a_rebuild_reads_at_most_rebuild_step_events_per_call(
    db, service, make_user, make_runner
):
    twin, runner = marked_twin(db, service, make_user, make_runner, votes=9, step=3)
    run = claimed(runner, twin)
    steps, through = [], 0
    while not isinstance(got := runner.store.claim_events(run), RunBatch):
        # Each call summed the twin's events after the last step's, at most 3 of them.
        read = count(db, "select count(*) from persona_training_events where twin_id = %s"
                     " and id > %s and id <= %s", twin.id, through, got.rebuilt_through_event_id)
        assert 1 <= read <= 3
        assert got.steps == len(steps) + 1
        steps.append(read)
        through = got.rebuilt_through_event_id
    # 8 events left: three steps, the third of which answers with the batch.
    assert sum(steps) + count(db, "select count(*) from persona_training_events where twin_id"
                              " = %s and id > %s", twin.id, through) == 8
    assert len(steps) == 2 and got.modules[0].success == pytest.approx(8)
    assert runner.process(run).status == "completed"
    assert sf(db, twin, "m") == (8, 0)
    assert_modules_exact(db, twin.id)


def test_a_deletion_between_rebuild_steps_starts_the_rebuild_over(
    db, service, make_user, make_runner
):
    twin, runner = marked_twin(db, service, make_user, make_runner, votes=9, step=2)
    run = claimed(runner, twin)
    first = runner.store.claim_events(run)
    second = runner.store.claim_events(run)
    assert isinstance(first, RebuildProgress) and isinstance(second, RebuildProgress)
    assert second.steps == 2
    # A vote the first step summed goes: the steps so far no longer hold.
    gone = db.execute("select min(id) from persona_training_events where twin_id = %s",
                      (twin.id,)).fetchone()[0]  # type: ignore[index]
    service.table("persona_training_events").delete().eq("id", gone).execute()
    again = runner.store.claim_events(run)
    assert isinstance(again, RebuildProgress) and again.steps == 1
    assert again.rebuilt_through_event_id < second.rebuilt_through_event_id
    assert runner.process(run).status == "completed"
    assert sf(db, twin, "m") == (7, 0)
    assert_modules_exact(db, twin.id)


def test_a_vote_changed_between_rebuild_steps_counts_once(db, service, make_user, make_runner):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    vote(voter, twin, "tv", 1, "a")  # the first event: the first step sums it
    for i in range(6):
        vote(owner, twin, f"t{i}", 1, "a")
    learn(runner, twin)
    service.table("persona_learning_settings").update({"rebuild_step_events": 2}).eq(
        "twin_id", twin.id).execute()
    service.table("persona_modules").update({"intent_label": "a"}).eq(
        "twin_id", twin.id).execute()  # a module edit marks the twin: the next run rebuilds
    run = claimed(runner, twin)
    assert isinstance(runner.store.claim_events(run), RebuildProgress)
    # After the first step, the voter changes their vote: a new event after the batch.
    vote(voter, twin, "tv", -1, "a")
    assert runner.process(run).status == "completed"
    assert sf(db, twin, "m") == (7, 0)  # the batch as it stood: the old vote counts, once
    learn(runner, twin)  # the change, learned incrementally: retracted once, counted once
    assert sf(db, twin, "m") == (6, 1)
    assert_modules_exact(db, twin.id)


def test_a_rebuild_weighs_every_kind_of_evidence_as_learning_does(
    db, service, make_user, make_runner
):
    """A rebuild in steps of two over a history of every kind of evidence: an unsafe failure
    (3 × 1), a neutral vote (nothing), an audit of a draft (nothing), a passing audit of the
    published spec (2), a vote changed inside the history (its new value only), and a vote
    changed after the run's batch was claimed, before the step that reads it (its value as the
    batch stood). DESIGN.md, Learning: feedback 1, audit 2, unsafe 3×, score 0 neutral, audits
    of a draft gate evidence only."""
    owner, voter, changer, late = (make_user(n) for n in ("owner", "voter", "changer", "late"))
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    draft = owner.client.table("persona_specs").insert(
        {"twin_id": twin.id, "spec": {"modules": ["m"]}}).execute().data[0]
    events = service.table("persona_training_events")
    vote(voter, twin, "t1", -1, "a", reason="unsafe")  # failure 3
    vote(owner, twin, "t2", 0, "a")  # neutral
    events.insert(audit_row(twin, "d1", False, draft["id"])).execute()  # the draft's: nothing
    events.insert(audit_row(twin, "p1", True, twin.published_spec_id)).execute()  # success 2
    vote(changer, twin, "tc", 1, "a")
    vote(changer, twin, "tc", -1, "a")  # replaces the up-vote: failure 1
    vote(owner, twin, "t3", 1, "a")  # success 1
    vote(late, twin, "tl", -1, "a")  # failure 1, changed below after the batch is claimed
    learn(runner, twin)
    assert sf(db, twin, "m") == (3, 5)
    assert_modules_exact(db, twin.id)

    service.table("persona_learning_settings").update({"rebuild_step_events": 2}).eq(
        "twin_id", twin.id).execute()
    service.table("persona_modules").update({"intent_label": "a"}).eq(
        "twin_id", twin.id).execute()  # a module edit marks the twin: the next run rebuilds
    run = claimed(runner, twin)
    vote(late, twin, "tl", 1, "a")  # after the batch: the rebuild counts the down-vote
    assert runner.process(run).status == "completed"
    steps = count(db, "select steps from private.learning_run_rebuilds where run_id = %s",
                  str(run.id))
    assert steps >= 4  # 9 events of the twin, at most two per step
    assert sf(db, twin, "m") == (3, 5)
    assert_modules_exact(db, twin.id)

    learn(runner, twin)  # the late change, incrementally: the down-vote retracted, the up added
    assert sf(db, twin, "m") == (4, 4)
    assert_modules_exact(db, twin.id)


def test_a_rebuild_that_keeps_starting_over_gives_the_attempt_up(
    db, service, make_user, make_runner
):
    twin, _ = marked_twin(db, service, make_user, make_runner, votes=30, step=2)
    victims = [r[0] for r in db.execute(
        "select id from persona_training_events where twin_id = %s order by id limit 8",
        (twin.id,))]

    class ModeratedStore(Store):
        """A moderator deletes one of the twin's oldest votes after each rebuild step."""

        def claim_events(self, run: Run) -> RunBatch | RebuildProgress:
            got = super().claim_events(run)
            if isinstance(got, RebuildProgress) and victims:
                db.execute("delete from persona_training_events where id = %s",
                           (victims.pop(0),))
            return got

    runner = make_runner(store_class=ModeratedStore)
    run = claimed(runner, twin)
    done = runner.process(run)
    # Four restarts in one read: the attempt is given up (counted; the run waits for another,
    # its lease expired), not held for ever.
    assert done.status == "running" and done.attempts == 1
    assert count(db, "select count(*) from persona_feedback_learning_runs where id = %s"
                 " and lease_expires_at <= now()", str(run.id)) == 1
    assert "changed 4 times while its modules were being rebuilt" in (done.error or "")
    assert len(victims) == 3
    # With the moderator gone, the next attempt rebuilds to the end, exactly.
    victims.clear()
    assert [r.status for r in learn(runner, twin)][-1] == "completed"
    assert_modules_exact(db, twin.id)


def test_a_twins_settings_row_cannot_be_deleted_apart_from_the_twin(db, service, make_user):
    twin = create_twin(db, make_user("owner").id)
    with pytest.raises(APIError) as refused:
        service.table("persona_learning_settings").delete().eq("twin_id", twin.id).execute()
    assert refused.value.code == "42501"
    assert count(db, "select count(*) from persona_learning_settings where twin_id = %s",
                 twin.id) == 1
    service.table("twins").delete().eq("id", twin.id).execute()
    assert count(db, "select count(*) from persona_learning_settings where twin_id = %s",
                 twin.id) == 0


# --------------------------------------------------------------------------- after a review


def test_an_edited_learned_vote_moves_in_the_daily_summary(db, service, make_user, make_runner):
    # A moderator relabels a learned vote's reason (service role); the voter then changes that
    # vote. The change's retraction must find the vote in its new bucket (it used to find the old
    # bucket still counting it and the new one empty: 23514 in every later run).
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a", "n": "b"})
    runner = make_runner()
    row = vote(voter, twin, "t0", 1, "a", reason="helpful")
    learn(runner, twin)
    service.table("persona_training_events").update({"reason": "incorrect"}).eq(
        "id", row["id"]).execute()
    assert daily_summary(db, twin.id) == daily_from_scratch(db, twin.id)
    learn(runner, twin)
    vote(voter, twin, "t0", -1, "a")
    learn(runner, twin)
    assert daily_summary(db, twin.id) == daily_from_scratch(db, twin.id)
    # Every bucket column at once, on a vote that is then replaced and relearned.
    service.table("persona_training_events").update(
        {"score": 1, "reason": "other", "intent_label": "b", "module_key": "n",
         "created_at": "2026-01-02T00:00:00Z"}).eq("id", row["id"]).execute()
    assert daily_summary(db, twin.id) == daily_from_scratch(db, twin.id)
    learn(runner, twin)
    latest = db.execute("select id from persona_training_events where twin_id = %s"
                        " order by id desc limit 1", (twin.id,)).fetchone()[0]
    service.table("persona_training_events").update({"reason": "unsafe"}).eq(
        "id", latest).execute()
    vote(voter, twin, "t0", 0, "b")
    learn(runner, twin)
    assert daily_summary(db, twin.id) == daily_from_scratch(db, twin.id) != []
    assert_modules_exact(db, twin.id)


@pytest.mark.parametrize("column, value", [("supersedes_id", None), ("superseded_at", "now")])
def test_an_audit_carries_no_vote_change_link(db, service, make_user, make_runner, column, value):
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    learned = vote(voter, twin, "t0", 1, "a")
    learn(make_runner(), twin)
    link = learned["id"] if column == "supersedes_id" else datetime.now(UTC).isoformat()
    before = counts(db, twin)
    with pytest.raises(APIError) as refused:
        service.table("persona_training_events").insert(
            {**audit_row(twin, "t9", True, None), column: link}).execute()
    assert refused.value.code == "23514"
    assert f"{column}_on_feedback_only" in refused.value.message
    audit = service.table("persona_training_events").insert(
        audit_row(twin, "t9", True, None)).execute().data[0]
    with pytest.raises(APIError) as edited:
        service.table("persona_training_events").update({column: link}).eq(
            "id", audit["id"]).execute()
    assert f"{column}_on_feedback_only" in edited.value.message
    assert counts(db, twin)[0] == before[0] + 1
    assert count(db, f"select count(*) from persona_training_events where {column} is not null"
                 " and source = 'persona_audit'") == 0


def test_a_vote_change_link_is_followed_within_its_twin_only(db, service, make_user, make_runner):
    # A service-role edit points a vote's supersedes_id at another twin's learned vote: the
    # claim must not retract that vote here (its bucket is not this twin's: 23514, and the twin
    # stuck).
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    other = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    foreign = vote(voter, other, "t0", -1, "a", reason="unsafe")
    vote(voter, other, "t0", 1, "a")  # marks the foreign vote superseded, as a retraction needs
    learn(runner, other)
    vote(voter, twin, "t1", 1, "a")
    # A bucket of this twin that the foreign vote's retraction would land in (were it followed).
    vote(make_user("voter2"), twin, "t5", -1, "a", reason="unsafe")
    learn(runner, twin)  # the twin's cursor passes the other twin's vote
    row = vote(voter, twin, "t0", 1, "a")
    service.table("persona_training_events").update({"supersedes_id": foreign["id"]}).eq(
        "id", row["id"]).execute()
    learn(runner, twin)
    assert sf(db, twin, "m") == (2, 3)
    assert daily_summary(db, twin.id) == daily_from_scratch(db, twin.id) != []
    assert_modules_exact(db, twin.id)
    assert_modules_exact(db, other.id)


@pytest.mark.parametrize("edit", [
    "insert into persona_modules (twin_id, module_key, intent_label) values (%s, 'mx', 'x')",
    "update persona_learning_settings set feedback_weight = 4 where twin_id = %s",
])
def test_an_edit_open_across_a_twins_first_claim_is_read(db, stack, make_user, make_runner, edit):
    # The edit's transaction began before any run, so its trigger saw none running and nothing
    # learned; the run claimed meanwhile read the modules and weighting as they were.
    owner, voter = make_user("owner"), make_user("voter")
    twin = create_twin(db, owner.id, {"m": "a"})
    assert count(db, "select evidence_generation - learned_generation from twins where id = %s",
                 twin.id) == 0  # a twin with nothing learned is not marked by its modules
    for trace in ("t0", "t1", "t2"):
        vote(voter, twin, trace, 1, "x")
    runner = make_runner()
    store, twin_id = runner.store, uuid.UUID(twin.id)
    with psycopg.connect(stack.database_url) as other:
        other.execute(edit, (twin.id,))
        store.enqueue_due_runs(twin_id)
        run = store.claim_run(runner.worker_id, 30, twin_id)
        assert run is not None
        stale = store.claim_events(run)
        assert isinstance(stale, RunBatch)
        other.commit()
    with pytest.raises(BatchChangedError):
        store.complete_run(run, decide(stale, safe_mode=True))
    batch = store.claim_events(run)
    assert isinstance(batch, RunBatch)
    done = store.complete_run(run, decide(batch, safe_mode=True))
    assert done.status == "completed" and done.rebuilt_modules is False
    assert_modules_exact(db, twin.id)
    if "persona_modules" in edit:
        assert sf(db, twin, "mx") == (3, 0)


@pytest.mark.parametrize("column, value, rule", [
    ("half_life_days", 1e-6, "half_life_days_0_01_to_3650"),
    ("half_life_days", "Infinity", "half_life_days_0_01_to_3650"),
    ("feedback_weight", "Infinity", "feedback_weight_0_to_1000"),
    ("audit_weight", "NaN", "audit_weight_0_to_1000"),
    ("unsafe_multiplier", 1e9, "unsafe_multiplier_1_to_1000"),
    ("min_evidence", "NaN", "min_evidence_0_to_1000000"),
    ("gate_min_pairs", 100001, "gate_min_pairs_1_to_100000"),
    ("gate_min_audited_traces", 2_000_000_000, "gate_min_audited_traces_1_to_100000"),
])
def test_learning_settings_are_bounded(db, make_user, column, value, rule):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, {"m": "a"})
    before = db.execute("select to_jsonb(s) from persona_learning_settings s where twin_id = %s",
                        (twin.id,)).fetchone()[0]
    with pytest.raises(APIError) as refused:
        owner.client.table("persona_learning_settings").update({column: value}).eq(
            "twin_id", twin.id).execute()
    assert refused.value.code == "23514" and rule in refused.value.message
    assert db.execute("select to_jsonb(s) from persona_learning_settings s where twin_id = %s",
                      (twin.id,)).fetchone()[0] == before


def test_a_completed_run_leaves_no_scratch_row_even_for_an_empty_batch(
    db, make_user, make_runner
):
    twin = create_twin(db, make_user("owner").id, {"m": "a"})
    [run] = make_runner().run_once(uuid.UUID(twin.id), request=True)
    assert run.status == "completed" and run.events_scanned == 0
    assert count(db, "select count(*) from private.learning_run_summaries where run_id = %s",
                 str(run.id)) == 0


# ------------------------------------------------- hand-edited vote-change links (a review)


def exact(db: psycopg.Connection, twin: Twin) -> None:
    """Modules and the daily feedback summary equal the recomputation from the evidence."""
    assert_modules_exact(db, twin.id)
    assert daily_summary(db, twin.id) == daily_from_scratch(db, twin.id)


def test_a_pending_vote_linked_by_hand_to_a_current_vote_retracts_nothing(
    db, service, make_user, make_runner
):
    # The service role points a pending vote's supersedes_id at a learned vote that is still
    # current (superseded_at null): that vote keeps counting, in the modules and the summary.
    owner, u1, u2 = make_user("owner"), make_user("u1"), make_user("u2")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    first = vote(u1, twin, "t1", 1, "a")
    learn(runner, twin)
    pending = vote(u2, twin, "t2", -1, "a")
    service.table("persona_training_events").update({"supersedes_id": first["id"]}).eq(
        "id", pending["id"]).execute()
    learn(runner, twin)
    assert sf(db, twin, "m") == (1, 1)
    exact(db, twin)


def test_a_current_vote_named_after_a_rebuilt_batch_counts_once(
    db, service, make_user, make_runner
):
    # The same link, with the linking vote after the rebuilding run's batch: the rebuild counts
    # the named vote once (it is current), not also as "replaced by a vote after the batch".
    owner, u1, u2, u3 = (make_user(n) for n in ("owner", "u1", "u2", "u3"))
    twin = create_twin(db, owner.id, {"m": "a", "n": "b"})
    db.execute("update persona_learning_settings set max_batch_events = 1 where twin_id = %s",
               (twin.id,))
    runner = make_runner()
    first = vote(u1, twin, "t1", 1, "a")
    learn(runner, twin)
    vote(u3, twin, "t3", 1, "b")
    pending = vote(u2, twin, "t2", -1, "a")
    service.table("persona_training_events").update({"supersedes_id": first["id"]}).eq(
        "id", pending["id"]).execute()
    runner.store.enqueue_due_runs(uuid.UUID(twin.id))
    run = runner.store.claim_run(runner.worker_id, 30, uuid.UUID(twin.id))
    assert run is not None
    done = runner.process(run)  # the rebuild, whose batch ends before the linking vote
    assert done.status == "completed" and done.rebuilt_modules
    assert sf(db, twin, "m") == (1, 0)
    exact(db, twin)
    learn(runner, twin)
    assert sf(db, twin, "m") == (1, 1)
    exact(db, twin)


def test_a_vote_named_by_two_votes_is_retracted_once(db, service, make_user, make_runner):
    owner, u1 = make_user("owner"), make_user("u1")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    first = vote(u1, twin, "t1", 1, "a")
    vote(owner, twin, "t9", 1, "a")
    learn(runner, twin)
    second = vote(u1, twin, "t1", -1, "a")  # replaces the first (the recorder's link)
    other = vote(owner, twin, "t2", -1, "a")
    service.table("persona_training_events").update({"supersedes_id": first["id"]}).eq(
        "id", other["id"]).execute()
    assert second["supersedes_id"] == first["id"]
    learn(runner, twin)
    assert sf(db, twin, "m") == (1, 2)
    exact(db, twin)


def test_a_summary_short_of_a_retraction_is_counted_again_not_stuck(
    db, service, make_user, make_runner
):
    # A bucket lowered by hand below what a batch retracts from it: the run completes and the
    # summary is counted again, instead of every run failing on votes_not_negative.
    owner, u1, u2 = make_user("owner"), make_user("u1"), make_user("u2")
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    vote(u1, twin, "t1", 1, "a")
    vote(u2, twin, "t2", 1, "a")
    learn(runner, twin)
    db.execute("update persona_feedback_daily set votes = 1 where twin_id = %s and score = 1",
               (twin.id,))
    vote(u1, twin, "t1", -1, "a")
    vote(u2, twin, "t2", -1, "a")
    learn(runner, twin)
    assert sf(db, twin, "m") == (0, 2)
    exact(db, twin)


def test_a_vote_named_by_votes_in_several_batches_is_retracted_once(
    db, service, make_user, make_runner
):
    # A superseded vote named by its replacement and, by hand, by two later votes that fall in
    # later batches: it counts until the last vote naming it is learned, and is retracted once.
    owner, u1, u2, u3, u4 = (make_user(n) for n in ("owner", "u1", "u2", "u3", "u4"))
    twin = create_twin(db, owner.id, {"m": "a"})
    runner = make_runner()
    first = vote(u1, twin, "t1", 1, "a")
    vote(u3, twin, "t3", 1, "a")
    vote(u4, twin, "t4", 1, "a")
    learn(runner, twin)
    db.execute("update persona_learning_settings set max_batch_events = 1 where twin_id = %s",
               (twin.id,))
    vote(u1, twin, "t1", -1, "a")  # the recorder's link: replaces the first vote
    later = [vote(u2, twin, t, -1, "a")["id"] for t in ("t2", "t5")]
    service.table("persona_training_events").update({"supersedes_id": first["id"]}).in_(
        "id", later).execute()
    assert len(learn(runner, twin)) >= 3  # one event per run (a rebuild first)
    exact(db, twin)
    assert sf(db, twin, "m") == (2, 3)


@pytest.mark.parametrize("others_between", [0, 250], ids=["dense", "sparse"])
def test_a_batch_of_more_than_10000_events_is_learned_exactly(
    db, make_user, make_runner, others_between
):
    # A batch past 10,000 events is read with a custom plan (claim_learning_run_events), a
    # smaller one with each statement's generic plan; the suite's other batches are small. A
    # large batch is dense when its twin holds most ids of its range (no other twin's events
    # between, here), sparse otherwise (250 of another twin's events after every 100: its reads
    # are also bounded by row comparisons). Each must read exactly the batch: other twins' events
    # interleaved in its id range stay out, and its changes of votes learned before retract them.
    owner, other_owner = make_user("owner"), make_user("other")
    twin = create_twin(db, owner.id, {"m": "a", "n": "b"})
    other = create_twin(db, other_owner.id, {"m": "a"})
    runner = make_runner()

    def votes(to: Twin, voter: str, prefix: str, n: int, up_every: int) -> None:
        db.execute(
            "insert into public.persona_training_events (twin_id, trace_id, score, intent_label,"
            " created_by) select %s, %s || g, case when g %% %s = 0 then 1 else -1 end,"
            " case when g %% 3 = 0 then 'b' else 'a' end, %s from generate_series(1, %s) g",
            (to.id, prefix, up_every, voter, n))

    votes(twin, owner.id, "t", 300, 2)
    learn(runner, twin)
    # 10,300 events: 300 changes of the learned votes, 10,000 new ones.
    for i in range(103):
        votes(twin, owner.id, "t" if i < 3 else f"u{i}-", 100, 3)
        if others_between:
            votes(other, other_owner.id, f"o{i}-", others_between, 5)
    [run] = learn(runner, twin)
    assert (run.events_scanned, run.events_processed) == (10_300, 10_300)
    exact(db, twin)
    assert count(db, "select count(*) from persona_training_events e where e.twin_id = %s"
                 " and e.processed_run_id is null", other.id) == 103 * others_between
    # Not left pending in the suite's one database: a later outbox drain would send them all.
    db.execute("delete from public.twins where id = any(%s::uuid[])", ([twin.id, other.id],))
