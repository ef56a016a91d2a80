"""The soak: apps, workers and Langfuse under faults for a bounded time, then proof that nothing
was lost and nothing was counted twice.

Run it through `scripts/soak [--seconds N] [--short] [--seed S]`, which brings up a stack of its
own (ports 603xx) and stops it afterwards. For N seconds:

- app clients (one thread per user, a minted JWT each, httpx against SUPABASE_URL) write feedback
  on a few twins and change their votes; an audit pipeline (service-role key) writes audits; the
  owner now and then requests a run. Every request is recorded with its outcome: `acked` (2xx),
  `failed` (never reached the API, or refused with a 4xx: nothing stored) or `unknown` (no answer,
  or a 5xx: it may or may not be stored). A client that got no acknowledgement backs off and
  sends the vote again;
- worker processes (`pfl serve`) learn and mirror feedback to a Langfuse stand-in process;
- faults at seeded random moments: workers killed with SIGKILL (preferably one holding a run) and
  replaced, PostgREST restarted, PostgreSQL restarted once, the Langfuse stand-in stopped and
  started again on its port, and periods of HTTP 500s and of hanging requests from it.

Then the clients stop, everything comes back up, the soak waits (with a deadline) until every
event is learned, no run is queued or running and no outbox row is open, stops the workers with
SIGTERM and checks five properties, and that the soak itself ran as planned (PASS/FAIL each).
The summary goes to stdout and to soak-results/soak-<timestamp>.json; the exit status is 1 when
a check fails.

The stand-in runs as `soak.py _standin --port P --state-file F`: the LangfuseStandin of
tests/langfuse_standin.py in a process of its own which, when stopped (SIGTERM), first stops
serving (joining every request handler) and then writes the scores it received, so that no
receipt is lost across its restarts.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LANGFUSE_KEYS = ("pk-lf-standin", "sk-lf-standin")  # the stand-in's defaults


def serve_standin(argv: list[str]) -> int:
    """`soak.py _standin --port P --state-file F`: the stand-in until SIGTERM, then its receipts."""
    from tests.langfuse_standin import LangfuseStandin

    parser = argparse.ArgumentParser(prog="soak.py _standin")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-file", type=Path, required=True)
    args = parser.parse_args(argv)
    standin = LangfuseStandin(public_key=LANGFUSE_KEYS[0], secret_key=LANGFUSE_KEYS[1],
                              port=args.port)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    standin.start()
    while not done.wait(0.5):
        pass
    standin.stop()  # joins every request handler: nothing is received after this
    state = {
        "scores": standin.scores,
        "score_requests": Counter(str(r.status) for r in standin.score_requests),
    }
    tmp = args.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(args.state_file)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["_standin"]:
    # The stand-in process needs nothing below: it starts without loading it.
    sys.exit(serve_standin(sys.argv[2:]))

import httpx  # noqa: E402
import jwt  # noqa: E402
import psycopg  # noqa: E402

from tests.integration.helpers import evidence_now  # noqa: E402
from worker.langfuse_sender import score_id_for  # noqa: E402
from worker.learning import beta_mean  # noqa: E402
from worker.models import LearningSettings  # noqa: E402

PFL = ROOT / ".venv" / "bin" / "pfl"
PYTHON = ROOT / ".venv" / "bin" / "python"
STACK = ROOT / "scripts" / "stack"
RESULTS = ROOT / "soak-results"

DEFAULT_SECONDS = 120
SHORT_SECONDS = 45
WORKERS = 3
FEEDBACK_USERS = 6
LANGFUSE_PORT = 60341
TRACES_PER_TWIN = 30
TWO_DEVICE_TRACES = 3  # the user on two devices votes on these traces of each twin only
THINK_MAX = 0.05  # a client waits up to this long between acknowledged requests
BACKOFF = (0.05, 1.0)  # a client's wait after an unacknowledged request: doubles up to the max
REQUEST_TIMEOUT = 5.0
REL_TOL = 1e-9

WORKER_ENV = {
    "PFL_POLL_MIN_SECONDS": "0.05",
    "PFL_POLL_MAX_SECONDS": "0.5",
    "PFL_LEASE_SECONDS": "5",
    "PFL_HTTP_TIMEOUT_SECONDS": "10",
    "PFL_LANGFUSE_TIMEOUT_SECONDS": "2",
    # A killed worker's claimed outbox rows come back after this (default 120 s).
    "PFL_LANGFUSE_VISIBILITY_SECONDS": "10",
    "PFL_LOG_FORMAT": "json",
}

INTENTS = ("factual_with_evidence", "casual_chat", "task_planning", "unmatched_intent")
FAILURE_REASONS = ("incorrect", "unhelpful", "off_persona", "unsafe", "outdated", "other")


def log(text: str) -> None:
    print(f"[soak {datetime.now().strftime('%H:%M:%S')}] {text}", flush=True)


def wait_until(what: str, condition: Callable[[], Any], deadline_s: float, every: float = 0.1):
    """Polls `condition` until it returns a truthy value (returned) or raises after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {deadline_s:.0f}s")
        time.sleep(every)


def remember_child(work_dir: Path, proc: subprocess.Popen[bytes]) -> None:
    """Notes a process the soak started, so that a later soak can end it if this one was killed
    before it could (workers and the stand-in run in sessions of their own)."""
    with open(work_dir / "children.pids", "a") as f:
        f.write(f"{proc.pid}\n")


def end_leftover_children(work_dir: Path) -> list[int]:
    """SIGKILLs the processes an earlier soak started and left running: by pid, and only if the
    pid is still one of them (a worker runs in `work_dir`, the stand-in keeps its state there)."""
    pids_file = work_dir / "children.pids"
    ended = []
    for pid in {int(p) for p in pids_file.read_text().split()} if pids_file.exists() else ():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, UnicodeDecodeError):
            continue
        if cwd == work_dir or "_standin --port" in cmdline and str(work_dir) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            ended.append(pid)
    pids_file.unlink(missing_ok=True)
    return ended


# -- the world: users, twins, modules, specs ----------------------------------------------------


@dataclass(frozen=True)
class TwinPlan:
    name: str
    feedback_from: str
    modules: dict[str, str]  # module_key -> intent_label
    settings: dict[str, Any] = field(default_factory=dict)
    draft: bool = False  # a draft spec the audit pipeline audits (auto-publish twins publish it)


