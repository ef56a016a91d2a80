"""`pfl serve`'s operations endpoint, through HTTP as an operator's scraper sees it: the
Prometheus metrics move by exactly what the worker did (checked against the rows it wrote), and
/healthz turns 503 while the API is unreachable and 200 again once it is back."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit import env as testkit_env
from testkit.world import make_twin
from tests.conftest import Stack, User, wait_for
from tests.integration.helpers import Refusal, pfl, time_passes

pytestmark = pytest.mark.integration

# The test stack's port prefix (scripts/test exports the stack's ports): the metrics and the
# stand-in API proxy get ports of this prefix, beside the stack's own.
PREFIX = os.environ.get("PFL_API_PORT", "55321")[:3]
METRICS_PORT = int(f"{PREFIX}61")
DEAD_PORT = int(f"{PREFIX}63")  # nothing listens there: a Langfuse that is down


def serve(stack: Stack, log: Path, url: str | None = None, **settings: str) -> subprocess.Popen:
    env = testkit_env.worker_env(
        stack,
        PFL_LOG_FORMAT="json",
        PFL_POLL_MIN_SECONDS="0.05",
        PFL_POLL_MAX_SECONDS="0.2",
        **settings,
    )
    if url:
        env["SUPABASE_URL"] = url
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(pfl("serve"), env=env, stdout=subprocess.DEVNULL, stderr=sink)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def get(path: str) -> httpx.Response | None:
    """GET on the metrics port; None while nothing answers there."""
    try:
        return httpx.get(f"http://127.0.0.1:{METRICS_PORT}{path}", timeout=5)
    except httpx.TransportError:
        return None


def scrape() -> dict[str, float]:
    """The metrics as {sample name with its labels: value}."""
    answer = get("/metrics")
    assert answer is not None and answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def vote(user: User, twin_id: str, trace: str, score: int) -> None:
    row = {"twin_id": twin_id, "trace_id": trace, "score": score,
           "intent_label": "factual_with_evidence"}
    user.client.table("persona_training_events").insert(row).execute()


def count(db: psycopg.Connection, query: str, *params: object) -> float:
    row = db.execute(query, params).fetchone()
    assert row is not None
    return row[0]


RUNS_OF = (
    "select twin_id::text, status::text, events_processed, attempts, error"
    " from persona_feedback_learning_runs where worker_id = %s"
)


def test_metrics_count_exactly_the_runs_events_and_backlog_of_the_worker(
    stack, db, make_user, tmp_path
):
    owner, voters = make_user("owner"), [make_user("voter") for _ in range(3)]
    twin, failing = make_twin(db, owner.id), make_twin(db, owner.id)
    refusal = Refusal(db, failing.id)
    worker_id = f"metrics-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "serve.log"
    # Langfuse configured but down: the votes stay in the outbox (retrying), so the backlog the
    # metrics read is not drained away under the test.
    proc = serve(
        stack, log,
        PFL_METRICS_PORT=str(METRICS_PORT), PFL_HEALTH_MAX_AGE_SECONDS="5",
        PFL_WORKER_ID=worker_id, LANGFUSE_HOST=f"http://127.0.0.1:{DEAD_PORT}",
        LANGFUSE_PUBLIC_KEY="pk-test", LANGFUSE_SECRET_KEY="sk-test",
        PFL_LANGFUSE_TIMEOUT_SECONDS="2", PFL_LANGFUSE_MAX_ATTEMPTS="100",
    )
    try:
        health = wait_for(lambda: (r := get("/healthz")) is not None and r.status_code == 200 and r)
        assert health.json()["status"] == "ok"
        assert f"http://127.0.0.1:{METRICS_PORT}/metrics" in log.read_text()  # 127.0.0.1 only

        # The failing twin's run is refused by the database (it fails for good; its vote waits),
        # then the refusal is lifted and its next run learns the vote.
        vote(voters[0], failing.id, "trace-f", -1)
        wait_for(lambda: count(
            db, "select count(*) from persona_feedback_learning_runs where twin_id = %s"
            " and status = 'failed'", failing.id), timeout=60)
        refusal.lift()
        # Its twin is held back after the failed run (10 s).
        time_passes(db, failing.id)
        # Six events for the other twin, one of them a changed vote.
        for i, voter in enumerate(voters):
            vote(voter, twin.id, f"trace-a{i}", 1)
        for i, voter in enumerate(voters[:2]):
            vote(voter, twin.id, f"trace-b{i}", -1)
        vote(voters[2], twin.id, "trace-a2", -1)

        def settled() -> dict[str, float] | None:
            """The scrape once every event of both twins is learned and the counters agree
            with the rows of the worker's runs."""
            if count(db, "select count(*) from persona_training_events e where e.twin_id in"
                         " (%s, %s) and e.processed_run_id is null", twin.id, failing.id):
                return None
            m = scrape()
            done = [r[1] for r in db.execute(RUNS_OF, (worker_id,)).fetchall()]
            if m['pfl_learning_runs_total{outcome="completed"}'] != done.count("completed"):
                return None
            return m

        m = wait_for(settled, timeout=60)
        runs = db.execute(RUNS_OF, (worker_id,)).fetchall()
        completed = [r for r in runs if r[1] == "completed"]
        failed = [r for r in runs if r[1] == "failed"]
        assert sum(r[2] for r in completed if r[0] == twin.id) == 6
        assert [r[2] for r in completed if r[0] == failing.id] == [1]
        assert failed and all(r[0] == failing.id for r in failed)
        assert all("refused for the test" in r[4] for r in failed)
        # One attempt each: nothing of this test's was retried.
        assert all(r[3] == 1 for r in runs if r[0] in (twin.id, failing.id))

        # Every counter moved from 0 (the process's start) by exactly what the rows of this
        # worker's runs say it did: this test's twins' runs, and whatever else was due.

        assert m['pfl_learning_runs_total{outcome="completed"}'] == len(completed)
        assert m['pfl_learning_runs_total{outcome="failed"}'] == len(failed)
        assert m['pfl_learning_runs_total{outcome="retried"}'] == 0
        assert m['pfl_learning_runs_total{outcome="lease_lost"}'] == 0
        assert m["pfl_learning_events_total"] == sum(r[2] for r in completed)
        assert m["pfl_learning_run_duration_seconds_count"] == len(runs)
        assert m['pfl_learning_run_duration_seconds_bucket{le="+Inf"}'] == len(runs)
        assert 0 < m["pfl_learning_run_duration_seconds_sum"] < 60 * len(runs)

        # The outbox backlog is the database's; both twins' current votes are in it, retrying.
        assert count(db, "select count(*) from persona_training_events where twin_id in (%s, %s)"
                         " and langfuse_status in ('pending', 'retrying')", twin.id,
                     failing.id) == 6  # 7 votes, one of them superseded before it was sent
        backlog, oldest = db.execute(
            "select count(*), extract(epoch from now() - min(created_at))::float8"
            " from persona_training_events where langfuse_status in ('pending', 'retrying')"
        ).fetchone()
        m = scrape()
        assert m["pfl_outbox_backlog"] == backlog >= 6
        assert m["pfl_outbox_oldest_pending_age_seconds"] == pytest.approx(oldest, abs=5)

        polled = m['pfl_last_successful_poll_timestamp_seconds{poller="learning-runs"}']
        assert polled == pytest.approx(count(db, "select extract(epoch from now())::float8"),
                                       abs=5)
        assert m['pfl_last_successful_poll_timestamp_seconds{poller="langfuse-outbox"}'] > 0
        assert m["process_cpu_seconds_total"] > 0
        assert (r := get("/nothing-here")) is not None and r.status_code == 404
    finally:
        refusal.lift()
        assert stop(proc) == 0, log.read_text()[-2000:]
    assert get("/healthz") is None  # the port is closed with the worker


