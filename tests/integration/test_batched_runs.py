"""Issue 15: several runs per round trip (claim_learning_runs, read_learning_runs,
complete_learning_runs) learn exactly what runs one at a time learn; one run's refusal leaves the
others completed and that run is handled as the one-run path handles it; a twin to rebuild goes
through the one-run path; the claim's bounds; two workers never share a run."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest
from postgrest.exceptions import APIError

from testkit.oracle import assert_modules_exact
from tests.integration.helpers import Twin, create_twin, scalar
from worker.models import RunDecision
from worker.runner import Runner
from worker.store import Run, RunBatch, RunRead, Store, StoreError, TransientStoreError

pytestmark = pytest.mark.integration

MODULES = {"answers": "factual", "chat": "casual", "tone": "factual"}
DRAFT = {"modules": ["answers", "chat"]}


class RecordingStore(Store):
    """The worker's store, recording the batched calls (run ids claimed, reads, completions)
    and calling `before_complete` (once) just before a batched completion."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claims: list[list[str]] = []
        self.reads: list[dict[str, RunRead]] = []
        self.completions: list[list[str]] = []
        self.before_complete: Callable[[Sequence[tuple[Run, RunDecision]]], None] | None = None

    def claim_runs(self, worker_id: str, lease_seconds: int, max_runs: int) -> list[Run]:
        runs = super().claim_runs(worker_id, lease_seconds, max_runs)
        self.claims.append([str(r.id) for r in runs])
        return runs

    def read_runs(self, runs: Sequence[Run]) -> list[RunRead]:
        reads = super().read_runs(runs)
        self.reads.append({str(r.id): read for r, read in zip(runs, reads, strict=True)})
        return reads

    def complete_runs(
        self, completions: Sequence[tuple[Run, RunDecision]]
    ) -> list[Run | StoreError]:
        hook, self.before_complete = self.before_complete, None
        if hook is not None:
            hook(completions)
        self.completions.append([str(run.id) for run, _ in completions])
        return super().complete_runs(completions)


def batched_runner(make_runner: Callable[..., Runner], name: str = "batched") -> Runner:
    runner = make_runner(name, store_class=RecordingStore)
    runner.claim_runs = 100
    return runner


def recording(runner: Runner) -> RecordingStore:
    assert isinstance(runner.store, RecordingStore)
    return runner.store


def feed(service, voters, twin: Twin, tag: str) -> None:
    """Votes on module keys and intents (one changed, one neutral, one unsafe, one no module
    serves) and audits of both specs when the twin has a draft: the same for every twin."""
    for i, (user, score, extra) in enumerate([
        (voters[0], 1, {"module_key": "answers"}),
        (voters[1], -1, {"reason": "unsafe"}),
        (voters[2], 1, {}),
        (voters[0], 0, {}),
        (voters[1], 1, {"intent_label": "casual"}),
        (voters[2], -1, {"intent_label": "nobody_serves_this", "reason": "incorrect"}),
    ]):
        row = {"twin_id": twin.id, "trace_id": f"{tag}-{i}", "score": score,
               "intent_label": "factual", **extra}
        user.client.table("persona_training_events").insert(row).execute()
    # voters[1] changes its mind on trace 1: the later vote supersedes the unsafe one.
    voters[1].client.table("persona_training_events").insert(
        {"twin_id": twin.id, "trace_id": f"{tag}-1", "score": 1, "intent_label": "factual"}
    ).execute()
    if twin.draft_spec_id:
        traces = [f"{tag}-audit-{i}" for i in range(25)]
        rows = [
            {"twin_id": twin.id, "source": "persona_audit", "trace_id": t, "intent_label":
             "factual", "persona_spec_id": spec, "passed": not (spec == twin.published_spec_id
                                                               and i < 5),
             "reason": "off_persona" if spec == twin.published_spec_id and i < 5 else None}
            for spec in (twin.published_spec_id, twin.draft_spec_id)
            for i, t in enumerate(traces)
        ]
        service.table("persona_training_events").insert(rows, returning="minimal").execute()


