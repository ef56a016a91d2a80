"""`pfl serve`'s operations endpoint: Prometheus metrics (/metrics) and health (/healthz).

Served only when PFL_METRICS_PORT is set, on PFL_METRICS_HOST (127.0.0.1 by default). Imported
by `serve` alone, so `pfl run-once` never loads prometheus_client.

Metrics (every one of this process, except the outbox's three, which are the database's and
read the same from every worker):

- pfl_learning_runs_total{outcome}, counter: attempts at runs by how they ended: completed,
  failed (for good), retried (the attempt failed, the run waits for another), lease_lost;
- pfl_learning_run_duration_seconds, histogram: an attempt's wall-clock seconds, claim to
  completion or failure;
- pfl_learning_events_total, counter: events marked processed by the runs this process
  completed;
- pfl_last_successful_poll_timestamp_seconds{poller}, gauge: Unix time at which a poll of
  `learning-runs` or `langfuse-outbox` last succeeded;
- pfl_poll_failures_total{poller}, counter: polls that raised (the API or the database
  failing, or an unexpected error, logged with its traceback); the poller goes on;
- pfl_outbox_backlog, gauge: feedback votes waiting for Langfuse (pending or retrying), read at
  scrape time;
- pfl_outbox_oldest_pending_age_seconds, gauge: the oldest one's age (0 when none waits), read
  at scrape time;
- pfl_outbox_hold_seconds, gauge: seconds until the mirror's hold ends (Langfuse asked to
  wait: a rate limit, a usage suspension, no ingestion route; no worker sends it anything
  before then), 0 when none holds, read at scrape time;
- process_*: the process's CPU seconds, memory and open files (prometheus_client's own).

Health: /healthz answers 200 while the last successful poll for runs ended at most
`max_poll_age` seconds ago, and 503 before the first one or once it is older (the API or the
database unreachable, or refusing the worker's calls). The Langfuse mirror's poller makes it
503 too when it is failing: its last poll failed and none has succeeded for `max_poll_age`
seconds (since its last success, or since start), or when its pass in progress started more
than `max_poll_age` seconds ago (a pass stuck, e.g. in a request: each is bounded by the
Langfuse timeout, so this is a bug or a wedged store call). A mirror that is slow, or waiting
for Langfuse (down, a hold), is not failing: those passes succeed. The body is JSON saying which:
the runs' poll age at its top level (as before) and, under `pollers`, each poller's age, its
failures and whether it is failing.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.runner import OUTCOMES, Outcome
from worker.store import OutboxBacklog, Run, Store, StoreError

logger = logging.getLogger(__name__)

POLLERS = ("learning-runs", "langfuse-outbox")
# Seconds: a run's attempt is a few RPCs, each bounded by the API's 8 s statement timeout.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class OutboxCollector(Collector):
    """The outbox's backlog and the mirror's hold, asked of the database at each scrape (one
    indexed read whose cost follows the backlog). When the call fails the three gauges are left
    out of that scrape."""

    def __init__(self, backlog: Callable[[], OutboxBacklog]) -> None:
        self._backlog = backlog

    def collect(self) -> Iterable[Metric]:
        try:
            backlog = self._backlog()
        except (StoreError, TypeError) as exc:
            logger.warning("could not read the outbox backlog", extra={"error": str(exc)})
            return []
        return [
            GaugeMetricFamily(
                "pfl_outbox_backlog",
                "Feedback votes waiting for Langfuse (pending or retrying), in the database.",
                value=backlog.rows,
            ),
            GaugeMetricFamily(
                "pfl_outbox_oldest_pending_age_seconds",
                "Age of the oldest vote waiting for Langfuse, in seconds; 0 when none waits.",
                value=backlog.oldest_seconds or 0.0,
            ),
            GaugeMetricFamily(
                "pfl_outbox_hold_seconds",
                "Seconds until Langfuse may be sent to again (it asked to wait); 0 when none "
                "holds.",
                value=backlog.hold_seconds,
            ),
        ]


class WorkerMetrics:
    """The metrics of one `serve` process, in a registry of their own.

    `store` is asked for the outbox backlog at each scrape; `max_poll_age` (seconds) is the
    health rule's bound; `clock` gives Unix time in seconds (tests pass their own).
    """

    def __init__(
        self, store: Store, max_poll_age: float, clock: Callable[[], float] = time.time
    ) -> None:
        # No `_created` series beside each counter and histogram: the process start time says it.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        self.registry = CollectorRegistry()
        self.max_poll_age = max_poll_age
        self._clock = clock
        self._last_poll: dict[str, float] = {}
        self._last_failure: dict[str, float] = {}
        self._pass_started: dict[str, float] = {}
        self._failures: dict[str, int] = dict.fromkeys(POLLERS, 0)
        self._started = clock()
        self._lock = threading.Lock()
        self.runs = Counter(
            "pfl_learning_runs",
            "Attempts at learning runs by how they ended.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.runs.labels(outcome)  # every outcome is exported from the start, at 0
        self.run_seconds = Histogram(
            "pfl_learning_run_duration_seconds",
            "Wall-clock seconds of one attempt at a run, claim to completion or failure.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.events = Counter(
            "pfl_learning_events",
            "Events marked processed by the runs this process completed.",
            registry=self.registry,
        )
        self.polls = Gauge(
            "pfl_last_successful_poll_timestamp_seconds",
            "Unix time of the poller's last successful poll.",
            ["poller"],
            registry=self.registry,
        )
        self.failures = Counter(
            "pfl_poll_failures",
            "Polls that raised (the API or the database failing, or an unexpected error).",
            ["poller"],
            registry=self.registry,
        )
        for poller in POLLERS:
            self.failures.labels(poller)  # exported from the start, at 0
        self.registry.register(OutboxCollector(store.outbox_backlog))
        ProcessCollector(registry=self.registry)

    def observe_run(self, outcome: Outcome, run: Run, seconds: float) -> None:
        """Counts one attempt at a run (a `RunObserver`)."""
        self.runs.labels(outcome).inc()
        self.run_seconds.observe(seconds)
        if outcome == "completed":
            self.events.inc(run.events_processed or 0)

    def poll_started(self, poller: str) -> None:
        """Records that a poll of `poller` (one of POLLERS) starts now: it is failing if it is
        still in progress `max_poll_age` seconds later."""
        now = self._clock()
        with self._lock:
            self._pass_started[poller] = now

    def poll_succeeded(self, poller: str) -> None:
        """Records that `poller` (one of POLLERS) just finished a poll without an error."""
        now = self._clock()
        with self._lock:
            self._pass_started.pop(poller, None)
            self._last_poll[poller] = now
        self.polls.labels(poller).set(now)

    def poll_failed(self, poller: str) -> None:
        """Records that a poll of `poller` (one of POLLERS) just raised."""
        now = self._clock()
        with self._lock:
            self._pass_started.pop(poller, None)
            self._last_failure[poller] = now
            self._failures[poller] = self._failures.get(poller, 0) + 1
        self.failures.labels(poller).inc()

    def health(self) -> tuple[bool, dict[str, object]]:
        """Whether the worker is healthy by the rule above, and the facts behind it."""
        now = self._clock()
        with self._lock:
            last = dict(self._last_poll)
            failed = dict(self._last_failure)
            counts = dict(self._failures)
            in_pass = dict(self._pass_started)
        pollers: dict[str, dict[str, object]] = {}
        ages: dict[str, float | None] = {}
        for poller in POLLERS:
            success = last.get(poller)
            age = ages[poller] = None if success is None else max(0.0, now - success)
            quiet = now - (success if success is not None else self._started)
            started = in_pass.get(poller)
            stuck = started is not None and now - started > self.max_poll_age
            failing = stuck or (
                poller in failed
                and (success is None or failed[poller] >= success)
                and quiet > self.max_poll_age
            )
            pollers[poller] = {
                "last_successful_poll_age_seconds": None if age is None else round(age, 3),
                "failures": counts.get(poller, 0),
                "failing": failing,
                "pass_age_seconds": None if started is None else round(now - started, 3),
            }
        runs_age = ages["learning-runs"]
        runs_ok = runs_age is not None and runs_age <= self.max_poll_age
        healthy = runs_ok and not any(p["failing"] for p in pollers.values())
        return healthy, {
            "status": "ok" if healthy else "unhealthy",
            "last_successful_poll_age_seconds": None if runs_age is None else round(runs_age, 3),
            "max_age_seconds": self.max_poll_age,
            "pollers": pollers,
        }

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class MetricsServer:
    """An HTTP server in a thread of its own: GET /metrics and GET /healthz, 404 otherwise.

    `host` is an IPv4 or IPv6 address or a name (the first address the resolver gives for it is
    taken; `::` listens on every interface, IPv4 too where the system maps it, as Linux does by
    default). Raises OSError when it cannot listen on `host`:`port` (e.g. the port is taken, or
    the name does not resolve: socket.gaierror).
    """

    def __init__(self, metrics: WorkerMetrics, host: str, port: int) -> None:
        handler = _handler_for(metrics)
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class = type("MetricsHTTPServer", (ThreadingHTTPServer,),
                            {"address_family": family})
        self._server = server_class(address[:2], handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        """Starts answering requests."""
        self._thread.start()
        host, port = self._server.server_address[:2]
        host = f"[{host!s}]" if self._server.address_family == socket.AF_INET6 else host
        logger.info("metrics served", extra={"address": f"http://{host!s}:{port}/metrics"})

    def stop(self) -> None:
        """Stops answering and closes the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(metrics: WorkerMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path == "/healthz":
                healthy, facts = metrics.health()
                body = json.dumps(facts).encode() + b"\n"
                self._answer(200 if healthy else 503, "application/json", body)
            else:
                self._answer(404, "text/plain; charset=utf-8", b"not found\n")

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes are not worth a log line each

    return Handler