class Proxy:
    """A TCP forwarder from `port` (0: one the system picks; `self.port` says which) to the
    stack's API. Paused, it makes the API unreachable for whoever connects through it (open
    connections are closed, new ones closed as they come) while it keeps the port."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port: int = self.listener.getsockname()[1]
        self.listener.settimeout(0.1)
        self.open: list[socket.socket] = []
        self.serving = threading.Event()
        self.serving.set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.serving.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _close_open(self) -> None:
        for s in self.open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.open = []

    def pause(self) -> None:
        self.serving.clear()
        self._close_open()

    def resume(self) -> None:
        self.serving.set()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.listener.close()
        self._close_open()


def test_health_is_503_while_the_api_is_unreachable_and_200_when_it_is(stack, tmp_path):
    api = httpx.URL(stack.url)
    target = (api.host, api.port or 80)
    # A port the system picks: a fixed one lies in the range handed to outgoing connections,
    # and a fresh-clone CI run found it taken.
    proxy = Proxy(0, target)
    log = tmp_path / "serve.log"
    proc = serve(
        stack, log, url=f"http://127.0.0.1:{proxy.port}",
        PFL_METRICS_PORT=str(METRICS_PORT), PFL_HEALTH_MAX_AGE_SECONDS="1",
        PFL_STORE_ATTEMPTS="1", PFL_HTTP_TIMEOUT_SECONDS="2",
    )
    try:
        wait_for(lambda: (r := get("/healthz")) is not None and r.status_code == 200)

        proxy.pause()  # the API is unreachable from the worker from now on
        # Another poller (the Langfuse mirror's pass, its API call hanging) can turn the worker
        # unhealthy first: wait for the run poller's own age to pass the bound as well.
        down = wait_for(lambda: (r := get("/healthz")) is not None and r.status_code == 503
                        and r.json()["last_successful_poll_age_seconds"] >= 1 and r)
        facts = down.json()
        assert facts["status"] == "unhealthy" and facts["max_age_seconds"] == 1
        # Unhealthy once the age passes 1 s; the age is reported rounded to the millisecond, so
        # an age of 1.0004 s reads 1.0.
        assert facts["last_successful_poll_age_seconds"] >= 1
        assert '"poll failed"' in log.read_text()
        assert proc.poll() is None  # the worker keeps polling, slower
        # The metrics still answer, without the outbox gauges the database could not give.
        m = scrape()
        assert "pfl_outbox_backlog" not in m
        assert m['pfl_last_successful_poll_timestamp_seconds{poller="learning-runs"}'] > 0

        proxy.resume()  # back
        up = wait_for(lambda: (r := get("/healthz")) is not None and r.status_code == 200 and r)
        assert up.json()["last_successful_poll_age_seconds"] <= 1
    finally:
        assert stop(proc) == 0, log.read_text()[-2000:]
        proxy.stop()


def test_metrics_are_off_unless_a_port_is_set(stack, tmp_path):
    log = tmp_path / "serve.log"
    proc = serve(stack, log)
    try:
        wait_for(lambda: log.read_text().count('"poller started"') == 2)
        assert get("/healthz") is None
        assert "metrics served" not in log.read_text()
    finally:
        assert stop(proc) == 0


def test_a_taken_metrics_port_stops_serve_with_one_line(stack, tmp_path):
    with socket.create_server(("127.0.0.1", METRICS_PORT)):
        done = subprocess.run(
            pfl("serve"),
            env=testkit_env.worker_env(stack, PFL_METRICS_PORT=str(METRICS_PORT)),
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"pfl: PFL_METRICS_PORT: cannot listen on 127.0.0.1:{METRICS_PORT}"
    ), done.stderr
