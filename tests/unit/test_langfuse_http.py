"""`LangfuseClient.exchange` ends by its deadline (the request's start plus the timeout) whatever
the server does: here a server on 127.0.0.1 that sends its status line and then its headers a
byte at a time, each byte well within the timeout, so that httpx's own timeout (one per network
read) never fires. Without the exchange's watchdog the request would last as long as the server
kept trickling (here a minute)."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from worker.langfuse_http import LangfuseClient, Unanswered
from worker.langfuse_response import Outcome

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 1.0  # the client's timeout_seconds
BYTE_EVERY = 0.25  # the trickle: one header byte this often, a quarter of the timeout
TRICKLE_BYTES = 240  # a minute of trickle
SLACK = 0.5  # the watchdog's timer, the thread switch, the socket's shutdown: far less


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class TricklingServer:
    """Answers the first `answered` requests of each connection at once (keep-alive), then
    sends a status line and trickles a header's bytes, one each BYTE_EVERY seconds, until the
    client goes away or the server is stopped."""

    def __init__(self, answered: int = 0) -> None:
        self.answered = answered
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            for _ in range(self.answered):
                self._read_request(conn)
                conn.sendall(OK)
            self._read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for byte in (b"x-slow: " + b"a" * TRICKLE_BYTES):
                if self.stopped.wait(BYTE_EVERY):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:  # the client shut the connection down: done
                    return

    @staticmethod
    def _read_request(conn: socket.socket) -> None:
        """Reads one request: its head, then content-length bytes of body."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += conn.recv(65536)


@pytest.fixture
def trickling() -> Iterator[TricklingServer]:
    server = TricklingServer()
    server.thread.start()
    yield server
    server.stopped.set()
    server.listener.close()


@pytest.fixture
def trickling_after_one() -> Iterator[TricklingServer]:
    server = TricklingServer(answered=1)
    server.thread.start()
    yield server
    server.stopped.set()
    server.listener.close()


def timed_exchange(client: LangfuseClient) -> tuple[float, BaseException | None]:
    """Runs one POST exchange in a thread (so that a broken bound fails this test instead of
    hanging it) and returns how long it took and what it raised. A thread still running after
    ten timeouts counts as running that long."""
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            client.exchange("POST", "/api/public/ingestion", b'{"batch": []}')
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(10 * TIMEOUT)
    elapsed = time.monotonic() - start
    assert not thread.is_alive(), f"the exchange still runs after {elapsed:.1f}s"
    return elapsed, outcome[0]


def test_headers_trickling_in_end_the_request_by_its_deadline(
    trickling: TricklingServer,
) -> None:
    with LangfuseClient(f"http://127.0.0.1:{trickling.port}", "pk", "sk", TIMEOUT) as client:
        elapsed, raised = timed_exchange(client)
    assert isinstance(raised, Unanswered), raised
    assert TIMEOUT <= elapsed < TIMEOUT + SLACK
    # The request had gone out: it may have arrived, so an attempt (retry), as a read timeout.
    assert raised.verdict.outcome is Outcome.retry
    assert raised.verdict.error == f"timeout after {TIMEOUT}s waiting for a response"


def test_a_kept_alive_connection_is_bounded_as_well(
    trickling_after_one: TricklingServer,
) -> None:
    """The second request reuses the first one's connection (no new connection to watch): the
    deadline still shuts it down; and the first request's watchdog, cancelled when it ended,
    left that connection alone."""
    url = f"http://127.0.0.1:{trickling_after_one.port}"
    with LangfuseClient(url, "pk", "sk", TIMEOUT) as client:
        first = client.exchange("POST", "/api/public/ingestion", b'{"batch": []}')
        assert (first.status, first.body) == (200, b"{}")
        elapsed, raised = timed_exchange(client)
    assert isinstance(raised, Unanswered), raised
    assert TIMEOUT <= elapsed < TIMEOUT + SLACK
    assert raised.verdict.error == f"timeout after {TIMEOUT}s waiting for a response"


@pytest.mark.parametrize(
    ("public_key", "secret_key"),
    [
        ("pk-lf-1\n", "sk-lf-2\n"),  # a Kubernetes secret made from a file with a newline
        ("  pk-lf-1", "sk-lf-2\r\n"),
        ("\tpk-lf-1 ", " sk-lf-2"),
    ],
)
def test_keys_are_sent_without_surrounding_blanks(public_key: str, secret_key: str) -> None:
    """As the host is: a key with a trailing newline is sent as the key, not refused by
    Langfuse as a wrong one."""
    with LangfuseClient(" https://lf.example\n", public_key, secret_key) as client:
        assert (client.host, client.public_key) == ("https://lf.example", "pk-lf-1")
        request = client.http.build_request("POST", client.host + "/api/public/ingestion")
        assert client.http.auth is not None
        sent = next(client.http.auth.sync_auth_flow(request))
    expected = base64.b64encode(b"pk-lf-1:sk-lf-2").decode()
    assert sent.headers["authorization"] == f"Basic {expected}"


@pytest.mark.parametrize(("public_key", "secret_key"), [("\n", "sk-lf-2"), ("pk-lf-1", " \n")])
def test_a_blank_key_is_refused_as_empty(public_key: str, secret_key: str) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        LangfuseClient("https://lf.example", public_key, secret_key)
