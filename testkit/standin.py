"""A stand-in for the Langfuse public score API, on 127.0.0.1, for tests and the local demo only.

It speaks the wire format the langfuse 5.x SDK uses for scores:

- `POST /api/public/scores` with HTTP Basic auth (public key : secret key) and a JSON array of
  scores (`id`, `traceId`, `name`, `value`, `dataType`, `comment`, `metadata`, `timestamp`, ...);
  answers 202 `{"message": "Accepted"}`, or 207 `{"accepted": n, "rejected": m, "errors":
  [{"message": "..."}]}` when some scores are rejected (invalid, or chosen by `partial` mode).
  A single JSON object is the one-score form and answers 200 `{"id": ...}`.
- 401 `{"message": ...}` for wrong or missing credentials, 429 / 500 in the modes below,
  413 for bodies over 1,000,000 bytes, 404 elsewhere; `GET /api/public/health` answers 200.

Every request is recorded (`requests`), every accepted score version by id (`scores`:
score id -> list of the versions received, oldest first). Modes switch at runtime
(`set_mode`): `ok`, `partial` (reject chosen score ids with 207), `unauthorized` (401),
`rate_limited` (429), `error` (500), `hang` (read the request, never answer until the mode
changes or the server stops). "Down" is `stop()`; `start()` binds the same port again.

    with LangfuseStandin() as lf:
        sender = LangfuseSender(lf.url, lf.public_key, lf.secret_key, 1.0)
        lf.set_mode("error")

As a process (for the bench and soak runs; `testkit.standin_process` launches it):
`python -m testkit.standin --port 3000` prints the URL on its first stdout line and serves until
SIGINT/SIGTERM. Another process can switch its mode with `POST /_standin/mode {"mode": "error"}`
and read `GET /_standin/state`. With `--state-file F` it writes, once stopped (every request
handler joined), the scores it received and its score requests by status to F, so that no
receipt is lost across restarts.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
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
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Self, cast, get_args

Mode = Literal["ok", "partial", "unauthorized", "rate_limited", "error", "hang"]
MODES: tuple[str, ...] = get_args(Mode)

SCORES_PATH = "/api/public/scores"
HEALTH_PATH = "/api/public/health"
ADMIN_PREFIX = "/_standin/"
MAX_BODY_BYTES = 1_000_000
INVALID_CREDENTIALS = "Invalid credentials. Confirm that you've configured the correct host."
_DATA_TYPES = frozenset({"NUMERIC", "BOOLEAN", "CATEGORICAL", "TEXT", "CORRECTION"})


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


@dataclass
class _State:
    mode: Mode = "ok"
    reject: dict[str, str] = field(default_factory=dict)
    hang_generation: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    scores: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class LangfuseStandin:
    """A threaded HTTP stand-in for the Langfuse score API; see the module docstring."""

    def __init__(
        self,
        *,
        public_key: str = "pk-lf-standin",
        secret_key: str = "sk-lf-standin",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
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
        """Base URL to give the SDK as host, e.g. http://127.0.0.1:41234."""
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

    def set_mode(self, mode: Mode, *, reject: Mapping[str, str] | None = None) -> None:
        """Switch behaviour. `reject` (partial mode) maps score ids to the error message Langfuse
        answers for them in a 207. Leaving `hang` releases the hanging requests unanswered."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        with self._cond:
            self._state.mode = mode
            self._state.reject = dict(reject or {})
            self._state.hang_generation += 1
            self._cond.notify_all()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received (admin requests excepted), oldest first."""
        with self._cond:
            return list(self._state.requests)

    @property
    def score_requests(self) -> list[RecordedRequest]:
        """The POST /api/public/scores requests."""
        return [r for r in self.requests if r.method == "POST" and r.path == SCORES_PATH]

    @property
    def scores(self) -> dict[str, list[dict[str, Any]]]:
        """Accepted scores: score id -> every version received, oldest first."""
        with self._cond:
            return {
                key: [dict(v) for v in versions] for key, versions in self._state.scores.items()
            }

    def clear(self) -> None:
        """Forget recorded requests and scores (the mode stays)."""
        with self._cond:
            self._state.requests.clear()
            self._state.scores.clear()

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

    def _snapshot(self) -> tuple[Mode, dict[str, str]]:
        with self._cond:
            return self._state.mode, dict(self._state.reject)

    def _accept_batch(self, body: list[Any], reject: Mapping[str, str]) -> tuple[int, Any]:
        accepted: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        for index, score in enumerate(body):
            problem = _invalid_score(score)
            score_id = score.get("id") if isinstance(score, dict) else None
            if problem is None and isinstance(score_id, str) and score_id in reject:
                problem = reject[score_id]
            if problem is not None:
                errors.append({"message": f"Score {score_id or index}: {problem}"})
            else:
                accepted.append(cast(dict[str, Any], score))
        self._store(accepted)
        if not errors:
            return 202, {"message": "Accepted"}
        return 207, {"accepted": len(accepted), "rejected": len(errors), "errors": errors}

    def _accept_one(self, body: dict[str, Any], reject: Mapping[str, str]) -> tuple[int, Any]:
        problem = _invalid_score(body)
        score_id = body.get("id")
        if problem is None and isinstance(score_id, str) and score_id in reject:
            problem = reject[score_id]
        if problem is not None:
            return 400, {"message": "Invalid request data", "error": problem}
        stored = self._store([body])
        return 200, {"id": stored[0]}

    def _store(self, scores: list[dict[str, Any]]) -> list[str]:
        ids: list[str] = []
        with self._cond:
            for score in scores:
                version = dict(score)
                score_id = version.get("id")
                if not isinstance(score_id, str) or not score_id:
                    score_id = version["id"] = str(uuid.uuid4())
                self._state.scores.setdefault(score_id, []).append(version)
                ids.append(score_id)
        return ids

    def _admin(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == ADMIN_PREFIX + "state":
            with self._cond:
                return 200, {
                    "mode": self._state.mode,
                    "requests": len(self._state.requests),
                    "scores": self._state.scores,
                }
        if method == "POST" and path == ADMIN_PREFIX + "mode" and isinstance(body, dict):
            mode = body.get("mode")
            reject = body.get("reject") or {}
            if mode not in MODES or not isinstance(reject, dict):
                return 400, {"message": f"mode must be one of {', '.join(MODES)}"}
            self.set_mode(cast(Mode, mode), reject={str(k): str(v) for k, v in reject.items()})
            return 200, {"mode": mode}
        if method == "POST" and path == ADMIN_PREFIX + "clear":
            self.clear()
            return 200, {}
        return 404, {"message": "Not found"}


def _invalid_score(score: object) -> str | None:
    """Why Langfuse would reject this score, or None."""
    if not isinstance(score, dict):
        return "expected an object"
    name = score.get("name")
    if not isinstance(name, str) or not name:
        return "name is required"
    if not any(isinstance(score.get(k), str) for k in ("traceId", "sessionId", "datasetRunId")):
        return "one of traceId, sessionId or datasetRunId is required"
    data_type = score.get("dataType", "NUMERIC")
    if data_type not in _DATA_TYPES:
        return f"invalid dataType {data_type!r}"
    value = score.get("value")
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if data_type in ("NUMERIC", "BOOLEAN") and not numeric:
        return f"value must be a number for {data_type} scores"
    if data_type == "BOOLEAN" and value not in (0, 1):
        return "value must be 0 or 1 for BOOLEAN scores"
    if data_type in ("CATEGORICAL", "TEXT", "CORRECTION") and not isinstance(value, str):
        return f"value must be a string for {data_type} scores"
    timestamp = score.get("timestamp")
    if timestamp is not None:
        try:
            parsed = datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
        except ValueError:
            return f"invalid timestamp {timestamp!r}"
        if parsed.tzinfo is None:
            return "timestamp needs a timezone offset"
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
        mode, reject = standin._snapshot()

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

        status, payload, extra = self._answer(mode, reject, path, auth, raw, body)
        record(status)
        self._respond(status, payload, extra)

    def _answer(
        self,
        mode: Mode,
        reject: Mapping[str, str],
        path: str,
        auth: tuple[str, str] | None,
        raw: bytes,
        body: Any,
    ) -> tuple[int, Any, dict[str, str]]:
        standin = self.server.standin
        if path == HEALTH_PATH and self.command == "GET":
            return 200, {"status": "OK", "version": "standin"}, {}
        if path != SCORES_PATH:
            return 404, {"message": "Not found"}, {}
        if self.command != "POST":
            return 405, {"message": f"Method {self.command} not allowed"}, {}
        if mode == "unauthorized" or auth != (standin.public_key, standin.secret_key):
            return 401, {"message": INVALID_CREDENTIALS}, {}
        if mode == "rate_limited":
            return 429, {"message": "Rate limit exceeded"}, {"Retry-After": "1"}
        if mode == "error":
            return 500, {"message": "Internal Server Error", "error": "stand-in error mode"}, {}
        if len(raw) > MAX_BODY_BYTES:
            return 413, {"message": "Body exceeded 1mb limit"}, {}
        rejected = reject if mode == "partial" else {}
        if isinstance(body, list) and body:
            return *standin._accept_batch(body, rejected), {}
        if isinstance(body, dict):
            return *standin._accept_one(body, rejected), {}
        return 400, {"message": "Invalid request data", "error": "expected scores as JSON"}, {}

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def _respond(self, status: int, payload: Any, extra: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
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
    parser.add_argument("--public-key", default="pk-lf-standin")
    parser.add_argument("--secret-key", default="sk-lf-standin")
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--state-file", type=Path, help="receipts written here once stopped")
    args = parser.parse_args(argv)

    standin = LangfuseStandin(
        public_key=args.public_key, secret_key=args.secret_key, host=args.host, port=args.port
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
        f"Langfuse stand-in on {standin.url} (public key {standin.public_key}, "
        f"secret key {standin.secret_key}); Ctrl-C stops it",
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
    """The scores received and the score requests by answered status, as JSON (atomically)."""
    state = {
        "scores": standin.scores,
        "score_requests": Counter(str(r.status) for r in standin.score_requests),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
