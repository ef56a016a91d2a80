"""The production watch through the real stack: a run publishes a draft and starts its watch;
later runs look at production evidence (audits and votes written as the audit pipeline and apps
would) and pass, alert, roll back or let the watch expire; owners read it under RLS and roll back
by hand; a rollback racing a publish leaves exactly one published spec; bad settings are
refused by the database.

Times: a watch's windows are set by its published_at. Each test publishes through a real run,
then moves that watch's publish time (and the replaced spec's) into the past as one would find
it days later, and writes the evidence with explicit times inside the windows.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from testkit.env import StackEnv
from tests.conftest import ROOT, Stack, User
from tests.integration.helpers import Twin, create_twin, pfl, psql_file, scalar, worker_env
from tests.integration.test_schema_source import scratch_database
from worker.config import WorkerSettings
from worker.models import WatchEvidence, WatchState
from worker.runner import Runner, decide
from worker.store import Run, RunBatch, Store, StoreError
from worker.watch import decide_watch, obf_alpha_spent

pytestmark = pytest.mark.integration

MODULES = {"evidence_answers": "factual_with_evidence", "small_talk": "casual_chat"}


@pytest.fixture
def runner(stack: Stack) -> Iterator[Runner]:
    settings = WorkerSettings(
        supabase_url=stack.url, supabase_service_role_key=SecretStr(stack.service_key),
        pfl_worker_id="watch-tests",
    )
    made = Runner(Store.connect(settings), settings.pfl_worker_id, 60)
    yield made
    made.store.close()


def audits(
    db: psycopg.Connection, twin: Twin, spec_id: str, passed: int, failed: int, *,
    at: str, prefix: str, module_key: str = "evidence_answers", origin: str | None = None,
    first: int = 1,
) -> None:
    """`passed` + `failed` audits of the spec, on traces <prefix>-<i> (i from `first`, the
    passed ones first), cast at the SQL time `at`, with the audit pipeline's `origin`
    (production or replay; None: left to the database's default, as a pipeline that sends
    none)."""
    db.execute(
        "insert into public.persona_training_events (twin_id, source, trace_id, passed, "
        "intent_label, module_key, persona_spec_id, created_at, audit_origin) "
        "select %s, 'persona_audit', %s || '-' || g, g < %s + %s, 'factual_with_evidence', %s, "
        f"%s, {at}, %s::public.audit_origin from generate_series(%s, %s + %s - 1) g",
        (twin.id, prefix, first, passed, module_key, spec_id, origin, first, first,
         passed + failed),
    )


def votes(
    db: psycopg.Connection, twin: Twin, voter: str, up: int, down: int, *, at: str, prefix: str,
    intent: str = "casual_chat",
) -> None:
    """`up` +1 and `down` -1 votes of one user on traces <prefix>-<i> of the intent `intent`
    (small_talk's unless given)."""
    db.execute(
        "insert into public.persona_training_events (twin_id, trace_id, score, reason, "
        "intent_label, created_by, created_at) "
        "select %s, %s || '-' || g, case when g <= %s then 1 else -1 end, "
        "case when g <= %s then 'helpful' else 'off_persona' end::public.training_event_reason, "
        f"%s, %s, {at} from generate_series(1, %s) g",
        (twin.id, prefix, up, up, intent, voter, up + down),
    )


def published_twin(
    db: psycopg.Connection, runner: Runner, owner: User, modules: dict[str, str] | None = None,
    before_publish: Callable[[Twin], None] | None = None, **settings: object,
) -> tuple[Twin, str, Run]:
    """A twin (of `modules`, MODULES if not given) whose draft (v2) was published over v1 by a
    real run, after `before_publish` (if given) wrote what it writes; the publish and v1's moved
    2 and 30 days into the past. Returns the twin, its watch's id and the publishing run."""
    modules = modules or MODULES
    twin = create_twin(db, owner.id, modules, settings={"auto_publish": True, **settings},
                       draft={"modules": list(modules)})
    # The gate's evidence: 80 traces both specs pass (Tango's bound -0.0458 >= -0.05), audited
    # 10 days ago, outside every window below (replayed for the gate under both).
    assert twin.draft_spec_id is not None
    for spec in (twin.published_spec_id, twin.draft_spec_id):
        audits(db, twin, spec, 80, 0, at="now() - interval '10 days'", prefix="gate",
               origin="replay")
    if before_publish is not None:
        before_publish(twin)
    [run] = runner.run_once(UUID(twin.id))
    assert (run.status, run.publish_decision, str(run.published_spec_id)) == (
        "completed", "published", twin.draft_spec_id)
    watch = db.execute(
        "select w.id::text, w.state::text, w.spec_id::text, w.previous_spec_id::text, "
        "w.published_by_run_id::text, w.published_at = s.published_at "
        "from public.persona_spec_watches w join public.persona_specs s on s.id = w.spec_id "
        "where w.twin_id = %s", (twin.id,),
    ).fetchall()
    assert [w[1:] for w in watch] == [
        ("watching", twin.draft_spec_id, twin.published_spec_id, str(run.id), True)]
    db.execute(
        "update public.persona_spec_watches set published_at = now() - interval '2 days', "
        "previous_published_at = now() - interval '30 days' where id = %s", (watch[0][0],),
    )
    return twin, watch[0][0], run


def next_draft(db: psycopg.Connection, twin: Twin) -> str:
    """A new draft spec of the twin (the next version, v3 after published_twin); its id."""
    return str(scalar(db, "insert into public.persona_specs (twin_id, spec) values (%s, %s) "
                          "returning id::text", twin.id, '{"modules": ["evidence_answers"]}'))


def regress(db: psycopg.Connection, twin: Twin, owner: User) -> None:
    """Production evidence of a regression: before the switch 85% of 200 audits of v1 passed and
    80% of 200 votes were up; since, 60% of 200 audits of v2 and 40% of 200 votes (both kinds
    at 200 a side: the kind with the least evidence holds the watch's clock, look 5 of 10)."""
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.published_spec_id, 170, 30, at="now() - interval '3 days'",
           prefix="before")
    audits(db, twin, twin.draft_spec_id, 120, 80, at="now() - interval '1 day'", prefix="after")
    votes(db, twin, owner.id, 160, 40, at="now() - interval '3 days'", prefix="vote-before")
    votes(db, twin, owner.id, 80, 120, at="now() - interval '1 day'", prefix="vote-after")


def rollback(
    owner: User, twin: Twin, reason: str = "racing", spec_id: str | None = None
) -> httpx.Response:
    """The owner's rollback_persona_spec through PostgREST, as an app sends it (with p_spec_id
    only when `spec_id` is given)."""
    env = StackEnv.load()
    return httpx.post(
        f"{env.rest}/rpc/rollback_persona_spec",
        headers={"apikey": env.anon_key, "Authorization": f"Bearer {owner.token}"},
        json={"p_twin_id": twin.id, "p_reason": reason,
              **({"p_spec_id": spec_id} if spec_id else {})},
        timeout=30,
    )


def spec_rows(db: psycopg.Connection, twin: Twin) -> list[tuple[Any, ...]]:
    return db.execute(
        "select id::text, status::text, rolled_back_at is not null, rollback_reason "
        "from public.persona_specs where twin_id = %s order by version", (twin.id,),
    ).fetchall()


