"""A stand-in for Langfuse's public score-writing API, on 127.0.0.1, for tests, bench and soak.

One mode per server generation in use (`generation`), each accepting and refusing what that
server's own validation does, as read in Langfuse's public source at v3.225.4 (latest v3) and
v4.16.0 (the newest release in the source available, 2026-08-21; the main branch to 2026-08-22,
commit 62751446149b, changes nothing below): web/src/pages/api/public/ingestion.ts,
scores/index.ts, health.ts; packages/shared/src/server/ingestion/{types,processEventBatch}.ts,
utils/scores.ts; web/src/features/public-api/server/{apiAuth,RateLimitService}.ts;
worker/src/services/IngestionService/{index,utils}.ts; ClickHouse migration 0003_scores. No
4.59 or Cloud source was available: for their `/api/public/scores` array, the langfuse 5.x SDK's
generated client; for Cloud's ingestion route from 2026-11-16, Langfuse's own statements
(langfuse/langfuse#17453, langfuse/langfuse-docs#3562), which match the events-only code above.

- `v3` (3.225.4): `POST /api/public/ingestion` takes `{"batch": [...]}` (JSON, `Content-Type:
  application/json`) up to 4.5 MB (the route's `bodyParser.sizeLimit`; its API definition tells
  clients 3.5 MB) and answers 207 `{"successes": [{id, status: 201}], "errors": [{id, status:
  400, message, error}]}`, a score taking its event's timestamp. Only score-create and sdk-log
  events are modelled (a valid sdk-log is dropped: neither a success nor an error); other
  types get a stand-in error, although v3 itself would take them.
  `POST /api/public/scores` takes ONE score object up to 1 MB (200 `{"id"}`; a JSON array is
  400 "Invalid request data") and makes it an event stamped with the time of receipt.
  Self-hosted: never 429, never a usage suspension.
- `v4` (4.16.0): the same, in the `events_only` write mode, v4's default since 4.0.0: the
  ingestion route keeps score-create and sdk-log events and refuses every other event type
  inside the 207, one error per event {id, status 400, message "Event type not accepted",
  error}, appended after the batch's own errors (`_events_only`).
- `v4.59` (4.59.0) and `cloud`: ingestion as `v4` (Cloud: from 2026-11-16, when Langfuse shuts
  the route down for every event type but scores); `POST /api/public/scores` also takes a JSON
  array up to 1 MB (202 `{"message": "Accepted"}`, or 207 `{"accepted", "rejected", "errors":
  [{"message"}]}`, no ids), stamped with the time of receipt (the SDK's `CreateScoreRequest`
  has no `timestamp`); SDK-documented, not source-verified.
  `cloud` alone answers 429 (Retry-After, X-RateLimit-*) and 403 "Ingestion suspended: Usage
  threshold exceeded...".

Everywhere: HTTP Basic auth, the key found by its secret key (a wrong public key with the right
secret is accepted, as apiAuth.ts does); 401 `{"error": "UnauthorizedError", "message"}` for a
missing header or a secret that matches no key; 413 above the body limit; 405 for other methods
on these paths; `GET /api/public/health` answers 200 `{"status": "OK", "version"}` without auth.

Scores are stored as Langfuse's worker and score table do (`_store`): every event ever received
for a score id is kept (the event log in blob storage) and re-read on each update; the row is
rebuilt from the stored row and those events (first `timestamp`, `traceId`, `environment` kept;
fields an event leaves out kept; `metadata` deep-merged) and written under (day of its
timestamp, name, id), replacing a row of that key (`table`); a score id with rows on two days is
a duplicate (`duplicates()`). `forget_event_log()` drops the event files (a lifecycle rule).
`scores` keeps every version received per score id, oldest first. The stand-in's clock
(`advance(days=…)`) moves "today" to show what a vote changed on another day does.

Faults switch at runtime (`set_mode`): `ok`, `partial` (reject chosen score ids in the 207),
`unauthorized` (401), `rate_limited` (429, cloud), `suspended` (403, cloud), `error` (500),
`redirect` (301 to https://, as an http→https proxy would), `hang` (read the request, never answer
until the mode changes or the server stops), `no_route` (404 on /api/public/ingestion while
health still answers: no Langfuse generation lacks the route, but a proxy in front of Langfuse
that forwards only some paths, or sends this one elsewhere, answers so), `proxy_page` (a 200
HTML page for every path: a proxy or a web app answering in Langfuse's place),
`proxy_rate_limited` (nginx's `limit_req` page, 429 with no Retry-After or rate-limit header,
for every path: a proxy's rate limit in front of any generation), `proxy_forbidden` (nginx's 403
page, for every path: a proxy's or firewall's `deny` rule), `proxy_not_allowed` (nginx's 405
page, for every POST: a web server that serves static files at LANGFUSE_HOST),
`proxy_bad_gateway` (nginx's 502 page, for every path: langfuse-web restarting or down behind
its proxy; Langfuse's handler itself never answers 502), `proxy_bad_encoding` (Langfuse takes
a non-empty batch as in `ok`, but its 207 arrives marked `Content-Encoding: gzip` without being
gzip: a proxy that broke the answer, which no client can read). Langfuse's own
refusals carry `{"error": "<Name>Error", "message"}` (see `_answer`); these pages do not. "Down"
is `stop()`; `start()` binds the same port.

As a process (`testkit.standin_process`): `python -m testkit.standin --port P --generation G`
prints the URL on its first stdout line and serves until SIGINT/SIGTERM; `POST /_standin/mode
{"mode": …}`, `POST /_standin/clock {"days": n}`, `POST /_standin/clear`, `GET /_standin/state`.
With `--state-file F` it writes, once stopped (every handler joined), what it received to F.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Self, cast, get_args

Generation = Literal["v3", "v4", "v4.59", "cloud"]
GENERATIONS: tuple[Generation, ...] = get_args(Generation)
VERSIONS: dict[str, str] = {"v3": "3.225.4", "v4": "4.16.0", "v4.59": "4.59.0", "cloud": "4.61.0"}
"""What each generation's health endpoint reports (cloud: a stand-in value of 4.59 or later)."""
Mode = Literal[
    "ok",
    "partial",
    "unauthorized",
    "rate_limited",
    "suspended",
    "error",
    "redirect",
    "hang",
    "no_route",
    "proxy_page",
    "proxy_rate_limited",
    "proxy_forbidden",
    "proxy_not_allowed",
    "proxy_bad_gateway",
    "proxy_bad_encoding",
]
MODES: tuple[str, ...] = get_args(Mode)
CLOUD_ONLY = frozenset({"rate_limited", "suspended"})
EVENTS_ONLY: frozenset[Generation] = frozenset({"v4", "v4.59", "cloud"})
"""Generations whose ingestion route takes score and SDK log events only (see `_events_only`)."""
SCORE_EVENT, LOG_EVENT = "score-create", "sdk-log"
EVENT_TYPE_REFUSED = "Event type not accepted"

