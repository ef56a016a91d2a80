"""Send feedback to Langfuse as NUMERIC scores, in batches, and say what happened to each one.

One request for every Langfuse server in use (v3 from 3.49, v4 before and after 4.59, Cloud):
`POST {host}/api/public/ingestion`, HTTP Basic auth (public key : secret key), a JSON body

    {"batch": [{"id": "<envelope id>", "type": "score-create",
                "timestamp": "<the first vote's time, UTC>",
                "body": {"id": "<score id>", "traceId": "...", "name": "user_feedback",
                         "value": 1.0, "dataType": "NUMERIC", "comment": null,
                         "metadata": {...}, "environment": "production"}}]}

answered 207 with one success or error per envelope id (`worker.langfuse_response` reads it).
Why this request: every generation accepts it (in v4's events-only mode too); it keeps the
score's timestamp (the envelope's), where `POST /api/public/scores` stamps the time of receipt
on v3 and v4 before 4.59 (and takes a single score there); and its errors name the event, so
each row gets its own outcome. Langfuse keys a score by (project, day of its timestamp, name,
id): every vote of one feedback carries the same score id, name and the first vote's time, so a
changed vote, sent days later, replaces the one score.

Why not the Langfuse SDK: its 5.x API client has no ingestion call any more; its score call posts
a JSON array to /api/public/scores, which v3 and v4 before 4.59 refuse (400). This one request
needs httpx alone.

`send` never retries and never raises for a delivery problem: retries happen across polls with
the backoff the database computes (`record_langfuse_deliveries`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Annotated, Any, Self
from uuid import UUID, uuid5

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from worker.langfuse_response import Outcome, Verdict, classify

logger = logging.getLogger(__name__)

LANGFUSE_SCORE_NAMESPACE = UUID("09229364-ef9e-51cb-bd31-b3f7a9619500")
"""Namespace of the uuid5 score ids (`score_id_for`), fixed as a literal; it is
`uuid5(NAMESPACE_URL, "urn:persona-feedback-learning:langfuse-score")`. Never change it: every
feedback would get a new score id and Langfuse would show each vote twice."""

INGESTION_PATH = "/api/public/ingestion"
HEALTH_PATH = "/api/public/health"
DEFAULT_BATCH_SIZE = 100
DEFAULT_MAX_REQUEST_BYTES = 4_000_000
"""The ingestion route takes bodies up to 4.5 MB (its `bodyParser.sizeLimit`); a margin."""
MIN_VERSION = (3, 49, 0)
"""The first Langfuse whose score events keep `metadata` (3.49.0; `environment` since 3.31.0);
older servers drop them without a word, so the mirror refuses to send to them."""
ENVIRONMENT_PATTERN = re.compile(r"^(?!langfuse)[a-z0-9_-]{1,40}$")
"""What Langfuse keeps as an environment; anything else it silently files under `default`."""
_ENVELOPE_SPAN = 10**19 - 1


class LangfuseConfigError(Exception):
    """Langfuse is configured in a way that cannot work (host, keys, version): the message says
    what to change. Nothing is sent until the worker restarts with a fixed configuration."""


class LangfuseUnavailable(Exception):
    """Langfuse could not be asked (down, timeout, 5xx): try again later."""


def score_id_for(twin_id: UUID | str, trace_id: str, user_id: UUID | str) -> str:
    """Return the Langfuse score id of one user's feedback on one trace of one twin.

    `uuid5(LANGFUSE_SCORE_NAMESPACE, json.dumps([twin_id, trace_id, user_id]))`, with both ids in
    canonical lower-case UUID form: the same feedback (and every later vote change on it) always
    maps to the same score, so Langfuse updates it instead of adding one. Raises ValueError when
    an id is not a UUID or the trace id is empty.
    """
    twin = str(UUID(str(twin_id)))
    user = str(UUID(str(user_id)))
    if not trace_id:
        raise ValueError("trace_id must not be empty")
    return str(uuid5(LANGFUSE_SCORE_NAMESPACE, json.dumps([twin, trace_id, user])))


def parse_version(text: object) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version such as "4.16.0", "v3.225.4" or "4.60.1-rc.1"; None
    when `text` is not one."""
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", text) if isinstance(text, str) else None
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def generation(version: tuple[int, int, int]) -> str:
    """The server generation of a version, as the README's table names it."""
    if version < (4, 0, 0):
        return "v3"
    return "v4 before 4.59" if version < (4, 59, 0) else "v4 4.59 or later"