def learned(db: psycopg.Connection, twin: Twin) -> bool:
    """Whether the twin's cursor is at its newest event and no run of it is queued or running."""
    return bool(scalar(
        db, "select t.learned_through_event_id >= (select max(e.id) from "
        "public.persona_training_events e where e.twin_id = t.id) and not exists (select 1 from "
        "public.persona_feedback_learning_runs r where r.twin_id = t.id "
        "and r.status in ('queued', 'running')) from public.twins t where t.id = %s", twin.id))


def drain(runner: Runner, db: psycopg.Connection, twins: Sequence[Twin], seconds: float = 60):
    """Steps the runner until every twin is learned (failing after `seconds`)."""
    deadline = time.monotonic() + seconds
    while not all(learned(db, t) for t in twins):
        assert time.monotonic() < deadline, "the twins were not learned in time"
        runner.step()


def runs_of(db: psycopg.Connection, twin: Twin) -> list[dict[str, Any]]:
    cur = db.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "select id::text, status, attempts, events_scanned, events_processed, events_unmatched, "
        "modules_updated, gate_passed, publish_decision, hold_reason, rebuilt_modules, "
        "published_spec_id is not null as published "
        "from public.persona_feedback_learning_runs where twin_id = %s order by created_at",
        (twin.id,)).fetchall()


def module_states(db: psycopg.Connection, twin: Twin) -> list[tuple[Any, ...]]:
    """Each module's key, status and weights; the weights to 1e-5 (the two twins' runs learned
    at times T a few seconds apart: their evidence decayed by a hair more or less)."""
    return [(key, status, pytest.approx(s, rel=1e-5), pytest.approx(f, rel=1e-5))
            for key, status, s, f in db.execute(
                "select module_key, status, success_weight, failure_weight "
                "from public.persona_modules where twin_id = %s order by module_key",
                (twin.id,))]


def spec_states(db: psycopg.Connection, twin: Twin) -> list[str]:
    return [r[0] for r in db.execute(
        "select status::text from public.persona_specs where twin_id = %s order by version",
        (twin.id,))]


FIGURES = ("status", "attempts", "events_scanned", "events_processed", "events_unmatched",
           "modules_updated", "gate_passed", "publish_decision", "hold_reason", "rebuilt_modules",
           "published")


# --------------------------------------------------------------------------- same learning


def test_batched_runs_learn_what_runs_one_at_a_time_learn(db, service, make_user, make_runner):
    owner = make_user("owner")
    voters = [make_user("voter") for _ in range(3)]
    pairs: list[tuple[Twin, Twin]] = []
    for i in range(4):
        draft = DRAFT if i == 0 else None
        pair = tuple(create_twin(db, owner.id, MODULES, draft=draft,
                                 settings={"auto_publish": True}) for _ in range(2))
        for twin in pair:
            feed(service, voters, twin, f"t{i}")
        pairs.append(pair)  # type: ignore[arg-type]

    one = make_runner("one")
    for alone, _ in pairs:
        assert [r.status for r in one.run_once(uuid.UUID(alone.id))] == ["completed"]
    batched = batched_runner(make_runner)
    drain(batched, db, [b for _, b in pairs])

    store = recording(batched)
    batched_ids = {runs_of(db, b)[0]["id"] for _, b in pairs}
    # All four in one claim, one read and one completion.
    assert any(batched_ids <= set(c) for c in store.claims), store.claims
    assert any(batched_ids <= set(r) for r in store.reads)
    assert any(batched_ids <= set(c) for c in store.completions), store.completions
    for alone, twin in pairs:
        [a], [b] = runs_of(db, alone), runs_of(db, twin)
        assert [a[k] for k in FIGURES] == [b[k] for k in FIGURES]
        assert module_states(db, alone) == module_states(db, twin)
        assert spec_states(db, alone) == spec_states(db, twin)
        assert_modules_exact(db, alone.id)
        assert_modules_exact(db, twin.id)
    # The draft passed its gate and was published by the batched completion as by the one.
    assert runs_of(db, pairs[0][1])[0]["published"]
    assert spec_states(db, pairs[0][1]) == ["archived", "published"]