TWIN_PLANS = (
    TwinPlan("owner-only", "owner", {"answers": "factual_with_evidence", "chat": "casual_chat"}),
    TwinPlan(
        "open",
        "any_user",
        {
            "answers": "factual_with_evidence",
            "answers_strict": "factual_with_evidence",  # two modules on one intent
            "chat": "casual_chat",
            "planning": "task_planning",
        },
    ),
    TwinPlan(
        "fast-decay",
        "any_user",
        {"answers": "factual_with_evidence", "chat": "casual_chat"},
        {"half_life_days": 0.01},  # 14.4 minutes: evidence decays visibly within the soak
    ),
    TwinPlan(
        "small-batches-auto-publish",
        "any_user",
        {"answers": "factual_with_evidence", "planning": "task_planning"},
        {"max_batch_events": 10, "auto_publish": True},
        draft=True,
    ),
)


@dataclass(frozen=True)
class Twin:
    id: str
    plan: TwinPlan
    published_spec_id: str
    draft_spec_id: str | None

    @property
    def module_keys(self) -> list[str]:
        return list(self.plan.modules)


@dataclass(frozen=True)
class World:
    owner_id: str
    users: list[str]  # users[0] is the owner of every twin
    twins: list[Twin]

    def twins_open_to(self, user_id: str) -> list[Twin]:
        return [
            t for t in self.twins if t.plan.feedback_from == "any_user" or user_id == self.owner_id
        ]


def create_world(db: psycopg.Connection) -> World:
    """What the platform and the owner would have made: users, twins, modules and specs."""

    def one(sql: str, *params: object) -> str:
        return str(db.execute(sql, params).fetchone()[0])  # type: ignore[index]

    tag = uuid.uuid4().hex[:8]
    users = [one("insert into auth.users (email) values (%s) returning id",
                 f"soak-{tag}-{i}@soak.local") for i in range(FEEDBACK_USERS)]
    spec_sql = "insert into persona_specs (twin_id, status, spec) values (%s, %s, %s) returning id"
    twins = []
    for plan in TWIN_PLANS:
        twin_id = one("insert into twins (owner_id, name, feedback_from) values (%s, %s, %s)"
                      " returning id", users[0], f"soak-{plan.name}", plan.feedback_from)
        for column, value in plan.settings.items():
            db.execute(f"update persona_learning_settings set {column} = %s where twin_id = %s",
                       (value, twin_id))
        for key, intent in plan.modules.items():
            db.execute("insert into persona_modules (twin_id, module_key, intent_label)"
                       " values (%s, %s, %s)", (twin_id, key, intent))
        published = one(spec_sql, twin_id, "published", json.dumps({"modules": list(plan.modules)}))
        draft = one(spec_sql, twin_id, "draft", json.dumps({"modules": []})) if plan.draft else None
        twins.append(Twin(twin_id, plan, published, draft))
    return World(users[0], users, twins)


def mint_token(secret: str, user_id: str, lifetime_s: float) -> str:
    now = int(time.time())
    claims = {"sub": user_id, "role": "authenticated", "aud": "authenticated", "iat": now,
              "exp": now + int(lifetime_s)}
    return jwt.encode(claims, secret, algorithm="HS256")


# -- clients --------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One request a client made, and what it learned about its fate."""

    kind: str  # feedback | audit | run_request
    nonce: str
    twin_id: str
    trace_id: str | None = None
    user_id: str | None = None
    score: int | None = None
    passed: bool | None = None
    outcome: str = ""  # acked | failed | unknown
    row_id: int | None = None
    detail: str = ""


class ApiClient(threading.Thread):
    """One party writing through PostgREST until `stop` is set or it made `max_requests`."""

    def __init__(self, name: str, url: str, anon_key: str, bearer: str, seed: str,
                 stop: threading.Event, max_requests: int) -> None:
        super().__init__(name=name, daemon=True)
        self.url, self.anon_key, self.bearer = f"{url}/rest/v1", anon_key, bearer
        self.rng = random.Random(seed)
        self.stop_event = stop
        self.max_requests = max_requests
        self.attempts: list[Attempt] = []

    def next_request(self) -> tuple[str, dict[str, Any], Attempt]:
        raise NotImplementedError

    def run(self) -> None:
        headers = {"apikey": self.anon_key, "Authorization": f"Bearer {self.bearer}",
                   "Prefer": "return=representation"}
        backoff = BACKOFF[0]
        retry: tuple[str, dict[str, Any], Attempt] | None = None
        with httpx.Client(base_url=self.url, headers=headers,
                          timeout=httpx.Timeout(REQUEST_TIMEOUT)) as http:
            while not self.stop_event.is_set() and len(self.attempts) < self.max_requests:
                path, body, template = retry or self.next_request()
                attempt = self.send(http, path, body, template)
                self.attempts.append(attempt)
                if attempt.outcome == "acked":
                    retry, backoff = None, BACKOFF[0]
                    self.stop_event.wait(self.rng.uniform(0, THINK_MAX))
                else:  # try the same vote again later, as an app would
                    retry = (path, body, template)
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF[1])

    @staticmethod
    def send(http: httpx.Client, path: str, body: dict[str, Any], template: Attempt) -> Attempt:
        nonce = uuid.uuid4().hex  # tags the row, so that its fate can be looked up afterwards
        attempt = Attempt(**{**asdict(template), "nonce": nonce})
        insert = attempt.kind != "run_request"
        if insert:
            body = {**body, "metadata": {"soak": nonce}}
        try:
            response = http.post(path, json=body, params={"select": "id"} if insert else None)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never reached the API
            attempt.outcome, attempt.detail = "failed", type(exc).__name__
            return attempt
        except httpx.TransportError as exc:  # sent, but no answer
            attempt.outcome, attempt.detail = "unknown", type(exc).__name__
            return attempt
        if response.is_success:
            attempt.outcome = "acked"
            data = response.json()
            if insert:
                attempt.row_id = int(data[0]["id"])
        else:
            try:
                code = response.json().get("code")
            except (ValueError, AttributeError):
                code = None
            # A 4xx with PostgREST's error code is the API refusing: nothing was stored. A 5xx,
            # or an answer without a code (PostgREST answered 400 with an empty code around a
            # database restart), may come after a commit: the row may or may not be there.
            refused = response.status_code < 500 and bool(code)
            attempt.outcome = "failed" if refused else "unknown"
            attempt.detail = f"HTTP {response.status_code} {code or 'without a code'}"
        return attempt


