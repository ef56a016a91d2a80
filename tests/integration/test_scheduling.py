"""The optional database schedule of learning runs (pg_cron), as a project owner uses it: enabled
the way hosted Supabase enables the extension, scheduled with public.schedule_learning_runs, its
job's command queueing exactly the due runs, pg_cron's scheduler running it, and a worker
executing what it queued. Without pg_cron the functions say so and change nothing."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from testkit import env as testkit_env
from testkit.world import make_twin, scalar
from tests.conftest import ROOT, Stack, User, wait_for

pytestmark = pytest.mark.integration

JOB = "pfl_enqueue_due_learning_runs"
COMMAND = "select id from public.enqueue_due_learning_runs()"
# A schedule that does not fire during a test (midnight of January 1st).
NEVER_SOON = "0 0 1 1 *"


def admin(stack: Stack, *sql: str) -> None:
    """Runs SQL as the platform (supabase_admin), as hosted Supabase does for extensions."""
    assert stack.admin_database_url, "needs the local stack's PFL_ADMIN_DATABASE_URL"
    with psycopg.connect(stack.admin_database_url, autocommit=True) as conn:
        for statement in sql:
            conn.execute(statement)


@pytest.fixture(scope="module")
def cron_extension(stack: Stack) -> Iterator[None]:
    """pg_cron enabled as the dashboard enables it (scripts/local/pg_cron.sql, as
    supabase_admin), once for this file's tests that need it; dropped after them. (Once a
    session has used cron's functions, pg_cron 1.4 keeps the old tables' ids in it: dropping and
    re-creating the extension between tests would break the session's next call.)"""
    if not stack.admin_database_url:
        pytest.skip("enabling pg_cron needs the local platform's superuser")
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f",
         str(ROOT / "scripts" / "local" / "pg_cron.sql"), stack.admin_database_url],
        check=True, capture_output=True, text=True,
    )
    try:
        yield
    finally:
        admin(stack, "drop extension pg_cron")


@pytest.fixture
def pg_cron(cron_extension: None, db: psycopg.Connection) -> Iterator[None]:
    """pg_cron enabled, without the schedule before and after the test."""
    db.execute("select public.unschedule_learning_runs()")
    try:
        yield
    finally:
        db.execute("select public.unschedule_learning_runs()")


def vote(user: User, twin_id: str, trace: str) -> None:
    user.client.table("persona_training_events").insert(
        {"twin_id": twin_id, "trace_id": trace, "score": 1, "intent_label": "factual_with_evidence"}
    ).execute()


def run_once(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(testkit_env.PFL), "run-once", *args], env=testkit_env.worker_env(stack),
        capture_output=True, text=True, timeout=60, check=False,
    )


def jobs(db: psycopg.Connection) -> list[tuple]:
    return db.execute(
        "select jobid, jobname, schedule, command, database, username, active from cron.job"
    ).fetchall()


def runs_of(db: psycopg.Connection, twin_id: str) -> list[tuple]:
    return db.execute(
        "select id::text, status::text, trigger::text from persona_feedback_learning_runs"
        " where twin_id = %s order by created_at", (twin_id,)
    ).fetchall()


def test_without_pg_cron_scheduling_says_so_and_changes_nothing(db: psycopg.Connection):
    installed = "select count(*) from pg_extension where extname = 'pg_cron'"
    assert scalar(db, installed) == 0
    hints = {"select public.schedule_learning_runs('* * * * *')": "enable it",
             "select public.unschedule_learning_runs()": "without pg_cron no schedule"}
    for call, hint in hints.items():
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                           match="pg_cron is not enabled in this database") as refused:
            db.execute(call)
        assert refused.value.diag.message_hint is not None
        assert refused.value.diag.message_hint.startswith(hint)
    assert scalar(db, "select count(*) from pg_namespace where nspname = 'cron'") == 0


def test_no_api_role_may_schedule(
    db: psycopg.Connection, anon, service, make_user, pg_cron
):
    # With pg_cron enabled, so that a call let through would schedule a job.
    callers = {"anon": anon, "authenticated": make_user("attacker").client, "service_role": service}
    for role, client in callers.items():
        for fn, params in (("schedule_learning_runs", {"p_schedule": "* * * * *"}),
                           ("unschedule_learning_runs", {})):
            with pytest.raises(Exception) as refused:
                client.rpc(fn, params).execute()
            assert getattr(refused.value, "code", None) == "42501", (role, fn, refused.value)
    assert jobs(db) == []


