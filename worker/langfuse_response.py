"""What one Langfuse answer means for each outbox row it carried: a pure function, no I/O.

`classify(status, headers, body, event_ids, now)` reads the answer to one
`POST /api/public/ingestion` request (a batch of `score-create` events whose envelope ids are
`event_ids`) and returns one `Verdict` per event id: `sent`, `retry` (an attempt; again after
the database's backoff, or the server's `Retry-After` if later; with `hold`, a top-level 500,
it also holds every worker as a wait does), `wait` (the server asked us to come back later, or
is not there for now: not an attempt, never fails a row, and no request goes to it before the
wait ends: the database's hold), `failed` (permanent, with the server's message), or, for the
request as a whole, `smaller` (413: send the events in smaller requests) or `off` (401, 403
other than a suspension, 405: the server, or something in front of it, refuses every request
of ours, e.g. keys rotated; the mirror turns off and the rows are left as they were).

What the endpoint documents, read in Langfuse's server source (`web/src/pages/api/public/
ingestion.ts` and `packages/shared/src/server/ingestion/processEventBatch.ts`, the same in
v3.225.4 and v4.16.0):

- 207 with `{"successes": [{"id", "status": 201}], "errors": [{"id", "status", "message"?,
  "error"?}]}`, one entry per event, keyed by the event's envelope id. That is the only 2xx it
  answers; any other 2xx, or a 207 without that shape, confirms nothing (retry: resending is
  harmless, the score id makes it an update).
- 400 `{"message": "Invalid request data", "errors": [...]}` for a body that is not
  `{"batch": [...]}`; every other refusal of the route is its `BaseError` answered as
  `{"error": <its name>, "message"}` (`res.status(error.httpCode).json(...)`): 401
  `UnauthorizedError` for keys that fail (an in-app agent key included); 403 `ForbiddenError`
  "Ingestion suspended: Usage threshold exceeded. Please upgrade your plan." when the key's
  scope `isIngestionSuspended` (Cloud's usage threshold), the route's only 403; 405
  `MethodNotAllowedError` for any method but POST, so never to our POST from Langfuse itself;
  413 above the 4.5 MB body limit; 429 with `Retry-After` (seconds) and `X-RateLimit-*` headers
  (Cloud only; self-hosted never limits); 500 for internal errors (below). A 401, 403 or 405 without
  that body came from something in front of Langfuse (a proxy, a firewall, another server at
  LANGFUSE_HOST), and the error says so.
- 404 or 410 for the whole request: nothing serves the route at LANGFUSE_HOST. Every Langfuse
  from 3.49 serves it for score events, Cloud included after the v3 ingestion sunset of
  2026-11-16 (only its other event types are refused from then, inside the 207: see the
  README), so this is a proxy in front of Langfuse or a wrong base path. The rows wait (not an
  attempt: nothing about them is wrong) and the error says why.
- In v4's `events_only` write mode (its default, and Cloud's from 2026-11-16) an event of
  another type than score-create or sdk-log gets a per-event 400 "Event type not accepted":
  read like any per-event 4xx (failed), though the sender never sends one.
- A 3xx means LANGFUSE_HOST is not the server itself (e.g. http:// redirected to https://). The
  sender never follows it (a redirected POST may arrive as a GET elsewhere and answer 200); as
  at start, the mirror turns off (`off`: every request would be redirected, nothing about the
  rows is wrong, no attempt) and the error names the location and, when the location ends with
  the route's path, the LANGFUSE_HOST it implies (`redirect_advice`).

- A top-level 502 or 504 never comes from Langfuse's handler (it answers a `BaseError`'s own
  code or 500): a gateway or load balancer in front of it says the server is not there for now
  (langfuse-web restarting, overloaded, a deploy); so does a gateway's 503, and Langfuse's own
  503 is its `ServiceUnavailableError` ("Storage service temporarily unavailable", a DNS
  failure reaching blob storage: `StorageService.ts`). Each is an outage: the rows wait (no
  attempt, never failed for it) and every worker holds, for the `Retry-After` when given,
  else the database's doubling backoff (as a bare 429).
- A top-level 500 is Langfuse's catch-all: a Prisma error (`{"error": "Internal Server
  Error"}`), or any other exception (`{"message": "Invalid request data", "errors": [<its
  message>]}`): blob storage or Redis failing in `processEventBatch` ("Failed to upload events
  to blob storage", "Redis not initialized"), the queue, the database. Those are outages, so a
  500 holds every worker too (no storm of requests); but the same catch-all also answers an
  exception our body itself may raise, which no wait cures, so it stays an attempt (`retry`
  with `hold`): a row fails after the configured attempts, each one a hold apart.

Per-item statuses inside a 207 are one event's, not the server's: 429 and 5xx retry (no hold),
other 4xx fail.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

MAX_ERROR_CHARS = 300
MAX_RETRY_AFTER_SECONDS = 86_400.0
"""A Retry-After beyond a day is read as a day (the database's limit for one delay)."""
SUSPENDED_RETRY_SECONDS = 300.0
"""Usage suspension (403) lifts when the plan or the billing period changes: look every 5 min."""
SUSPENDED = (
    "ForbiddenError",
    "Ingestion suspended: Usage threshold exceeded. Please upgrade your plan.",
)
"""The usage suspension exactly as Langfuse answers it: `throw new ForbiddenError("Ingestion
suspended: ...")` in `web/src/pages/api/public/ingestion.ts` when the key's scope
`isIngestionSuspended`, answered `{"error": error.name, "message": error.message}` with 403 by
the same handler (v3.225.4, v4.16.0 and main commit 62751446149b). Another 403 is not one."""
NO_ROUTE_RETRY_SECONDS = 300.0
"""A host that does not serve the ingestion route (404/410) is asked again every 5 minutes."""
INGESTION_PATH = "/api/public/ingestion"
OUTAGE_STATUSES = frozenset({502, 503, 504})
"""Top-level answers of a gateway in front of Langfuse, or Langfuse's own "temporarily
unavailable" (see above): the server is not there for now, so the rows wait."""


def no_route_hint(setting: str = "LANGFUSE_HOST") -> str:
    """Why a host answers 404 or 410 to the ingestion route, naming the base URL's `setting`."""
    return (
        "every Langfuse from 3.49 serves it for scores, Cloud included: a proxy in front of "
        f"Langfuse, or the path in {setting}, is in the way"
    )


class Outcome(StrEnum):
    """What became of one row (the values record_langfuse_deliveries reads, and `smaller`)."""

    sent = "sent"
    retry = "retry"
    wait = "wait"
    failed = "failed"
    smaller = "smaller"
    """The request was too large (413): send its events again in smaller requests."""
    off = "off"
    """The server, or the way to it, refuses us, not the scores (401, 403 other than a
    suspension, 405, a redirect; from the sender: a host name that does not exist, TLS that
    cannot work with the host): the mirror turns off until a start-up check passes again
    (repeated every few minutes); the rows are left as they were."""
    later = "later"
    """From the sender: not sent, as the worker is stopping (no request starts once it is): the
    rows are left as they were, due again once their claim window has passed; no attempt."""
    unreachable = "unreachable"
    """From the sender: no connection could be made (refused, connect timeout, no route, a
    resolver's temporary failure, a TLS handshake cut short), so nothing was sent: the rows
    are left as they were, and the mirror checks the server again on its next pass, as when
    it is down at start."""


@dataclass(frozen=True)
class Verdict:
    """One row's outcome; `error` is short and human readable (None when sent);
    `retry_after_seconds` is the least delay the server asked for (None: the backoff alone);
    `stop` says the same answer would come for every other request of this pass (down,
    overloaded, bad keys, suspended), so the sender sends no more of it; `hold` (a `retry`
    only: a top-level 500) says the answer also holds every worker, as a wait does."""

    outcome: Outcome
    error: str | None = None
    retry_after_seconds: float | None = None
    stop: bool = False
    hold: bool = False


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    event_ids: Sequence[str],
    now: datetime,
    setting: str = "LANGFUSE_HOST",
) -> dict[str, Verdict]:
    """The verdict for each of `event_ids` (the envelope ids of the request, in any order) from
    the answer's `status`, `headers` (names in any case) and raw `body`; `now` (aware) turns an
    HTTP-date Retry-After into seconds; `setting` is the name of the base URL's setting, as the
    errors name it (LANGFUSE_HOST or LANGFUSE_BASE_URL). Total: never raises, every id gets a
    verdict."""
    lower = {k.lower(): v for k, v in headers.items()}
    parsed = _json(body)

    if 200 <= status < 300:
        return _batch_result(status, parsed, event_ids)
    if 300 <= status < 400:
        location = lower.get("location", "no location given")
        advice = redirect_advice(location, INGESTION_PATH, setting)
        error = f"HTTP {status}: redirected to {location}; {advice}"
        return _all(event_ids, Verdict(Outcome.off, _short(error), stop=True))

    error = f"HTTP {status}: {_message(parsed, body, status)}"
    if status == 413:
        return _all(event_ids, Verdict(Outcome.smaller, _short(error)))
    if status == 429:
        wait = retry_after(lower, now)
        return _all(event_ids, Verdict(Outcome.wait, _short(error), wait, stop=True))
    if status in (404, 410):
        return _all(
            event_ids,
            Verdict(
                Outcome.wait,
                _short(f"{error}: no POST {INGESTION_PATH} at {setting} "
                       f"({no_route_hint(setting)}); scores wait"),
                NO_ROUTE_RETRY_SECONDS,
                True,
            ),
        )
    shape = _langfuse_error(parsed)
    if status == 403 and shape == SUSPENDED:
        return _all(
            event_ids, Verdict(Outcome.wait, _short(error), SUSPENDED_RETRY_SECONDS, stop=True)
        )
    if status in OUTAGE_STATUSES:  # a gateway: the server is not there for now
        return _all(event_ids, Verdict(Outcome.wait, _short(error), retry_after(lower, now), True))
    if status >= 500:  # Langfuse's catch-all: an outage, or a body that breaks it
        wait = retry_after(lower, now)
        return _all(event_ids, Verdict(Outcome.retry, _short(error), wait, True, hold=True))
    if status == 408:
        return _all(event_ids, Verdict(Outcome.retry, _short(error), retry_after(lower, now), True))
    if status in (401, 403, 405):
        # Every request would be refused the same way: the mirror goes off, the rows wait.
        refused = _short(refusal(status, error, shape, setting))
        return _all(event_ids, Verdict(Outcome.off, refused, stop=True))
    # Other 4xx: our request is wrong; sending it again will not help.
    return _all(event_ids, Verdict(Outcome.failed, _short(error)))


