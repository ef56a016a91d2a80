"""Send feedback to Langfuse as scores, in batches, and report what happened to each one.

The Postgres outbox hands `LangfuseSender.send` a batch of `ScoreItem`s; `send` returns one
`Delivery` per item (`sent`, `retry` or `failed`, with a short error), and the caller records
those outcomes in one SQL call. Retries happen across polls, with the backoff the database
computes; `send` itself never retries and never raises for a delivery problem.

Wire format (langfuse 5.x): `POST {host}/api/public/scores`, HTTP Basic auth
(public key : secret key), a JSON array of scores, e.g.

    [{"id": "<score id>", "traceId": "<trace id>", "name": "user_feedback", "value": 1.0,
      "dataType": "NUMERIC", "comment": null, "metadata": {"reason": "helpful"},
      "timestamp": "2024-05-01T12:00:00.123456Z"}]

Langfuse answers 202 `{"message": "Accepted"}` when it accepted every score, or 207
`{"accepted": n, "rejected": m, "errors": [{"message": "..."}]}` when it rejected some. The
207 errors do not say which score they belong to, so a chunk answered with a rejection is
split in halves and the halves are sent again until each rejected score stands alone (a
score sent twice with the same id and timestamp is updated, not duplicated, so re-sending the
accepted ones is harmless).

The request goes through the SDK's synchronous generated client (`langfuse.api.LangfuseAPI`,
the object behind `Langfuse().api`) with SDK retries off. `Langfuse()` itself is not used: it
is a per-public-key process singleton (a second client with another secret or host silently
gets the first one's), and it starts background score, media and span-export threads and an
exit-time flush that this worker does not want.
"""

from __future__ import annotations

import errno
import json
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from http import HTTPStatus
from types import TracebackType
from typing import Annotated, Any, Literal, Self
from uuid import UUID, uuid5

import httpx
import pydantic
from langfuse import __version__ as langfuse_version
from langfuse.api import (
    CreateScoreBatchResults,
    CreateScoreRequest,
    LangfuseAPI,
    ScoreDataType,
)
from langfuse.api.core import ApiError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

LANGFUSE_SCORE_NAMESPACE = UUID("09229364-ef9e-51cb-bd31-b3f7a9619500")
"""Namespace of the uuid5 score ids (`score_id_for`), fixed as a literal; it is
`uuid5(NAMESPACE_URL, "urn:persona-feedback-learning:langfuse-score")`. Never change it: every
feedback would get a new score id and Langfuse would show each vote twice."""

DEFAULT_BATCH_SIZE = 100
"""Scores per request. 1,000 outbox rows take 10 requests."""

DEFAULT_MAX_REQUEST_BYTES = 900_000
"""Langfuse's score endpoint takes bodies up to 1,000,000 bytes; this leaves a margin."""

_MAX_ERROR_CHARS = 300
# Whole-request statuses that say nothing about the chunk and would repeat for every chunk.
_SYSTEMIC_STATUSES = frozenset({401, 403, 404, 405})


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