SCORES_PATH = "/api/public/scores"
INGESTION_PATH = "/api/public/ingestion"
HEALTH_PATH = "/api/public/health"
ADMIN_PREFIX = "/_standin/"
INGESTION_LIMIT = int(4.5 * 1024 * 1024)  # Next.js bodyParser sizeLimit "4.5mb"
SCORES_LIMIT = 1024 * 1024  # the default "1mb"
INVALID_CREDENTIALS = "Invalid credentials. Confirm that you've configured the correct host."
SUSPENDED = "Ingestion suspended: Usage threshold exceeded. Please upgrade your plan."
NOT_FOUND_PAGE = "404: This page could not be found."
PROXY_PAGE = "<!doctype html><html><body>Sign in to continue</body></html>"


def nginx_page(status: str) -> str:
    """nginx's own error page for `status` (e.g. "429 Too Many Requests"), as it answers when
    it refuses a request itself (no Retry-After, no JSON)."""
    return (
        f"<html>\r\n<head><title>{status}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    )


PROXY_429_PAGE = nginx_page("429 Too Many Requests")  # limit_req_status 429
RETRY_AFTER_SECONDS = 2
_DATA_TYPES = frozenset({"NUMERIC", "BOOLEAN", "CATEGORICAL", "TEXT", "CORRECTION"})
_SOURCES = frozenset({"API", "EVAL", "ANNOTATION"})
TEXT_SCORE_MAX_LENGTH = 500  # packages/shared/src/domain/scores.ts
_ISO_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it."""

    method: str
    path: str
    auth: tuple[str, str] | None
    """Basic-auth (username, password) as sent, None when absent or unreadable."""
    headers: dict[str, str]
    """Header names in lower case."""
    body: Any
    """Parsed JSON body; the raw text when it is not JSON; None when empty."""
    received_at: float
    """time.monotonic() when the request was read."""
    status: int | None
    """Status answered; None when the stand-in did not answer (hang)."""

    @property
    def scores(self) -> list[dict[str, Any]]:
        """The scores this request carried (ingestion score events' bodies, or /scores bodies)."""
        if self.path == INGESTION_PATH and isinstance(self.body, dict):
            batch = self.body.get("batch")
            return [
                e["body"]
                for e in batch or []
                if isinstance(e, dict)
                and e.get("type") == SCORE_EVENT
                and isinstance(e.get("body"), dict)
            ]
        if self.path == SCORES_PATH and self.method == "POST":
            items = self.body if isinstance(self.body, list) else [self.body]
            return [s for s in items if isinstance(s, dict)]
        return []


@dataclass
class _State:
    mode: Mode = "ok"
    reject: dict[str, str] = field(default_factory=dict)
    reject_status: int = 400
    hang_generation: int = 0
    days: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    scores: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    table: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    writes: int = 0
    written: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """When each table row was last written (a counter): ClickHouse's `event_ts` order."""
    event_log: dict[str, dict[str, list[tuple[datetime, dict[str, Any]]]]] = field(
        default_factory=dict
    )
    """Score id -> event file key -> the events of that file: the blob-storage event log the
    worker re-reads on every update of an id."""


class LangfuseStandin:
    """A threaded HTTP stand-in for one Langfuse server generation; see the module docstring."""

    def __init__(
        self,
        *,
        generation: Generation = "v3",
        public_key: str = "pk-lf-standin",
        secret_key: str = "sk-lf-standin",
        host: str = "127.0.0.1",
        port: int = 0,
        version: str | None = None,
    ) -> None:
        if generation not in GENERATIONS:
            raise ValueError(f"unknown generation {generation!r}; one of {', '.join(GENERATIONS)}")
        self.generation: Generation = generation
        self.version = version or VERSIONS[generation]
        self.public_key = public_key
        self.secret_key = secret_key
        self.host = host
        self._port = port
        self._cond = threading.Condition()
        self._state = _State()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (known after the first start)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL to give the worker as LANGFUSE_HOST, e.g. http://127.0.0.1:41234."""
        return f"http://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start serving; after a stop(), on the same port as before."""
        with self._lifecycle:
            if self._server is not None:
                return
            server = _Server((self.host, self._port), self)
            self._port = server.server_address[1]
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"langfuse-standin:{self._port}",
                daemon=True,
            )
            self._server, self._thread = server, thread
            thread.start()

    def stop(self) -> None:
        """Stop serving (Langfuse "down": connections are refused). Open connections are
        closed, hanging requests are released without an answer, handler threads are joined."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            if server is None or thread is None:
                return
            with self._cond:
                server.stopping = True
                self._cond.notify_all()
            server.shutdown()
            server.close_connections()
            server.server_close()
            thread.join()
            self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour and records --------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        with self._cond:
            return self._state.mode

    def set_mode(
        self, mode: Mode, *, reject: Mapping[str, str] | None = None, reject_status: int = 400
    ) -> None:
        """Switch behaviour. `reject` (partial mode) maps score ids to the error Langfuse answers
        for them, with `reject_status` (400, or 500 for "Internal Server Error"). Leaving `hang`
        releases the hanging requests unanswered. Raises ValueError for an unknown mode, and for
        a Cloud-only answer (429, usage suspension) on a self-hosted generation, which never
        gives it."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if mode in CLOUD_ONLY and self.generation != "cloud":
            raise ValueError(f"self-hosted Langfuse ({self.generation}) never answers {mode}")
        with self._cond:
            self._state.mode = mode
            self._state.reject = dict(reject or {})
            self._state.reject_status = reject_status
            self._state.hang_generation += 1
            self._cond.notify_all()

    def advance(self, *, days: int) -> None:
        """Move the stand-in's "today" (the time of receipt it stamps) by `days`."""
        with self._cond:
            self._state.days += days

    def now(self) -> datetime:
        """The stand-in's clock: the real time, moved by advance()."""
        with self._cond:
            days = self._state.days
        return datetime.now(UTC) + timedelta(days=days)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (admin requests excepted), oldest first."""
        with self._cond:
            return list(self._state.requests)

    @property
    def score_requests(self) -> list[RecordedRequest]:
        """The requests that carried scores (an empty probe batch does not)."""
        return [r for r in self.requests if r.method == "POST" and r.scores]

    @property
    def scores(self) -> dict[str, list[dict[str, Any]]]:
        """Accepted scores: score id -> every version stored, oldest first (each with the
        timestamp the server gave it)."""
        with self._cond:
            return {k: [dict(v) for v in versions] for k, versions in self._state.scores.items()}

    @property
    def table(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """The score table: (day, name, score id) -> the row as it stands."""
        with self._cond:
            return {k: dict(v) for k, v in self._state.table.items()}

    def duplicates(self) -> dict[str, int]:
        """Score ids with more than one row in the table (a vote counted twice)."""
        counts = Counter(score_id for _, _, score_id in self.table)
        return {k: n for k, n in counts.items() if n > 1}

    def clear(self) -> None:
        """Forget recorded requests and scores (the mode and the clock stay)."""
        with self._cond:
            self._state.requests.clear()
            self._state.scores.clear()
            self._state.table.clear()
            self._state.written.clear()
            self._state.event_log.clear()

    def forget_event_log(self) -> None:
        """Drop the stored event files (what a blob-storage lifecycle rule expiring them does);
        the score table stays."""
        with self._cond:
            self._state.event_log.clear()

    # -- request handling (called from handler threads) -------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._cond:
            self._state.requests.append(request)

    def _hang(self, server: _Server) -> None:
        with self._cond:
            generation = self._state.hang_generation
            self._cond.wait_for(
                lambda: server.stopping or self._state.hang_generation != generation
            )

    def _snapshot(self) -> tuple[Mode, dict[str, str], int]:
        with self._cond:
            return self._state.mode, dict(self._state.reject), self._state.reject_status

    def _store(self, file_key: str, events: list[tuple[datetime, dict[str, Any]]]) -> None:
        """Store one event file (the score-create events of one request for one score id, in
        request order) and rebuild that score's row as Langfuse's worker does
        (`IngestionService.processScoreEventList`, v3.225.4 and v4.16.0):

        - every event file ever stored for the id is read (listed by key, ascending) and the
          events are ordered by timestamp; equal timestamps come out in reverse listing order
          (`toTimeSortedEventList` answers -1 for two create events, which V8's sort turns into
          a reversal; for mixed timestamps this is modelled as reverse, then a stable sort);
        - the row found for the id with a timestamp at or after the earliest event's comes
          first (`getClickhouseRecord`, latest write), then each event overwrites it
          (`overwriteObject`): a field the event leaves out keeps its value, `null` replaces it,
          `id`, `timestamp`, `traceId` and `environment` keep their first value, `metadata` is
          deep-merged (lodash `merge`) and stored as strings (ClickHouse `Map(String, String)`);
        - the result is written under (day of its timestamp, name, id) (`0003_scores`:
          `ORDER BY (project_id, toDate(timestamp), name, id)`), replacing a row of that key.
        """
        score_id = str(events[0][1]["id"])
        with self._cond:
            files = self._state.event_log.setdefault(score_id, {})
            files[file_key] = list(events)
            listed = [event for key in sorted(files) for event in files[key]]
            ordered = sorted(reversed(listed), key=lambda event: event[0])
            earliest = ordered[0][0]
            candidates = [
                key
                for key, row in self._state.table.items()
                if key[2] == score_id and _parse_time(row["timestamp"]) >= earliest
            ]
            merged: dict[str, Any] = {}
            if candidates:
                latest = max(candidates, key=lambda key: self._state.written[key])
                merged = dict(self._state.table[latest])
            for _, record in ordered:
                merged = _overwrite(merged, record)
            merged["metadata"] = {
                k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
                for k, v in (merged.get("metadata") or {}).items()
            }
            day = _parse_time(merged["timestamp"]).astimezone(UTC).date().isoformat()
            key = (day, str(merged.get("name")), score_id)
            self._state.table[key] = merged
            self._state.writes += 1
            self._state.written[key] = self._state.writes

    def _received(self, score: dict[str, Any], timestamp: datetime) -> dict[str, Any]:
        """One score version as received: its body with the timestamp it takes and the
        environment Langfuse files it under; also kept in `scores`."""
        row = {k: v for k, v in score.items() if k != "timestamp"}
        row["timestamp"] = timestamp.astimezone(UTC).isoformat().replace("+00:00", "Z")
        row["environment"] = _environment(score.get("environment"), self.generation)
        row.setdefault(
            "dataType", "NUMERIC" if not isinstance(row.get("value"), str) else "CATEGORICAL"
        )
        with self._cond:
            self._state.scores.setdefault(str(row["id"]), []).append(dict(row))
        return row

    def _ingest(self, body: Any, reject: Mapping[str, str], reject_status: int) -> tuple[int, Any]:
        """`POST /api/public/ingestion` after auth (`ingestion.ts`, `processEventBatch.ts`)."""
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            return 400, {
                "message": "Invalid request data",
                "errors": ["Invalid input: expected object with a batch array"],
            }
        successes: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        batch, refused = _events_only(body["batch"], self.generation in EVENTS_ONLY)
        # one event file per score id per request, under the first event's id, events in
        # request order (processEventBatch groups the sorted batch by body id)
        files: dict[str, tuple[str, list[tuple[datetime, dict[str, Any]]]]] = {}
        valid = []
        for event in batch:
            event_id = event.get("id") if isinstance(event, dict) else None
            label = event_id if isinstance(event_id, str) else "unknown"
            problem = _invalid_event(event)
            score = event.get("body") if isinstance(event, dict) else None
            if problem is None and event.get("type") == LOG_EVENT:
                continue  # logged by the server, then dropped: neither a success nor an error
            if problem is None and isinstance(score, dict) and score.get("id") in reject:
                status = reject_status
                message = "Invalid request data" if status < 500 else "Internal Server Error"
                errors.append(
                    {
                        "id": label,
                        "status": status,
                        "message": message,
                        "error": reject[score["id"]],
                    }
                )
                continue
            if problem is not None:
                errors.append(
                    {
                        "id": label,
                        "status": 400,
                        "message": "Invalid request data",
                        "error": problem,
                    }
                )
                continue
            valid.append(cast(dict[str, Any], event))
        # every valid event is a success, even one whose body has no id: that one is never
        # queued, so never stored (processEventBatch skips it when grouping by body id)
        for event in sorted(valid, key=lambda e: _parse_time(e["timestamp"])):
            successes.append({"id": event["id"], "status": 201})
            if not event["body"].get("id"):
                continue
            stamp = _parse_time(event["timestamp"])
            row = self._received(event["body"], stamp)
            files.setdefault(row["id"], (event["id"], []))[1].append((stamp, row))
        for file_key, events in files.values():
            self._store(file_key, events)
        # the events-only refusals come after the batch's own errors, as ingestion.ts appends them
        return 207, {"successes": successes, "errors": errors + refused}

    def _post_scores(self, body: Any, reject: Mapping[str, str]) -> tuple[int, Any]:
        """`POST /api/public/scores`: one score object on v3 and v4 (`scores/index.ts`,
        `ScoresApiService.createScore`: one score-create event with a new id and the time of
        receipt); on v4.59 and cloud also an array (modelled from the SDK, see above)."""
        batch_route = self.generation in ("v4.59", "cloud")
        if isinstance(body, list) and batch_route:
            accepted, errors = 0, []
            for index, score in enumerate(body):
                problem = _invalid_score(score)
                score_id = score.get("id") if isinstance(score, dict) else None
                if problem is None and score_id in reject:
                    problem = reject[cast(str, score_id)]
                if problem is not None:
                    errors.append({"message": f"Score {score_id or index}: {problem}"})
                    continue
                score = dict(cast(dict[str, Any], score))
                score["id"] = score.get("id") or str(uuid.uuid4())
                # the SDK's CreateScoreRequest has no timestamp: the time of receipt, as the
                # one-score route
                now = self.now()
                self._store(str(uuid.uuid4()), [(now, self._received(score, now))])
                accepted += 1
            if not errors:
                return 202, {"message": "Accepted"}
            return 207, {"accepted": accepted, "rejected": len(errors), "errors": errors}
        if not isinstance(body, dict):
            issue = (
                "Invalid input: expected object, received array"
                if isinstance(body, list)
                else "Invalid input"
            )
            return 400, {
                "message": "Invalid request data",
                "error": [{"code": "invalid_type", "message": issue}],
            }
        problem = _invalid_score(body)
        if problem is None and body.get("id") in reject:
            problem = reject[cast(str, body["id"])]
        if problem is not None:
            return 400, {"message": "Invalid request data", "error": problem}
        # The one-score route ignores a body timestamp: the score gets the time of receipt.
        score = dict(body)
        score["id"] = score.get("id") or str(uuid.uuid4())
        now = self.now()
        self._store(str(uuid.uuid4()), [(now, self._received(score, now))])
        return 200, {"id": score["id"]}

    def _admin(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == ADMIN_PREFIX + "state":
            with self._cond:
                return 200, {
                    "generation": self.generation,
                    "mode": self._state.mode,
                    "requests": len(self._state.requests),
                    "score_requests": len(self.score_requests),
                    "scores": self._state.scores,
                    "table": [
                        {"day": day, "name": name, "id": score_id, "row": row}
                        for (day, name, score_id), row in self._state.table.items()
                    ],
                    "duplicates": self.duplicates(),
                }
        if method == "POST" and path == ADMIN_PREFIX + "mode" and isinstance(body, dict):
            mode = body.get("mode")
            reject = body.get("reject") or {}
            if mode not in MODES or not isinstance(reject, dict):
                return 400, {"message": f"mode must be one of {', '.join(MODES)}"}
            try:
                self.set_mode(cast(Mode, mode), reject={str(k): str(v) for k, v in reject.items()})
            except ValueError as exc:
                return 400, {"message": str(exc)}
            return 200, {"mode": mode}
        if method == "POST" and path == ADMIN_PREFIX + "clock" and isinstance(body, dict):
            self.advance(days=int(body.get("days", 0)))
            return 200, {"now": self.now().isoformat()}
        if method == "POST" and path == ADMIN_PREFIX + "clear":
            self.clear()
            return 200, {}
        return 404, {"message": "Not found"}


_IMMUTABLE = frozenset({"id", "timestamp", "traceId", "environment"})
"""Score fields that keep their first value (IngestionService `immutableEntityKeys`)."""


def _overwrite(row: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """`overwriteObject` of Langfuse's worker (worker/src/services/IngestionService/utils.ts,
    v3.225.4 and v4.16.0): the event's fields replace the row's, except a field it leaves out
    (and an empty object), and an immutable field the row already has; `metadata` deep-merged."""
    out = dict(row)
    for key, value in event.items():
        if key == "metadata":
            continue
        if key in _IMMUTABLE and key in out:
            continue
        if isinstance(value, dict) and not value:
            continue
        out[key] = value
    # convertJsonSchemaToRecord: an object as it is, a literal or an array as {"metadata": …}
    new = event.get("metadata")
    if new is None:
        new = {}
    elif not isinstance(new, dict):
        new = {"metadata": new if isinstance(new, str) else json.dumps(new, separators=(",", ":"))}
    old = row.get("metadata")
    out["metadata"] = _deep_merge(old, new) if isinstance(old, dict) else new
    return out


def _deep_merge(a: Any, b: Any) -> Any:
    """lodash `merge(a, b)`: objects merged key by key, arrays index by index, other values
    replaced (JSON null included)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for key, value in b.items():
            out[key] = _deep_merge(a[key], value) if key in a else value
        return out
    if isinstance(a, list) and isinstance(b, list):
        return [_deep_merge(a[i], b[i]) if i < len(a) else b[i] for i in range(len(b))] + a[
            len(b) :
        ]
    return b


