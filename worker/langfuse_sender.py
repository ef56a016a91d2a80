"""Send feedback to Langfuse as NUMERIC scores, in batches, and say what became of each one.

One request for every Langfuse server in use (v3 from 3.49, v4 before and after 4.59, Cloud):
`POST {host}/api/public/ingestion`, HTTP Basic auth (public key : secret key), the body

    {"batch": [{"id": "<envelope id>", "type": "score-create", "timestamp": "<first vote, UTC>",
                "body": {"id": "<score id>", "traceId": "...", "name": "user_feedback",
                         "value": 1.0, "dataType": "NUMERIC", "comment": null,
                         "metadata": {...}, "environment": "production"}}]}

answered 207 with a success or an error per envelope id (`worker.langfuse_response` reads it).
Every generation accepts it: v3.225.4 and v4.16.0 in their source (v4's default `events_only`
write mode keeps score-create events and refuses the other types per event), and Langfuse
Cloud after its v3 ingestion sunset of 2026-11-16, which Langfuse states keeps this route for
score-create events (langfuse/langfuse#17453). A host that answers 404 there is reported, not
guessed at: the rows wait. The score takes the event's timestamp (the one-score route of v3 and
v4 before 4.59 stamps the time of receipt instead); its errors name the event. Langfuse keys a
score by (project, day of its timestamp, name, id): all votes of one feedback carry the same
id, name and first vote's time, so a vote changed days later replaces the one score.

`send` never retries and never raises for a delivery problem: retries happen across polls, with
the delay the database computes (`record_langfuse_deliveries`, which also holds every worker's
sends while Langfuse asks to wait). A request that could not even connect (`_post`) spends no
attempt: a host name that does not exist or TLS that cannot work with the host turns the
mirror off (`Outcome.off`, `unusable_host`), and a refused or timed-out connection, a
resolver's temporary failure or a TLS handshake cut short leaves the rows for the next pass
(`Outcome.unreachable`), both as at start; a failure once the request was on its way (a
timeout waiting for the answer, a reset) is a retry, an attempt: the request itself may be why
(too large for a proxy's limits, a body that crashes the server), and attempts bound that. An
answer whose body cannot be read (a Content-Encoding it does not have) is read by its status
(`worker.langfuse_response.unreadable`: a 2xx confirms nothing, a retry), and so is one whose
body is over `MAX_ANSWER_BYTES`; an answer not read in full within the timeout (counted from
the request's start: httpx's own timeout bounds each network read only) is a timeout waiting
for the answer.
"""

from __future__ import annotations

import errno
import json
import math
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Self
from uuid import UUID, uuid5

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from worker.langfuse_response import INGESTION_PATH, Outcome, Verdict, classify, unreadable

LANGFUSE_SCORE_NAMESPACE = UUID("09229364-ef9e-51cb-bd31-b3f7a9619500")
"""Namespace of the uuid5 score ids, fixed as a literal (it is `uuid5(NAMESPACE_URL,
"urn:persona-feedback-learning:langfuse-score")`). Never change it: every feedback would get a
new score id and Langfuse would show each vote twice."""

DEFAULT_MAX_REQUEST_BYTES = 3_500_000
"""What the endpoint's definition tells clients (`fern/apis/server/definition/ingestion.yml`,
v3.225.4 and v4.16.0: "Batch sizes are limited to 3.5 MB in total"); the route itself takes up
to 4.5 MB (its `bodyParser.sizeLimit`), a proxy in front of it may take less."""
_SPAN = 10**19 - 1  # envelope ids count down from here
MAX_ANSWER_BYTES = 1 << 20
"""The most of an answer's body the worker reads (decoded): Langfuse answers a batch of at
most a few hundred events in a few kB; a longer body is read as unreadable
(`AnswerTooLarge`)."""


class AnswerTooLarge(httpx.DecodingError):
    """An answer's body over `MAX_ANSWER_BYTES`: read as one whose body cannot be read."""


