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
sends while Langfuse asks to wait). The request itself, and what a request without an answer
means for its rows, is `worker.langfuse_http`'s; what an answer means, `worker.langfuse_response`'s.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID, uuid5

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from worker.langfuse_http import LangfuseClient, Unanswered
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

    @classmethod
    def of(cls, event_id: int, verdict: Verdict) -> Delivery:
        """The delivery a verdict gives (a 413 no split can cure, `smaller`, fails)."""
        outcome = Outcome.failed if verdict.outcome == Outcome.smaller else verdict.outcome
        return cls(event_id, outcome, verdict.error, verdict.retry_after_seconds, verdict.hold)


Chunk = list[tuple[ScoreItem, dict[str, Any]]]


class LangfuseSender(LangfuseClient):
    """Sends `ScoreItem`s to one Langfuse project (a `LangfuseClient`: its requests, bounds
    and base URL), as `environment` (sent as `langfuse_environment` makes it), in requests of
    at most `batch_size` events and `max_request_bytes`. Raises ValueError as LangfuseClient
    does, and for an environment Langfuse would file under `default`, a batch_size below 1 or a
    max_request_bytes below 1024."""

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
        environment = langfuse_environment(environment)
        if batch_size < 1 or max_request_bytes < 1024:
            raise ValueError("batch_size must be at least 1 and max_request_bytes at least 1024")
        super().__init__(host, public_key, secret_key, timeout_seconds, setting=setting)
        self.environment = environment
        self.batch_size, self.max_request_bytes = batch_size, max_request_bytes

    def send(
        self, items: Sequence[ScoreItem], stopping: Callable[[], bool] = lambda: False
    ) -> list[Delivery]:
        """Send `items`; return one Delivery per item, in their order. Requests hold at most
        `batch_size` events and `max_request_bytes`; a 413 splits one in halves. Several items of
        one score id: only the last is sent (pass them oldest first), the others share its
        outcome. After an answer that would repeat for every request (`Verdict.stop`: down, 5xx,
        429, bad keys...), the rest is not attempted and gets the same outcome; once `stopping()`
        is true (the worker stops), no request starts and the rest is `Outcome.later`. A wait
        without a server-given delay keeps none: the database's hold backs off. Raises
        ValueError for duplicate event ids."""
        if len({item.event_id for item in items}) != len(items):
            raise ValueError("duplicate event_id in one send")
        latest = {item.score_id: item for item in items}  # the last version of each score
        results: dict[int, Delivery] = {}
        pending: deque[Chunk] = deque(self._chunks(list(latest.values()), results))
        stopped: Verdict | None = None
        while pending:
            chunk = pending.popleft()
            if stopped is None and stopping():
                stopped = Verdict(Outcome.later, "not sent: the worker is stopping")
            if stopped is not None:
                not_sent = replace(stopped, error=f"{stopped.error} (not attempted)")
                verdicts = dict.fromkeys((i.envelope_id for i, _ in chunk), not_sent)
            else:
                verdicts = self._post(chunk)
                if len(chunk) > 1 and any(v.outcome == Outcome.smaller for v in verdicts.values()):
                    pending.extendleft([chunk[len(chunk) // 2 :], chunk[: len(chunk) // 2]])
                    continue
                stopped = next((v for v in verdicts.values() if v.stop), None)
            for item, _ in chunk:
                results[item.event_id] = Delivery.of(item.event_id, verdicts[item.envelope_id])
        return [replace(results[latest[i.score_id].event_id], event_id=i.event_id) for i in items]

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
        empty = len(body([]))
        size = empty
        for item in items:
            event = self.event(item)
            item_size = len(body([event])) - empty
            if empty + item_size > self.max_request_bytes:
                error = f"score is {item_size} bytes, over the {self.max_request_bytes}-byte limit"
                results[item.event_id] = Delivery(item.event_id, Outcome.failed, error, unsent=True)
                continue
            full = len(chunks[-1]) >= self.batch_size
            if chunks[-1] and (full or size + 1 + item_size > self.max_request_bytes):
                chunks.append([])
                size = empty
            size += item_size + (1 if chunks[-1] else 0)  # the comma before all but the first
            chunks[-1].append((item, event))
        return [chunk for chunk in chunks if chunk]

    def _post(self, chunk: Chunk) -> dict[str, Verdict]:
        """One request of `chunk`'s events: the verdict of each envelope id."""
        ids = [item.envelope_id for item, _ in chunk]
        try:
            answer = self.exchange("POST", INGESTION_PATH, body([event for _, event in chunk]))
        except Unanswered as exc:
            return dict.fromkeys(ids, exc.verdict)
        now = datetime.now(UTC)
        if answer.unreadable is not None:
            return unreadable(answer.status, answer.headers, answer.unreadable, ids, now,
                              self.setting)
        return classify(answer.status, answer.headers, answer.body, ids, now, self.setting)


def body(events: list[dict[str, Any]]) -> bytes:
    """The request body of an ingestion batch: compact JSON (no blanks after `,` and `:`),
    UTF-8, as sent; `_chunks` counts request sizes with it."""
    return json.dumps({"batch": events}, ensure_ascii=False, separators=(",", ":")).encode()
