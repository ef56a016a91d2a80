"""The worker's CLI as a subprocess (time, peak RSS), putting twins back between trials, and the
learning checks against the from-scratch oracle."""

from __future__ import annotations

import re
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.config import CorrectnessError
from bench.data import checkpoint
from testkit.env import PFL, ROOT, StackEnv, worker_env
from testkit.oracle import module_counts_from_scratch, relative_error, twin_settings
from testkit.world import scalar
from worker.learning import classify
from worker.models import ModuleStatus


def run_pfl(*args: str, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs the worker's CLI as a subprocess with the bench stack's environment: its wall time
    and peak RSS. A non-zero exit is a correctness failure."""
    env = worker_env(StackEnv.from_environ(), PFL_LOG_FORMAT="json", **(env_extra or {}))
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen([str(PFL), *args], stdout=out, stderr=out, env=env, cwd=ROOT)
        with PeakRss(proc.pid) as peak:
            proc.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        output = out.read().decode()
    if proc.returncode != 0:
        raise CorrectnessError(f"pfl {' '.join(args)} exited {proc.returncode}:\n{output}")
    return {"seconds": seconds, "peak_rss_mb": peak.kib / 1024}


class PeakRss:
    """Polls a process's VmHWM (its peak resident set) from /proc every 10 ms until it exits.

    Not getrusage/wait4: a child's ru_maxrss carries the high-water mark of the address space it
    replaced at exec, which after subprocess's vfork is this harness's own (≈ 150 MB once the
    harness has checked a few modules); VmHWM belongs to the worker's own address space."""

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.kib = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                found = re.search(r"^VmHWM:\s+(\d+) kB", self.status.read_text(), re.MULTILINE)
            except OSError:
                return
            if found is None:  # a zombie: its memory is gone
                return
            self.kib = max(self.kib, int(found.group(1)))
            self._done.wait(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def startup_seconds(twin_id: str, repeats: int = 3) -> float:
    """`pfl run-once` with nothing due (process start-up and two RPCs): the fixed part of every
    worker figure."""
    return min(run_pfl("run-once", "--twin", twin_id)["seconds"] for _ in range(repeats))


def learn_all(conn: psycopg.Connection, twin_id: str) -> dict[str, Any]:
    """`pfl run-once --twin` (runs until the twin has nothing left): its wall time, the runs'
    own time (started → finished, summed), the runs and the process's peak RSS."""
    checkpoint()
    result = run_pfl("run-once", "--twin", twin_id)
    runs = conn.execute(
        "select status, events_processed, extract(epoch from finished_at - started_at)::float8 "
        "from public.persona_feedback_learning_runs where twin_id = %s order by created_at",
        (twin_id,),
    ).fetchall()
    if not runs or any(r[0] != "completed" for r in runs):
        raise CorrectnessError(f"twin {twin_id}: runs {[r[0] for r in runs]}")
    return {
        "seconds": round(result["seconds"], 3),
        "run_seconds": round(sum(r[2] for r in runs), 3),
        "runs": len(runs),
        "events_processed": sum(r[1] for r in runs),
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
    }


def forget_learning(conn: psycopg.Connection, twin_id: str) -> None:
    """Puts a twin back to 'nothing learned yet': cursor 0, blank modules, no runs, no daily
    feedback summary (the run evidence goes with the runs)."""
    with conn.transaction():
        conn.execute("delete from public.persona_feedback_daily where twin_id = %s", (twin_id,))
        conn.execute(
            "update public.twins set learned_through_event_id = 0 where id = %s", (twin_id,)
        )
        conn.execute(
            "update public.persona_modules set success_weight = 0, failure_weight = 0, "
            "confidence = 0.5, status = 'insufficient_data', evidence_at = null "
            "where twin_id = %s",
            (twin_id,),
        )
        delete_runs(conn, twin_id)


def delete_runs(conn: psycopg.Connection, twin_id: str) -> None:
    conn.execute("delete from public.persona_module_changes where twin_id = %s", (twin_id,))
    conn.execute("delete from public.persona_feedback_learning_runs where twin_id = %s", (twin_id,))


def snapshot_learning(conn: psycopg.Connection, twin_id: str) -> dict[str, Any]:
    return {
        "cursor": scalar(
            conn, "select learned_through_event_id from public.twins where id = %s", twin_id
        ),
        "modules": conn.execute(
            "select success_weight, failure_weight, confidence, status, evidence_at, id "
            "from public.persona_modules where twin_id = %s",
            (twin_id,),
        ).fetchall(),
        "daily": conn.execute(
            "select twin_id, day, intent_label, module_key, reason, score, votes "
            "from public.persona_feedback_daily where twin_id = %s",
            (twin_id,),
        ).fetchall(),
    }


def restore_learning(conn: psycopg.Connection, twin_id: str, snap: dict[str, Any]) -> None:
    """Puts a twin back as `snapshot_learning` saw it: same cursor, same modules, the same daily
    feedback summary, no runs."""
    with conn.transaction():
        conn.execute("delete from public.persona_feedback_daily where twin_id = %s", (twin_id,))
        with conn.cursor() as cur:
            cur.executemany(
                "insert into public.persona_feedback_daily "
                "(twin_id, day, intent_label, module_key, reason, score, votes) "
                "values (%s, %s, %s, %s, %s, %s, %s)",
                snap["daily"],
            )
        conn.execute(
            "update public.twins set learned_through_event_id = %s where id = %s",
            (snap["cursor"], twin_id),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "update public.persona_modules set success_weight = %s, failure_weight = %s, "
                "confidence = %s, status = %s, evidence_at = %s where id = %s",
                snap["modules"],
            )
        delete_runs(conn, twin_id)


def check_learning(conn: psycopg.Connection, twin_id: str) -> dict[str, Any]:
    """After all of a twin's events were learned: its cursor is its last event id, and every
    module's weights equal the from-scratch sum (testkit.oracle). Raises CorrectnessError."""
    cursor, last = conn.execute(
        "select t.learned_through_event_id, "
        "(select max(id) from public.persona_training_events e where e.twin_id = t.id) "
        "from public.twins t where t.id = %s",
        (twin_id,),
    ).fetchone() or (None, None)
    if cursor != last:
        raise CorrectnessError(f"twin {twin_id}: cursor at {cursor}, last event {last}")
    worst = 0.0
    modules = module_counts_from_scratch(conn, twin_id)
    for m in modules:
        if m.evidence_at is None and any(m.expected):
            raise CorrectnessError(f"module {m.module_key} has evidence but was never learned")
        for got, want in zip(m.stored, m.expected, strict=True):
            error = relative_error(got, want)
            worst = max(worst, error)
            if error > 1e-6:
                raise CorrectnessError(
                    f"module {m.module_key}: weights {m.stored}, from scratch {m.expected}"
                )
    return {"modules_checked": len(modules), "max_relative_error": worst}


def settle_history(conn: psycopg.Connection, twin_id: str) -> None:
    """What completed runs over a twin's whole history leave behind: the cursor at its last
    event, and each module's weights, confidence and status as of now (the from-scratch sum)."""
    with conn.transaction():
        conn.execute(
            "update public.persona_modules set evidence_at = %s where twin_id = %s",
            (datetime.now(UTC), twin_id),
        )
        conn.execute(
            "update public.twins t set learned_through_event_id = "
            "(select max(id) from public.persona_training_events e where e.twin_id = t.id) "
            "where t.id = %s",
            (twin_id,),
        )
    settings = twin_settings(conn, twin_id)
    modules = module_counts_from_scratch(conn, twin_id)
    with conn.transaction():
        for m in modules:
            s, f = m.expected
            status = classify(s, f, ModuleStatus.insufficient_data, settings)
            conn.execute(
                "update public.persona_modules set success_weight = %s, failure_weight = %s, "
                "confidence = %s, status = %s where id = %s",
                (s, f, m.expected_confidence, status.value, m.module_id),
            )
