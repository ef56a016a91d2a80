"""The Langfuse stand-in (testkit.standin) in a process of its own, as Langfuse would be: it
shares no interpreter with the workers it serves, and it can be stopped ("down") and started
again on its port. With a state folder, each instance writes what it received when stopped, and
`receipts()` joins them, so that no receipt is lost across restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import httpx

from testkit.env import ROOT
from testkit.wait import wait_until

DEFAULT_KEYS = ("pk-lf-standin", "sk-lf-standin")
Receipts = dict[str, list[dict[str, Any]]]


class StandinProcess:
    def __init__(
        self,
        port: int,
        keys: tuple[str, str] = DEFAULT_KEYS,
        state_dir: Path | None = None,
        on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None,
        generation: str | tuple[str, ...] = "v3",
    ) -> None:
        """`generation`: the Langfuse server generation it stands for (testkit.standin); a
        tuple rotates: each start runs the next one (a soak's "Langfuse down, then up" comes
        back as another generation)."""
        self.port, self.keys, self.state_dir, self.on_spawn = port, keys, state_dir, on_spawn
        self.rotation = (generation,) if isinstance(generation, str) else generation
        self.generation = self.rotation[0]
        self.starts = 0
        self.generations_run: list[str] = []
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.instances: list[Path] = []  # the state file of each instance started

    @property
    def public_key(self) -> str:
        return self.keys[0]

    @property
    def secret_key(self) -> str:
        return self.keys[1]

    def worker_env(self) -> dict[str, str]:
        """The LANGFUSE_* settings that point a worker at this stand-in."""
        return {
            "LANGFUSE_HOST": self.url,
            "LANGFUSE_PUBLIC_KEY": self.public_key,
            "LANGFUSE_SECRET_KEY": self.secret_key,
        }

    def start(self) -> None:
        """Starts an instance (nothing when one runs) and waits until it serves."""
        if self.proc is not None:
            return
        self.generation = self.rotation[self.starts % len(self.rotation)]
        self.starts += 1
        self.generations_run.append(self.generation)
        cmd = [sys.executable, "-m", "testkit.standin", "--port", str(self.port),
               "--generation", self.generation,
               "--public-key", self.public_key, "--secret-key", self.secret_key]
        out: Any = subprocess.DEVNULL
        if self.state_dir is not None:
            state = self.state_dir / f"standin-{len(self.instances) + 1}.json"
            self.instances.append(state)
            cmd += ["--state-file", str(state)]
            out = open(self.state_dir / "standin.log", "ab")  # noqa: SIM115 (closed below)
        try:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        if self.on_spawn is not None:
            self.on_spawn(self.proc)
        wait_until(self._healthy, 15, f"the Langfuse stand-in to serve on :{self.port}")

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"the Langfuse stand-in exited ({self.proc.returncode}; port {self.port} taken?)"
            )
        try:
            return httpx.get(f"{self.url}/api/public/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        """SIGTERM: it stops serving, joins every request handler, writes its receipts, exits."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.proc = None
        if self.instances and not self.instances[-1].exists():
            raise RuntimeError(f"the Langfuse stand-in left no state in {self.instances[-1]}")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_mode(self, mode: str) -> None:
        """Raises httpx.HTTPStatusError for a mode this generation never shows (429 on
        self-hosted)."""
        httpx.post(f"{self.url}/_standin/mode", json={"mode": mode}, timeout=5).raise_for_status()

    def advance(self, days: int) -> None:
        """Moves the running instance's "today" by `days`."""
        httpx.post(f"{self.url}/_standin/clock", json={"days": days}, timeout=5).raise_for_status()

    def state(self) -> dict[str, Any]:
        """The running instance's mode, request count and scores."""
        answer = httpx.get(f"{self.url}/_standin/state", timeout=30).raise_for_status()
        return dict(answer.json())

    def clear(self) -> None:
        """The running instance forgets its requests and scores."""
        httpx.post(f"{self.url}/_standin/clear", timeout=30).raise_for_status()

    def receipts(self) -> tuple[Receipts, Counter[str]]:
        """Every score version received, per score id in arrival order, over all stopped
        instances; and the score requests by answered status."""
        scores: Receipts = {}
        statuses: Counter[str] = Counter()
        for path in self.instances:
            state = json.loads(path.read_text())
            for score_id, versions in state["scores"].items():
                scores.setdefault(score_id, []).extend(versions)
            statuses.update(state["score_requests"])
        return scores, statuses

    def duplicates(self) -> dict[str, int]:
        """Score ids with rows on more than one day of Langfuse's score table, over all stopped
        instances (each instance's table starts empty, so rows are counted by day across them)."""
        days: dict[str, set[str]] = {}
        for path in self.instances:
            state = json.loads(path.read_text())
            for score_id, versions in state["scores"].items():
                days.setdefault(score_id, set()).update(v["timestamp"][:10] for v in versions)
        return {k: len(v) for k, v in days.items() if len(v) > 1}