def _environment(value: object, generation: Generation) -> str:
    """Langfuse's public environment rule (`PublicEnvironmentName`,
    packages/shared/src/server/ingestion/types.ts): lower case, the leading "langfuse" prefix
    removed (v3.225.4: one; v4.16.0: all of them), at most 40 of [a-z0-9_-]; anything else is
    "default"."""
    if not isinstance(value, str):
        return "default"
    prefix = r"^langfuse[-_]?" if generation == "v3" else r"^(?:langfuse[-_]?)+"
    stripped = re.sub(prefix, "", value.lower())[:40]
    return stripped if stripped and re.fullmatch(r"[a-z0-9_-]+", stripped) else "default"


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _invalid_event(event: object) -> str | None:
    """Why the ingestion schema refuses this event, or None (score-create events only)."""
    if not isinstance(event, dict):
        return "expected an event object"
    event_id = event.get("id")
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= 800 or "\r" in event_id:
        return "id: a string of 1 to 800 characters without carriage returns is required"
    timestamp = event.get("timestamp")
    if not isinstance(timestamp, str) or not _ISO_OFFSET.match(timestamp):
        return "timestamp: an ISO 8601 datetime with an offset is required"
    if event.get("type") == LOG_EVENT:
        log = event.get("body")
        if not isinstance(log, dict) or "log" not in log:
            return "body.log: required"
        if log.get("id") is not None and not isinstance(log.get("id"), str):
            return "body.id: expected a string"
        return None
    if event.get("type") != SCORE_EVENT:
        return f"type {event.get('type')!r}: this stand-in models score-create events only"
    return _invalid_score(event.get("body"))