def read_bounded(
    answer: httpx.Response, deadline: float, timeout: float, limit: int = MAX_ANSWER_BYTES
) -> bytes:
    """The decoded body of a streamed `answer`, read chunk by chunk. httpx's timeout bounds
    each network read, not the request: a body trickling in a byte at a time would never time
    out. Raises httpx.ReadTimeout (a TransportError, classified like httpx's own: no answer)
    once `time.monotonic()` passes `deadline` (the request's start plus `timeout` seconds),
    AnswerTooLarge (an httpx.DecodingError) past `limit` bytes; httpx's own errors pass. The
    deadline is checked between chunks, so the read ends at most one network read (itself
    bounded by httpx's timeout) after it. The status line and headers are read by httpx before
    this: each of their reads is bounded, not their whole."""
    chunks: list[bytes] = []
    size = 0
    for chunk in answer.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(f"an answer over {limit} bytes", request=answer.request)
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout(
                f"the answer took longer than {timeout}s", request=answer.request
            )
    return b"".join(chunks)


def langfuse_environment(name: str) -> str:
    """The environment name the worker sends for `name`: lower-cased, leading `langfuse`,
    `langfuse-` or `langfuse_` prefixes removed, the first 40 characters kept, which is how
    Langfuse 4 files a name (`PublicEnvironmentName` in
    `packages/shared/src/server/ingestion/types.ts`, v4.0.0 to v4.16.0 and main). Older servers
    differ for the names this changes: 3.161 to 3.225 remove one prefix only; 3.122 to 3.160
    lower-case but refuse a name starting with `langfuse`; 3.31 to 3.121 refuse any name not
    already lower-case a-z 0-9 - _ (their `EnvironmentName`), so there `Staging` cannot be a
    trace's environment at all. The result is such a name, which every server from 3.31 stores
    unchanged: the scores land in `staging` everywhere. Raises ValueError when what is left is
    empty or not only a-z 0-9 - _ (Langfuse 4 would file it under `default`)."""
    kept = re.sub(r"^(?:langfuse[-_]?)+", "", name.lower())[:40]
    if not re.fullmatch(r"[a-z0-9_-]+", kept):
        raise ValueError(
            f"Langfuse environment {name!r} would be filed under 'default' by Langfuse (it "
            "lower-cases the name, drops a leading 'langfuse' prefix, keeps 40 characters and "
            "accepts only a-z 0-9 - _): set PFL_LANGFUSE_ENVIRONMENT to your traces' environment"
        )
    return kept


def score_id_for(twin_id: UUID | str, trace_id: str, user_id: UUID | str) -> str:
    """The Langfuse score id of one user's feedback on one trace of one twin:
    `uuid5(LANGFUSE_SCORE_NAMESPACE, json.dumps([twin_id, trace_id, user_id]))`, ids in canonical
    lower-case form, so every vote change of one feedback maps to the same score. Raises
    ValueError when an id is not a UUID or the trace id is empty."""
    twin, user = str(UUID(str(twin_id))), str(UUID(str(user_id)))
    if not trace_id:
        raise ValueError("trace_id must not be empty")
    return str(uuid5(LANGFUSE_SCORE_NAMESPACE, json.dumps([twin, trace_id, user])))


DOUBLE_LIMIT = 2**1024 - 2**970
"""The least magnitude a double rounds to Infinity: a JSON number at least this large, an
integer included (Python keeps it exact, JavaScript, so Langfuse, reads it as Infinity), is
refused, as the database's metadata rule (`private.check_metadata_numbers`) refuses it."""