class FeedbackUser(ApiClient):
    """An app user: votes on traces of the twins open to them and changes votes often. A user
    on two devices votes on a few traces only, so that both sometimes vote on one at once."""

    def __init__(self, world: World, user_id: str, token: str, traces: int = TRACES_PER_TWIN,
                 **kw: Any) -> None:
        super().__init__(bearer=token, **kw)
        self.world, self.user_id, self.traces = world, user_id, traces
        self.twins = world.twins_open_to(user_id)
        self.last: tuple[Twin, str, int] | None = None

    def next_request(self) -> tuple[str, dict[str, Any], Attempt]:
        rng = self.rng
        if self.user_id == self.world.owner_id and rng.random() < 0.02:
            twin = rng.choice(self.twins)
            return ("/rpc/request_learning_run", {"p_twin_id": twin.id, "p_auto_publish": False},
                    Attempt("run_request", "", twin.id, user_id=self.user_id))
        if self.last is not None and rng.random() < 0.3:  # change the last vote
            twin, trace, old = self.last
            score = rng.choice([s for s in (-1, 0, 1) if s != old])
        else:
            twin = rng.choice(self.twins)
            trace = f"trace-{rng.randrange(self.traces):02d}"
            score = rng.choices((-1, 0, 1), weights=(35, 15, 50))[0]
        self.last = (twin, trace, score)
        body: dict[str, Any] = {
            "twin_id": twin.id, "trace_id": trace, "score": score,
            "intent_label": rng.choice(INTENTS), "metadata": {},
            "reason": rng.choice(FAILURE_REASONS) if score < 0 else rng.choice(("helpful", None)),
        }
        if rng.random() < 0.2:  # name the module (or one the twin does not have)
            body["module_key"] = rng.choice([*twin.module_keys, "no_such_module"])
        if rng.random() < 0.1:
            body["comment"] = f"soak comment {rng.randrange(1000)}"
        return ("/persona_training_events", body,
                Attempt("feedback", "", twin.id, trace, self.user_id, score=score))


class AuditPipeline(ApiClient):
    """The audit pipeline (service-role key): audits of the published spec and of no spec; on a
    twin with a draft, the draft and the published spec in turn on the same traces, the draft
    always passing, so that the gate of an auto-publish twin publishes it within the soak."""

    def __init__(self, world: World, **kw: Any) -> None:
        super().__init__(**kw)
        self.world = world
        self.paired = Counter[str]()  # audits made so far per twin with a draft

    def next_request(self) -> tuple[str, dict[str, Any], Attempt]:
        rng = self.rng
        drafts = [t for t in self.world.twins if t.draft_spec_id]
        if drafts and rng.random() < 0.4:
            twin = rng.choice(drafts)
            k = self.paired[twin.id]
            self.paired[twin.id] += 1
            trace = f"trace-{k // 2 % TRACES_PER_TWIN:02d}"
            spec = twin.draft_spec_id if k % 2 == 0 else twin.published_spec_id
            passed = spec == twin.draft_spec_id or rng.random() < 0.75
        else:
            twin = rng.choice(self.world.twins)
            trace = f"trace-{rng.randrange(TRACES_PER_TWIN):02d}"
            spec = twin.published_spec_id if rng.random() < 0.8 else None
            passed = rng.random() < 0.75
        body = {
            "twin_id": twin.id, "source": "persona_audit", "trace_id": trace,
            "intent_label": rng.choice(INTENTS), "passed": passed, "persona_spec_id": spec,
            "reason": None if passed else rng.choice(("off_persona", "unsafe", "incorrect")),
            "metadata": {},
        }
        return "/persona_training_events", body, Attempt("audit", "", twin.id, trace, passed=passed)


class Clients:
    """Every app user and the audit pipeline, started and stopped together."""

    def __init__(self, world: World, env: dict[str, str], seed: int, seconds: float,
                 max_requests: int) -> None:
        self.stop_event = threading.Event()
        common = {"url": env["SUPABASE_URL"], "anon_key": env["SUPABASE_ANON_KEY"],
                  "stop": self.stop_event, "max_requests": max_requests}
        tokens = {u: mint_token(env["SUPABASE_JWT_SECRET"], u, seconds + 3600) for u in world.users}
        self.threads: list[ApiClient] = [
            FeedbackUser(world, user, tokens[user], name=f"user-{i}", seed=f"{seed}-user-{i}",
                         traces=TWO_DEVICE_TRACES if i == 1 else TRACES_PER_TWIN, **common)
            for i, user in enumerate(world.users)
        ]
        two_devices = world.users[1]  # the same user on a second device
        self.threads.append(FeedbackUser(
            world, two_devices, tokens[two_devices], name="user-1-device-2",
            seed=f"{seed}-user-1-device-2", traces=TWO_DEVICE_TRACES, **common))
        self.threads.append(AuditPipeline(
            world, name="audits", bearer=env["SUPABASE_SERVICE_ROLE_KEY"], seed=f"{seed}-audits",
            **common))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, deadline_s: float = 30) -> None:
        self.stop_event.set()
        end = time.monotonic() + deadline_s
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"clients did not stop: {alive}")

    @property
    def attempts(self) -> list[Attempt]:
        return [a for t in self.threads for a in list(t.attempts)]

    def counts(self) -> dict[str, int]:
        c = Counter(a.outcome for a in self.attempts)
        return {"made": sum(c.values()), "acked": c["acked"], "failed": c["failed"],
                "unknown": c["unknown"]}

    def counts_by_kind(self) -> dict[str, int]:
        c = Counter(f"{a.kind}/{a.outcome}" for a in self.attempts)
        return dict(sorted(c.items()))


# -- the Langfuse stand-in process ---------------------------------------------------------------