# --------------------------------------------------------------------------- refusals


def test_one_refused_completion_leaves_the_others_completed(db, service, make_user, make_runner):
    owner = make_user("owner")
    voters = [make_user("voter") for _ in range(3)]
    kept, changed, stolen = (create_twin(db, owner.id, MODULES) for _ in range(3))
    for twin, tag in ((kept, "k"), (changed, "c"), (stolen, "s")):
        feed(service, voters, twin, tag)
    runner = batched_runner(make_runner)
    outcomes: dict[str, str] = {}
    runner.observer = lambda outcome, run, seconds: outcomes.setdefault(str(run.id), outcome)
    deleted: list[int] = []

    def interfere(completions: Sequence[tuple[Run, RunDecision]]) -> None:
        by_twin = {str(run.twin_id): run for run, _ in completions}
        # The evidence of one run changes (PT412), another run's lease is lost (PT409).
        deleted.append(scalar(
            db, "delete from public.persona_training_events where id = (select max(id) from "
            "public.persona_training_events where twin_id = %s and source = 'user_feedback' "
            "and superseded_at is null) returning id", changed.id))
        db.execute("update public.persona_feedback_learning_runs set lease_token = "
                   "gen_random_uuid() where id = %s", (str(by_twin[stolen.id].id),))

    recording(runner).before_complete = interfere
    runner.store.enqueue_due_runs()
    runner.step()

    [k], [c], [s] = runs_of(db, kept), runs_of(db, changed), runs_of(db, stolen)
    assert deleted, "the three runs were not completed in one call"
    assert {k["id"], c["id"], s["id"]} <= set(recording(runner).completions[0])
    # The untouched run completed in the batched call.
    assert (outcomes[k["id"]], k["status"], k["events_processed"]) == ("completed", "completed", 7)
    # The changed one read its batch again through the one-run path (its twin rebuilt: an
    # event was deleted) and completed, learning the evidence that is left.
    assert (outcomes[c["id"]], c["status"], c["attempts"], c["rebuilt_modules"]) == (
        "completed", "completed", 1, True)
    assert c["events_processed"] == 6
    assert_modules_exact(db, kept.id)
    assert_modules_exact(db, changed.id)
    # The stolen one: its work was discarded, nothing of it written.
    assert outcomes[s["id"]] == "lease_lost"
    assert (s["status"], s["events_processed"]) == ("running", None)
    assert scalar(db, "select learned_through_event_id from public.twins where id = %s",
                  stolen.id) == scalar(db, "select batch_after_event_id from "
                                       "public.persona_feedback_learning_runs where id = %s",
                                       s["id"])
    # Once that lease expires, a claim takes the run over (same batch) and completes it.
    db.execute("update public.persona_feedback_learning_runs set lease_expires_at = now() "
               "- interval '1 second' where id = %s", (s["id"],))
    drain(runner, db, [stolen])
    [s] = runs_of(db, stolen)
    assert (s["status"], s["attempts"], s["events_processed"]) == ("completed", 2, 7)
    assert_modules_exact(db, stolen.id)


def test_a_twin_to_rebuild_among_batched_runs_is_learned_through_the_one_run_path(
    db, service, make_user, make_runner
):
    owner = make_user("owner")
    voters = [make_user("voter") for _ in range(3)]
    first, second, rebuilt = (create_twin(db, owner.id, MODULES) for _ in range(3))
    feed(service, voters, rebuilt, "r0")
    assert [r.status for r in make_runner("one").run_once(uuid.UUID(rebuilt.id))] == [
        "completed"]
    # A learned vote deleted (its twin now needs its modules rebuilt), and new evidence.
    db.execute("delete from public.persona_training_events where id = (select min(id) from "
               "public.persona_training_events where twin_id = %s)", (rebuilt.id,))
    for twin, tag in ((first, "a"), (second, "b"), (rebuilt, "r1")):
        feed(service, voters, twin, tag)
    runner = batched_runner(make_runner)
    # Queued in this order: the twin to rebuild is claimed last of the three.
    for twin in (first, second, rebuilt):
        runner.store.enqueue_run(uuid.UUID(twin.id), safe_mode=None)
    drain(runner, db, [first, second, rebuilt])

    store = recording(runner)
    ids = [runs_of(db, t)[-1]["id"] for t in (first, second, rebuilt)]
    assert any(set(ids) <= set(c) for c in store.claims), store.claims
    [read] = [r for r in store.reads if ids[2] in r]
    assert read[ids[2]].batch is None  # left to the one-run path
    assert all(isinstance(read[i].batch, RunBatch) for i in ids[:2])
    for twin in (first, second, rebuilt):
        run = runs_of(db, twin)[-1]
        assert (run["status"], run["events_processed"]) == ("completed", 7)
        assert run["rebuilt_modules"] is (twin is rebuilt)
        assert_modules_exact(db, twin.id)


