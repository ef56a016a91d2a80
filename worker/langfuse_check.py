"""The mirror's start-up check: is LANGFUSE_HOST a Langfuse we can send to, with these keys?

`check(sender)` reads `GET /api/public/health` (no auth; every generation answers 200
`{"status": "OK", "version": "4.16.0"}`) and sends an empty batch to `POST
/api/public/ingestion` (207 `{"successes": [], "errors": []}` when the keys work, other top-level
keys allowed, as Cloud's `_deprecation` notice; stores nothing). Langfuse serves its health route
to anyone, without keys; a 401, 403, 404, 405 or 410 there comes from something in front of it
(a proxy that exposes only the API routes it must), so the version is unknown (the 3.49 minimum
cannot be checked; the drainer says so) and the ingestion route, which every supported
generation serves, decides.

Every failure of the check is checked again later (`worker.outbox`): a key pair, a proxy's rule,
DNS, a certificate or the server itself (an upgrade past 3.49) may come right without a restart.
"""

from __future__ import annotations

from datetime import UTC, datetime

from worker.langfuse_http import Answer, LangfuseClient, Unanswered
from worker.langfuse_response import (
    INGESTION_PATH,
    Outcome,
    Verdict,
    classify,
    health_version,
    no_route_hint,
    passed_empty_batch,
    redirect_advice,
)

HEALTH_PATH = "/api/public/health"
MIN_VERSION = (3, 49, 0)
"""The first Langfuse whose score events keep `metadata` (3.49.0; `environment` since 3.31.0);
older servers drop them without a word, so the mirror does not send to them."""


class LangfuseConfigError(Exception):
    """Langfuse is configured in a way that cannot work (host, keys, a server older than 3.49):
    the message says what to change. Nothing is sent until a later check passes (something
    outside the worker may fix it: an upgrade, a proxy's rule)."""


class LangfuseRefused(LangfuseConfigError):
    """Langfuse refused the keys, or something in front of it refused our requests (401, 403
    other than a usage suspension, 405): the keys may work again (a key pair restored) or a
    proxy's rule be fixed, so the check is repeated later."""


class LangfuseHostUnusable(LangfuseConfigError):
    """LANGFUSE_HOST's name does not exist ("Name or service not known"; a resolver's temporary
    failure is no such thing: LangfuseUnavailable), or TLS cannot work with it (https:// to a
    port that speaks plain HTTP, a certificate not trusted): a setting to fix, but DNS or the
    server may also come right (a container not started yet), so the check is repeated later.
    The same failure on a send later is treated alike (`Outcome.off`)."""


class LangfuseNotThere(LangfuseConfigError):
    """No Langfuse answers at LANGFUSE_HOST, or not its ingestion route (a health route without
    a version, a 404 or 410 to the ingestion POST): a wrong host or path, or a proxy in front
    of a Langfuse not ready yet (a container starting behind Traefik answers 404 until it is
    healthy), so the check is repeated later, as mid-run (a 5-minute hold)."""


class LangfuseRedirected(LangfuseConfigError):
    """LANGFUSE_HOST answers with a redirect (never followed: a redirected POST may arrive as a
    GET elsewhere): a setting to fix, but also what a proxy in front of Langfuse answers while
    it is being set up (http:// to https://), so the check is repeated later, as for a redirect
    met mid-run."""


class LangfuseUnavailable(Exception):
    """Langfuse could not be asked (down, timeout, 5xx): try again later."""


class LangfuseWait(LangfuseUnavailable):
    """The health route answered that Langfuse, or a proxy in front of it, asks to wait (a 429)
    or is not there for now (a gateway's 502/503/504): `verdict` is that wait (its error and
    delay), which the drainer makes the database's hold, as for a send."""

    def __init__(self, message: str, verdict: Verdict) -> None:
        super().__init__(message)
        self.verdict = verdict


def generation(version: tuple[int, int, int] | None) -> str:
    """The server generation of a version, as the README's table names it ("unknown" for
    None: the health route was not served)."""
    if version is None:
        return "unknown"
    if version < (4, 0, 0):
        return "v3"
    return "v4 before 4.59" if version < (4, 59, 0) else "v4 4.59 or later"