def unreadable(
    status: int,
    headers: Mapping[str, str],
    why: str,
    event_ids: Sequence[str],
    now: datetime,
    setting: str = "LANGFUSE_HOST",
) -> dict[str, Verdict]:
    """The verdicts for an answer whose status and headers came but whose body could not be
    read (`why`: e.g. a Content-Encoding of gzip on a body that is not gzip, from a proxy): a
    2xx confirms nothing, as a 2xx without the ingestion result (retry: an attempt; resending
    is harmless, the score id makes it an update); another status is read without its body.
    Total: never raises."""
    if 200 <= status < 300:
        error = f"HTTP {status} with a body that could not be read ({why}): not confirmed"
        return _all(event_ids, Verdict(Outcome.retry, _short(error)))
    return classify(status, headers, b"", event_ids, now, setting)


def refusal(
    status: int, error: str, shape: tuple[str, str] | None, setting: str = "LANGFUSE_HOST"
) -> str:
    """What a 401, 403 or 405 to our POST means, followed by `error` (the status and the
    server's words); `shape` is Langfuse's (error name, message) when the body has that shape.
    Only Langfuse's own 401 is about the keys; Langfuse never answers 405 to a POST there, and
    its only other 403 is a usage suspension (see `SUSPENDED`)."""
    if status == 405:
        return (
            f"method not allowed, though Langfuse takes POST {INGESTION_PATH}: {setting} "
            f"is not Langfuse's base URL (a wrong host or path), or a proxy in front of it "
            f"refuses POST ({error})"
        )
    if shape is None:
        return (
            f"refused by something in front of Langfuse, not Langfuse (no Langfuse error in the "
            f"body): a proxy or firewall at {setting} ({error})"
        )
    if status == 401:
        return f"Langfuse refused the keys: {error}"
    return f"Langfuse refused the request: {error}"


