"""The one HTTP exchange with Langfuse, for the start-up check and the sender alike.

`LangfuseClient.exchange(method, path, payload)` makes one request to the base URL with HTTP
Basic auth (public key : secret key), redirects never followed, and returns its `Answer`: the
status, the headers and the body read in full within the timeout counted from the request's
start, at most `MAX_ANSWER_BYTES` (a longer body, or one whose Content-Encoding it does not
have, is an answer whose body could not be read: `Answer.unreadable` says why). A request that
got no answer raises `Unanswered` with the verdict for its rows: a host name that does not
exist or TLS that cannot work with the host is a setting (`Outcome.off`, `unusable_host`); a
refused or timed-out connection, a resolver's temporary failure or a TLS handshake cut short
sent nothing (`Outcome.unreachable`); a failure once the request was on its way (a timeout
waiting for the answer, a reset) is a retry, as the request itself may be why.

The timeout bounds the whole exchange, not only each network wait (httpx's own timeout bounds
each connect, write and read, so a server trickling its headers a byte at a time would hold a
request for ever): `Deadline`, a watchdog timer, shuts the connection's socket down once the
request's start plus the timeout has passed, wherever the exchange is (connecting, uploading,
waiting for the headers, reading the body), and the request ends as a timeout. What no socket
bounds is the system resolver's look-up of the host name, before any connection: its own
timeout and attempts (resolv.conf) bound it, and a name it says does not exist is a setting to
fix even when that answer comes past the deadline.
"""

from __future__ import annotations

import contextlib
import errno
import math
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Self

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
    `waited`: see `worker.langfuse_check.check`). The host and the keys are taken without
    surrounding blanks (a trailing newline from a mounted secret). Close it (or use `with`) to
    release its connections. Raises ValueError for a host that is not an http(s) URL with a host
    name, an empty (or blank) key or a timeout that is not a positive number of seconds."""

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
        # Keys without surrounding blanks, as the host: a secret mounted from a file (a
        # Kubernetes secret made with a trailing newline) would otherwise be refused as wrong.
        public_key, secret_key = public_key.strip(), secret_key.strip()
        if not public_key or not secret_key:
            raise ValueError("LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must not be empty")
        if not timeout_seconds > 0 or not math.isfinite(timeout_seconds):
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        self.public_key, self.timeout_seconds = public_key, float(timeout_seconds)
        self.checked = False  # a check passed, and nothing failed since
        self.version: tuple[int, int, int] | None = None  # as the last check read it
        self.waited = False  # the last check's empty batch met a wait: the next sends it alone
        self.stream: Any = None  # the network stream of the client's one connection, if any
        self.http = httpx.Client(
            auth=(public_key, secret_key),
            timeout=self.timeout_seconds,
            follow_redirects=False,
            headers={"user-agent": "persona-feedback-learning"},
            # One connection (kept alive between requests): the one a request's watchdog shuts
            # down is the one it uses. Requests are made one at a time (the mirror's thread).
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exchange(self, method: str, path: str, payload: bytes | None = None) -> Answer:
        """The answer to `method` `host + path`, with `payload` (JSON) as its body if given,
        within `timeout_seconds` of its start (`Deadline`; the resolver's look-up of the host
        name aside). Raises Unanswered when no answer came (see the module docstring): past
        the deadline, a timeout, `unreachable` if the request had not been sent yet, else a
        retry (a host name that does not exist is `off` all the same)."""
        deadline = Deadline(self, self.timeout_seconds)
        headers = {"content-type": "application/json"} if payload is not None else None
        try:
            with deadline, self.http.stream(
                method,
                self.host + path,
                content=payload,
                headers=headers,
                extensions={"trace": deadline.trace},
            ) as streamed:
                try:
                    body = read_bounded(streamed, deadline.at, self.timeout_seconds)
                except httpx.DecodingError as exc:  # status and headers came, the body is not
                    why = " ".join((str(exc) or type(exc).__name__).split())[:200]
                    return Answer(streamed.status_code, streamed.headers, b"", why)
        except httpx.TransportError as exc:
            verdict = self._unanswered(exc)
            # A setting to fix (a host name that does not exist, TLS that cannot work) stays
            # one when its answer came past the deadline: no timeout would ever get through.
            if deadline.passed and verdict.outcome is not Outcome.off:
                verdict = deadline.verdict()
            raise Unanswered(verdict) from exc
        except httpx.HTTPError as exc:  # anything else httpx raises for one request
            if deadline.passed:
                raise Unanswered(deadline.verdict()) from exc
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


class Deadline:
    """The deadline of one exchange of `client`'s: `seconds` from its creation (`at`, on
    `time.monotonic()`). Used as a context manager around the request: a watchdog timer (a
    thread, joined when the exchange ends) then shuts down (SHUT_RDWR, which wakes a thread
    blocked reading or writing it) the socket of the client's connection once the deadline
    passes, so the request fails at once with httpx's error for a closed connection, which
    the exchange reports as this timeout (`verdict`). Pass `trace` as the request's httpx
    "trace" extension: it records the connection's stream when
    one is made (a connection kept alive from an earlier request is the client's `stream`),
    shuts down a stream made after the deadline, and notes when the request starts going out
    (so a timeout before that sent nothing). Raises nothing of its own."""

    def __init__(self, client: LangfuseClient, seconds: float) -> None:
        self.client, self.seconds = client, seconds
        self.at = time.monotonic() + seconds
        self.passed = False  # the watchdog fired: the exchange ran out of time
        self.sending = False  # the request started going out
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.name = "langfuse-deadline"

    def __enter__(self) -> Self:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()
        self._timer.join()  # at once once cancelled: no thread outlives the exchange

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace callback: `connection.connect_tcp.complete` and
        `connection.start_tls.complete` carry the new stream as `return_value`;
        `http11.send_request_headers.started` is the request going out."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            with self._lock:
                self.client.stream = info.get("return_value")
                if self.passed:
                    shut_down(self.client.stream)
        elif event.endswith(".send_request_headers.started"):
            self.sending = True

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.passed = True
            shut_down(self.client.stream)

    def verdict(self) -> Verdict:
        """A request the deadline ended: a timeout, nothing sent (`unreachable`) if it had not
        started going out, else a retry (it may have arrived)."""
        if self.sending:
            return Verdict(
                Outcome.retry, f"timeout after {self.seconds}s waiting for a response", stop=True
            )
        return Verdict(Outcome.unreachable, f"timeout after {self.seconds}s connecting", stop=True)


def shut_down(stream: Any) -> None:
    """Shuts down both directions of an httpcore network stream's socket (its TLS socket's
    underlying one too: the plain socket call, not SSLSocket's, which would tear its TLS state
    down under a reading thread); a stream without a socket, or one already closed, is left."""
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def read_bounded(
    answer: httpx.Response, deadline: float, timeout: float, limit: int = MAX_ANSWER_BYTES
) -> bytes:
    """The decoded body of a streamed `answer`, read chunk by chunk. httpx's timeout bounds
    each network read, not the request: a body trickling in a byte at a time would never time
    out. Raises httpx.ReadTimeout (a TransportError, classified like httpx's own: no answer)
    once `time.monotonic()` passes `deadline` (the request's start plus `timeout` seconds),
    AnswerTooLarge (an httpx.DecodingError) past `limit` bytes; httpx's own errors pass. The
    deadline is checked between chunks (a body that stops coming in is cut by the exchange's
    watchdog, `Deadline`)."""
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
