"""The soak's sizes, timings and vocabulary, and its log."""

from __future__ import annotations

from datetime import datetime

from testkit.env import ROOT

STACK = ROOT / "scripts" / "stack"
RESULTS = ROOT / "soak-results"

DEFAULT_SECONDS = 120
SHORT_SECONDS = 45
WORKERS = 4
FEEDBACK_USERS = 6
LANGFUSE_PORT = 60341
TRACES_PER_TWIN = 30
TWO_DEVICE_TRACES = 3  # the user on two devices votes on these traces of each twin only
THINK_MAX = 0.05  # a client waits up to this long between acknowledged requests
BACKOFF = (0.05, 1.0)  # a client's wait after an unacknowledged request: doubles up to the max
REQUEST_TIMEOUT = 5.0
REL_TOL = 1e-9

WORKER_ENV = {
    "PFL_POLL_MIN_SECONDS": "0.05",
    "PFL_POLL_MAX_SECONDS": "0.5",
    "PFL_LEASE_SECONDS": "5",
    "PFL_HTTP_TIMEOUT_SECONDS": "10",
    "PFL_LANGFUSE_TIMEOUT_SECONDS": "2",
    # A killed worker's claimed outbox rows come back after this (default 120 s).
    "PFL_LANGFUSE_VISIBILITY_SECONDS": "10",
    "PFL_LOG_FORMAT": "json",
}

INTENTS = ("factual_with_evidence", "casual_chat", "task_planning", "unmatched_intent")
FAILURE_REASONS = ("incorrect", "unhelpful", "off_persona", "unsafe", "outdated", "other")


def log(text: str) -> None:
    print(f"[soak {datetime.now().strftime('%H:%M:%S')}] {text}", flush=True)