def _events_only(batch: list[Any], events_only: bool) -> tuple[list[Any], list[dict[str, Any]]]:
    """(the events processed further, the per-event errors of those refused): in v4's
    `events_only` write mode (its default since 4.0.0, and Langfuse Cloud's for this route from
    2026-11-16) `ingestion.ts` (`filterBatchForEventsOnly`, main to 2026-08-22) keeps only
    score-create and sdk-log events, judged by the `type` alone, before any other validation;
    each other event, or a non-object, is refused with status 400 under its id ("unknown" when
    it has no string id). Off (v3): the whole batch goes on."""
    if not events_only:
        return batch, []
    kept: list[Any] = []
    refused: list[dict[str, Any]] = []
    for event in batch:
        kind = event.get("type") if isinstance(event, dict) else None
        kind = kind if isinstance(kind, str) else None
        if kind in (SCORE_EVENT, LOG_EVENT):
            kept.append(event)
            continue
        event_id = event.get("id") if isinstance(event, dict) else None
        refused.append(
            {
                "id": event_id if isinstance(event_id, str) else "unknown",
                "status": 400,
                "message": EVENT_TYPE_REFUSED,
                "error": f"event type {kind or 'unknown'!r} refused: in the events_only write "
                "mode this route takes score and SDK log events only",
            }
        )
    return kept, refused