def _beyond_double(value: object) -> bool:
    """Whether a number in `value` (plain JSON: dicts, lists, scalars), at any depth, has a
    magnitude of at least `DOUBLE_LIMIT` (an infinite float included)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return True  # a finite double is below the limit
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) >= DOUBLE_LIMIT:
            return True
    return False


class ScoreItem(BaseModel):
    """One outbox row (`event_id`) to mirror as a NUMERIC score on `trace_id`. Re-sends keep
    `score_id`, `name` and `timestamp` (the first vote's time, sent in UTC)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    event_id: int = Field(ge=1, le=_SPAN)
    score_id: str = Field(min_length=1, max_length=760)
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
        if _beyond_double(value):
            raise ValueError(
                "metadata must be plain JSON: a number is beyond the range of a double (its "
                "magnitude must stay below 2^1024 - 2^970, about 1.8e308): JavaScript "
                "(Langfuse) reads it as Infinity"
            )
        return value

    @property
    def envelope_id(self) -> str:
        """The event's id: the score id, then the row counted down, so newer rows sort FIRST.
        Langfuse re-reads a score's stored events, sorted by timestamp; ours are all equal, and
        its tie rule (`IngestionService.toTimeSortedEventList`, v3.225.4 and v4.16.0) reverses
        the order it listed them in, which is by this id: the newest vote is merged last."""
        return f"{self.score_id}-{_SPAN - self.event_id:019d}"


@dataclass(frozen=True)
class Delivery:
    """One item's outcome (sent, retry, wait or failed), a short error (None when sent), the
    least delay the server asked for, in seconds, whether the answer holds every worker
    though it is a retry (`Verdict.hold`: a top-level 500), and whether the item never left
    the worker (`unsent`: failed without a request, so no answer of Langfuse's)."""

    event_id: int
    outcome: Outcome
    error: str | None = None
    retry_after_seconds: float | None = None
    hold: bool = False
    unsent: bool = False


Chunk = list[tuple[ScoreItem, dict[str, Any]]]


class LangfuseSender:
    """Sends `ScoreItem`s to one Langfuse project with httpx, redirects never followed, every
    request bounded by `timeout_seconds` (each network read, and the answer's body read in full
    from the request's start: `read_bounded`; a body over `MAX_ANSWER_BYTES` is unreadable).
    `version` is the server's once `worker.langfuse_check.check` passed. Close it (or use
    `with`) to release its connections.

    `environment` is sent as `langfuse_environment` makes it. Raises
    ValueError for a host that is not an http(s) URL with a host name, an empty key, an
    environment Langfuse would file under `default`, a timeout that is not a positive number
    of seconds, a batch_size below 1 or a max_request_bytes below 1024.
    """

    def __init__(
        self,
        host: str,
        public_key: str,
        secret_key: str,
        timeout_seconds: float = 5.0,
        *,
        environment: str = "default",
        batch_size: int = 100,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        setting: str = "LANGFUSE_HOST",
    ) -> None:
        self.setting = setting  # the name of the base URL's setting, for the messages
        self.host = check_host(host, setting)
        if not public_key or not secret_key:
            raise ValueError("LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must not be empty")
        environment = langfuse_environment(environment)
        if not timeout_seconds > 0 or not math.isfinite(timeout_seconds):
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        if batch_size < 1 or max_request_bytes < 1024:
            raise ValueError("batch_size must be at least 1 and max_request_bytes at least 1024")
        self.public_key, self.environment = public_key, environment
        self.timeout_seconds = float(timeout_seconds)
        self.batch_size, self.max_request_bytes = batch_size, max_request_bytes
        # Whether a check (`worker.langfuse_check.check`) passed, and nothing failed since.
        self.checked = False
        # The server's version as the last check read it (None: not read, or not served).
        self.version: tuple[int, int, int] | None = None
        # Whether the last check's empty batch met a wait, so the next check (the hold's probe)
        # sends that batch alone, keeping `version`: `worker.langfuse_check.check` keeps it.
        self.waited = False
        self.http = httpx.Client(
            auth=(public_key, secret_key),
            timeout=self.timeout_seconds,
            follow_redirects=False,
            headers={"user-agent": "persona-feedback-learning"},
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, items: Sequence[ScoreItem]) -> list[Delivery]:
        """Send `items`; return one Delivery per item, in their order. Requests hold at most
        `batch_size` events and `max_request_bytes`; a 413 splits one in halves. Several items of
        one score id: only the last is sent (pass them oldest first), the others share its
        outcome. After an answer that would repeat for every request (`Verdict.stop`: down, 5xx,
        429, bad keys...), the rest is not attempted and gets the same outcome. A wait without
        a server-given delay keeps none: the database's hold backs off. Raises ValueError for
        duplicate event ids."""
        if len({item.event_id for item in items}) != len(items):
            raise ValueError("duplicate event_id in one send")
        latest = {item.score_id: item for item in items}  # the last version of each score
        results: dict[int, Delivery] = {}
        pending: deque[Chunk] = deque(self._chunks(list(latest.values()), results))
        stopped: Verdict | None = None
        while pending:
            chunk = pending.popleft()
            if stopped is not None:
                error = f"{stopped.error} (not attempted)"
                verdicts = dict.fromkeys(
                    (i.envelope_id for i, _ in chunk),
                    Verdict(stopped.outcome, error, stopped.retry_after_seconds, hold=stopped.hold),
                )
            else:
                verdicts = self._post(chunk)
                if len(chunk) > 1 and any(v.outcome == Outcome.smaller for v in verdicts.values()):
                    pending.extendleft([chunk[len(chunk) // 2 :], chunk[: len(chunk) // 2]])
                    continue
                stopped = next((v for v in verdicts.values() if v.stop), None)
            for item, _ in chunk:
                v = verdicts[item.envelope_id]
                outcome = Outcome.failed if v.outcome == Outcome.smaller else v.outcome
                results[item.event_id] = Delivery(
                    item.event_id, outcome, v.error, v.retry_after_seconds, v.hold
                )
        out = []
        for item in items:
            d = results[latest[item.score_id].event_id]
            out.append(
                Delivery(item.event_id, d.outcome, d.error, d.retry_after_seconds, d.hold, d.unsent)
            )
        return out

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

    def _chunks(self, items: list[ScoreItem], results: dict[int, Delivery]) -> list[Chunk]:
        """Requests of at most batch_size events and max_request_bytes, counted exactly as
        `body` serialises them (`{"batch":[` + the events joined by `,` + `]}`); an event too
        large for any request fails into `results` unsent."""
        chunks: list[Chunk] = [[]]
        size = len(body([]))
        for item in items:
            event = self.event(item)
            item_size = len(body([event])) - len(body([]))
            if len(body([event])) > self.max_request_bytes:
                error = f"score is {item_size} bytes, over the {self.max_request_bytes}-byte limit"
                results[item.event_id] = Delivery(item.event_id, Outcome.failed, error, unsent=True)
                continue
            full = len(chunks[-1]) >= self.batch_size
            if chunks[-1] and (full or size + 1 + item_size > self.max_request_bytes):
                chunks.append([])
                size = len(body([]))
            size += item_size + (1 if chunks[-1] else 0)  # the comma before all but the first
            chunks[-1].append((item, event))
        return [chunk for chunk in chunks if chunk]

    def _post(self, chunk: Chunk) -> dict[str, Verdict]:
        ids = [item.envelope_id for item, _ in chunk]
        payload = body([event for _, event in chunk])
        deadline = time.monotonic() + self.timeout_seconds
        try:
            with self.http.stream(
                "POST",
                self.host + INGESTION_PATH,
                content=payload,
                headers={"content-type": "application/json"},
            ) as answer:
                try:
                    content = read_bounded(answer, deadline, self.timeout_seconds)
                except httpx.DecodingError as exc:  # status and headers came, the body is not
                    why = " ".join((str(exc) or type(exc).__name__).split())[:200]
                    now = datetime.now(UTC)
                    status, headers = answer.status_code, answer.headers
                    return unreadable(status, headers, why, ids, now, self.setting)
        except httpx.TransportError as exc:
            return dict.fromkeys(ids, self._unanswered(exc))
        except httpx.HTTPError as exc:  # anything else httpx raises for one request
            error = f"no usable answer ({type(exc).__name__}: {exc})"
            return dict.fromkeys(ids, Verdict(Outcome.retry, error[:300], stop=True))
        now = datetime.now(UTC)
        return classify(answer.status_code, answer.headers, content, ids, now, self.setting)

    def _unanswered(self, exc: httpx.TransportError) -> Verdict:
        """A request without an answer (see the module docstring): off, unreachable or retry."""
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):  # nothing was sent
            unusable = unusable_host(exc, self.host)
            if unusable is not None:
                return Verdict(Outcome.off, unusable, stop=True)
            outcome = Outcome.unreachable
        else:
            outcome = Outcome.retry
        return Verdict(outcome, transport_error(exc, self.timeout_seconds), stop=True)


def body(events: list[dict[str, Any]]) -> bytes:
    """The request body of an ingestion batch: compact JSON (no blanks after `,` and `:`),
    UTF-8, as sent; `_chunks` counts request sizes with it."""
    return json.dumps({"batch": events}, ensure_ascii=False, separators=(",", ":")).encode()


def check_host(host: str, setting: str = "LANGFUSE_HOST") -> str:
    """`host` without surrounding blanks or a trailing slash. Raises ValueError, naming
    `setting`, unless it is an http or https URL with a host name and no query or fragment (a
    path prefix, as behind a proxy, is kept, but not one with Langfuse's own `/api/public`)."""
    host = host.strip() if isinstance(host, str) else host
    try:
        url = httpx.URL(host)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"{setting}={host!r} is not a URL: {exc}") from exc
    if "://" not in host:  # "localhost:3000" parses as the scheme "localhost"
        raise ValueError(
            f"{setting}={host!r} needs a scheme (http:// or https://) and a host, e.g. "
            "https://cloud.langfuse.com"
        )
    if url.scheme not in ("http", "https"):
        raise ValueError(
            f"{setting}={host!r}: the scheme must be http or https, not {url.scheme}, e.g. "
            "https://cloud.langfuse.com"
        )
    if not url.host:
        raise ValueError(f"{setting}={host!r} needs a host, e.g. https://cloud.langfuse.com")
    if url.query or url.fragment:
        raise ValueError(f"{setting}={host!r} must not have a query or a fragment")
    if re.search(r"/api/public(/|$)", url.path):
        raise ValueError(
            f"{setting}={host!r} must be Langfuse's base URL, without /api/public (the mirror "
            "adds the API paths itself), e.g. https://cloud.langfuse.com"
        )
    return host.rstrip("/")


def transport_error(exc: httpx.TransportError, timeout: float | None = None) -> str:
    """A short account of a request that got no answer: "connection refused", "timeout after
    Ns waiting for a response", "network error: ..."."""
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: " connecting",
            httpx.ReadTimeout: " waiting for a response",
            httpx.WriteTimeout: " sending",
        }.get(type(exc), "")
        return f"timeout after {timeout}s{phase}" if timeout else f"timeout{phase}"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    text = " ".join((str(exc) or type(exc).__name__).split())[:200]
    return "connection refused" if "Connection refused" in text else f"network error: {text}"


CONFIGURATION_EAI = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY", "EAI_SERVICE", "EAI_FAMILY")
    if hasattr(socket, name)
)
"""Resolver answers that say the name itself is wrong ("Name or service not known": NXDOMAIN,
no address of that family): a setting to fix. Every other one (EAI_AGAIN "Temporary failure
in name resolution", EAI_FAIL a failing DNS server, EAI_MEMORY, EAI_SYSTEM) is the resolver's
trouble of the moment: Langfuse is unreachable for now."""

