"""The one HTTP exchange with Langfuse, for the start-up check and the sender alike.

`LangfuseClient.exchange(method, path, payload)` makes one request to the base URL with HTTP
Basic auth (public key : secret key), redirects never followed, and returns its `Answer`: the
status, the headers and the body read in full within the timeout counted from the request's
start (`read_bounded`: httpx's own timeout bounds each network read only), at most
`MAX_ANSWER_BYTES` (a longer body, or one whose Content-Encoding it does not have, is an answer
whose body could not be read: `Answer.unreadable` says why). A request that got no answer raises
`Unanswered` with the verdict for its rows: a host name that does not exist or TLS that cannot
work with the host is a setting (`Outcome.off`, `unusable_host`); a refused or timed-out
connection, a resolver's temporary failure or a TLS handshake cut short sent nothing
(`Outcome.unreachable`); a failure once the request was on its way (a timeout waiting for the
answer, a reset) is a retry, as the request itself may be why.
"""

from __future__ import annotations

import errno
import math
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Self

import httpx

from worker.langfuse_response import Outcome, Verdict

MAX_ANSWER_BYTES = 1 << 20
"""The most of an answer's body the worker reads (decoded): Langfuse answers a batch of at
most a few hundred events in a few kB; a longer body is read as unreadable
(`AnswerTooLarge`)."""


class AnswerTooLarge(httpx.DecodingError):
    """An answer's body over `MAX_ANSWER_BYTES`: read as one whose body cannot be read."""


@dataclass(frozen=True)
class Answer:
    """An answer's status, headers and decoded body; `unreadable` says why the body could not be
    read (then `body` is empty and the status and headers are all there is)."""

    status: int
    headers: httpx.Headers
    body: bytes
    unreadable: str | None = None


class Unanswered(Exception):
    """A request that got no answer; `verdict` (off, unreachable or retry, with `stop`) is its
    rows' outcome and its `error` the account of it."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.error)
        self.verdict = verdict


class LangfuseClient:
    """One Langfuse project's base URL (`host`, named `setting` in messages: LANGFUSE_HOST or
    LANGFUSE_BASE_URL) and keys, over one httpx client, every request bounded by
    `timeout_seconds`; what the start-up check last learnt of the server (`checked`, `version`,
    `waited`: see `worker.langfuse_check.check`). Close it (or use `with`) to release its
    connections. Raises ValueError for a host that is not an http(s) URL with a host name, an
    empty key or a timeout that is not a positive number of seconds."""

    def __init__(
        self,
        host: str,
        public_key: str,
        secret_key: str,
        timeout_seconds: float = 5.0,
        *,
        setting: str = "LANGFUSE_HOST",
    ) -> None:
        self.setting = setting
        self.host = check_host(host, setting)
        if not public_key or not secret_key:
            raise ValueError("LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must not be empty")
        if not timeout_seconds > 0 or not math.isfinite(timeout_seconds):
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        self.public_key, self.timeout_seconds = public_key, float(timeout_seconds)
        self.checked = False  # a check passed, and nothing failed since
        self.version: tuple[int, int, int] | None = None  # as the last check read it
        self.waited = False  # the last check's empty batch met a wait: the next sends it alone
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

    def exchange(self, method: str, path: str, payload: bytes | None = None) -> Answer:
        """The answer to `method` `host + path`, with `payload` (JSON) as its body if given.
        Raises Unanswered when no answer came (see the module docstring)."""
        deadline = time.monotonic() + self.timeout_seconds
        headers = {"content-type": "application/json"} if payload is not None else None
        try:
            with self.http.stream(
                method, self.host + path, content=payload, headers=headers
            ) as streamed:
                try:
                    body = read_bounded(streamed, deadline, self.timeout_seconds)
                except httpx.DecodingError as exc:  # status and headers came, the body is not
                    why = " ".join((str(exc) or type(exc).__name__).split())[:200]
                    return Answer(streamed.status_code, streamed.headers, b"", why)
        except httpx.TransportError as exc:
            raise Unanswered(self._unanswered(exc)) from exc
        except httpx.HTTPError as exc:  # anything else httpx raises for one request
            error = f"an answer that could not be read ({type(exc).__name__}: {exc})"
            raise Unanswered(Verdict(Outcome.retry, error[:300], stop=True)) from exc
        return Answer(streamed.status_code, streamed.headers, body)

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


def transport_error(exc: httpx.TransportError, timeout: float) -> str:
    """A short account of a request that got no answer: "connection refused", "timeout after
    Ns waiting for a response" (`timeout` seconds), "network error: ..."."""
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: " connecting",
            httpx.ReadTimeout: " waiting for a response",
            httpx.WriteTimeout: " sending",
        }.get(type(exc), "")
        return f"timeout after {timeout}s{phase}"
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