# --------------------------------------------------------------------------- bounds


def run_counts(db: psycopg.Connection) -> tuple[int, ...]:
    row = db.execute(
        "select count(*) filter (where status = 'queued'), count(*) filter (where status = "
        "'running'), count(*) filter (where status = 'completed'), count(*) filter (where "
        "status = 'failed'), coalesce(sum(attempts), 0) from public.persona_feedback_learning_runs"
    ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize("max_runs", [0, -1, 101, 1_000_000, None])
def test_the_batched_claim_refuses_a_bad_number_of_runs(db, service, make_user, max_runs):
    owner = make_user("owner")
    twin = create_twin(db, owner.id, MODULES)
    db.execute("insert into public.persona_feedback_learning_runs (twin_id, trigger) "
               "values (%s, 'manual')", (twin.id,))
    before = run_counts(db)
    with pytest.raises(APIError) as refused:
        service.rpc("claim_learning_runs", {"p_worker_id": "w", "p_lease_seconds": 60,
                                            "p_max_runs": max_runs}).execute()
    assert (refused.value.code, refused.value.message) == ("22023", "p_max_runs must be 1 to 100")
    assert run_counts(db) == before


@pytest.mark.parametrize("function,argument,message", [
    ("read_learning_runs", "p_runs", "p_runs must be a JSON array of 1 to 100 {run_id, "
     "lease_token}"),
    ("complete_learning_runs", "p_completions", "p_completions must be a JSON array of 1 to 100 "
     "{run_id, lease_token, result}"),
])
@pytest.mark.parametrize("value", [None, [], {}, "runs", list(range(101))])
def test_the_batched_read_and_completion_refuse_a_bad_list(
    db, service, function, argument, message, value
):
    before = run_counts(db)
    with pytest.raises(APIError) as refused:
        service.rpc(function, {argument: value}).execute()
    assert (refused.value.code, refused.value.message) == ("22023", message)
    assert run_counts(db) == before


def test_a_batched_completion_with_a_malformed_element_completes_nothing(
    db, service, make_user, make_runner
):
    owner = make_user("owner")
    voters = [make_user("voter") for _ in range(3)]
    twin = create_twin(db, owner.id, MODULES)
    feed(service, voters, twin, "m")
    store = make_runner().store
    store.enqueue_due_runs(uuid.UUID(twin.id))
    run = store.claim_run("w-malformed", 60, uuid.UUID(twin.id))
    assert run is not None
    store.claim_events(run)
    good = {"run_id": str(run.id), "lease_token": str(run.lease_token), "result": {
        "module_updates": [], "gate_passed": True, "gate_report": {"checks": []},
        "hold_reason": "no_draft"}}
    before = run_counts(db)
    with pytest.raises(APIError) as refused:
        service.rpc("complete_learning_runs",
                    {"p_completions": [good, {"run_id": "not-a-uuid", "lease_token": None}]}
                    ).execute()
    assert (refused.value.code, refused.value.message) == (
        "22023", "p_completions[1] needs run_id and lease_token (uuids) and result (an object)")
    assert run_counts(db) == before
    assert runs_of(db, twin)[0]["status"] == "running"
    store.release_run(run)


# --------------------------------------------------------------------------- concurrency


def test_two_workers_claiming_at_once_never_share_a_run(db, service, make_user, make_runner):
    owner = make_user("owner")
    twins = [create_twin(db, owner.id, {"m": "factual"}) for _ in range(24)]
    service.table("persona_training_events").insert(
        [{"twin_id": t.id, "source": "persona_audit", "trace_id": f"c{i}", "intent_label":
          "factual", "passed": True} for t in twins for i in range(2)],
        returning="minimal").execute()
    runners = [batched_runner(make_runner, f"w{i}") for i in range(2)]
    for r in runners:
        r.claim_runs = 4
    runners[0].store.enqueue_due_runs()
    start = threading.Barrier(2)
    claimed: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait(10)
            while runs := runners[i].store.claim_runs(runners[i].worker_id, 60, 4):
                claimed[i].extend(str(r.id) for r in runs)
                runners[i].process_many(runs)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert not set(claimed[0]) & set(claimed[1])
    mine = {runs_of(db, t)[0]["id"] for t in twins}
    assert mine <= set(claimed[0]) | set(claimed[1])
    assert claimed[0] and claimed[1], "each worker claimed some of the runs"
    for twin in twins:
        [run] = runs_of(db, twin)
        assert (run["status"], run["attempts"], run["events_processed"]) == ("completed", 1, 2)


class FailingCompletion(RecordingStore):
    """Fails the complete_learning_runs request that carries `fail_run_id`, as the API would
    after every try."""

    fail_run_id: str | None = None
    error: StoreError = TransientStoreError("complete_learning_runs: ReadTimeout: timed out")

    def _rpc(self, name: str, params: dict[str, object]) -> Any:
        if name == "complete_learning_runs" and any(
            c["run_id"] == self.fail_run_id for c in params["p_completions"]  # type: ignore[attr-defined]
        ):
            self.fail_run_id = None
            raise self.error
        return super()._rpc(name, params)


@pytest.mark.parametrize(
    "error",
    [TransientStoreError("complete_learning_runs: ReadTimeout: timed out"),
     # The request refused as a whole (a statement timeout, a gateway's 413): not the runs'
     # fault, so their attempts fail and the runs wait for another, as for an outage.
     StoreError("canceling statement due to statement timeout", "57014")],
    ids=["transient", "request-refused"],
)
def test_a_failed_completion_request_fails_its_runs_only(
    db, service, make_user, make_runner, monkeypatch, error
):
    owner = make_user("owner")
    voters = [make_user("voter") for _ in range(3)]
    twins = [create_twin(db, owner.id, MODULES) for _ in range(3)]
    for i, twin in enumerate(twins):
        feed(service, voters, twin, f"f{i}")
    monkeypatch.setattr("worker.store.BATCH_BODY_BYTES", 1)  # one run per request
    runner = make_runner("failing", store_class=FailingCompletion)
    runner.claim_runs = 100
    outcomes: dict[str, str] = {}
    runner.observer = lambda outcome, run, seconds: outcomes.setdefault(str(run.id), outcome)
    for twin in twins:
        runner.store.enqueue_run(uuid.UUID(twin.id), safe_mode=None)
    first, failed, third = (runs_of(db, t)[0]["id"] for t in twins)
    store = runner.store
    assert isinstance(store, FailingCompletion)
    store.fail_run_id, store.error = failed, error
    runner.step()

    assert any({first, failed, third} <= set(c) for c in store.completions), store.completions
    assert store.fail_run_id is None  # the request failed
    for run_id, twin in ((first, twins[0]), (third, twins[2])):
        [run] = runs_of(db, twin)
        assert (outcomes[run_id], run["status"], run["events_processed"]) == (
            "completed", "completed", 7)
    # The failed request's run: its attempt failed (retryable), the run waits for another.
    [run] = runs_of(db, twins[1])
    assert (outcomes[failed], run["status"], run["events_processed"]) == (
        "retried", "running", None)
    assert scalar(db, "select error from public.persona_feedback_learning_runs where id = %s",
                  failed) == f"TransientStoreError: {error}"
    drain(runner, db, twins)
    assert runs_of(db, twins[1])[0]["attempts"] == 2
    for twin in twins:
        assert_modules_exact(db, twin.id)