class ScoreItem(BaseModel):
    """One outbox row to mirror as a NUMERIC Langfuse score on `trace_id`.

    Re-sends keep `score_id`, `name` and `timestamp` (the first vote's time, sent in UTC):
    Langfuse then replaces the score instead of adding one. `event_id` is the outbox row.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    event_id: int = Field(ge=1, le=_ENVELOPE_SPAN)
    score_id: str = Field(min_length=1, max_length=800)
    trace_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    value: Annotated[float, Field(allow_inf_nan=False)]
    comment: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    timestamp: AwareDatetime

    @field_validator("timestamp")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @field_validator("metadata")
    @classmethod
    def _json_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be plain JSON: {exc}") from exc
        return value

    @property
    def envelope_id(self) -> str:
        """The ingestion event's id: the score id and the row, newer rows sorting FIRST. Langfuse
        re-reads every stored event of a score and orders them by timestamp; ours are all equal,
        and its tie rule (v4.16.0 `IngestionService.toTimeSortedEventList`) reverses the order
        it listed them in, which is by this id: so the newest vote is merged last and wins."""
        return f"{self.score_id}-{_ENVELOPE_SPAN - self.event_id:019d}"


@dataclass(frozen=True)
class Delivery:
    """The outcome of one item: `sent`, `retry`, `wait` or `failed` (see Outcome), a short
    error (None when sent) and the least delay the server asked for, in seconds."""

    event_id: int
    outcome: Outcome
    error: str | None = None
    retry_after_seconds: float | None = None


class LangfuseSender:
    """Sends `ScoreItem`s to one Langfuse project and reports per-item outcomes.

    Every request is bounded by `timeout_seconds`. Redirects are never followed. After an answer
    that would repeat for every request (down, slow, 5xx, 429, bad keys, suspended), the rest of
    the same `send` is not attempted and gets the same outcome. Close it, or use it as a context
    manager, to release its connections.

    Raises ValueError for a host that is not an http(s) URL with a host name, an empty key, an
    environment Langfuse would not keep, a timeout that is not a positive number of seconds, a
    batch_size below 1 or a max_request_bytes below 1024.
    """

    def __init__(
        self,
        host: str,
        public_key: str,
        secret_key: str,
        timeout_seconds: float = 5.0,
        *,
        environment: str = "default",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.host = check_host(host)
        if not public_key or not secret_key:
            raise ValueError("LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must not be empty")
        if not ENVIRONMENT_PATTERN.match(environment):
            raise ValueError(
                f"Langfuse environment {environment!r} is not 1-40 lowercase letters, digits, "
                "'-' or '_' not starting with 'langfuse' (Langfuse would file it as 'default')"
            )
        if not timeout_seconds > 0 or not math.isfinite(timeout_seconds):
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {max_request_bytes}")
        self.public_key = public_key
        self.environment = environment
        self.timeout_seconds = float(timeout_seconds)
        self.batch_size = batch_size
        self.max_request_bytes = max_request_bytes
        self.version: tuple[int, int, int] | None = None
        """The server's version once `check` passed; None before."""
        self._http = httpx.Client(
            auth=(public_key, secret_key),
            timeout=self.timeout_seconds,
            follow_redirects=False,
            headers={"user-agent": "persona-feedback-learning"},
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- start-up check ----------------------------------------------------------------------

    def check(self) -> tuple[int, int, int]:
        """Ask the server its version (`GET /api/public/health`, no auth) and try the keys with
        an empty batch (`POST /api/public/ingestion {"batch": []}`, which stores nothing).
        Returns the version (and keeps it as `version`). Raises LangfuseConfigError when the
        host, the keys or the version cannot work, LangfuseUnavailable when the server cannot be
        asked now."""
        answer = self._request("GET", HEALTH_PATH)
        if answer.is_redirect:
            raise LangfuseConfigError(self._redirected(answer))
        if answer.status_code >= 500:
            raise LangfuseUnavailable(f"{self.host}{HEALTH_PATH} answered {answer.status_code}")
        body = _json_object(answer)
        version = parse_version(body.get("version")) if body else None
        if answer.status_code != 200 or version is None:
            raise LangfuseConfigError(
                f"no Langfuse at LANGFUSE_HOST={self.host}: GET {HEALTH_PATH} answered "
                f"{answer.status_code} without a version"
            )
        if version < MIN_VERSION:
            raise LangfuseConfigError(
                f"Langfuse {'.'.join(map(str, version))} at {self.host} is too old: score "
                f"metadata and environments need {'.'.join(map(str, MIN_VERSION))} or later"
            )
        probe = self._request("POST", INGESTION_PATH, json={"batch": []})
        if probe.is_redirect:
            raise LangfuseConfigError(self._redirected(probe))
        empty = _json_object(probe)
        if probe.status_code == 207 and empty == {"successes": [], "errors": []}:
            self.version = version  # the documented answer to an empty batch: the keys work
            return version
        verdict = classify(
            probe.status_code, probe.headers, probe.content, ["probe"], datetime.now(UTC)
        )["probe"]
        if verdict.outcome == Outcome.failed:
            raise LangfuseConfigError(f"Langfuse at {self.host} refused the keys: {verdict.error}")
        if verdict.outcome != Outcome.wait:  # suspended or rate limited: the sends will wait
            raise LangfuseUnavailable(f"Langfuse at {self.host}: {verdict.error}")
        self.version = version
        return version

    def _redirected(self, answer: httpx.Response) -> str:
        return (
            f"LANGFUSE_HOST={self.host} redirects ({answer.status_code}) to "
            f"{answer.headers.get('location', '?')}: set LANGFUSE_HOST to the server's own URL"
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, self.host + path, **kwargs)
        except httpx.TransportError as exc:
            raise LangfuseUnavailable(f"{self.host}{path}: {_transport_error(exc)}") from exc

    # -- sending -------------------------------------------------------------------------------

    def send(self, items: Sequence[ScoreItem]) -> list[Delivery]:
        """Send `items`; return one Delivery per item, in the order of `items`.

        Requests hold at most `batch_size` scores and `max_request_bytes`. When several items
        carry the same score id, only the last one is sent (pass items oldest first) and the
        earlier ones share its outcome. Raises ValueError for duplicate event ids.
        """
        if len({item.event_id for item in items}) != len(items):
            raise ValueError("duplicate event_id in one send")
        latest: dict[str, ScoreItem] = {}
        for item in items:
            latest.pop(item.score_id, None)  # re-insert so the order follows the latest version
            latest[item.score_id] = item

        results: dict[int, Delivery] = {}
        pending: deque[list[tuple[ScoreItem, dict[str, Any]]]] = deque()
        for chunk_or_item in self._chunks(list(latest.values())):
            if isinstance(chunk_or_item, list):
                pending.append(chunk_or_item)
            else:
                results[chunk_or_item.event_id] = chunk_or_item
        stopped: Verdict | None = None
        while pending:
            chunk = pending.popleft()
            if stopped is not None:
                for item, _ in chunk:
                    results[item.event_id] = _delivery(
                        item, stopped, f"{stopped.error} (not attempted)"
                    )
                continue
            verdicts = self._post(chunk)
            if any(v.outcome == Outcome.smaller for v in verdicts.values()) and len(chunk) > 1:
                half = len(chunk) // 2
                pending.appendleft(chunk[half:])
                pending.appendleft(chunk[:half])
                continue
            for item, _ in chunk:
                verdict = verdicts[item.envelope_id]
                if verdict.outcome == Outcome.smaller:  # one score alone is too large
                    verdict = Verdict(Outcome.failed, verdict.error)
                results[item.event_id] = _delivery(item, verdict, verdict.error)
            stop = next((v for v in verdicts.values() if v.stop), None)
            if stop is not None:
                logger.warning(
                    "Langfuse request of %d scores: %s (%s)", len(chunk), stop.error, stop.outcome
                )
                stopped = stop

        deliveries: list[Delivery] = []
        for item in items:
            delivery = results[latest[item.score_id].event_id]
            deliveries.append(
                Delivery(
                    item.event_id, delivery.outcome, delivery.error, delivery.retry_after_seconds
                )
            )
        return deliveries

    def event(self, item: ScoreItem) -> dict[str, Any]:
        """The `score-create` ingestion event of one item, as sent."""
        return {
            "id": item.envelope_id,
            "type": "score-create",
            "timestamp": item.timestamp.isoformat().replace("+00:00", "Z"),
            "body": {
                "id": item.score_id,
                "traceId": item.trace_id,
                "name": item.name,
                "value": item.value,
                "dataType": "NUMERIC",
                "comment": item.comment,
                "metadata": item.metadata,
                "environment": self.environment,
            },
        }

    def _chunks(
        self, items: list[ScoreItem]
    ) -> list[list[tuple[ScoreItem, dict[str, Any]]] | Delivery]:
        """Requests of at most batch_size events and max_request_bytes; a Delivery (failed) for
        an event too large for any request."""
        out: list[list[tuple[ScoreItem, dict[str, Any]]] | Delivery] = []
        chunk: list[tuple[ScoreItem, dict[str, Any]]] = []
        envelope = len(b'{"batch":[]}')
        size = envelope
        for item in items:
            event = self.event(item)
            item_size = len(json.dumps(event, ensure_ascii=False).encode()) + 1
            if item_size + envelope > self.max_request_bytes:
                error = f"score is {item_size} bytes, over the {self.max_request_bytes}-byte limit"
                out.append(Delivery(item.event_id, Outcome.failed, error))
                continue
            if chunk and (
                len(chunk) >= self.batch_size or size + item_size > self.max_request_bytes
            ):
                out.append(chunk)
                chunk, size = [], envelope
            chunk.append((item, event))
            size += item_size
        if chunk:
            out.append(chunk)
        return out

    def _post(self, chunk: list[tuple[ScoreItem, dict[str, Any]]]) -> dict[str, Verdict]:
        ids = [item.envelope_id for item, _ in chunk]
        body = json.dumps({"batch": [event for _, event in chunk]}, ensure_ascii=False).encode()
        try:
            answer = self._http.post(
                self.host + INGESTION_PATH,
                content=body,
                headers={"content-type": "application/json"},
            )
        except httpx.TransportError as exc:
            error = _transport_error(exc, self.timeout_seconds)
            return dict.fromkeys(ids, Verdict(Outcome.retry, error, stop=True))
        return classify(answer.status_code, answer.headers, answer.content, ids, datetime.now(UTC))


def check_host(host: str) -> str:
    """`host` without a trailing slash. Raises ValueError unless it is an http(s) URL with a
    host name and no query or fragment (a path prefix, as behind a proxy, is kept)."""
    try:
        url = httpx.URL(host)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"LANGFUSE_HOST={host!r} is not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"LANGFUSE_HOST={host!r} needs a scheme and a host, e.g. https://cloud.langfuse.com"
        )
    if url.query or url.fragment:
        raise ValueError(f"LANGFUSE_HOST={host!r} must not have a query or a fragment")
    return host.rstrip("/")


def _delivery(item: ScoreItem, verdict: Verdict, error: str | None) -> Delivery:
    return Delivery(item.event_id, verdict.outcome, error, verdict.retry_after_seconds)


def _json_object(answer: httpx.Response) -> dict[str, Any] | None:
    try:
        body = answer.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _transport_error(exc: httpx.TransportError, timeout: float | None = None) -> str:
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: " connecting",
            httpx.ReadTimeout: " waiting for a response",
            httpx.WriteTimeout: " sending",
        }.get(type(exc), "")
        return f"timeout after {timeout}s{phase}" if timeout else f"timeout{phase}"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        ):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    text = " ".join((str(exc) or type(exc).__name__).split())[:200]
    return "connection refused" if "Connection refused" in text else f"network error: {text}"
