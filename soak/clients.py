"""The apps and the audit pipeline: threads writing through PostgREST, recording every request
and what it learned about its fate."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from soak.config import (
    BACKOFF,
    FAILURE_REASONS,
    INTENTS,
    REQUEST_TIMEOUT,
    THINK_MAX,
    TRACES_PER_TWIN,
    TWO_DEVICE_TRACES,
)
from soak.world import World
from testkit.env import StackEnv
from testkit.tokens import user_token
from testkit.world import Twin


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

    def __init__(self, world: World, env: StackEnv, seed: int, seconds: float,
                 max_requests: int) -> None:
        self.stop_event = threading.Event()
        common: dict[str, Any] = {"url": env.url, "anon_key": env.anon_key,
                  "stop": self.stop_event, "max_requests": max_requests}
        tokens = {u: user_token(env.jwt_secret, u, seconds + 3600) for u in world.users}
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
            world, name="audits", bearer=env.service_key, seed=f"{seed}-audits",
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