def check(sender: LangfuseClient) -> tuple[int, int, int] | None:
    """The server's version (None: its health route is not served at the base URL, so unknown),
    also kept as `sender.version`, and `sender.checked` set. Raises LangfuseConfigError when the
    host, the keys or the version cannot work, LangfuseNotThere (one too) when no Langfuse, or
    no ingestion route, answers there (a proxy or a wrong base path), LangfuseRedirected (one
    too) for a redirect, LangfuseRefused (one too) when the keys, or our requests, are refused,
    LangfuseHostUnusable (one too) when the host name does not exist or TLS cannot work,
    LangfuseWait (a LangfuseUnavailable) when the health route or the empty batch answers a wait
    (429, a usage suspension, a gateway's 502/503/504) or Langfuse's 500: the drainer holds
    every worker for it, as for a send's; LangfuseUnavailable when the server cannot be asked
    now (refused or reset connections, a resolver's temporary failure, timeout, another 5xx, an
    answer whose body cannot be read). A check after one whose empty batch met a wait sends that
    batch alone (the version read then is kept): after a hold, a worker's check is one request."""
    if sender.waited:
        version, sender.waited = sender.version, False
    else:
        version = _health(sender)
    probe = _request(sender, "POST", INGESTION_PATH, b'{"batch":[]}')
    if probe.status in (404, 410):
        raise LangfuseNotThere(
            f"Langfuse {_named(version)} at {sender.host} answered {probe.status} to POST "
            f"{INGESTION_PATH}: {no_route_hint(sender.setting)}"
        )
    if not passed_empty_batch(probe.status, probe.body):
        now = datetime.now(UTC)
        verdict = classify(probe.status, probe.headers, probe.body, ["-"], now, sender.setting)["-"]
        if verdict.outcome == Outcome.off:
            raise LangfuseRefused(f"{sender.setting}={sender.host}: {verdict.error}")
        if verdict.outcome == Outcome.failed:
            raise LangfuseConfigError(
                f"Langfuse at {sender.host} refused an empty batch: {verdict.error}"
            )
        # a 429, a suspension, a gateway's 5xx; Langfuse's 500 holds every worker too, as on a
        # send (no rows here, so no attempt)
        if verdict.outcome == Outcome.wait or verdict.hold:
            sender.version, sender.waited = version, True  # the hold's probe is this POST
            raise LangfuseWait(f"Langfuse at {sender.host}: {verdict.error}", verdict)
        raise LangfuseUnavailable(f"Langfuse at {sender.host}: {verdict.error}")
    sender.version, sender.checked = version, True
    return version


HIDDEN_HEALTH = frozenset({401, 403, 404, 405, 410})
"""Answers to the health route that Langfuse never gives (it serves the route to anyone): a
proxy in front of it does not expose the route, so the version is unknown, not the server
missing; the empty batch to the ingestion route decides."""


def _health(sender: LangfuseClient) -> tuple[int, int, int] | None:
    """The version `GET /api/public/health` answers, None when the route is hidden
    (`HIDDEN_HEALTH`). Raises as `check` does."""
    health = _request(sender, "GET", HEALTH_PATH)
    version = health_version(health.body)
    if health.status >= 500 or health.status == 429:
        now = datetime.now(UTC)
        verdict = classify(health.status, health.headers, health.body, ["-"], now)["-"]
        message = f"{sender.host}{HEALTH_PATH} answered {health.status}"
        if verdict.outcome == Outcome.wait or verdict.hold:  # a 500 holds, as on a send
            raise LangfuseWait(message, verdict)
        raise LangfuseUnavailable(message)
    if health.status in HIDDEN_HEALTH:
        return None
    if health.status != 200 or version is None:
        raise LangfuseNotThere(
            f"no Langfuse at {sender.setting}={sender.host}: GET {HEALTH_PATH} answered "
            f"{health.status} without a version"
        )
    if version < MIN_VERSION:
        raise LangfuseConfigError(
            f"Langfuse {_named(version)} at {sender.host} is too old: score metadata and "
            f"environments need {_named(MIN_VERSION)} or later"
        )
    return version


def _named(version: tuple[int, int, int] | None) -> str:
    return "(version unknown)" if version is None else ".".join(map(str, version))


def _request(
    sender: LangfuseClient, method: str, path: str, payload: bytes | None = None
) -> Answer:
    """The answer to one request of the check, its body read (`LangfuseClient.exchange`).
    Raises LangfuseHostUnusable, LangfuseUnavailable (no answer, or one whose body cannot be
    read) or LangfuseRedirected, as `check` says."""
    try:
        answer = sender.exchange(method, path, payload)
    except Unanswered as exc:
        if exc.verdict.outcome == Outcome.off:  # a name that does not exist, TLS that fails
            raise LangfuseHostUnusable(f"{sender.setting}={sender.host}: {exc}") from exc
        raise LangfuseUnavailable(f"{sender.host}{path}: {exc}") from exc
    if answer.unreadable is not None:  # e.g. a lying Content-Encoding
        raise LangfuseUnavailable(
            f"{sender.host}{path}: an answer that could not be read ({answer.unreadable})"
        )
    if 300 <= answer.status < 400:
        location = answer.headers.get("location", "no location given")
        raise LangfuseRedirected(
            f"{sender.setting}={sender.host} redirects ({answer.status}) to {location}: "
            f"{redirect_advice(location, path, sender.setting)}"
        )
    return answer