def redirect_advice(location: str, path: str, setting: str = "LANGFUSE_HOST") -> str:
    """What to set the base URL (`setting`) to, for a request to `path` redirected to
    `location`: the location without its query and that path, when it is an absolute http(s)
    URL ending with it (e.g. `https://x/api/public/ingestion` -> "set LANGFUSE_HOST to
    https://x"); otherwise the general advice ("set LANGFUSE_HOST to the server itself")."""
    general = f"set {setting} to the server itself"
    try:
        parts = urlsplit(location)
    except ValueError:
        return general
    if parts.scheme in ("http", "https") and parts.netloc and parts.path.endswith(path):
        return f"set {setting} to {parts.scheme}://{parts.netloc}{parts.path[: -len(path)]}"
    return general


def retry_after(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds to wait from `Retry-After` (delta-seconds or an HTTP-date, RFC 9110 §10.2.3),
    else from `RateLimit-Reset` (the IETF rate-limit headers draft: delta-seconds), else from
    `X-RateLimit-Reset` (a date as Langfuse writes it, or a number); clamped to
    0..MAX_RETRY_AFTER_SECONDS; None when no header is usable. Header names in lower case.
    A reset header's number is read by its size, since servers send all three: from 1e12 Unix
    time in milliseconds, from 1e9 Unix time in seconds (2001 on), below that delta-seconds
    (1e9 s is over 31 years, so no delay is taken for a time)."""
    for name in ("retry-after", "ratelimit-reset", "x-ratelimit-reset"):
        value = headers.get(name, "").strip()
        if not value:
            continue
        seconds = _seconds_until(value, now, reset=name != "retry-after")
        if seconds is not None:
            return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
    return None


EPOCH_SECONDS_FROM = 1e9
"""A reset header's number from here on is a Unix time in seconds (2001-09-09 on)..."""
EPOCH_MILLISECONDS_FROM = 1e12
"""...and from here on in milliseconds (1e12 ms is 2001-09-09; 1e12 s would be year 33658)."""


def _seconds_until(value: str, now: datetime, *, reset: bool) -> float | None:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isfinite(number):
        if reset and number >= EPOCH_MILLISECONDS_FROM:
            return number / 1000 - now.timestamp()
        if reset and number >= EPOCH_SECONDS_FROM:
            return number - now.timestamp()
        return number
    for parse in (_http_date, _js_date):
        when = parse(value)
        if when is not None:
            return (when - now).total_seconds()
    return None


def _http_date(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else None


def _js_date(value: str) -> datetime | None:
    """JavaScript's Date.toString(), e.g. `Tue Dec 01 2026 10:00:05 GMT+0000 (Coordinated
    Universal Time)`: what Langfuse writes in X-RateLimit-Reset."""
    head = value.split(" (", 1)[0]
    try:
        return datetime.strptime(head, "%a %b %d %Y %H:%M:%S GMT%z")
    except ValueError:
        return None


def _batch_result(status: int, parsed: Any, event_ids: Sequence[str]) -> dict[str, Verdict]:
    shape = _ingestion_shape(parsed)
    if status != 207 or shape is None:
        unconfirmed = Verdict(
            Outcome.retry,
            _short(
                f"HTTP {status} without the ingestion result (successes, errors): not confirmed"
            ),
        )
        return _all(event_ids, unconfirmed)
    successes, errors = shape
    out: dict[str, Verdict] = {}
    for event_id in event_ids:
        if event_id in errors:
            item_status, message = errors[event_id]
            text = _short(f"rejected by Langfuse (HTTP {item_status}): {message}")
            transient = item_status == 429 or item_status >= 500
            out[event_id] = Verdict(Outcome.retry if transient else Outcome.failed, text)
        elif event_id in successes:
            out[event_id] = Verdict(Outcome.sent)
        else:
            out[event_id] = Verdict(Outcome.retry, "Langfuse did not confirm the score")
    return out


def passed_empty_batch(status: int, body: bytes) -> bool:
    """Whether an answer to an empty batch (the start-up check's) is the ingestion result of
    one: 207 with no success and no error (other top-level keys allowed, as Cloud's
    `_deprecation` notice)."""
    return status == 207 and _ingestion_shape(_json(body)) == (set(), {})


def health_version(body: bytes) -> tuple[int, int, int] | None:
    """The version of a `GET /api/public/health` answer's body (`{"status": "OK", "version":
    "4.16.0"}`), None when it has none."""
    parsed = _json(body)
    return parse_version(parsed.get("version")) if isinstance(parsed, dict) else None


def parse_version(text: object) -> tuple[int, int, int] | None:
    """(major, minor, patch) of "4.16.0", "v3.225.4" or "4.60.1-rc.1"; None otherwise."""
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", text) if isinstance(text, str) else None
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def _ingestion_shape(parsed: Any) -> tuple[set[str], dict[str, tuple[int, str]]] | None:
    """(ids accepted, id -> (status, message) rejected) of an ingestion 207 body, or None when
    the body is not that shape."""
    if not isinstance(parsed, dict):
        return None
    successes, errors = parsed.get("successes"), parsed.get("errors")
    if not isinstance(successes, list) or not isinstance(errors, list):
        return None
    accepted: set[str] = set()
    for item in successes:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return None
        accepted.add(item["id"])
    rejected: dict[str, tuple[int, str]] = {}
    for item in errors:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return None
        item_status = item.get("status")
        if not isinstance(item_status, int) or isinstance(item_status, bool):
            item_status = 500
        rejected[item["id"]] = (item_status, _message(item, b"", item_status))
    return accepted - set(rejected), rejected


def _langfuse_error(parsed: Any) -> tuple[str, str] | None:
    """(error name, message) of a body shaped as Langfuse answers a refusal, `{"error":
    "<Name>Error", "message": "..."}`; None for any other body."""
    if not isinstance(parsed, dict):
        return None
    name, message = parsed.get("error"), parsed.get("message")
    if isinstance(name, str) and name.endswith("Error") and isinstance(message, str):
        return name, message
    return None


def _all(event_ids: Sequence[str], verdict: Verdict) -> dict[str, Verdict]:
    return dict.fromkeys(event_ids, verdict)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None  # RecursionError: JSON nested beyond Python's stack ('[' * 200_000)


def _message(parsed: Any, raw: bytes, status: int) -> str:
    """The server's own words: `message`, then `error`/`errors`/`detail`; else the raw text;
    else the status phrase."""
    if isinstance(parsed, dict):
        parts = []
        for key in ("message", "error", "errors", "detail"):
            value = parsed.get(key)
            if isinstance(value, str) and value:
                parts.append(value)
            elif value:
                parts.append(json.dumps(value, default=str))
        if parts:
            return _short(": ".join(parts))
    text = raw.decode(errors="replace").strip()
    if text:
        return _short(text)
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