class Standin:
    """The stand-in as a process: start, stop (keeping what it received), switch its mode."""

    def __init__(self, port: int, state_dir: Path) -> None:
        self.port, self.state_dir = port, state_dir
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.instances: list[Path] = []

    def start(self) -> None:
        if self.proc is not None:
            return
        state = self.state_dir / f"standin-{len(self.instances) + 1}.json"
        self.instances.append(state)
        with open(self.state_dir / "standin.log", "ab") as out:
            self.proc = subprocess.Popen(
                [str(PYTHON), __file__, "_standin", "--port", str(self.port), "--state-file",
                 str(state)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        remember_child(self.state_dir, self.proc)
        wait_until("the Langfuse stand-in to serve", self._healthy, 15)

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the Langfuse stand-in exited ({self.proc.returncode})")
        try:
            return httpx.get(f"{self.url}/api/public/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.proc = None
        if not self.instances[-1].exists():
            raise RuntimeError(f"the Langfuse stand-in left no state in {self.instances[-1]}")

    def set_mode(self, mode: str) -> None:
        httpx.post(f"{self.url}/_standin/mode", json={"mode": mode}, timeout=5).raise_for_status()

    def receipts(self) -> tuple[dict[str, list[dict[str, Any]]], Counter[str]]:
        """Every score version received, per score id in arrival order, over all instances."""
        scores: dict[str, list[dict[str, Any]]] = {}
        statuses: Counter[str] = Counter()
        for path in self.instances:
            state = json.loads(path.read_text())
            for score_id, versions in state["scores"].items():
                scores.setdefault(score_id, []).extend(versions)
            statuses.update(state["score_requests"])
        return scores, statuses


# -- workers --------------------------------------------------------------------------------------


class Workers:
    """`pfl serve` processes, each with a worker id of its own; killed ones are replaced."""

    def __init__(self, count: int, env: dict[str, str], standin_url: str, log_dir: Path,
                 database_url: str) -> None:
        self.count, self.log_dir, self.database_url = count, log_dir, database_url
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "PFL_"))}
        self.env.update(WORKER_ENV, SUPABASE_URL=env["SUPABASE_URL"],
                        SUPABASE_SERVICE_ROLE_KEY=env["SUPABASE_SERVICE_ROLE_KEY"],
                        LANGFUSE_HOST=standin_url, LANGFUSE_PUBLIC_KEY=LANGFUSE_KEYS[0],
                        LANGFUSE_SECRET_KEY=LANGFUSE_KEYS[1])
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.spawned = 0
        self.exits: dict[str, int] = {}  # worker id -> exit status, once it ended

    def spawn(self) -> str:
        self.spawned += 1
        name = f"soak-w{self.spawned}"
        with open(self.log_dir / f"{name}.log", "wb") as out:
            # cwd: a directory without a .env file, so that only the environment configures it
            self.procs[name] = subprocess.Popen(
                [str(PFL), "serve"], env={**self.env, "PFL_WORKER_ID": name}, cwd=self.log_dir,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        remember_child(self.log_dir, self.procs[name])
        return name

    def ensure(self) -> list[str]:
        """Replaces workers that ended; returns those that ended without being killed."""
        unexpected = []
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.exits[name] = proc.returncode
                unexpected.append(name)
                del self.procs[name]
        while len(self.procs) < self.count:
            self.spawn()
        return unexpected

    def lease_holders(self) -> set[str]:
        with contextlib.suppress(psycopg.Error), psycopg.connect(
                self.database_url, connect_timeout=2, autocommit=True) as db:
            rows = db.execute(
                "select worker_id from persona_feedback_learning_runs where status = 'running'"
            ).fetchall()
            return {r[0] for r in rows}
        return set()

    def kill_one(self, rng: random.Random) -> str:
        """SIGKILLs a worker, preferably one holding a run (so that a takeover follows)."""
        holders = sorted(self.lease_holders() & set(self.procs))
        if holders and rng.random() < 0.7:
            name = rng.choice(holders)
        else:
            name = rng.choice(sorted(self.procs))
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        self.exits[name] = proc.wait(timeout=10)
        self.spawn()
        return name + (" (holding a run)" if name in holders else "")

    def stop(self, deadline_s: float = 60) -> dict[str, int]:
        """SIGTERM: each finishes the work in hand and exits; exit statuses by worker id."""
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + deadline_s
        statuses = {}
        for name, proc in self.procs.items():
            try:
                statuses[name] = proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                statuses[name] = -999  # did not stop gracefully
        self.exits.update(statuses)
        self.procs.clear()
        return statuses

    def kill_all(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self.procs.clear()

    def log_entries(self) -> Iterator[dict[str, Any]]:
        """The workers' JSON log lines, oldest worker first."""
        for path in sorted(self.log_dir.glob("soak-w*.log"), key=lambda p: int(p.stem[6:])):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    entry = {"level": "error", "event": f"not a log line: {line[:40]}"}
                if isinstance(entry, dict):
                    yield {**entry, "worker": path.stem}

    def log_warnings(self) -> Counter[str]:
        """Warnings and errors the workers logged, by message (numbers masked)."""
        return Counter(
            f"{e['level']}: {re.sub(r'[0-9][0-9.]*', 'N', str(e.get('event')))[:70]}"
            for e in self.log_entries() if e.get("level") in ("warning", "error", "critical"))

    def permanent_failures(self) -> list[str]:
        """Run attempts a worker failed for good (not retryable). Every fault of the soak is
        transient, so each one is a transient error taken for a permanent one."""
        return [f"{e['worker']} {e.get('ts')}: run {e.get('run_id')} attempt {e.get('attempt')}: "
                f"{e.get('error')}" for e in self.log_entries()
                if e.get("event") == "run attempt failed" and e.get("retryable") is False]


# -- faults ---------------------------------------------------------------------------------------


def plan_faults(rng: random.Random, seconds: float) -> list[tuple[float, str]]:
    """When to inject what: a reproducible timeline for a seed. Faults start after a tenth of the
    time and end before the last tenth; Langfuse episodes (down, 500s, hang) do not overlap."""
    lo, hi = 0.1 * seconds, 0.9 * seconds
    plan = [(rng.uniform(lo, hi), "worker_kill") for _ in range(max(4, round(seconds / 10)))]
    plan += [(rng.uniform(lo, hi), "rest_restart") for _ in range(max(2, round(seconds / 30)))]
    plan.append((rng.uniform(0.3 * seconds, 0.7 * seconds), "db_restart"))
    episodes = ["langfuse_down", "langfuse_error", "langfuse_hang"]
    while len(episodes) < round(seconds / 60):
        episodes.append(rng.choice(episodes[:3]))
    rng.shuffle(episodes)
    width = (hi - lo) / len(episodes)
    for i, kind in enumerate(episodes):
        length = rng.uniform(2, min(8, 0.6 * width))
        start = lo + i * width + rng.uniform(0, width - length)
        plan += [(start, kind), (start + length, kind + "_end")]
    return sorted(plan)


@dataclass
class FaultRecord:
    at: float  # seconds since the soak started
    kind: str
    seconds: float  # how long injecting it took
    detail: str = ""


class Faults(threading.Thread):
    """Injects the planned faults at their moments, one at a time."""

    def __init__(self, plan: list[tuple[float, str]], rng: random.Random, workers: Workers,
                 standin: Standin, started: float) -> None:
        super().__init__(name="faults", daemon=True)
        self.plan, self.rng, self.workers, self.standin = plan, rng, workers, standin
        self.started = started
        self.stop_event = threading.Event()
        self.done: list[FaultRecord] = []
        self.errors: list[str] = []

    def run(self) -> None:
        for at, kind in self.plan:
            if self.stop_event.wait(max(0.0, self.started + at - time.monotonic())):
                return
            began = time.monotonic()
            try:
                detail = self.inject(kind)
            except Exception as exc:  # a fault that cannot be applied or undone fails the soak
                self.errors.append(f"{kind} at {at:.1f}s: {type(exc).__name__}: {exc}")
                log(f"fault {kind} FAILED: {exc}")
                continue
            record = FaultRecord(round(began - self.started, 2), kind,
                                 round(time.monotonic() - began, 2), detail)
            self.done.append(record)
            log(f"fault {kind} at {record.at:.1f}s ({record.seconds:.1f}s) {detail}".rstrip())

    def inject(self, kind: str) -> str:
        if kind == "worker_kill":
            return "killed " + self.workers.kill_one(self.rng)
        if kind in ("rest_restart", "db_restart"):
            target = "rest" if kind == "rest_restart" else "db"
            done = subprocess.run([str(STACK), "restart", target], timeout=120, text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if done.returncode != 0:
                raise RuntimeError(f"scripts/stack restart {target}: {done.stderr.strip()[-300:]}")
            return ""
        if kind == "langfuse_down":
            self.standin.stop()
            return ""
        if kind == "langfuse_down_end":
            self.standin.start()
            return ""
        if kind in ("langfuse_error", "langfuse_hang"):
            self.standin.set_mode(kind.removeprefix("langfuse_"))
            return ""
        if kind in ("langfuse_error_end", "langfuse_hang_end"):
            self.standin.set_mode("ok")
            return ""
        raise ValueError(f"unknown fault {kind}")

    def counts(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.done if not f.kind.endswith("_end")))

    def finish(self) -> None:
        """Stops injecting and brings the stand-in back to serving normally."""
        self.stop_event.set()
        self.join(180)
        if self.is_alive():
            raise TimeoutError("the fault injector did not stop")
        self.standin.start()
        self.standin.set_mode("ok")


# -- drain ----------------------------------------------------------------------------------------


DRAIN_SQL = """
select
  (select count(*) from twins t
    where t.learned_through_event_id
          < coalesce((select max(e.id) from persona_training_events e where e.twin_id = t.id), 0))
    as twins_behind,
  (select count(*) from persona_feedback_learning_runs where status in ('queued', 'running'))
    as active_runs,
  (select count(*) from persona_training_events where langfuse_status in ('pending', 'retrying'))
    as open_outbox,
  (select count(*) from persona_training_events
    where langfuse_status in ('pending', 'retrying') and langfuse_next_attempt_at <= now())
    as due_outbox,
  -- rows not due wait for a retry delay or for the claim window of a worker that died
  (select ceil(extract(epoch from max(langfuse_next_attempt_at) - now()))::int
     from persona_training_events where langfuse_status in ('pending', 'retrying'))
    as last_due_in_s
"""


def drain(database_url: str, workers: Workers, deadline_s: float) -> tuple[bool, float, dict]:
    """Waits until every event is learned, no run is queued or running and no outbox row is open
    (pending or retrying, due or waiting for its retry or claim window)."""
    started = time.monotonic()
    last_report = started
    state: dict[str, int] = {}
    with psycopg.connect(database_url, autocommit=True) as db:
        while True:
            row = db.execute(DRAIN_SQL).fetchone()
            names = ("twins_behind", "active_runs", "open_outbox", "due_outbox", "last_due_in_s")
            state = dict(zip(names, row, strict=True))  # type: ignore[arg-type]
            if not (state["twins_behind"] or state["active_runs"] or state["open_outbox"]):
                return True, time.monotonic() - started, state
            if time.monotonic() - started > deadline_s:
                return False, time.monotonic() - started, state
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                log(f"draining: {state}")
            for name in workers.ensure():
                log(f"worker {name} had exited ({workers.exits[name]}); replaced")
            time.sleep(0.5)


# -- checks ---------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    passed: bool
    lines: list[str]
    figures: dict[str, Any] = field(default_factory=dict)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=REL_TOL)


class Checks:
    """The five properties, read from the database (as superuser) and the stand-in's receipts."""

    def __init__(self, db: psycopg.Connection, attempts: list[Attempt],
                 receipts: dict[str, list[dict[str, Any]]], permanent_failures: list[str]) -> None:
        self.db, self.attempts, self.receipts = db, attempts, receipts
        self.permanent_failures = permanent_failures

    def all(self) -> list[Check]:
        return [self.acknowledged_stored(), self.processed_once(), self.evidence_exact(),
                self.no_stuck_runs(), self.langfuse_exactly_once()]

    def acknowledged_stored(self) -> Check:
        rows = {r[0]: r for r in self.db.execute(
            "select metadata->>'soak', id, twin_id::text, trace_id, created_by::text, score, passed"
            " from persona_training_events where metadata ? 'soak'").fetchall()}
        problems: list[str] = []
        writes = [a for a in self.attempts if a.kind != "run_request"]
        for a in writes:
            row = rows.get(a.nonce)
            if a.outcome == "acked":
                expected = (a.nonce, a.row_id, a.twin_id, a.trace_id, a.user_id, a.score, a.passed)
                if row != expected:
                    problems.append(f"acked {a.kind} {a.row_id}: stored as {row}, sent {expected}")
            elif a.outcome == "failed" and row is not None:
                problems.append(f"refused {a.kind} ({a.detail}) was stored as event {row[1]}")
        unknown = [a for a in writes if a.outcome == "unknown"]
        unknown_stored = sum(1 for a in unknown if a.nonce in rows)
        sent = {a.nonce for a in writes}
        phantoms = [r[1] for n, r in rows.items() if n not in sent]
        if phantoms:
            problems.append(f"{len(phantoms)} stored rows no client sent: {phantoms[:5]}")
        current = self.db.execute(
            """select count(*) filter (where n_current <> 1 or current_id <> last_id)
               from (select count(*) filter (where superseded_at is null) as n_current,
                            max(id) filter (where superseded_at is null) as current_id,
                            max(id) as last_id
                     from persona_training_events where source = 'user_feedback'
                     group by twin_id, trace_id, created_by) f""").fetchone()[0]  # type: ignore[index]
        if current:
            problems.append(f"{current} feedbacks whose latest vote is not their one current vote")
        acked = sum(1 for a in writes if a.outcome == "acked")
        not_acked = Counter(f"{a.outcome}: {a.detail}" for a in self.attempts if a.detail)
        lines = problems[:10] or [
            f"{acked} acknowledged writes stored with their twin/trace/user/score; "
            f"{sum(1 for a in writes if a.outcome == 'failed')} refused ones not stored; "
            f"{len(unknown)} unanswered: {unknown_stored} stored, "
            f"{len(unknown) - unknown_stored} not; one current vote per feedback, its latest"]
        if not_acked:
            lines.append(f"not acknowledged, by reason: {dict(not_acked)}")
        return Check(
            "1. every acknowledged write is stored as acknowledged", not problems, lines,
            {"acked_writes": acked, "unknown_writes": len(unknown),
             "unknown_writes_stored": unknown_stored, "not_acked_by_reason": dict(not_acked)})

    def processed_once(self) -> Check:
        problems: list[str] = []
        twins = self.db.execute(
            "select id::text, learned_through_event_id from twins order by id").fetchall()
        events: dict[str, list[tuple[int, str | None]]] = {}
        for twin_id, event_id, run_id in self.db.execute(
                "select e.twin_id::text, e.id, e.processed_run_id::text"
                " from persona_training_events e order by e.id"):
            events.setdefault(twin_id, []).append((event_id, run_id))
        runs: dict[str, list[tuple[int, int, str, int, int]]] = {}
        for row in self.db.execute(
                "select twin_id::text, batch_after_event_id, batch_last_event_id, id::text,"
                " events_scanned, events_processed from persona_feedback_learning_runs"
                " where status = 'completed' order by batch_after_event_id, batch_last_event_id"):
            runs.setdefault(row[0], []).append(row[1:])
        total = 0
        for twin_id, cursor in twins:
            covered = 0
            ids = [e for e, _ in events.get(twin_id, [])]  # ascending
            for after, last, run_id, scanned, processed in runs.get(twin_id, []):
                if after != covered:
                    problems.append(f"twin {twin_id}: run {run_id} covers ({after}, {last}] "
                                    f"after ({covered}]: {'overlap' if after < covered else 'gap'}")
                covered = max(covered, last)
                batch = events[twin_id][bisect.bisect_right(ids, after):
                                        bisect.bisect_right(ids, last)] if ids else []
                inside = [r for _, r in batch]
                if not (len(inside) == scanned == processed):
                    problems.append(f"run {run_id}: {len(inside)} events in its batch, "
                                    f"scanned {scanned}, processed {processed}")
                if any(r != run_id for r in inside):
                    problems.append(f"run {run_id}: events of its batch name another run")
            if covered != cursor:
                problems.append(f"twin {twin_id}: completed runs cover (0, {covered}], "
                                f"cursor {cursor}")
            beyond = [e for e, _ in events.get(twin_id, []) if e > cursor]
            if beyond:
                problems.append(f"twin {twin_id}: {len(beyond)} events beyond the cursor {cursor}")
            total += len(events.get(twin_id, []))
        return Check(
            "2. every event processed exactly once", not problems,
            problems[:10] or [f"{total} events of {len(twins)} twins, each in exactly one "
                              "completed run's batch; batches tile (0, cursor] per twin"],
            {"events": total})

    def evidence_exact(self) -> Check:
        problems: list[str] = []
        modules = self.db.execute(
            "select m.twin_id::text, m.module_key, m.intent_label, m.success_weight,"
            " m.failure_weight, m.confidence, m.evidence_at, to_jsonb(s)"
            " from persona_modules m join persona_learning_settings s using (twin_id)"
            " order by m.twin_id, m.module_key").fetchall()
        worst = 0.0
        for twin_id, key, intent, s, f, confidence, at, settings in modules:
            if at is None:
                if s or f:
                    problems.append(f"{twin_id}/{key}: evidence ({s}, {f}) but never learned")
                continue
            want_s, want_f = evidence_now(self.db, twin_id, key, intent, at,
                                          LearningSettings.model_validate(settings))
            for got, want in ((s, want_s), (f, want_f)):
                worst = max(worst, abs(got - want) / max(1.0, abs(want)))
            if not (close(s, want_s) and close(f, want_f)):
                problems.append(f"{twin_id}/{key}: stored (s={s!r}, f={f!r}), "
                                f"from scratch (s={want_s!r}, f={want_f!r}) at {at}")
            if not math.isclose(confidence, beta_mean(s, f), abs_tol=1e-12):
                problems.append(f"{twin_id}/{key}: confidence {confidence} is not (s+1)/(s+f+2)")
        return Check(
            "3. module evidence equals a from-scratch recomputation", not problems,
            problems[:10] or [f"{len(modules)} modules; largest relative difference {worst:.2e}"],
            {"modules": len(modules), "max_relative_difference": worst})

    def no_stuck_runs(self) -> Check:
        """No run left queued or running. A run may fail after its last attempt (its workers
        kept dying), but never earlier: every fault the soak injects is transient."""
        by_status = dict(self.db.execute(
            "select status, count(*) from persona_feedback_learning_runs group by status"
        ).fetchall())
        failed = self.db.execute(
            "select id, twin_id, attempts, max_attempts, error from persona_feedback_learning_runs"
            " where status = 'failed' order by created_at").fetchall()
        stuck = by_status.get("queued", 0) + by_status.get("running", 0)
        early = [r for r in failed if r[2] < r[3]]
        lines = [f"runs by status: {by_status}"]
        lines += [f"failed run {r[0]} (twin {r[1]}, attempt {r[2]}/{r[3]}): {r[4]}"
                  for r in failed[:20]]
        if len(failed) > 20:
            lines.append(f"... and {len(failed) - 20} more failed runs")
        if early:
            lines.append(f"FAIL: {len(early)} runs failed for good before their last attempt")
        if self.permanent_failures:
            lines.append(f"FAIL: workers failed {len(self.permanent_failures)} run attempts as "
                         "not retryable on transient faults (recorded or not):")
            lines += [f"  {p}" for p in self.permanent_failures[:10]]
        errors = Counter((r[4] or "")[:80] for r in failed)
        return Check("4. no run stuck in queued or running, none failed for good on a transient "
                     "fault", stuck == 0 and not early and not self.permanent_failures, lines,
                     {"runs_by_status": by_status, "failed_run_errors": dict(errors),
                      "permanent_failures_logged": len(self.permanent_failures)})

    def langfuse_exactly_once(self) -> Check:
        problems: list[str] = []
        votes = self.db.execute(
            "select e.id, e.twin_id::text, e.trace_id, e.created_by::text, e.score,"
            " e.langfuse_status, first.created_at"
            " from persona_training_events e"
            " join persona_training_events first on first.id = e.first_vote_id"
            " where e.source = 'user_feedback' and e.superseded_at is null").fetchall()
        expected: set[str] = set()
        missing = wrong_value = wrong_time = not_sent = other_row = 0
        for event_id, twin_id, trace_id, user_id, score, status, first_at in votes:
            score_id = score_id_for(twin_id, trace_id, user_id)
            expected.add(score_id)
            if status != "sent":
                not_sent += 1
                problems.append(f"current vote {event_id}: outbox status {status}")
            versions = self.receipts.get(score_id)
            if not versions:
                missing += 1
                problems.append(f"current vote {event_id}: score {score_id} never received")
                continue
            latest = versions[-1]
            if latest.get("value") != float(score):
                wrong_value += 1
                problems.append(f"current vote {event_id}: score {score_id} ends "
                                f"{latest.get('value')}, vote is {score}")
            if parse_ts(latest.get("timestamp")) != first_at:
                wrong_time += 1
                problems.append(f"current vote {event_id}: score {score_id} timestamp "
                                f"{latest.get('timestamp')}, first vote at {first_at.isoformat()}")
            if (latest.get("metadata") or {}).get("event_id") != event_id:
                other_row += 1
        strays = sorted(set(self.receipts) - expected)
        if strays:
            problems.append(f"{len(strays)} score ids received that match no vote: {strays[:3]}")
        received = sum(len(v) for v in self.receipts.values())
        seen: set[tuple[str, Any, Any]] = set()
        duplicates = 0
        for score_id, versions in self.receipts.items():
            for v in versions:
                key = (score_id, (v.get("metadata") or {}).get("event_id"), v.get("value"))
                duplicates += key in seen
                seen.add(key)
        outbox = dict(self.db.execute(
            "select langfuse_status, count(*) from persona_training_events"
            " where source = 'user_feedback' group by 1").fetchall())
        figures = {"current_votes": len(votes), "score_ids_received": len(self.receipts),
                   "receipts": received, "duplicate_receipts": duplicates, "missing": missing,
                   "wrong_final_value": wrong_value, "wrong_timestamp": wrong_time,
                   "current_votes_not_sent": not_sent, "stray_score_ids": len(strays),
                   "latest_receipt_from_an_older_vote_row": other_row, "outbox_by_status": outbox}
        summary = (f"{len(votes)} current votes: {missing} score ids missing, {wrong_value} with "
                   f"a wrong final value, {wrong_time} with a wrong timestamp, {not_sent} outbox "
                   f"rows not sent; {received} receipts of {len(self.receipts)} score ids, "
                   f"{duplicates} duplicate receipts (same score, vote row and value: re-sends); "
                   f"latest receipt from an older vote row (same value): {other_row}; "
                   f"outbox {outbox}")
        return Check("5. every score delivered to Langfuse exactly once (upsert by id)",
                     not problems, [summary, *problems[:10]], figures)


def parse_ts(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- the soak -------------------------------------------------------------------------------------


def stack_env() -> dict[str, str]:
    keys = ("SUPABASE_URL", "SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET",
            "DATABASE_URL")
    missing = [k for k in keys if not os.environ.get(k)]
    if missing:
        sys.exit(f"soak: {', '.join(missing)} not set; run it through scripts/soak")
    return {k: os.environ[k] for k in keys}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"how long clients write under faults (default {DEFAULT_SECONDS})")
    parser.add_argument("--short", action="store_true",
                        help=f"a CI-sized soak of {SHORT_SECONDS} seconds")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault plan and clients")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--drain-seconds", type=float, default=300,
                        help="deadline for everything to be learned and delivered afterwards")
    parser.add_argument("--max-requests", type=int, default=50_000,
                        help="at most this many requests per client")
    parser.add_argument("--langfuse-port", type=int, default=LANGFUSE_PORT)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = SHORT_SECONDS if args.short else DEFAULT_SECONDS
    if not 5 <= args.seconds <= 3600:
        parser.error("--seconds must be between 5 and 3600")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    return args