def _invalid_score(score: object) -> str | None:
    """Why Langfuse's score schema refuses this score body, or None: `ScoreBody` in
    packages/shared/src/server/ingestion/types.ts with `applyScoreValidation`
    (packages/shared/src/utils/scores.ts), the same in v3.225.4 and v4.16.0. Unknown keys pass
    (zod objects strip them)."""
    if not isinstance(score, dict):
        return "body: expected an object"
    name = score.get("name")
    if not isinstance(name, str) or not name:
        return "name: a non-empty string is required"
    score_id = score.get("id")
    if score_id is not None and (
        not isinstance(score_id, str) or not 1 <= len(score_id) <= 800 or "\r" in score_id
    ):
        return "id: a string of 1 to 800 characters without carriage returns"
    for key in (
        "traceId",
        "sessionId",
        "datasetRunId",
        "observationId",
        "comment",
        "configId",
        "executionTraceId",
        "queueId",
    ):
        if score.get(key) is not None and not isinstance(score.get(key), str):
            return f"{key}: expected a string"
    if score.get("source") is not None and score.get("source") not in _SOURCES:
        return "source: expected one of API, EVAL, ANNOTATION"
    data_type = score.get("dataType")
    if data_type is not None and data_type not in _DATA_TYPES:
        return f"dataType: invalid discriminator value {data_type!r}"
    value = score.get("value")
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if data_type in ("NUMERIC", "BOOLEAN") and not numeric:
        return f"value must be a number for {data_type} scores"
    if data_type == "BOOLEAN" and value not in (0, 1):
        return "Value must be a number equal to either 0 or 1 for data type BOOLEAN"
    if data_type in ("CATEGORICAL", "TEXT", "CORRECTION") and not isinstance(value, str):
        return f"value must be a string for {data_type} scores"
    if data_type == "TEXT" and not 1 <= len(cast(str, value)) <= TEXT_SCORE_MAX_LENGTH:
        return f"value: a TEXT score is 1 to {TEXT_SCORE_MAX_LENGTH} characters"
    if data_type == "CORRECTION" and score.get("configId") is not None:
        return "configId: a CORRECTION score cannot have a config"
    if data_type is None and not (numeric or isinstance(value, str)):
        return "value must be a number or a string"
    # exactly one subject; an empty string counts as absent (`!!data.traceId`)
    trace, session, run = (bool(score.get(k)) for k in ("traceId", "sessionId", "datasetRunId"))
    observation = bool(score.get("observationId"))
    if not (
        (trace and not session and not run)
        or (session and not trace and not run and not observation)
        or (run and not trace and not session and not observation)
    ):
        return (
            "Provide exactly one of the following: traceId (with optional observationId), "
            "sessionId or datasetRunId. ObservationId requires traceId."
        )
    return None


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


