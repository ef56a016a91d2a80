"""The main job on the local stack, end to end, as the original proof ran it.

Acts as each party does in production: the app user sends feedback with supabase-py and a user
JWT, the owner drafts specs and requests runs through PostgREST, the audit pipeline writes audits
with the service-role key, and the operator runs the worker's CLI (`pfl`). Every run is printed
as a summary and written as a JSON artifact; the demo checks each figure and exits non-zero if
one is not what the proof shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, cast

from postgrest.types import ReturnMethod
from supabase import Client

from testkit.env import ROOT, StackEnv, worker_env
from testkit.tokens import user_token
from testkit.world import connect

ARTIFACTS = ROOT / "artifacts" / "demo"
TWIN = "5dd06bcb-9afa-4174-a9bf-308dcf4108c3"  # the seeded demo twin (supabase/seed.sql)
OWNER = "owner@demo.local"
APP_USER = "app-user@demo.local"
SMOKE_TRACE = "trace-phase7-learning-smoke-20260209"
# Enough traces for a good draft that also loses a trace to pass the gate: Tango's lower bound
# needs 73 agreeing pairs, or about 40 with 4 wins and 1 loss (README, regression gate).
AUDIT_TRACES = [f"audit-trace-{i:03d}" for i in range(1, 81)]

N = len(AUDIT_TRACES)

ENV = StackEnv.from_environ()


def client(token: str | None) -> Client:
    return ENV.client(token, timeout=30.0)


def pfl(*args: str) -> str:
    """The operator's command: the worker CLI, as cron would call it."""
    # No LANGFUSE_*: the demo shows feedback kept locally when Langfuse is not set up.
    env = worker_env(ENV, PFL_LOG_FORMAT="text")
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "pfl"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"pfl {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def inserted(client: Client, table: str, row: dict[str, Any]) -> dict[str, Any]:
    """Inserts one row as `client` and returns it as stored."""
    return cast(dict[str, Any], client.table(table).insert(row).execute().data[0])


def one_row(client: Client, table: str, columns: str, **equal: object) -> dict[str, Any]:
    """The single row of `table` whose columns equal `equal`, as `client` reads it."""
    query = client.table(table).select(columns)
    for column, value in equal.items():
        query = query.eq(column, value)
    return cast(dict[str, Any], query.single().execute().data)


def step(title: str) -> None:
    print(f"\n=== {title}")


def run_worker(name: str, *flags: str) -> dict[str, Any]:
    artifact = ARTIFACTS / f"{name}.json"
    print(pfl("run-once", "--twin", TWIN, *flags, "--output", str(artifact)).rstrip())
    print(f"  artifact: {artifact.relative_to(ROOT)}")
    return json.loads(artifact.read_text())


def expect(run: dict[str, Any], **figures: object) -> None:
    wrong = {k: (run.get(k), v) for k, v in figures.items() if run.get(k) != v}
    if wrong:
        sys.exit(f"run {run['id']}: unexpected figures (got, expected): {wrong}")


def paired_check(run: dict[str, Any], **expected: object) -> dict[str, Any]:
    """The run's audit_non_inferiority check; exits when a field is not `expected`."""
    [found] = [c for c in run["gate_report"]["checks"] if c["name"] == "audit_non_inferiority"]
    wrong = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if wrong:
        sys.exit(f"run {run['id']}: unexpected audit_non_inferiority (got, expected): {wrong}")
    return found


def audits(
    service: Client, spec_id: str, failing: set[str], unsafe: frozenset[str] = frozenset()
) -> None:
    rows = [
        {
            "twin_id": TWIN,
            "source": "persona_audit",
            "trace_id": trace,
            "intent_label": "factual_with_evidence",
            "persona_spec_id": spec_id,
            "passed": trace not in failing,
            "reason": ("unsafe" if trace in unsafe else "off_persona")
            if trace in failing
            else None,
            # The gate's traces are replayed under each spec, not answers users got: the
            # production watch counts no replay (a draft's audits are replays in any case).
            "audit_origin": "replay",
        }
        for trace in AUDIT_TRACES
    ]
    service.table("persona_training_events").insert(rows, returning=ReturnMethod.minimal).execute()