@contextlib.contextmanager
def running(standin: Standin, workers: Workers, work_dir: Path) -> Iterator[None]:
    """Whatever happens (short of SIGKILL: see end_leftover_children), no process of the soak
    outlives it."""
    try:
        yield
    finally:
        workers.kill_all()
        with contextlib.suppress(Exception):
            standin.stop()
        end_leftover_children(work_dir)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    env = stack_env()
    started_at = datetime.now(UTC)
    rng = random.Random(args.seed)
    plan = plan_faults(rng, args.seconds)
    log(f"seed {args.seed}: {args.seconds:.0f}s of writes under {len(plan)} planned fault events, "
        f"{args.workers} workers, Langfuse stand-in on :{args.langfuse_port}")
    work_dir = Path(os.environ.get("PFL_STACK_DIR", ROOT / ".stack" / "soak")) / "soak"
    if not work_dir.is_absolute():
        work_dir = ROOT / work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    if leftovers := end_leftover_children(work_dir):
        log(f"ended processes an earlier soak left running: {leftovers}")
    for old in [*work_dir.glob("soak-w*.log"), *work_dir.glob("standin*")]:
        old.unlink()

    db = psycopg.connect(env["DATABASE_URL"], autocommit=True)
    world = create_world(db)
    standin = Standin(args.langfuse_port, work_dir)
    workers = Workers(args.workers, env, standin.url, work_dir, env["DATABASE_URL"])
    clients = Clients(world, env, args.seed, args.seconds, args.max_requests)
    timings: dict[str, float] = {}
    with running(standin, workers, work_dir):
        standin.start()
        workers.ensure()
        t0 = time.monotonic()
        faults = Faults(plan, rng, workers, standin, t0)
        clients.start()
        faults.start()
        while (left := t0 + args.seconds - time.monotonic()) > 0:
            time.sleep(min(10.0, left))
            log(f"t={time.monotonic() - t0:.0f}s requests {clients.counts()}, "
                f"faults {faults.counts()}")
        clients.stop()
        faults.finish()
        timings["writes_s"] = round(time.monotonic() - t0, 1)
        for name in workers.ensure():
            log(f"worker {name} had exited by itself ({workers.exits[name]}); replaced")
        log(f"clients stopped: {clients.counts()}; draining")
        t1 = time.monotonic()
        drained, drain_s, drain_state = drain(env["DATABASE_URL"], workers, args.drain_seconds)
        timings["drain_s"] = round(drain_s, 1)
        log(f"drain {'complete' if drained else 'INCOMPLETE'} after {drain_s:.1f}s: {drain_state}")
        worker_exits = workers.stop()
        standin.stop()
        timings["stop_s"] = round(time.monotonic() - t1 - drain_s, 1)

    receipts, score_requests = standin.receipts()
    t2 = time.monotonic()
    db.close()
    db = psycopg.connect(env["DATABASE_URL"], autocommit=True)  # the first one saw a restart
    checks = Checks(db, clients.attempts, receipts, workers.permanent_failures()).all()
    checks.insert(0, harness_check(drained, drain_s, drain_state, faults.errors, worker_exits))
    timings["checks_s"] = round(time.monotonic() - t2, 1)
    summary = {
        "seed": args.seed,
        "seconds": args.seconds,
        "started_at": started_at.isoformat(),
        "timings": timings,
        "fault_plan": plan,
        "faults": faults.counts(),
        "fault_log": [asdict(f) for f in faults.done],
        "requests": clients.counts(),
        "requests_by_kind": clients.counts_by_kind(),
        "runs": run_figures(db),
        "langfuse": {"score_requests_by_status": dict(score_requests),
                     "stand_in_instances": len(standin.instances),
                     "scores_received": sum(len(v) for v in receipts.values())},
        "workers": {"spawned": workers.spawned, "exits": workers.exits,
                    "log_warnings": dict(workers.log_warnings())},
        "checks": [asdict(c) for c in checks],
        "passed": all(c.passed for c in checks),
    }
    print_summary(summary, checks)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"soak-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log(f"summary written to {out.relative_to(ROOT)}")
    return 0 if summary["passed"] else 1