TRANSIENT_TLS_REASONS = frozenset(
    {"UNEXPECTED_EOF_WHILE_READING", "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL"}
)
"""OpenSSL's reasons for a handshake the other side closed (a restart, a load balancer
dropping the connection): nothing about our settings."""


def unusable_host(exc: httpx.TransportError, host: str) -> str | None:
    """What is wrong with LANGFUSE_HOST when `exc` says its name does not exist or TLS cannot
    work with it (a socket.gaierror of `CONFIGURATION_EAI`, a certificate not trusted, a
    handshake refused for its protocol, e.g. https:// to a port that speaks plain HTTP, among
    its causes); None for any other failure, a temporary one included (a resolver's "temporary
    failure in name resolution", a handshake cut short by EOF or a reset)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            if cause.errno not in CONFIGURATION_EAI:
                return None
            return f"the host name {httpx.URL(host).host} does not resolve ({cause})"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not trusted ({cause})"
        if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
            return None
        if isinstance(cause, ssl.SSLError):
            if getattr(cause, "reason", None) in TRANSIENT_TLS_REASONS:
                return None
            return (
                f"the TLS handshake failed ({cause}); a port that speaks plain HTTP answers so: "
                "use http://, or the server's TLS port"
            )
        cause = cause.__cause__ or cause.__context__
    return None