class _Server(ThreadingHTTPServer):
    """Tracks its connections so stop() can close keep-alive ones; joins handler threads on
    close (hanging handlers are released first)."""

    daemon_threads = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], standin: LangfuseStandin) -> None:
        self.standin = standin
        self.stopping = False
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # client went away (timeout, reset): not our problem
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LangfuseStandin/1"
    timeout = 30  # an idle keep-alive connection is dropped after this
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        standin = self.server.standin
        path = self.path.split("?", 1)[0]
        raw = self._read_body()
        body = _parse_body(raw)

        if path.startswith(ADMIN_PREFIX):
            self._respond(*standin._admin(self.command, path, body))
            return

        headers = {k.lower(): v for k, v in self.headers.items()}
        auth = _basic_auth(self.headers.get("Authorization"))
        mode, reject, reject_status = standin._snapshot()

        def record(status: int | None) -> None:
            standin._record(
                RecordedRequest(
                    method=self.command,
                    path=path,
                    auth=auth,
                    headers=headers,
                    body=body,
                    received_at=time.monotonic(),
                    status=status,
                )
            )

        if mode == "hang":
            record(None)
            standin._hang(self.server)
            self.close_connection = True
            return

        status, payload, extra = self._answer(mode, reject, reject_status, path, auth, raw, body)
        if mode == "proxy_bad_encoding" and path == INGESTION_PATH and status == 207:
            batch = body.get("batch") if isinstance(body, dict) else None
            if batch:  # the start-up check's empty batch is answered readably
                extra = {**extra, "Content-Encoding": "gzip"}
        record(status)
        self._respond(status, payload, extra)

    def _answer(
        self,
        mode: Mode,
        reject: Mapping[str, str],
        reject_status: int,
        path: str,
        auth: tuple[str, str] | None,
        raw: bytes,
        body: Any,
    ) -> tuple[int, Any, dict[str, str]]:
        standin = self.server.standin
        if mode == "proxy_page":  # something else answers in Langfuse's place
            return 200, PROXY_PAGE, {"Content-Type": "text/html; charset=utf-8"}
        if mode == "proxy_rate_limited":  # a proxy's rate limit in front of Langfuse
            return 429, PROXY_429_PAGE, {"Content-Type": "text/html"}
        if mode == "proxy_forbidden":  # a proxy's or firewall's deny rule
            return 403, nginx_page("403 Forbidden"), {"Content-Type": "text/html"}
        if mode == "proxy_bad_gateway":  # nothing behind the proxy answers for now
            return 502, nginx_page("502 Bad Gateway"), {"Content-Type": "text/html"}
        if mode == "proxy_not_allowed" and self.command == "POST":  # static files, not Langfuse
            return 405, nginx_page("405 Not Allowed"), {"Content-Type": "text/html"}
        if mode == "redirect":  # an http -> https proxy in front of Langfuse
            location = f"https://{standin.host}:{standin.port}{self.path}"
            return 301, "Moved Permanently", {"Location": location}
        if path == HEALTH_PATH and self.command == "GET":
            return 200, {"status": "OK", "version": standin.version}, {}
        if path not in (INGESTION_PATH, SCORES_PATH) or (
            mode == "no_route" and path == INGESTION_PATH
        ):
            return 404, NOT_FOUND_PAGE, {}
        limit = INGESTION_LIMIT if path == INGESTION_PATH else SCORES_LIMIT
        if len(raw) > limit:  # the body parser refuses it before any handler runs
            size = "4.5mb" if path == INGESTION_PATH else "1mb"
            return 413, f"Body exceeded {size} limit", {}
        if path == SCORES_PATH and self.command == "GET":
            if auth is None or auth[1] != standin.secret_key:
                return 401, {"error": "UnauthorizedError", "message": INVALID_CREDENTIALS}, {}
            return (
                200,
                {"data": [], "meta": {"page": 1, "limit": 50, "totalItems": 0, "totalPages": 0}},
                {},
            )
        if self.command != "POST":
            return 405, {"error": "MethodNotAllowedError", "message": "Method not allowed"}, {}
        if auth is None:
            return 401, {"error": "UnauthorizedError", "message": "No authorization header"}, {}
        # apiAuth.ts (v3.225.4, v4.16.0) finds the key by the hash of the secret key; a public
        # key that is not that key's own is only logged ("Public key mismatch on basic auth")
        if mode == "unauthorized" or auth[1] != standin.secret_key:
            return 401, {"error": "UnauthorizedError", "message": INVALID_CREDENTIALS}, {}
        if mode == "suspended":
            return 403, {"error": "ForbiddenError", "message": SUSPENDED}, {}
        if mode == "rate_limited":
            reset = standin.now() + timedelta(seconds=RETRY_AFTER_SECONDS)
            return (
                429,
                {
                    "message": "Rate limit exceeded",
                    "code": "rate_limited",
                    "details": {
                        "retryAfterSeconds": RETRY_AFTER_SECONDS,
                        "limit": 1000,
                        "remaining": 0,
                        "resetAt": reset.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    },
                },
                {
                    "Retry-After": str(RETRY_AFTER_SECONDS),
                    "X-RateLimit-Limit": "1000",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": reset.strftime("%a %b %d %Y %H:%M:%S GMT+0000"),
                },
            )
        if mode == "error":
            return 500, {"message": "Invalid request data", "errors": ["stand-in error mode"]}, {}
        rejected = reject if mode == "partial" else {}
        if not self.headers.get("Content-Type", "").lower().startswith("application/json"):
            body = raw.decode(errors="replace") if raw else None  # not parsed: a string
        if path == INGESTION_PATH:
            return *standin._ingest(body, rejected, reject_status), {}
        return *standin._post_scores(body, rejected), {}

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def _respond(self, status: int, payload: Any, extra: Mapping[str, str] | None = None) -> None:
        text = isinstance(payload, str)
        data = payload.encode() if text else json.dumps(payload).encode()
        self.send_response(status)
        headers = {"Content-Type": f"{'text/plain' if text else 'application/json'}; charset=utf-8"}
        headers |= dict(extra or {})
        headers["Content-Length"] = str(len(data))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw.decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a Langfuse score API stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--generation", choices=GENERATIONS, default="v3")
    parser.add_argument("--public-key", default="pk-lf-standin")
    parser.add_argument("--secret-key", default="sk-lf-standin")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--state-file", type=Path, help="receipts written here once stopped")
    args = parser.parse_args(argv)

    standin = LangfuseStandin(
        generation=args.generation,
        public_key=args.public_key,
        secret_key=args.secret_key,
        host=args.host,
        port=args.port,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    standin.set_mode(cast(Mode, args.mode))
    standin.start()
    print(standin.url, flush=True)
    print(
        f"Langfuse stand-in ({standin.generation}, version {standin.version}) on {standin.url} "
        f"(public key {standin.public_key}, secret key {standin.secret_key}); Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    while not done.wait(0.5):
        pass
    standin.stop()  # joins every request handler: nothing is received after this
    if args.state_file is not None:
        write_receipts(standin, args.state_file)
    return 0


def write_receipts(standin: LangfuseStandin, path: Path) -> None:
    """The scores received, the table's duplicates and the score requests by answered status,
    as JSON (atomically)."""
    state = {
        "generation": standin.generation,
        "scores": standin.scores,
        "duplicates": standin.duplicates(),
        "score_requests": Counter(str(r.status) for r in standin.score_requests),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