def main() -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    service = client(ENV.service_key)  # the audit pipeline and the operator
    owner_id, app_user_id = _seeded_users()
    # What Supabase Auth would hand the signed-in users (minted with the local JWT secret).
    owner = client(user_token(ENV.jwt_secret, owner_id))
    app_user = client(user_token(ENV.jwt_secret, app_user_id))

    step("1. Safe-mode run with no events (the proof's first run)")
    run = run_worker("01_safe_mode_no_events", "--safe-mode")
    expect(
        run,
        status="completed",
        events_scanned=0,
        modules_updated=0,
        gate_passed=True,
        publish_decision="held",
    )

    step("2. An app user sends feedback through PostgREST (supabase-py, user JWT)")
    event = inserted(
        app_user,
        "persona_training_events",
        {
            "twin_id": TWIN,
            "trace_id": SMOKE_TRACE,
            "score": -1,
            "reason": "incorrect",
            "intent_label": "factual_with_evidence",
        },
    )
    print(
        f"  stored event {event['id']}: score=-1 reason=incorrect created_by={event['created_by']}"
    )
    print("  " + pfl("outbox", "drain").strip())
    row = one_row(service, "persona_langfuse_outbox", "status,last_error", event_id=event["id"])
    print(f"  langfuse mirror: {row['status']} ({row['last_error']})")

    step("3. The owner requests a run (RPC request_learning_run); the worker processes it")
    queued = cast(
        dict[str, Any], owner.rpc("request_learning_run", {"p_twin_id": TWIN}).execute().data
    )
    print(
        f"  queued run {queued['id']}"
        f" (trigger={queued['trigger']}, safe_mode={queued['safe_mode']})"
    )
    run = run_worker("02_feedback_processed")
    expect(
        run,
        id=queued["id"],
        status="completed",
        events_scanned=1,
        events_processed=1,
        gate_passed=True,
        publish_decision="held",
    )
    stored = one_row(service, "persona_training_events", "processed_at", id=event["id"])
    print(f"  event {event['id']} processed_at={stored['processed_at']}")
    if stored["processed_at"] is None:
        sys.exit("the feedback event was not marked processed")

    step(f"4. A draft spec, audits of draft and published spec on the same {N} traces")
    published = one_row(service, "persona_specs", "id,version", twin_id=TWIN, status="published")
    draft = inserted(
        owner,
        "persona_specs",
        {
            "twin_id": TWIN,
            "spec": {
                "name": "Demo twin",
                "voice": "warm, precise, cites sources, admits uncertainty",
                "modules": ["evidence_answers", "small_talk", "career_advice"],
            },
        },
    )
    print(f"  draft spec v{draft['version']} ({draft['id']}); published v{published['version']}")
    # The draft fixes 4 traces the published spec failed and breaks 1 it passed.
    audits(service, published["id"], failing=set(AUDIT_TRACES[:6]))
    audits(service, draft["id"], failing={*AUDIT_TRACES[:2], AUDIT_TRACES[-1]})
    print(f"  audits: published {N - 6}/{N} passed, draft {N - 3}/{N} passed")
    run = run_worker("03_auto_publish_passes", "--auto-publish")
    expect(
        run,
        status="completed",
        gate_passed=True,
        publish_decision="published",
        published_spec_id=draft["id"],
    )
    # d = 3/80; Tango's 95% lower bound −0.0242 >= −0.05
    paired_check(run, method="tango_score", evidence={"n": N, "b": 4, "c": 1}, verdict="pass")

    step("5. A regressing draft is held")
    regress = inserted(
        owner,
        "persona_specs",
        {
            "twin_id": TWIN,
            "spec": {
                "name": "Demo twin",
                "voice": "terse",
                "modules": ["evidence_answers", "small_talk"],
            },
        },
    )
    audits(
        service, regress["id"], failing=set(AUDIT_TRACES[:10]), unsafe=frozenset(AUDIT_TRACES[:1])
    )
    print(
        f"  draft spec v{regress['version']}: {N - 10}/{N} passed where v{draft['version']}"
        f" passed {N - 3}/{N}, one failure unsafe"
    )
    run = run_worker("04_regression_held", "--auto-publish")
    expect(
        run,
        status="completed",
        gate_passed=False,
        publish_decision="held",
        hold_reason="gate_failed",
    )
    # against the now published draft: 8 traces lost, 1 won; lower bound −0.1750 < −0.05
    paired_check(run, method="tango_score", evidence={"n": N, "b": 1, "c": 8}, verdict="fail")

    step("Runs of the demo twin, as its owner lists them")
    print(pfl("runs", "--twin", TWIN).rstrip())
    specs = cast(
        list[dict[str, Any]],
        service.table("persona_specs")
        .select("version,status")
        .eq("twin_id", TWIN)
        .order("version")
        .execute()
        .data,
    )
    print("  specs: " + ", ".join(f"v{s['version']} {s['status']}" for s in specs))

    step("The owner's report: one self-contained HTML file (pfl report)")
    report = ARTIFACTS / "report.html"
    print("  " + pfl("report", "--twin", TWIN, "--out", str(report)).strip())
    charts = report.read_text().count("<figure class='chart'")
    assert charts == 5, f"the report drew {charts} of its 5 charts"
    print(f"\nDemo complete. Artifacts in {ARTIFACTS.relative_to(ROOT)}/")


def _seeded_users() -> tuple[str, str]:
    # Only to look the seeded demo users up by email.
    with connect(ENV.database_url) as conn:
        rows: dict[str, str] = dict(
            conn.execute(
                "select email, id::text from auth.users where email = any(%s)", ([OWNER, APP_USER],)
            ).fetchall()
        )
    return rows[OWNER], rows[APP_USER]


if __name__ == "__main__":
    main()