def harness_check(drained: bool, drain_s: float, drain_state: dict[str, Any],
                  fault_errors: list[str], worker_exits: dict[str, int]) -> Check:
    """Check 0: the soak did what it set out to do, so that the other checks mean something."""
    problems = list(fault_errors)
    if not drained:
        problems.insert(0, f"drain incomplete after {drain_s:.0f}s: {drain_state}")
    bad_exits = {k: v for k, v in worker_exits.items() if v != 0}
    if bad_exits:
        problems.append(f"workers that did not stop cleanly on SIGTERM: {bad_exits}")
    return Check("0. the soak ran as planned (faults applied, drained, clean stop)", not problems,
                 problems or ["every fault applied; drained; workers exited 0"])


def run_figures(db: psycopg.Connection) -> dict[str, int]:
    row = db.execute(
        "select count(*) filter (where status = 'completed'),"
        " count(*) filter (where status = 'completed' and attempts > 1),"
        " count(*) filter (where status = 'failed'),"
        " count(*) filter (where publish_decision = 'published')"
        " from persona_feedback_learning_runs").fetchone()
    names = ("completed", "taken_over", "failed", "published_a_spec")
    return dict(zip(names, row, strict=True))  # type: ignore[arg-type]


def print_summary(summary: dict[str, Any], checks: list[Check]) -> None:
    print()
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}")
        for line in check.lines:
            print(f"      {line}")
    req = summary["requests"]
    print(f"\nseed {summary['seed']}, {summary['seconds']:.0f}s, timings {summary['timings']}")
    print(f"faults injected: {summary['faults']}")
    print(f"client requests: made {req['made']}, acknowledged {req['acked']}, "
          f"failed {req['failed']}, unknown {req['unknown']}  ({summary['requests_by_kind']})")
    runs = summary["runs"]
    print(f"runs: completed {runs['completed']}, taken over (attempts > 1) {runs['taken_over']}, "
          f"failed {runs['failed']}, published a spec {runs['published_a_spec']}")
    lf = summary["langfuse"]
    print(f"scores received: {lf['scores_received']} "
          f"(requests by status {lf['score_requests_by_status']}, "
          f"{lf['stand_in_instances']} stand-in processes)")
    print(f"worker warnings: {summary['workers']['log_warnings']}")
    print(f"\n{'PASSED' if summary['passed'] else 'FAILED'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