def test_the_job_exists_once_and_its_command_queues_exactly_the_due_runs(
    stack: Stack, db: psycopg.Connection, make_user, pg_cron
):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_schedule"):
        db.execute("select public.schedule_learning_runs(' ')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid schedule"):
        db.execute("select public.schedule_learning_runs('now and then')")
    assert jobs(db) == []

    job_id = scalar(db, "select public.schedule_learning_runs(%s)", NEVER_SOON)
    assert jobs(db) == [(job_id, JOB, NEVER_SOON, COMMAND, "postgres", "postgres", True)]
    # Scheduling again changes the schedule of the same job.
    again = scalar(db, "select public.schedule_learning_runs('*/10 * * * *')")
    assert again == job_id
    db.execute("select public.schedule_learning_runs(%s)", (NEVER_SOON,))
    assert [j[:3] for j in jobs(db)] == [(job_id, JOB, NEVER_SOON)]

    owner, voter = make_user("owner"), make_user("voter")
    due, queued, learned, quiet = (make_twin(db, owner.id) for _ in range(4))
    for twin in (due, queued, learned):
        vote(voter, twin.id, "trace-1")
    assert run_once(stack, "--twin", learned.id).returncode == 0  # nothing left to learn
    db.execute("select public.enqueue_learning_run(%s, true)", (queued.id,))  # already queued
    [(command,)] = db.execute("select command from cron.job where jobid = %s", (job_id,)).fetchall()
    ours = {due.id, queued.id, learned.id, quiet.id}
    before = {t: runs_of(db, t) for t in ours}
    # Every twin with unprocessed evidence, or whose learned evidence changed since its last run
    # (a rebuild is due), and no run queued or running, whoever made it.
    expected = {r[0] for r in db.execute(
        "select t.id::text from twins t where (exists (select from persona_training_events e"
        " where e.twin_id = t.id and e.id > t.learned_through_event_id)"
        " or t.evidence_generation <> t.learned_generation) and not exists ("
        "select from persona_feedback_learning_runs r where r.twin_id = t.id"
        " and r.status in ('queued', 'running'))").fetchall()}
    assert due.id in expected and not expected & {queued.id, learned.id, quiet.id}

    queued_now = [r[0] for r in db.execute(command).fetchall()]  # as the scheduler runs it

    twins_queued = {r[0] for r in db.execute(
        "select twin_id::text from persona_feedback_learning_runs where id = any(%s::uuid[])"
        " and trigger = 'schedule' and status = 'queued'", (queued_now,)).fetchall()}
    assert len(queued_now) == len(twins_queued) and twins_queued == expected
    for twin in (queued, learned, quiet):
        assert runs_of(db, twin.id) == before[twin.id]
    [(run_id, status, trigger)] = runs_of(db, due.id)
    assert (status, trigger) == ("queued", "schedule")
    # The database only queues: a worker executes the run it queued.
    done = run_once(stack, "--twin", due.id)
    assert done.returncode == 0, done.stderr
    assert runs_of(db, due.id) == [(run_id, "completed", "schedule")]


@pytest.mark.timeout(180)
def test_pg_crons_scheduler_runs_the_job_and_a_worker_executes_what_it_queued(
    stack: Stack, db: psycopg.Connection, make_user, pg_cron
):
    owner, voter = make_user("owner"), make_user("voter")
    twin = make_twin(db, owner.id)
    vote(voter, twin.id, f"trace-{uuid.uuid4().hex[:6]}")
    # pg_cron 1.4 (Debian's) schedules by the minute; 1.5 and later (hosted) also by seconds.
    job_id = scalar(db, "select public.schedule_learning_runs('* * * * *')")
    started = scalar(db, "select now()")

    def ran() -> list[tuple] | None:
        return db.execute(
            "select status, return_message from cron.job_run_details where jobid = %s"
            " and start_time >= %s and status in ('succeeded', 'failed')", (job_id, started)
        ).fetchall() or None

    # The next minute boundary comes within 60 s; the job then takes well under a second.
    details = wait_for(ran, timeout=90, interval=0.5)
    assert details[0][0] == "succeeded", details
    # pg_cron's report of the command: "1 row" / "3 rows" (1.4), "SELECT 3" (later versions).
    reported = re.fullmatch(r"(?:SELECT (\d+))|(?:(\d+) rows?)", details[0][1])
    assert reported and int(reported.group(1) or reported.group(2)) >= 1, details
    [(run_id, status, trigger)] = runs_of(db, twin.id)  # queued once, by the schedule
    assert (status, trigger) == ("queued", "schedule")

    done = run_once(stack, "--twin", twin.id)
    assert done.returncode == 0, done.stderr
    assert runs_of(db, twin.id) == [(run_id, "completed", "schedule")]