def watch_row(db: psycopg.Connection, watch_id: str) -> dict[str, Any]:
    row = db.execute("select to_jsonb(w) from public.persona_spec_watches w where id = %s",
                     (watch_id,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def published_count(db: psycopg.Connection, twin: Twin) -> int:
    return int(scalar(db, "select count(*) from public.persona_specs where twin_id = %s "
                          "and status = 'published'", twin.id))


def test_auto_mode_rolls_a_regressing_spec_back_in_the_run_that_finds_it(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User], stack: Stack,
) -> None:
    owner, other = make_user("owner"), make_user("other")
    twin, watch_id, publish_run = published_twin(db, runner, owner, watch_mode="auto")
    regress(db, twin, owner)

    [run] = runner.run_once(UUID(twin.id))

    assert (run.status, run.publish_decision, run.hold_reason) == ("completed", "held",
                                                                   "rolled_back")
    assert run.gate_report is not None
    report = run.gate_report["watch"]
    # Both kinds hold 200 a side: look 5 of 10 (400).
    assert (report["state"], report["action"], report["mode"], report["look"]) == (
        "regressed", "roll_back", "auto", 5)
    by_scope = {(c["module_key"], c["kind"]): c for c in report["comparisons"]}
    # Votes and audits apart, never one pass rate: 2 kinds x (twin + 2 modules) comparisons.
    assert report["comparisons_planned"] == 6
    assert {k: c["evidence"] for k, c in by_scope.items()} == {
        (None, "audits"): {"new_n": 200, "new_passed": 120, "old_n": 200, "old_passed": 170},
        (None, "votes"): {"new_n": 200, "new_passed": 80, "old_n": 200, "old_passed": 160},
        ("evidence_answers", "audits"): {
            "new_n": 200, "new_passed": 120, "old_n": 200, "old_passed": 170},
        ("small_talk", "votes"): {
            "new_n": 200, "new_passed": 80, "old_n": 200, "old_passed": 160},
    }
    twin_wide = by_scope[(None, "audits")]
    assert twin_wide["verdict"] == "regressed" and twin_wide["value"] < twin_wide["threshold"]
    assert twin_wide["threshold"] == -0.02 and twin_wide["method"] == "newcombe_hybrid_score"

    # v1 published again, v2 archived with the reason and time; exactly one published.
    assert spec_rows(db, twin) == [
        (twin.published_spec_id, "published", False, None),
        (twin.draft_spec_id, "archived", True,
         f"production watch: regression found by run {run.id}"),
    ]
    stored = watch_row(db, watch_id)
    assert (stored["state"], stored["last_run_id"], stored["looks_done"]) == (
        "rolled_back", str(run.id), 5)
    assert stored["concluded_at"] is not None and stored["last_report"] == report
    # History: the publish, then the rollback, in time order.
    times = db.execute(
        "select s1.published_at < s2.published_at, s2.published_at < s2.rolled_back_at, "
        "s2.rolled_back_at <= s1.published_at from public.persona_specs s1, "
        "public.persona_specs s2 where s1.id = %s and s2.id = %s",
        (twin.published_spec_id, twin.draft_spec_id),
    ).fetchone()
    assert times == (False, True, True)  # v1 is published again, after v2's rollback
    assert [r.id for r in runner.store.list_runs(UUID(twin.id))] == [run.id, publish_run.id]

    # The owner reads the finding through PostgREST; another user sees nothing.
    seen: list[dict[str, Any]] = owner.client.table("persona_spec_watches").select(
        "state,last_report").eq("twin_id", twin.id).execute().data  # type: ignore[assignment]
    assert [(w["state"], w["last_report"]["action"]) for w in seen] == [
        ("rolled_back", "roll_back")]
    assert other.client.table("persona_spec_watches").select("id").eq(
        "twin_id", twin.id).execute().data == []

    # `pfl runs` shows the outcome.
    shown = subprocess.run(pfl("runs", "--twin", twin.id), env=worker_env(StackEnv.load()),
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "rolled back" in shown and "watch of v2: regressed at look 5/10, rolled back" in shown
    assert "twin-wide audits 120/200 passed since the publish vs 170/200 before" in shown

    # v2 was rolled back: a plain rollback of v1 has no earlier spec to go to that was not
    # itself rolled back (v1 is not "the only spec published": v2 was), and changes nothing.
    again = rollback(owner, twin, "v1 too")
    assert (again.status_code, again.json()["message"]) == (409, (
        f"twin {twin.id}: no spec was published before version 1 that was not itself rolled "
        "back; there is nothing to roll back to")), again.text
    assert published_count(db, twin) == 1 and spec_rows(db, twin)[0][1] == "published"


def test_alert_mode_records_the_regression_and_changes_no_spec(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner)  # watch_mode alert: the default
    regress(db, twin, owner)

    [run] = runner.run_once(UUID(twin.id))

    assert (run.status, run.hold_reason) == ("completed", "no_draft")
    assert run.gate_report is not None
    assert (run.gate_report["watch"]["state"], run.gate_report["watch"]["action"]) == (
        "regressed", "alert")
    assert spec_rows(db, twin) == [
        (twin.published_spec_id, "archived", False, None),
        (twin.draft_spec_id, "published", False, None),
    ]
    assert watch_row(db, watch_id)["state"] == "regressed"
    # A concluded watch is not looked at again.
    votes(db, twin, owner.id, 1, 0, at="now()", prefix="late")
    [later] = runner.run_once(UUID(twin.id))
    assert later.gate_report is not None and later.gate_report["watch"] is None
    # The owner acts on the alert: v1 is live again and the watch says why.
    response = rollback(owner, twin, "acting on the watch's alert")
    assert response.status_code == 200, response.text
    assert spec_rows(db, twin) == [
        (twin.published_spec_id, "published", False, None),
        (twin.draft_spec_id, "archived", True, "owner: acting on the watch's alert"),
    ]
    stored = watch_row(db, watch_id)
    assert (stored["state"], stored["last_run_id"]) == ("rolled_back", response.json()["id"])


def test_run_once_names_the_watched_specs_by_version(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # `pfl run-once` says what the run's watch found as `pfl runs` does: v2 and v1, not ids.
    owner = make_user("owner")
    twin, _, _ = published_twin(db, runner, owner)  # alert
    regress(db, twin, owner)
    done = subprocess.run(pfl("run-once", "--twin", twin.id), env=worker_env(StackEnv.load()),
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "  watch of v2: regressed at look 5/10, alert only" in done, done


def test_no_regression_passes_the_watch(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.published_spec_id, 340, 60, at="now() - interval '3 days'",
           prefix="before")
    audits(db, twin, twin.draft_spec_id, 336, 64, at="now() - interval '1 day'", prefix="after")

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None
    report = run.gate_report["watch"]
    assert (report["state"], report["action"], report["look"]) == ("passed", "none", 10)
    # The audits' plan spent all of its alpha; the votes, not in play, none of theirs: half of
    # watch_alpha in all (each kind's comparisons hold half of the planned ones).
    assert report["alpha_spent"] == pytest.approx(0.025)
    assert {c["kind"]: c["alpha_spent"] for c in report["clocks"]} == {
        "audits": pytest.approx(0.05), "votes": 0.0}
    assert watch_row(db, watch_id)["state"] == "passed"
    assert spec_rows(db, twin)[1] == (twin.draft_spec_id, "published", False, None)


def test_plentiful_audits_that_hold_do_not_pass_a_watch_whose_votes_dropped(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The review's case: 400 production audits a side holding at 90%, and 40 votes a side
    # dropping from 80% to 55%. With the most evidence on the clock the audits reached the last
    # look and the watch ended passed, the votes' drop tested at look 10's level on 40 votes
    # and never looked at again. The votes hold the clock now: look 1, still watching.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.published_spec_id, 360, 40, at="now() - interval '3 days'",
           prefix="before")
    audits(db, twin, twin.draft_spec_id, 360, 40, at="now() - interval '1 day'", prefix="after")
    votes(db, twin, owner.id, 32, 8, at="now() - interval '3 days'", prefix="vote-before")
    votes(db, twin, owner.id, 22, 18, at="now() - interval '1 day'", prefix="vote-after")

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None
    report = run.gate_report["watch"]
    assert (report["state"], report["action"], report["look"], report["information"]) == (
        "watching", "none", 1, 0.1)
    stored = watch_row(db, watch_id)
    assert (stored["state"], stored["looks_done"]) == ("watching", 1)
    assert spec_rows(db, twin)[1] == (twin.draft_spec_id, "published", False, None)


def changed_mid_watch(
    db: psycopg.Connection, runner: Runner, owner: User, *, spent: float, looks_done: int,
    setting: str, value: float, before: tuple[int, int], after: tuple[int, int],
) -> tuple[Twin, str, dict[str, Any]]:
    """A published twin (watch_mode auto) whose watch had spent `spent` by look `looks_done`
    (the shared columns, as a watch from before the kinds' own clocks) when the owner set
    `setting` to `value`; then production audits (passed, failed) of the replaced spec
    (`before`) and of the live one (`after`), and a run. Returns the twin, the watch's id and
    the run's watch report."""
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    assert twin.draft_spec_id is not None
    db.execute("update public.persona_spec_watches set alpha_spent = %s, looks_done = %s "
               "where id = %s", (spent, looks_done, watch_id))
    db.execute(sql.SQL("update public.persona_learning_settings set {} = %s where twin_id = %s")
               .format(sql.Identifier(setting)), (value, twin.id))
    audits(db, twin, twin.published_spec_id, *before, at="now() - interval '3 days'",
           prefix="before")
    audits(db, twin, twin.draft_spec_id, *after, at="now() - interval '1 day'", prefix="after")
    [run] = runner.run_once(UUID(twin.id))
    assert run.gate_report is not None
    return twin, watch_id, run.gate_report["watch"]


def test_a_look_with_no_alpha_left_after_the_owner_lowered_it_tests_nothing(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The review's case: the watch spent 0.04 by look 9 of 10, then the owner lowered
    # watch_alpha to 0.01. Look 10 has nothing left to spend, so it is not due: nothing is
    # tested, its comparisons are not_tested (they read no_regression at an upper bound of 1
    # before), and the watch is not passed.
    twin, watch_id, report = changed_mid_watch(
        db, runner, make_user("owner"), spent=0.04, looks_done=9, setting="watch_alpha",
        value=0.01, before=(380, 20), after=(200, 200))
    assert (report["state"], report["action"], report["look"], report["tested"]) == (
        "watching", "none", 10, False)
    assert (report["alpha_per_comparison"], report["z"], report["alpha_spent"]) == (
        None, None, 0.04)
    twin_wide = {c["kind"]: c for c in report["comparisons"] if c["scope"] == "twin"}
    assert (twin_wide["audits"]["verdict"], twin_wide["audits"]["value"]) == ("not_tested", None)
    assert watch_row(db, watch_id)["state"] == "watching"
    assert spec_rows(db, twin)[1] == (twin.draft_spec_id, "published", False, None)


def test_a_plan_cut_to_fewer_looks_than_were_done_still_tests_and_passes(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The watch reached look 4 of 5 (α(0.8) spent), then the owner lowered watch_looks to 3.
    # A look is due when the plan allows more than was spent: at 400 audits a side its look 3
    # (α(1)) tests, finds no regression and passes the watch, at look 3 of 3 (before: no look
    # past 4 was ever due, the watch could only expire, and it read look 4 of 3).
    spent = obf_alpha_spent(0.8, 0.05)
    _, watch_id, report = changed_mid_watch(
        db, runner, make_user("owner"), spent=spent, looks_done=4, setting="watch_looks",
        value=3, before=(340, 60), after=(336, 64))
    assert (report["state"], report["look"], report["looks_planned"], report["tested"]) == (
        "passed", 3, 3, True)
    clocks = {c["kind"]: c for c in report["clocks"]}
    assert (clocks["audits"]["look"], clocks["audits"]["passed"]) == (3, True)
    assert clocks["audits"]["alpha_per_comparison"] == pytest.approx(
        (0.05 - spent) / report["comparisons_planned"])
    stored = watch_row(db, watch_id)
    assert (stored["state"], stored["looks_done"]) == ("passed", 3)


def test_the_gates_paired_audits_and_the_other_kind_make_no_false_regression(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The review's case: nothing changed in production (votes 60% up before and after the
    # switch, production audits 90% of both specs), and the gate's paired audits of both specs
    # (190/200 each, the same traces, replayed: the pipeline says so for the published spec's,
    # and a draft's are replays by definition) were made an hour before the publish, inside the
    # old side's window. Counted on the old side only and pooled with the votes, they read
    # 370/500 against 180/300 and rolled back (auto); now they count on neither side, and each
    # kind is compared with itself.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    assert twin.draft_spec_id is not None
    for spec in (twin.published_spec_id, twin.draft_spec_id):
        audits(db, twin, spec, 190, 10, at="now() - interval '2 days 1 hour'", prefix="pair",
               origin="replay")
    audits(db, twin, twin.published_spec_id, 45, 5, at="now() - interval '3 days'",
           prefix="prod-before")
    audits(db, twin, twin.draft_spec_id, 45, 5, at="now() - interval '1 day'", prefix="prod-after")
    votes(db, twin, owner.id, 180, 120, at="now() - interval '3 days'", prefix="vote-before")
    votes(db, twin, owner.id, 180, 120, at="now() - interval '1 day'", prefix="vote-after")

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None and run.hold_reason != "rolled_back"
    report = run.gate_report["watch"]
    # The kind with the least compared evidence, the production audits (50 a side), holds the
    # clock: look 1 of 10 (300 votes a side alone would be look 7).
    assert (report["state"], report["action"], report["look"]) == ("watching", "none", 1)
    twin_wide = {c["kind"]: c for c in report["comparisons"] if c["scope"] == "twin"}
    assert twin_wide["votes"]["evidence"] == {
        "new_n": 300, "new_passed": 180, "old_n": 300, "old_passed": 180}
    assert twin_wide["votes"]["verdict"] == "no_regression"
    # Only the unpaired (production) audits: 45/50 a side.
    assert twin_wide["audits"]["evidence"] == {
        "new_n": 50, "new_passed": 45, "old_n": 50, "old_passed": 45}
    assert twin_wide["audits"]["verdict"] == "no_regression"
    assert watch_row(db, watch_id)["state"] == "watching"
    assert spec_rows(db, twin)[1] == (twin.draft_spec_id, "published", False, None)


def test_the_next_drafts_gate_audits_make_no_false_regression(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The second review's case: v2 was published over v1 two days ago (auto). Production is
    # unchanged: audits 180/200 of each spec, votes 180/300 before and after. An hour ago the
    # next draft, v3, was gated against v2 on a hard set of 300 traces (both 60%: v3 as good as
    # v2), replayed under both (the pipeline marks v2's replays; v3's, a draft's, are replays
    # by definition). Counted on the new side they read 360/500 against 180/200 and rolled v2
    # back; a replay counts on neither side.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.published_spec_id, 180, 20, at="now() - interval '3 days'",
           prefix="prod-before")
    audits(db, twin, twin.draft_spec_id, 180, 20, at="now() - interval '1 day'",
           prefix="prod-after")
    votes(db, twin, owner.id, 180, 120, at="now() - interval '3 days'", prefix="vote-before")
    votes(db, twin, owner.id, 180, 120, at="now() - interval '1 day'", prefix="vote-after")
    v3 = next_draft(db, twin)
    for spec in (twin.draft_spec_id, v3):
        audits(db, twin, spec, 180, 120, at="now() - interval '1 hour'", prefix="hard-set",
               origin="replay" if spec == twin.draft_spec_id else None)
    # The owner publishes v3 by hand, later: this run judges the watch alone.
    db.execute("update public.persona_learning_settings set auto_publish = false "
               "where twin_id = %s", (twin.id,))

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None and run.hold_reason != "rolled_back"
    report = run.gate_report["watch"]
    assert (report["state"], report["action"]) == ("watching", "none")
    twin_wide = {c["kind"]: c for c in report["comparisons"] if c["scope"] == "twin"}
    assert twin_wide["audits"]["evidence"] == {
        "new_n": 200, "new_passed": 180, "old_n": 200, "old_passed": 180}
    assert {c["verdict"] for c in report["comparisons"]} == {"no_regression"}
    assert watch_row(db, watch_id)["state"] == "watching"
    assert spec_rows(db, twin) == [
        (twin.published_spec_id, "archived", False, None),
        (twin.draft_spec_id, "published", False, None),
        (v3, "draft", False, None),
    ]
    # The owner deletes draft v3: its audits lose their spec (on delete set null); v2's replays
    # stay replays.
    db.execute("delete from public.persona_specs where id = %s", (v3,))
    votes(db, twin, owner.id, 1, 0, at="now()", prefix="late")
    [later] = runner.run_once(UUID(twin.id))
    assert later.gate_report is not None
    audits_now = [c for c in later.gate_report["watch"]["comparisons"]
                  if (c["scope"], c["kind"]) == ("twin", "audits")]
    assert [c["evidence"] for c in audits_now] == [
        {"new_n": 200, "new_passed": 180, "old_n": 200, "old_passed": 180}]
    assert later.hold_reason != "rolled_back" and watch_row(db, watch_id)["state"] == "watching"


def gated_next_draft(db: psycopg.Connection, twin: Twin, drop: bool) -> str:
    """After published_twin: 30 production audits a side of v1 (before the switch) and v2
    (since), 27 of 30 passing before and 9 (`drop`) or 27 since: compared, but short of the
    plan's first look (40 a side), so no run tests them. Then v3, a draft that passes its gate
    against v2 (80 paired replays, all agreeing). Returns v3's id."""
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.published_spec_id, 27, 3, at="now() - interval '3 days'",
           prefix="prod-before")
    audits(db, twin, twin.draft_spec_id, 9 if drop else 27, 21 if drop else 3,
           at="now() - interval '1 day'", prefix="prod-after")
    v3 = next_draft(db, twin)
    for spec in (twin.draft_spec_id, v3):
        audits(db, twin, spec, 80, 0, at="now() - interval '1 hour'", prefix="gate-v3",
               origin="replay" if spec == twin.draft_spec_id else None)
    return v3


def test_a_publish_makes_the_running_watchs_final_test_first(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # A fresh review's case: the next publish ended a running watch `superseded`, untested, and
    # the spec that had dropped became the next one's baseline (a weekly shipper at about 12
    # votes a day a side: a drop from 80% to 50% caught before the next publish in 29 of 200
    # watches). The publishing run now makes the watch's final test first, spending what is
    # left: here it regresses, and with watch_mode auto the run rolls v2 back and holds v3.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    v3 = gated_next_draft(db, twin, drop=True)

    [run] = runner.run_once(UUID(twin.id))

    assert (run.status, run.publish_decision, run.hold_reason) == ("completed", "held",
                                                                   "rolled_back")
    assert run.gate_report is not None
    report = run.gate_report["watch"]
    assert (report["state"], report["action"], report["final"], report["superseding"]) == (
        "regressed", "roll_back", True, True)
    assert report["look"] == 0  # short of the first look: only the final test could see it
    assert spec_rows(db, twin) == [
        (twin.published_spec_id, "published", False, None),
        (twin.draft_spec_id, "archived", True,
         f"production watch: regression found by run {run.id}"),
        (v3, "draft", False, None),
    ]
    assert watch_row(db, watch_id)["state"] == "rolled_back"
    assert scalar(db, "select count(*) from public.persona_spec_watches where twin_id = %s",
                  twin.id) == 1
    shown = subprocess.run(pfl("runs", "--twin", twin.id), env=worker_env(StackEnv.load()),
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert ("watch of v2: regressed at look 0/10 (its final test, as the next spec passed its "
            "gate), rolled back to v1") in shown, shown


def test_in_alert_mode_a_publish_records_the_final_tests_regression_and_publishes(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The same with watch_mode alert: the finding is recorded on v2's watch (regressed, not
    # superseded) and the owner's next spec goes live, watched against v2.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner)
    v3 = gated_next_draft(db, twin, drop=True)

    [run] = runner.run_once(UUID(twin.id))

    assert (run.publish_decision, str(run.published_spec_id)) == ("published", v3)
    assert run.gate_report is not None
    report = run.gate_report["watch"]
    assert (report["state"], report["action"], report["superseding"]) == (
        "regressed", "alert", True)
    assert watch_row(db, watch_id)["state"] == "regressed"
    assert [r[1] for r in spec_rows(db, twin)] == ["archived", "archived", "published"]
    assert db.execute("select state::text, previous_spec_id::text from "
                      "public.persona_spec_watches where twin_id = %s and spec_id = %s",
                      (twin.id, v3)).fetchall() == [("watching", twin.draft_spec_id)]


def test_a_publish_over_a_watch_with_no_regression_ends_it_superseded_after_its_test(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    v3 = gated_next_draft(db, twin, drop=False)

    [run] = runner.run_once(UUID(twin.id))

    assert (run.publish_decision, str(run.published_spec_id)) == ("published", v3)
    stored = watch_row(db, watch_id)
    assert (stored["state"], stored["last_run_id"]) == ("superseded", str(run.id))
    report = stored["last_report"]
    assert (report["state"], report["final"], report["superseding"]) == (
        "superseded", True, True)
    twin_audits = [c for c in report["comparisons"]
                   if (c["scope"], c["kind"]) == ("twin", "audits")]
    assert [c["verdict"] for c in twin_audits] == ["no_regression"]
    # All that was left spent: the audits' comparisons spent their half of watch_alpha.
    assert {c["kind"]: c["alpha_spent"] for c in report["clocks"]}["audits"] == \
        pytest.approx(0.05)


def test_a_watch_ends_superseded_only_in_a_run_that_publishes(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The database takes `superseded` from a run's report only with a publish: a worker that
    # sent it otherwise is refused with a clear error, and nothing changes.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner)
    audits(db, twin, twin.published_spec_id, 27, 3, at="now() - interval '3 days'", prefix="b")
    store = runner.store
    store.enqueue_run(UUID(twin.id), safe_mode=True)
    run = store.claim_run("watch-tests", 60, UUID(twin.id))
    assert run is not None
    batch = store.claim_events(run)
    watch = store.claim_watch(run)
    assert isinstance(batch, RunBatch) and watch is not None
    decision = decide(batch, safe_mode=True, watch=watch)
    assert decision.watch is not None and decision.publish_spec_id is None
    forged = decision.model_copy(update={
        "watch": decision.watch.model_copy(update={"state": WatchState.superseded})})
    before = watch_row(db, watch_id)
    with pytest.raises(StoreError, match="a watch ends superseded only in a run that publishes"):
        store.complete_run(run, forged)
    assert watch_row(db, watch_id) == before
    assert scalar(db, "select status::text from public.persona_feedback_learning_runs "
                      "where id = %s", str(run.id)) == "running"
    store.release_run(run)


def test_a_publish_that_leaves_the_running_watch_watching_is_refused(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # A worker that publishes without the watch's final test (one built before it, say): the
    # database refuses the publish, and nothing changes; the run's next attempt concludes it.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    v3 = gated_next_draft(db, twin, drop=True)
    store = runner.store
    store.enqueue_run(UUID(twin.id), safe_mode=False)
    run = store.claim_run("watch-tests", 60, UUID(twin.id))
    assert run is not None
    batch, watch = store.claim_events(run), store.claim_watch(run)
    assert isinstance(batch, RunBatch) and watch is not None
    decision = decide(batch, safe_mode=False, watch=watch)
    assert decision.publish_spec_id is None  # the final test regressed: held, rolled back
    untested = decide(batch, safe_mode=False, watch=None).model_copy(
        update={"watch": decide_watch(watch)})
    assert untested.publish_spec_id is not None and untested.watch is not None
    assert untested.watch.state is WatchState.watching
    before = (spec_rows(db, twin), watch_row(db, watch_id))
    with pytest.raises(StoreError, match=f"leaves watch {watch_id} watching: a publish makes "
                                         "the running watch's final test first"):
        store.complete_run(run, untested)
    assert (spec_rows(db, twin), watch_row(db, watch_id)) == before
    assert spec_rows(db, twin)[2] == (v3, "draft", False, None)
    store.release_run(run)


def test_a_watch_turned_on_mid_run_is_tested_before_the_publish(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The run read no watch (watch_mode off); the owner turned it to auto before the run
    # completed its publish. The completion refuses (PT412), the run reads again, and the
    # watch's final test rolls v2 back instead of v3 going live over it untested.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    v3 = gated_next_draft(db, twin, drop=True)
    db.execute("update public.persona_learning_settings set watch_mode = 'off' "
               "where twin_id = %s", (twin.id,))
    reads = flip_watch_mode_after_the_first_claim(db, runner, twin, "auto")

    [run] = runner.run_once(UUID(twin.id))

    assert reads[0] is None and reads[1] is not None
    assert (run.status, run.attempts, run.hold_reason) == ("completed", 1, "rolled_back")
    assert watch_row(db, watch_id)["state"] == "rolled_back"
    assert spec_rows(db, twin)[2] == (v3, "draft", False, None)


def audit_check(run: Run) -> dict[str, Any]:
    """The gate's audit_non_inferiority check in the run's report."""
    assert run.gate_report is not None
    [check] = [c for c in run.gate_report["checks"] if c["name"] == "audit_non_inferiority"]
    return check  # type: ignore[no-any-return]


def test_production_failures_re_audited_for_a_gate_stay_production_evidence(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The third review's false rollback: production is the same on both sides (audits 80% of
    # v1 before the switch and of v2 since). Before publishing v2 the owner gated it on v1's
    # 40 failed production traces (v2 fixes 36 of them; the gate pairs them with v1's
    # production audits of those traces). The watch took every audit of a trace also audited
    # under another spec for a replay: v1's 40 failures left the old side, which read 160/160
    # against 160/200 and v2 was rolled back. The pipeline records each audit's origin now; a
    # production audit stays one whatever is audited later on its trace.
    owner = make_user("owner")

    def gate_v2_on_v1s_failures(twin: Twin) -> None:
        assert twin.draft_spec_id is not None
        audits(db, twin, twin.published_spec_id, 160, 40, at="now() - interval '3 days'",
               prefix="prod-v1")  # production: the pipeline sends no origin
        audits(db, twin, twin.draft_spec_id, 36, 4, at="now() - interval '2 days 6 hours'",
               prefix="prod-v1", first=161)  # a draft's audits: replays by definition

    twin, watch_id, publish_run = published_twin(db, runner, owner, watch_mode="auto",
                                                 before_publish=gate_v2_on_v1s_failures)
    # The gate paired v2's re-audits with v1's production audits of those traces: 80 traces
    # both pass, and 36 v2 fixed.
    assert audit_check(publish_run)["evidence"] == {"n": 120, "b": 36, "c": 0}
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.draft_spec_id, 160, 40, at="now() - interval '1 day'", prefix="prod-v2")

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None and run.hold_reason != "rolled_back"
    report = run.gate_report["watch"]
    assert (report["state"], report["action"], report["look"]) == ("watching", "none", 5)
    audits_ = {c["module_key"]: c for c in report["comparisons"] if c["kind"] == "audits"}
    for key in (None, "evidence_answers"):
        assert audits_[key]["evidence"] == {
            "new_n": 200, "new_passed": 160, "old_n": 200, "old_passed": 160}
        assert audits_[key]["verdict"] == "no_regression"
    assert watch_row(db, watch_id)["state"] == "watching"
    assert spec_rows(db, twin)[1] == (twin.draft_spec_id, "published", False, None)


def test_a_drop_is_found_when_the_next_draft_is_gated_on_the_live_specs_failures(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The third review's missed regression: production audits fell 30 points with v2 (90% of
    # v1 before the switch, 60% of v2 since). An hour ago the owner gated the next draft, v3,
    # on v2's 80 failed production traces, replayed under v2 (the pipeline marks them replay)
    # and audited under v3. The inference took v2's 80 failures for replays: the new side read
    # 120/120 against 180/200 and the drop was hidden. Now they stay v2's production (120/200),
    # the replays count on neither side, and the drop rolls v2 back; the gate paired v3's
    # audits with v2's replays (the latest audit of each trace).
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.published_spec_id, 180, 20, at="now() - interval '3 days'",
           prefix="prod-v1")
    audits(db, twin, twin.draft_spec_id, 120, 80, at="now() - interval '1 day'", prefix="prod-v2")
    v3 = next_draft(db, twin)
    # Traces 121-200 failed in production. Replayed, v2 passes 20 of them (121-140); v3 passes
    # 70 (121-190).
    audits(db, twin, twin.draft_spec_id, 20, 60, at="now() - interval '1 hour'",
           prefix="prod-v2", first=121, origin="replay")
    audits(db, twin, v3, 70, 10, at="now() - interval '1 hour'", prefix="prod-v2", first=121)

    [run] = runner.run_once(UUID(twin.id))

    # The gate judged v3 against v2's replays: 50 traces only v3 passes (141-190), none only
    # v2 (paired with v2's production failures it would have been 70).
    assert audit_check(run)["evidence"] == {"n": 80, "b": 50, "c": 0}
    assert run.gate_report is not None and run.hold_reason == "rolled_back"
    report = run.gate_report["watch"]
    assert (report["state"], report["action"]) == ("regressed", "roll_back")
    [audits_wide] = [c for c in report["comparisons"]
                     if (c["scope"], c["kind"]) == ("twin", "audits")]
    assert audits_wide["evidence"] == {
        "new_n": 200, "new_passed": 120, "old_n": 200, "old_passed": 180}
    assert audits_wide["verdict"] == "regressed"
    assert watch_row(db, watch_id)["state"] == "rolled_back"
    assert spec_rows(db, twin) == [
        (twin.published_spec_id, "published", False, None),
        (twin.draft_spec_id, "archived", True,
         f"production watch: regression found by run {run.id}"),
        (v3, "draft", False, None),
    ]


def test_a_change_in_module_mix_alone_rolls_nothing_back(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # small_talk 90% up before and after, evidence_answers 50% before and after; only the
    # traffic moves (320 of 400 votes on small_talk before, 200 of 400 after). Pooled, the twin
    # read 280/400 against 328/400 and rolled back while both modules held; by module,
    # standardised to the old side's mix, nothing changed.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    for intent, before, after in (("casual_chat", (288, 32), (180, 20)),
                                  ("factual_with_evidence", (40, 40), (100, 100))):
        votes(db, twin, owner.id, *before, at="now() - interval '3 days'",
              prefix=f"before-{intent}", intent=intent)
        votes(db, twin, owner.id, *after, at="now() - interval '1 day'",
              prefix=f"after-{intent}", intent=intent)

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None and run.hold_reason != "rolled_back"
    report = run.gate_report["watch"]
    assert (report["state"], report["action"], report["look"]) == ("passed", "none", 10)
    votes_ = {c["module_key"]: c for c in report["comparisons"] if c["kind"] == "votes"}
    assert votes_[None]["evidence"] == {
        "new_n": 400, "new_passed": 280, "old_n": 400, "old_passed": 328}
    assert votes_[None]["difference"] == pytest.approx(0.0, abs=1e-12)
    assert votes_[None]["method"] == "newcombe_standardized_kish_and_mover"
    assert {k: c["verdict"] for k, c in votes_.items()} == {
        None: "no_regression", "evidence_answers": "no_regression",
        "small_talk": "no_regression"}
    assert spec_rows(db, twin)[1] == (twin.draft_spec_id, "published", False, None)


def test_an_early_look_at_a_small_alpha_over_many_modules_completes(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # 5 modules, watch_alpha 0.01, 10 looks, 40 votes a side: look 1 spends about 4e-16, split
    # over 12 comparisons; 1 - share rounded to 1.0 and every run of the twin failed.
    owner = make_user("owner")
    modules = MODULES | {f"extra_{i}": f"intent_{i}" for i in range(3)}
    twin, watch_id, _ = published_twin(db, runner, owner, modules, watch_alpha=0.01)
    votes(db, twin, owner.id, 32, 8, at="now() - interval '3 days'", prefix="vote-before")
    votes(db, twin, owner.id, 32, 8, at="now() - interval '1 day'", prefix="vote-after")

    [run] = runner.run_once(UUID(twin.id))

    assert (run.status, run.attempts) == ("completed", 1), run.error
    assert run.gate_report is not None
    report = run.gate_report["watch"]
    assert (report["state"], report["look"], report["tested"], report["comparisons_planned"]) == (
        "watching", 1, True, 12)
    assert 0 < report["alpha_per_comparison"] < 1e-16 and report["z"] > 8
    assert watch_row(db, watch_id)["looks_done"] == 1


def test_a_15_point_drop_in_votes_alone_rolls_back(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # No audits in production at all; votes 80% up before the switch and 65% since, 400 a side.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    votes(db, twin, owner.id, 320, 80, at="now() - interval '3 days'", prefix="vote-before")
    votes(db, twin, owner.id, 260, 140, at="now() - interval '1 day'", prefix="vote-after")

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None and run.hold_reason == "rolled_back"
    report = run.gate_report["watch"]
    assert (report["state"], report["action"], report["look"]) == ("regressed", "roll_back", 10)
    [votes_wide] = [c for c in report["comparisons"]
                    if (c["scope"], c["kind"]) == ("twin", "votes")]
    assert votes_wide["verdict"] == "regressed"
    assert watch_row(db, watch_id)["state"] == "rolled_back"
    assert spec_rows(db, twin)[0] == (twin.published_spec_id, "published", False, None)


def test_a_watch_without_enough_evidence_expires(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto",
                                       watch_expire_days=1.5)
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.draft_spec_id, 5, 15, at="now() - interval '1 day'", prefix="after")

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None
    assert run.gate_report["watch"]["state"] == "expired"
    assert {c["verdict"] for c in run.gate_report["watch"]["comparisons"]} == {
        "insufficient_evidence"}
    assert watch_row(db, watch_id)["state"] == "expired"
    assert published_count(db, twin) == 1


def test_an_expired_watch_spends_what_is_left_on_a_final_test(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # A quiet twin: 50 production audits a side by expiry (look 1 of 10, which spent almost
    # nothing: 1e-9), 90% of v1 before the switch and 60% of v2 since. The watch expired
    # without a real test; its final test now spends the alpha left and the drop rolls back.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto",
                                       watch_expire_days=1.5)
    assert twin.draft_spec_id is not None
    audits(db, twin, twin.published_spec_id, 45, 5, at="now() - interval '3 days'",
           prefix="before")
    audits(db, twin, twin.draft_spec_id, 30, 20, at="now() - interval '1 day'", prefix="after")

    [run] = runner.run_once(UUID(twin.id))

    assert run.gate_report is not None and run.hold_reason == "rolled_back"
    report = run.gate_report["watch"]
    assert (report["state"], report["action"], report["final"], report["look"]) == (
        "regressed", "roll_back", True, 1)
    assert report["alpha_spent"] == pytest.approx(0.05)
    assert watch_row(db, watch_id)["state"] == "rolled_back"
    assert spec_rows(db, twin)[0] == (twin.published_spec_id, "published", False, None)


def test_the_scheduler_concludes_a_watch_past_its_time_without_new_evidence(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_expire_days=1.5)

    runs = runner.run_once(UUID(twin.id))  # no run requested: the scheduler queues it

    assert [(r.trigger, r.events_scanned) for r in runs] == [("schedule", 0)]
    assert runs[0].gate_report is not None
    assert runs[0].gate_report["watch"]["state"] == "expired"
    assert watch_row(db, watch_id)["state"] == "expired"
    # Concluded: nothing is due any more.
    assert runner.run_once(UUID(twin.id)) == []


def test_watch_mode_off_starts_no_watch(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    owner = make_user("owner")
    twin = create_twin(db, owner.id, MODULES, settings={"auto_publish": True,
                                                        "watch_mode": "off"},
                       draft={"modules": list(MODULES)})
    assert twin.draft_spec_id is not None
    for spec in (twin.published_spec_id, twin.draft_spec_id):
        audits(db, twin, spec, 80, 0, at="now() - interval '10 days'", prefix="gate")
    [run] = runner.run_once(UUID(twin.id))
    assert run.publish_decision == "published"
    assert scalar(db, "select count(*) from public.persona_spec_watches where twin_id = %s",
                  twin.id) == 0


# --- bad settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "constraint"),
    [
        ({"watch_margin": 1.5}, "watch_margin_0_02_to_1"),
        ({"watch_margin": -0.01}, "watch_margin_0_02_to_1"),
        # At margin 0, or under 30 a side, a test calls false regressions more often than its
        # share of watch_alpha (README, "When the bound holds").
        ({"watch_margin": 0}, "watch_margin_0_02_to_1"),
        ({"watch_margin": 0.0199}, "watch_margin_0_02_to_1"),
        ({"watch_min_evidence": 29}, "watch_min_evidence_30_to_50000"),
        ({"watch_min_evidence": 1, "watch_pass_evidence": 2}, "watch_min_evidence_30_to_50000"),
        ({"watch_pass_evidence": 29}, "watch_pass_evidence_30_to_50000"),
        ({"watch_alpha": 0}, "watch_alpha_1e_10_to_0_5"),
        ({"watch_expire_days": -1}, "watch_expire_days_above_0_to_3650"),
        ({"watch_min_evidence": 0}, "watch_min_evidence_30_to_50000"),
        ({"watch_looks": 0}, "watch_looks_1_to_100"),
        ({"watch_min_evidence": 100, "watch_pass_evidence": 50},
         "watch_pass_evidence_at_least_watch_min_evidence"),
        # NaN sorts above every number in PostgreSQL, so "> 0" alone let it in, and Infinity;
        # an upper bound refuses both (and a value the scheduler's interval cannot hold).
        ({"watch_expire_days": "NaN"}, "watch_expire_days_above_0_to_3650"),
        ({"watch_expire_days": "Infinity"}, "watch_expire_days_above_0_to_3650"),
        ({"watch_expire_days": 1e12}, "watch_expire_days_above_0_to_3650"),
        ({"watch_expire_days": 3650.001}, "watch_expire_days_above_0_to_3650"),
        ({"watch_margin": "NaN"}, "watch_margin_0_02_to_1"),
        ({"watch_alpha": "NaN"}, "watch_alpha_1e_10_to_0_5"),
        ({"watch_alpha": "Infinity"}, "watch_alpha_1e_10_to_0_5"),
        # The smallest float was accepted: α/2 rounded to 0 and every run of the twin failed.
        ({"watch_alpha": 5e-324}, "watch_alpha_1e_10_to_0_5"),
        ({"watch_alpha": 9.9e-11}, "watch_alpha_1e_10_to_0_5"),
        # Each side of a watch counts at most its latest 50,000 events: more is never reached.
        ({"watch_pass_evidence": 50001}, "watch_pass_evidence_30_to_50000"),
        ({"watch_min_evidence": 50001, "watch_pass_evidence": 50000},
         "watch_min_evidence_30_to_50000"),
        # The gate's numbers: its margins were bounded already, its z (wilson_z) was not.
        ({"gate_non_inferiority_margin": "NaN"}, "gate_non_inferiority_margin_0_to_1"),
        ({"gate_first_publish_min_lower_bound": "Infinity"},
         "gate_first_publish_min_lower_bound_0_to_1"),
        ({"wilson_z": "NaN"}, "wilson_z_above_0_to_10"),
        ({"wilson_z": "Infinity"}, "wilson_z_above_0_to_10"),
        ({"wilson_z": 10.5}, "wilson_z_above_0_to_10"),
    ],
)
def test_bad_watch_settings_are_refused_and_change_nothing(
    db: psycopg.Connection, make_user: Callable[[str], User], patch: dict[str, object],
    constraint: str,
) -> None:
    owner = make_user("owner")
    twin = create_twin(db, owner.id, MODULES)
    before = db.execute("select count(*), (select to_jsonb(s) from public.persona_learning_settings"
                        " s where twin_id = %s) from public.persona_learning_settings",
                        (twin.id,)).fetchone()
    response = httpx.patch(
        f"{StackEnv.load().rest}/persona_learning_settings?twin_id=eq.{twin.id}",
        headers={"apikey": StackEnv.load().anon_key, "Authorization": f"Bearer {owner.token}"},
        json=patch, timeout=20,
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "23514"
    assert response.json()["message"] == (
        f'new row for relation "persona_learning_settings" violates check constraint '
        f'"{constraint}"')
    after = db.execute("select count(*), (select to_jsonb(s) from public.persona_learning_settings"
                       " s where twin_id = %s) from public.persona_learning_settings",
                       (twin.id,)).fetchone()
    assert after == before


def test_the_largest_settings_allowed_keep_every_twins_schedule(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User], stack: Stack,
) -> None:
    # One owner's settings must not stop the scheduler for the others: Infinity (accepted before
    # the bound) made enqueue_due_learning_runs(null) fail with 22008 for every twin. The owner
    # of a watched twin is refused Infinity and sets the largest values allowed; the scheduler
    # over all twins then queues another owner's twin, and the watched twin's run completes.
    owner, other = make_user("owner"), make_user("other")
    twin, watch_id, _ = published_twin(db, runner, owner)
    env = StackEnv.load()
    as_owner = {"apikey": env.anon_key, "Authorization": f"Bearer {owner.token}"}
    settings = f"{env.rest}/persona_learning_settings?twin_id=eq.{twin.id}"
    refused = httpx.patch(settings, headers=as_owner, json={"watch_expire_days": "Infinity"},
                          timeout=20)
    assert (refused.status_code, refused.json()["code"]) == (400, "23514"), refused.text
    largest = {"watch_expire_days": 3650, "watch_pass_evidence": 50000,
               "watch_min_evidence": 50000, "wilson_z": 10}
    allowed = httpx.patch(settings, headers=as_owner, json=largest, timeout=20)
    assert allowed.status_code == 204, allowed.text
    queued_twin = create_twin(db, other.id, MODULES)
    votes(db, queued_twin, other.id, 3, 0, at="now()", prefix="other")

    queued = httpx.post(
        f"{env.rest}/rpc/enqueue_due_learning_runs",
        headers={"apikey": stack.service_key, "Authorization": f"Bearer {stack.service_key}"},
        json={}, timeout=20,
    )

    assert queued.status_code == 200, queued.text
    assert queued_twin.id in {r["twin_id"] for r in queued.json()}
    votes(db, twin, owner.id, 1, 0, at="now()", prefix="late")
    [run] = runner.run_once(UUID(twin.id))
    assert run.status == "completed" and run.gate_report is not None
    assert run.gate_report["watch"]["state"] == "watching"
    assert watch_row(db, watch_id)["state"] == "watching"


def test_settings_over_the_new_bounds_are_clamped_by_the_migration(stack: Stack) -> None:
    # A database migrated up to the bounds' migration holds a twin whose settings the bounds
    # refuse (NaN and Infinity were accepted): the migration clamps them (NaN to the default,
    # the rest to the bound) before it adds the constraints, and applies.
    migrations = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
    bounds = ROOT / "supabase" / "migrations" / "20261214000100_watch_review.sql"
    with scratch_database(stack) as url:
        for path in migrations[: migrations.index(bounds)]:
            psql_file(url, path)
        with psycopg.connect(url, autocommit=True) as scratch:
            user = scalar(scratch, "insert into auth.users (id) values (gen_random_uuid()) "
                                   "returning id::text")
            twins = [scalar(scratch, "insert into public.twins (owner_id, name) values (%s, %s) "
                                     "returning id::text", user, name) for name in "abc"]
            for twin, values in zip(twins, [
                ("NaN", 1_000_000, 1_000_000, "NaN"),
                ("Infinity", 30, 400, "Infinity"),
                (1e12, 30, 60_000, 12.5),
            ], strict=True):
                scratch.execute(
                    "update public.persona_learning_settings set watch_expire_days = %s, "
                    "watch_min_evidence = %s, watch_pass_evidence = %s, wilson_z = %s "
                    "where twin_id = %s", (*values, twin))
            psql_file(url, bounds)
            clamped = scratch.execute(
                "select watch_expire_days, watch_min_evidence, watch_pass_evidence, wilson_z "
                "from public.persona_learning_settings where twin_id = any(%s::uuid[]) "
                "order by array_position(%s::uuid[], twin_id)", (twins, twins)).fetchall()
    assert clamped == [(14.0, 50_000, 50_000, 1.96), (3650.0, 30, 400, 10.0),
                       (3650.0, 30, 50_000, 10.0)]


def test_settings_under_the_new_floors_are_raised_by_the_migration(stack: Stack) -> None:
    # Settings the floors refuse (watch_margin under 0.02, watch_min_evidence or
    # watch_pass_evidence under 30) were allowed before 20261218000700: the migration raises
    # them to the floors (and watch_pass_evidence to at least watch_min_evidence) before it
    # adds the constraints, and applies; a row within the floors is left as it was.
    migrations = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
    floors = ROOT / "supabase" / "migrations" / "20261218000700_watch_review_4.sql"
    with scratch_database(stack) as url:
        for path in migrations[: migrations.index(floors)]:
            psql_file(url, path)
        with psycopg.connect(url, autocommit=True) as scratch:
            user = scalar(scratch, "insert into auth.users (id) values (gen_random_uuid()) "
                                   "returning id::text")
            twins = [scalar(scratch, "insert into public.twins (owner_id, name) values (%s, %s) "
                                     "returning id::text", user, name) for name in "abcd"]
            for twin, values in zip(twins, [
                (0.0, 1, 2), (0.01, 10, 400), (0.5, 29, 29), (0.03, 40, 500),
            ], strict=True):
                scratch.execute(
                    "update public.persona_learning_settings set watch_margin = %s, "
                    "watch_min_evidence = %s, watch_pass_evidence = %s where twin_id = %s",
                    (*values, twin))
            psql_file(url, floors)
            raised = scratch.execute(
                "select watch_margin, watch_min_evidence, watch_pass_evidence "
                "from public.persona_learning_settings where twin_id = any(%s::uuid[]) "
                "order by array_position(%s::uuid[], twin_id)", (twins, twins)).fetchall()
    assert raised == [(0.02, 30, 30), (0.02, 30, 400), (0.5, 30, 30), (0.03, 40, 500)]


def test_an_unknown_watch_mode_is_refused(
    db: psycopg.Connection, make_user: Callable[[str], User],
) -> None:
    owner = make_user("owner")
    twin = create_twin(db, owner.id, MODULES)
    response = httpx.patch(
        f"{StackEnv.load().rest}/persona_learning_settings?twin_id=eq.{twin.id}",
        headers={"apikey": StackEnv.load().anon_key, "Authorization": f"Bearer {owner.token}"},
        json={"watch_mode": "sometimes"}, timeout=20,
    )
    assert response.status_code == 400, response.text
    assert response.json()["message"] == 'invalid input value for enum watch_mode: "sometimes"'
    assert scalar(db, "select watch_mode::text from public.persona_learning_settings "
                      "where twin_id = %s", twin.id) == "alert"


# --- a rollback racing a publish -----------------------------------------------------------


def twin_with_a_draft_on_top(
    db: psycopg.Connection, runner: Runner, owner: User
) -> tuple[Twin, str]:
    """A twin with v1 archived, v2 published (watched) and a draft v3 that passes the gate
    against v2 (80 agreeing traces); returns the twin and v3's id."""
    twin, _, _ = published_twin(db, runner, owner, watch_mode="auto")
    assert twin.draft_spec_id is not None
    v3 = next_draft(db, twin)
    for spec in (twin.draft_spec_id, v3):
        audits(db, twin, spec, 80, 0, at="now() - interval '12 hours'", prefix="gate3")
    return twin, v3





def test_a_double_click_on_rollback_rolls_back_one_step_only(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # v3 published over v2 over v1 (by real runs); the owner clicks "roll back v3" twice. With
    # the spec named, the first click goes back to v2 and the second is refused (PT409) with
    # nothing changed; without it, the second would have rolled v2 back to v1 as well.
    owner = make_user("owner")
    twin, v3 = twin_with_a_draft_on_top(db, runner, owner)
    [published] = runner.run_once(UUID(twin.id), safe_mode=False, request=True)
    assert str(published.published_spec_id) == v3

    first = rollback(owner, twin, "v3 is worse", spec_id=v3)
    assert first.status_code == 200, first.text

    def state() -> tuple[Any, ...]:
        return (spec_rows(db, twin), db.execute(
            "select count(*), (select jsonb_agg(to_jsonb(w) order by created_at) from "
            "public.persona_spec_watches w where twin_id = %s) from "
            "public.persona_feedback_learning_runs where twin_id = %s",
            (twin.id, twin.id)).fetchone())

    before = state()
    second = rollback(owner, twin, "v3 is worse", spec_id=v3)

    assert second.status_code == 409, second.text
    assert second.json()["message"] == (
        f"p_spec_id: spec {v3} is not the published spec of twin {twin.id} (version 2 is); "
        "nothing was rolled back")
    assert state() == before
    assert spec_rows(db, twin) == [
        (twin.published_spec_id, "archived", False, None),
        (twin.draft_spec_id, "published", False, None),
        (v3, "archived", True, "owner: v3 is worse"),
    ]
    # The call without p_spec_id still rolls back whatever is published (v2, to v1).
    plain = rollback(owner, twin, "v2 too")
    assert plain.status_code == 200, plain.text
    assert plain.json()["gate_report"]["rollback"]["from_spec_id"] == twin.draft_spec_id
    assert published_count(db, twin) == 1


def test_a_rollback_by_hand_claims_no_gate_outcome(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User], tmp_path: Path,
) -> None:
    # A rollback by hand runs no gate: its run recorded gate_passed true (a completed run's
    # figures could not be null). It is null now, and the database keeps it so for that kind of
    # run only; `pfl runs`, the overview and the report say no gate ran.
    owner = make_user("owner")
    twin, _, publish_run = published_twin(db, runner, owner)
    response = rollback(owner, twin, "users dislike the tone", spec_id=twin.draft_spec_id)
    assert response.status_code == 200, response.text
    run = response.json()
    assert (run["trigger"], run["status"], run["gate_passed"], run["publish_decision"]) == (
        "owner_rollback", "completed", None, "published")
    seen = owner.client.table("persona_twin_overview").select(
        "last_run_trigger,last_run_gate_passed").eq("twin_id", twin.id).execute().data
    assert seen == [{"last_run_trigger": "owner_rollback", "last_run_gate_passed": None}]

    env = worker_env(StackEnv.load())
    shown = subprocess.run(pfl("runs", "--twin", twin.id), env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout
    [line] = [x for x in shown.splitlines() if x.split()[2:3] == [run["id"][:8]]]
    assert line.split()[3:8] == ["completed", "0", "0", "0", "-"], line
    assert "owner rollback" in line
    page = tmp_path / "report.html"
    subprocess.run(pfl("report", "--twin", twin.id, "--out", str(page)),
                   env={**env, "MPLCONFIGDIR": str(tmp_path / "mpl")}, capture_output=True,
                   text=True, timeout=120, check=True)
    html_ = page.read_text()
    assert "gate not run (a rollback by hand)" in html_ and "<td>not run</td>" in html_

    # The database holds it: a rollback's run claiming a gate outcome, or another completed run
    # without one, is refused (23514, naming the rule) and changes nothing.
    def runs() -> list[tuple[Any, ...]]:
        return db.execute("select id::text, gate_passed from public.persona_feedback_learning_runs"
                          " where twin_id = %s order by created_at", (twin.id,)).fetchall()

    before = runs()
    assert before == [(str(publish_run.id), True), (run["id"], None)]
    with pytest.raises(psycopg.errors.CheckViolation, match="gate_passed_null_on_owner_rollback"):
        db.execute("update public.persona_feedback_learning_runs set gate_passed = true "
                   "where id = %s", (run["id"],))
    with pytest.raises(psycopg.errors.CheckViolation, match="figures_when_completed"):
        db.execute("update public.persona_feedback_learning_runs set gate_passed = null "
                   "where id = %s", (str(publish_run.id),))
    assert runs() == before


def flip_watch_mode_after_the_first_claim(
    db: psycopg.Connection, runner: Runner, twin: Twin, mode: str
) -> list[WatchEvidence | None]:
    """Makes the runner's store set the twin's watch_mode to `mode` (as the owner's PATCH
    would, committed) right after its first read of the watch; returns every read's answer."""
    store = runner.store
    real_claim = store.claim_watch
    reads: list[WatchEvidence | None] = []

    def claim_then_flip(run: Run) -> WatchEvidence | None:
        found = real_claim(run)
        if not reads:
            db.execute("update public.persona_learning_settings set watch_mode = %s "
                       "where twin_id = %s", (mode, twin.id))
        reads.append(found)
        return found

    store.claim_watch = claim_then_flip  # type: ignore[method-assign]
    return reads


def test_watch_mode_turned_to_auto_mid_run_rolls_back_after_reading_again(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The run read the watch in alert mode; the owner switched to auto before it completed. Its
    # decision (alert) is stale: the completion refuses it (PT412), the run reads again and the
    # regression rolls back, as auto says.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner)  # alert
    regress(db, twin, owner)
    reads = flip_watch_mode_after_the_first_claim(db, runner, twin, "auto")

    [run] = runner.run_once(UUID(twin.id))

    assert [r.settings.mode if r else None for r in reads] == ["alert", "auto"]
    assert (run.status, run.attempts, run.hold_reason) == ("completed", 1, "rolled_back")
    assert run.gate_report is not None
    assert (run.gate_report["watch"]["mode"], run.gate_report["watch"]["action"]) == (
        "auto", "roll_back")
    assert watch_row(db, watch_id)["state"] == "rolled_back"
    assert spec_rows(db, twin)[:2] == [
        (twin.published_spec_id, "published", False, None),
        (twin.draft_spec_id, "archived", True,
         f"production watch: regression found by run {run.id}"),
    ]


def test_watch_mode_turned_off_mid_run_pauses_the_watch(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The run read the watch in auto mode and would roll back; the owner turned the watch off
    # before it completed: the completion refuses the stale decision (PT412), the run reads
    # again, finds no watch to look at and changes no spec. The watch waits, still watching,
    # and the next run after auto is back rolls back.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    regress(db, twin, owner)
    reads = flip_watch_mode_after_the_first_claim(db, runner, twin, "off")

    [run] = runner.run_once(UUID(twin.id))

    assert [r.settings.mode if r else None for r in reads] == ["auto", None]
    assert (run.status, run.attempts, run.hold_reason) == ("completed", 1, "no_draft")
    assert run.gate_report is not None and run.gate_report["watch"] is None
    stored = watch_row(db, watch_id)
    assert (stored["state"], stored["looks_done"], stored["last_run_id"]) == ("watching", 0, None)
    assert spec_rows(db, twin)[1] == (twin.draft_spec_id, "published", False, None)

    db.execute("update public.persona_learning_settings set watch_mode = 'auto' "
               "where twin_id = %s", (twin.id,))
    [again] = runner.run_once(UUID(twin.id), request=True)
    assert again.hold_reason == "rolled_back"
    assert watch_row(db, watch_id)["state"] == "rolled_back"


# auto: the run also looked at v2's watch, which the rollback concluded; off: no watch, so the
# gate's baseline alone tells the completion that its comparison is stale.
@pytest.mark.parametrize("mode", ["auto", "off"])
def test_a_rollback_committed_mid_run_makes_the_run_gate_again(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User], mode: str,
) -> None:
    # The owner's rollback commits after the run read its batch and before it completes: the
    # gate compared v3 with v2, which is no longer published, so the completion refuses (PT412)
    # and the run reads again and gates v3 against v1 (no paired audits: held).
    owner = make_user("owner")
    twin, v3 = twin_with_a_draft_on_top(db, runner, owner)
    db.execute("update public.persona_learning_settings set watch_mode = %s where twin_id = %s",
               (mode, twin.id))
    answers: list[httpx.Response] = []
    store = runner.store
    real_claim = store.claim_watch

    def claim_then_roll_back(run: Run) -> WatchEvidence | None:
        found = real_claim(run)
        if not answers:
            answers.append(rollback(owner, twin))
        return found

    store.claim_watch = claim_then_roll_back  # type: ignore[method-assign]
    [run] = runner.run_once(UUID(twin.id), safe_mode=False, request=True)

    assert answers[0].status_code == 200, answers[0].text
    assert (run.status, run.publish_decision, run.hold_reason) == ("completed", "held",
                                                                   "gate_failed")
    assert run.gate_report is not None
    assert run.gate_report["baseline_spec_id"] == twin.published_spec_id
    assert spec_rows(db, twin) == [
        (twin.published_spec_id, "published", False, None),
        (twin.draft_spec_id, "archived", True, "owner: racing"),
        (v3, "draft", False, None),
    ]


def test_a_rollback_racing_a_publish_leaves_exactly_one_published_spec(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    owner = make_user("owner")
    twin, v3 = twin_with_a_draft_on_top(db, runner, owner)
    start = threading.Barrier(2)
    answers: list[httpx.Response] = []
    runs: list[Run] = []

    def publish() -> None:
        start.wait()
        runs.extend(runner.run_once(UUID(twin.id), safe_mode=False, request=True))

    def roll_back() -> None:
        start.wait()
        answers.append(rollback(owner, twin))

    threads = [threading.Thread(target=publish), threading.Thread(target=roll_back)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.status for r in runs] == ["completed"]
    assert answers[0].status_code == 200, answers[0].text
    assert published_count(db, twin) == 1
    states = {row[0]: row[1:] for row in spec_rows(db, twin)}
    assert twin.draft_spec_id is not None
    if runs[0].publish_decision == "published":
        # The run first (v3 over v2), then the rollback (v3 back to v2).
        assert states == {
            twin.published_spec_id: ("archived", False, None),
            twin.draft_spec_id: ("published", False, None),
            v3: ("archived", True, "owner: racing"),
        }
    else:
        # The rollback first (v2 back to v1); the run then gated v3 against v1 and held.
        assert states == {
            twin.published_spec_id: ("published", False, None),
            twin.draft_spec_id: ("archived", True, "owner: racing"),
            v3: ("draft", False, None),
        }


def test_a_vote_changed_since_the_publish_counts_once_at_its_latest_value(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # A voter's +1 changed to -1 after the switch is one vote (-1) on the new side, not two; the
    # same vote changed before the switch is one vote (its latest value) on the old side.
    owner = make_user("owner")
    twin, _, _ = published_twin(db, runner, owner)
    for trace, first, then in (("after-1", 1, -1), ("after-2", -1, 1), ("after-3", 1, 1)):
        for score in (first, then):
            owner.client.table("persona_training_events").insert(
                {"twin_id": twin.id, "trace_id": trace, "score": score,
                 "intent_label": "casual_chat"}).execute()
    store = runner.store
    store.enqueue_run(UUID(twin.id), safe_mode=True)
    run = store.claim_run("watch-tests", 60, UUID(twin.id))
    assert run is not None
    try:
        evidence = store.claim_watch(run)
    finally:
        store.release_run(run)
    assert evidence is not None
    [votes_twin] = [c for c in evidence.twin if c.kind == "votes"]
    assert (votes_twin.new_n, votes_twin.new_passed) == (3, 2)


def claimed_watch(runner: Runner, twin: Twin) -> WatchEvidence:
    """The watch's evidence as the next run would claim it (the run is then released)."""
    store = runner.store
    store.enqueue_run(UUID(twin.id), safe_mode=True)
    run = store.claim_run("watch-tests", 60, UUID(twin.id))
    assert run is not None
    try:
        evidence = store.claim_watch(run)
    finally:
        store.release_run(run)
    assert evidence is not None
    return evidence


def test_a_vote_changed_after_the_publish_stays_on_the_side_of_the_answer_it_judges(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # The fourth review's case: votes cast before the publish and changed after it. Placed by
    # the time of the change, a +1 changed to -1 left the old side and landed on the new one as
    # a failure, inventing a regression (about 40 of 320 old up-votes changed: 6.4% of watches
    # with no difference in the spec regressed). Placed by the feedback's first vote it stays on
    # the old side at its latest value; one whose first vote lies before the old window counts
    # on neither side.
    owner = make_user("owner")
    twin, _, _ = published_twin(db, runner, owner)  # published 2 days ago: old window from 4
    votes(db, twin, owner.id, 5, 0, at="now() - interval '3 days'", prefix="early")
    votes(db, twin, owner.id, 2, 0, at="now() - interval '5 days'", prefix="older")
    # Changed a day ago (after the publish): two of the five, and both older ones, to -1.
    for prefix, n in (("early", 2), ("older", 2)):
        votes(db, twin, owner.id, 0, n, at="now() - interval '1 day'", prefix=prefix)
    votes(db, twin, owner.id, 3, 1, at="now() - interval '1 day'", prefix="fresh")
    assert scalar(db, "select count(*) from public.persona_training_events where twin_id = %s "
                      "and source = 'user_feedback' and superseded_at is not null",
                  twin.id) == 4
    evidence = claimed_watch(runner, twin)
    [votes_twin] = [c for c in evidence.twin if c.kind == "votes"]
    # Old side: the five early votes, two of them now -1; new side: the four fresh ones only.
    assert (votes_twin.old_n, votes_twin.old_passed) == (5, 3)
    assert (votes_twin.new_n, votes_twin.new_passed) == (4, 3)
    # A moderator deletes the two changed feedbacks' first votes: each feedback's later vote
    # keeps its first vote's time (first_vote_at). Found by joining to the deleted row, it fell
    # back to the change's own time, and the two -1s moved to the new side (6 of 3 there).
    assert scalar(db, "with gone as (delete from public.persona_training_events where "
                      "twin_id = %s and trace_id like 'early-%%' and superseded_at is not null "
                      "returning 1) select count(*) from gone", twin.id) == 2
    [votes_twin] = [c for c in claimed_watch(runner, twin).twin if c.kind == "votes"]
    assert (votes_twin.old_n, votes_twin.old_passed) == (5, 3)
    assert (votes_twin.new_n, votes_twin.new_passed) == (4, 3)


def test_a_trickle_of_votes_does_not_hold_back_the_audits_looks(
    db: psycopg.Connection, runner: Runner, make_user: Callable[[str], User],
) -> None:
    # Production audits 90% before the switch, 60% since (200 a side), and one vote a side. One
    # clock for both kinds, the votes' (under watch_min_evidence: 0), left every look undue
    # until the expiry. Each kind has its own plan: a first run at 40 audits a side reaches the
    # audits' look 1 (stored in the watch's report, read back by the next claim), and the run
    # after the rest arrived reaches look 5 and rolls the spec back.
    owner = make_user("owner")
    twin, watch_id, _ = published_twin(db, runner, owner, watch_mode="auto")
    assert twin.draft_spec_id is not None
    votes(db, twin, owner.id, 1, 0, at="now() - interval '3 days'", prefix="vote-before")
    votes(db, twin, owner.id, 1, 0, at="now() - interval '1 day'", prefix="vote-after")
    audits(db, twin, twin.published_spec_id, 36, 4, at="now() - interval '3 days'", prefix="b")
    audits(db, twin, twin.draft_spec_id, 36, 4, at="now() - interval '1 day'", prefix="a")
    [first] = runner.run_once(UUID(twin.id))
    assert first.gate_report is not None
    report = first.gate_report["watch"]
    # The votes, one a side, were never compared: not in play, so the watch's look is the
    # audits' (the least of the kinds in play).
    assert (report["state"], report["look"]) == ("watching", 1)
    clocks = {c["kind"]: c for c in report["clocks"]}
    assert (clocks["audits"]["look"], clocks["audits"]["tested"]) == (1, True)
    assert (clocks["votes"]["look"], clocks["votes"]["in_play"]) == (0, False)
    assert watch_row(db, watch_id)["last_report"]["clocks"] == report["clocks"]

    audits(db, twin, twin.published_spec_id, 144, 16, at="now() - interval '3 days'",
           prefix="b", first=41)
    audits(db, twin, twin.draft_spec_id, 84, 76, at="now() - interval '1 day'", prefix="a",
           first=41)
    # The next claim reads each kind's plan back (the run it claims is released with its batch,
    # and the next run_once completes it).
    claimed = claimed_watch(runner, twin)
    assert [(c.kind, c.look, c.alpha_spent, c.in_play) for c in claimed.clocks] == [
        (c["kind"], c["look"], c["alpha_spent"], c["in_play"]) for c in report["clocks"]]
    [run] = runner.run_once(UUID(twin.id))
    assert run.gate_report is not None
    report = run.gate_report["watch"]
    assert (report["state"], report["action"]) == ("regressed", "roll_back")
    assert {c["kind"]: c["look"] for c in report["clocks"]} == {"audits": 5, "votes": 0}
    assert published_count(db, twin) == 1
    assert scalar(db, "select status::text from public.persona_specs where id = %s",
                  twin.draft_spec_id) == "archived"