class ScoreItem(BaseModel):
    """One outbox row to mirror as a Langfuse score on `trace_id`.

    Re-sends must keep `score_id` and `timestamp` (the feedback's creation time): Langfuse then
    updates the score instead of adding a second one. The timestamp is sent in UTC.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str = Field(min_length=1, description="Outbox row id; keys the Delivery.")
    score_id: str = Field(min_length=1, description="Deterministic score id (score_id_for).")
    trace_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    value: Annotated[float, Field(allow_inf_nan=False)] | str = Field(
        description="A number for NUMERIC and BOOLEAN (0 or 1), a string for CATEGORICAL."
    )
    data_type: Literal["NUMERIC", "BOOLEAN", "CATEGORICAL"] = "NUMERIC"
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

    @model_validator(mode="after")
    def _value_matches_type(self) -> Self:
        if self.data_type == "CATEGORICAL":
            if not isinstance(self.value, str) or not self.value:
                raise ValueError("a CATEGORICAL score needs a non-empty string value")
        elif not isinstance(self.value, float):
            raise ValueError(f"a {self.data_type} score needs a numeric value")
        elif self.data_type == "BOOLEAN" and self.value not in (0.0, 1.0):
            raise ValueError("a BOOLEAN score value must be 0 or 1")
        return self


class DeliveryOutcome(StrEnum):
    """What became of one item."""

    sent = "sent"
    """Langfuse accepted the score."""
    retry = "retry"
    """Transient: network error, timeout, HTTP 5xx or 429. Send again later."""
    failed = "failed"
    """Permanent: another 4xx (bad credentials, rejected score). Sending again will not help."""


class Delivery(BaseModel):
    """The outcome of one item; `error` is short and human readable, None when sent."""

    model_config = ConfigDict(frozen=True)

    item_id: str
    outcome: DeliveryOutcome
    error: str | None = None


@dataclass(frozen=True)
class _RequestFailed:
    """A request that failed as a whole."""

    outcome: DeliveryOutcome
    error: str
    stop_batch: bool
    """True when the remaining chunks would fail the same way (down, slow, bad credentials)."""


@dataclass(frozen=True)
class _Split:
    """Langfuse wants the chunk sent in smaller parts (207 rejection, 413)."""

    reason: str


_PostResult = CreateScoreBatchResults | _RequestFailed | _Split | None
"""None: every score of the chunk was accepted."""


class LangfuseSender:
    """Sends `ScoreItem`s to one Langfuse project and reports per-item outcomes.

    Every request is bounded by `timeout_seconds` (httpx applies it to connecting, sending, each
    read and waiting for a pooled connection). After a transient failure or an authentication
    failure, the remaining chunks of the same `send` are not attempted and get the same outcome,
    so a down or hanging Langfuse costs one timeout per `send`, not one per chunk.

    A sender keeps no state between sends besides its (thread-safe) connection pool. Close it,
    or use it as a context manager, to release its connections.

    Raises ValueError for a host that is not an http(s) URL, an empty key, a timeout that is not
    a positive number of seconds, a batch_size below 1 or a max_request_bytes below 1024.
    """

    def __init__(
        self,
        host: str,
        public_key: str,
        secret_key: str,
        timeout_seconds: float = 5.0,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        if not host.startswith(("http://", "https://")):
            raise ValueError(f"host must be an http(s) URL, got {host!r}")
        if not public_key or not secret_key:
            raise ValueError("public_key and secret_key must not be empty")
        if not timeout_seconds > 0 or not math.isfinite(timeout_seconds):
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {max_request_bytes}")
        self.host = host.rstrip("/")
        self.public_key = public_key
        self.timeout_seconds = float(timeout_seconds)
        self.batch_size = batch_size
        self.max_request_bytes = max_request_bytes
        self._http = httpx.Client(timeout=self.timeout_seconds, follow_redirects=True)
        # Same construction as the SDK's own Langfuse().api, minus the singleton and threads.
        self._api = LangfuseAPI(
            base_url=self.host,
            username=public_key,
            password=secret_key,
            x_langfuse_sdk_name="python",
            x_langfuse_sdk_version=langfuse_version,
            x_langfuse_public_key=public_key,
            timeout=self.timeout_seconds,
            httpx_client=self._http,
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

    def send(self, items: Sequence[ScoreItem]) -> list[Delivery]:
        """Send `items` as scores; return one Delivery per item, in the order of `items`.

        Items are sent in requests of at most `batch_size` scores (and `max_request_bytes`).
        When several items carry the same score id, only the last one is sent (pass items oldest
        first) and the earlier ones share its outcome: they are superseded versions of the same
        score, and sending them together would leave Langfuse's final value to chance.

        Raises ValueError only for programming errors (duplicate item ids).
        """
        seen: set[str] = set()
        for item in items:
            if item.item_id in seen:
                raise ValueError(f"duplicate item_id in one send: {item.item_id!r}")
            seen.add(item.item_id)

        latest: dict[str, ScoreItem] = {}
        for item in items:
            latest.pop(item.score_id, None)  # re-insert so the order follows the latest version
            latest[item.score_id] = item

        results: dict[str, Delivery] = {}
        pending: deque[list[ScoreItem]] = deque()
        for item_or_error in self._chunks(list(latest.values())):
            if isinstance(item_or_error, Delivery):
                results[item_or_error.item_id] = item_or_error
            else:
                pending.append(item_or_error)

        stopped: _RequestFailed | None = None
        while pending:
            chunk = pending.popleft()
            if stopped is not None:
                self._settle(chunk, stopped.outcome, f"{stopped.error} (not attempted)", results)
                continue
            result = self._post(chunk)
            if result is None:
                self._settle(chunk, DeliveryOutcome.sent, None, results)
            elif isinstance(result, _RequestFailed):
                logger.warning(
                    "Langfuse request of %d scores: %s (%s)",
                    len(chunk),
                    result.error,
                    result.outcome,
                )
                self._settle(chunk, result.outcome, result.error, results)
                if result.stop_batch:
                    stopped = result
            elif isinstance(result, _Split):
                if len(chunk) == 1:
                    self._settle(chunk, DeliveryOutcome.failed, result.reason, results)
                else:
                    half = len(chunk) // 2
                    pending.appendleft(chunk[half:])
                    pending.appendleft(chunk[:half])
            else:  # 207 for a single score
                outcome, error = _single_rejection(result)
                self._settle(chunk, outcome, error, results)

        deliveries: list[Delivery] = []
        for item in items:
            delivery = results.get(item.item_id)
            if delivery is None:  # superseded by a later item with the same score id
                winner = results[latest[item.score_id].item_id]
                delivery = winner.model_copy(update={"item_id": item.item_id})
            deliveries.append(delivery)
        return deliveries

    def _chunks(self, items: list[ScoreItem]) -> list[list[ScoreItem] | Delivery]:
        """Group items into requests of at most batch_size scores and max_request_bytes."""
        out: list[list[ScoreItem] | Delivery] = []
        chunk: list[ScoreItem] = []
        size = 2  # the brackets of the JSON array
        for item in items:
            item_size = len(json.dumps(_wire(item), ensure_ascii=False).encode()) + 1
            if item_size + 2 > self.max_request_bytes:
                out.append(
                    Delivery(
                        item_id=item.item_id,
                        outcome=DeliveryOutcome.failed,
                        error=f"score is {item_size} bytes, over the "
                        f"{self.max_request_bytes}-byte request limit",
                    )
                )
                continue
            if chunk and (
                len(chunk) >= self.batch_size or size + item_size > self.max_request_bytes
            ):
                out.append(chunk)
                chunk, size = [], 2
            chunk.append(item)
            size += item_size
        if chunk:
            out.append(chunk)
        return out

    def _post(self, chunk: list[ScoreItem]) -> _PostResult:
        """Send one request; classify its answer."""
        request = [_request(item) for item in chunk]
        try:
            response = self._api.scores.create(request=request, request_options={"max_retries": 0})
        except httpx.TimeoutException as exc:
            return _transient(f"timeout after {self.timeout_seconds}s{_timeout_phase(exc)}")
        except httpx.ConnectError as exc:
            return _transient(_connect_error(exc))
        except httpx.TransportError as exc:
            return _transient(f"network error: {_short(str(exc) or type(exc).__name__)}")
        except ApiError as exc:
            return _classify_status(exc)
        except pydantic.ValidationError:
            return _transient("unexpected response body from Langfuse")

        if not isinstance(response, CreateScoreBatchResults):
            return None
        if response.rejected == 0 and not response.errors and response.accepted >= len(chunk):
            return None
        if len(chunk) == 1:
            return response
        return _Split(reason="rejected by Langfuse")

    @staticmethod
    def _settle(
        chunk: list[ScoreItem],
        outcome: DeliveryOutcome,
        error: str | None,
        results: dict[str, Delivery],
    ) -> None:
        for item in chunk:
            results[item.item_id] = Delivery(item_id=item.item_id, outcome=outcome, error=error)


def _request(item: ScoreItem) -> CreateScoreRequest:
    return CreateScoreRequest(
        id=item.score_id,
        trace_id=item.trace_id,
        name=item.name,
        value=item.value,
        data_type=ScoreDataType(item.data_type),
        comment=item.comment,
        metadata=item.metadata,
        timestamp=item.timestamp,
    )


def _wire(item: ScoreItem) -> dict[str, object]:
    """The JSON object of one score, as sent (used to size requests)."""
    return {
        "id": item.score_id,
        "traceId": item.trace_id,
        "name": item.name,
        "value": item.value,
        "dataType": item.data_type,
        "comment": item.comment,
        "metadata": item.metadata,
        "timestamp": item.timestamp.isoformat(),
    }


def _transient(error: str) -> _RequestFailed:
    return _RequestFailed(outcome=DeliveryOutcome.retry, error=error, stop_batch=True)


def _timeout_phase(exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return " connecting"
    if isinstance(exc, httpx.ReadTimeout):
        return " waiting for a response"
    if isinstance(exc, httpx.WriteTimeout):
        return " sending"
    return ""


def _connect_error(exc: httpx.ConnectError) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        ):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    return f"connection failed: {_short(text or type(exc).__name__)}"


def _classify_status(exc: ApiError) -> _PostResult:
    status = exc.status_code
    if status is None or not 400 <= status < 600:
        # e.g. a 2xx whose body is not JSON: delivery is unconfirmed, and resending is harmless.
        return _transient(f"unexpected response from Langfuse (HTTP {status})")
    error = f"HTTP {status}: {_body_message(exc.body, status)}"
    if status == 429 or status >= 500:
        return _transient(error)
    if status == 413:
        return _Split(reason=error)
    return _RequestFailed(
        outcome=DeliveryOutcome.failed, error=error, stop_batch=status in _SYSTEMIC_STATUSES
    )


def _single_rejection(result: CreateScoreBatchResults) -> tuple[DeliveryOutcome, str]:
    """Outcome of a lone score that Langfuse answered with 207."""
    messages = [error.message for error in result.errors if error.message]
    statuses = [_int_or_none((error.model_extra or {}).get("status")) for error in result.errors]
    if any(s is not None and (s == 429 or s >= 500) for s in statuses):
        outcome = DeliveryOutcome.retry
    elif result.rejected == 0 and not result.errors:
        # Neither accepted nor rejected: unconfirmed, try again later.
        return DeliveryOutcome.retry, "Langfuse did not confirm the score"
    else:
        outcome = DeliveryOutcome.failed
    reason = "; ".join(messages) if messages else "no reason given"
    return outcome, _short(f"rejected by Langfuse: {reason}")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _body_message(body: object, status: int) -> str:
    text: str | None = None
    if isinstance(body, dict):
        message, detail = body.get("message"), body.get("error", body.get("detail"))
        if isinstance(message, str) and message:
            text = message
            if detail:
                text += (
                    f": {detail if isinstance(detail, str) else json.dumps(detail, default=str)}"
                )
        elif body:
            text = json.dumps(body, default=str)
    elif isinstance(body, str) and body.strip():
        text = body.strip()
    if text is None:
        try:
            text = HTTPStatus(status).phrase
        except ValueError:
            text = "error"
    return _short(text)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"
