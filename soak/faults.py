"""The fault plan for a seed, and the thread that injects it."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass

from soak.config import STACK, WORKER_ENV, log
from soak.processes import Pause, Workers
from testkit.standin_process import StandinProcess


def plan_faults(rng: random.Random, seconds: float) -> list[tuple[float, str]]:
    """When to inject what: a reproducible timeline for a seed. Faults start after a tenth of the
    time and end before the last tenth; Langfuse episodes (down, 500s, hang) do not overlap."""
    lo, hi = 0.1 * seconds, 0.9 * seconds
    plan = [(rng.uniform(lo, hi), "worker_kill") for _ in range(max(4, round(seconds / 10)))]
    plan += [(rng.uniform(lo, hi), "rest_restart") for _ in range(max(2, round(seconds / 30)))]
    plan += [(rng.uniform(lo, hi), "worker_pause") for _ in range(max(1, round(seconds / 60)))]
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
                 standin: StandinProcess, started: float) -> None:
        super().__init__(name="faults", daemon=True)
        self.plan, self.rng, self.workers, self.standin = plan, rng, workers, standin
        self.started = started
        self.stop_event = threading.Event()
        self.done: list[FaultRecord] = []
        self.errors: list[str] = []
        self.pauses: list[Pause] = []

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
        if kind == "worker_pause":
            pause = self.workers.pause_holder(self.rng, float(WORKER_ENV["PFL_LEASE_SECONDS"]))
            self.pauses.append(pause)
            return (f"stopped {pause.worker} holding run {pause.run_id} (attempt "
                    f"{pause.attempt}) for {pause.seconds:.1f}s, until {pause.taken_over_by} "
                    "took it over")
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

