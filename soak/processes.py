"""The processes the soak starts: `pfl serve` workers (killed and replaced), and what ends them
if an earlier soak left them running."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from soak.config import WORKER_ENV
from testkit.env import PFL, StackEnv, worker_env
from testkit.wait import wait_until


@dataclass(frozen=True)
class Pause:
    """A worker stopped (SIGSTOP) while it held a run, until another worker took the run over."""

    worker: str
    run_id: str
    attempt: int  # the paused worker's attempt of the run
    taken_over_by: str
    seconds: float  # how long it was stopped


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
        if cwd == work_dir or "testkit.standin" in cmdline and str(work_dir) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            ended.append(pid)
    pids_file.unlink(missing_ok=True)
    return ended



class Workers:
    """`pfl serve` processes, each with a worker id of its own; killed ones are replaced."""

    def __init__(self, count: int, env: StackEnv, langfuse_env: dict[str, str],
                 log_dir: Path) -> None:
        self.count, self.log_dir, self.database_url = count, log_dir, env.database_url
        self.env = worker_env(env, **WORKER_ENV, **langfuse_env)
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

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one statement on a connection of its own; none when the database is down."""
        with contextlib.suppress(psycopg.Error), psycopg.connect(
                self.database_url, connect_timeout=2, autocommit=True) as db:
            return db.execute(sql, params).fetchall()
        return []

    def kill_one(self, rng: random.Random) -> str:
        """SIGKILLs a worker, preferably one holding a run (so that a takeover follows)."""
        holders = sorted({w for w, _ in self.running_runs().values()} & set(self.procs))
        if holders and rng.random() < 0.7:
            name = rng.choice(holders)
        else:
            name = rng.choice(sorted(self.procs))
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        self.exits[name] = proc.wait(timeout=10)
        self.spawn()
        return name + (" (holding a run)" if name in holders else "")

    def running_runs(self, *, before_last_attempt: bool = False) -> dict[str, tuple[str, int]]:
        """Runs now running under a live lease: run id -> (worker id, attempt); with
        `before_last_attempt`, only those an expired lease would hand over rather than fail."""
        return {r[0]: (r[1], r[2]) for r in self.query(
            "select id::text, worker_id, attempts from persona_feedback_learning_runs"
            " where status = 'running' and lease_expires_at > now()"
            + (" and attempts < max_attempts" if before_last_attempt else ""))}

    def pause_holder(self, rng: random.Random, lease_s: float, deadline_s: float = 20) -> Pause:
        """Stops (SIGSTOP) a worker while it holds a run under a live lease, as a long GC pause
        or a frozen VM would, and continues it (SIGCONT) once another worker has taken the run
        over: the paused worker then finds its lease stale and must discard its work. A run that
        ends at the paused worker's own attempt after all (its completion was already in flight
        when the worker stopped) is no takeover: the worker is continued and another holder is
        caught. Raises TimeoutError when no worker is caught holding a run within `deadline_s`,
        or a caught run is neither taken over nor ended within the lease and 15 s more."""

        def catch() -> tuple[str, str, int] | None:
            held = [(run, w, a) for run, (w, a)
                    in self.running_runs(before_last_attempt=True).items() if w in self.procs]
            if not held:
                return None
            run_id, name, attempt = rng.choice(sorted(held))
            self.procs[name].send_signal(signal.SIGSTOP)
            if self.running_runs().get(run_id) == (name, attempt):
                return run_id, name, attempt
            self.procs[name].send_signal(signal.SIGCONT)  # it finished the run meanwhile
            return None

        give_up = time.monotonic() + deadline_s
        while True:
            run_id, name, attempt = wait_until(catch, max(0.1, give_up - time.monotonic()),
                                               "a worker holding a run", every=0.02)

            stopped = time.monotonic()
            try:
                taker = wait_until(functools.partial(self.successor, run_id, attempt), lease_s + 15,
                                   f"run {run_id} taken over from paused {name}", every=0.1)
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}; the run now (status, worker, attempts, lease "
                                   f"live): {self.run_state(run_id)}") from None
            finally:
                self.procs[name].send_signal(signal.SIGCONT)
            if taker != "itself":
                return Pause(name, run_id, attempt, taker, round(time.monotonic() - stopped, 2))

    def successor(self, run_id: str, attempt: int) -> str | None:
        """The worker that took the run over after `attempt` (running it, or having ended it),
        "itself" when the run ended at `attempt`, None while it is still that attempt's."""
        state = self.run_state(run_id)
        if state is None:
            return None
        status, worker, at, live = state
        if at > attempt and (live or status not in ("queued", "running")):
            return worker
        return "itself" if status not in ("queued", "running") else None

    def run_state(self, run_id: str) -> tuple[str, str, int, bool] | None:
        """(status, worker id, attempts, lease live) of a run; None when it cannot be read."""
        rows = self.query("select status, worker_id, attempts,"
                          " coalesce(lease_expires_at > now(), false)"
                          " from persona_feedback_learning_runs where id = %s", (run_id,))
        return (rows[0][0], rows[0][1], rows[0][2], rows[0][3]) if rows else None

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

    def logged_for(self, worker: str, run_id: str, attempt: int) -> list[str]:
        """What `worker` logged about its attempt `attempt` of a run, in order."""
        return [str(e.get("event")) for e in self.log_entries()
                if e["worker"] == worker and e.get("run_id") == run_id
                and e.get("attempt") == attempt]

    def permanent_failures(self) -> list[str]:
        """Run attempts a worker failed for good (not retryable). Every fault of the soak is
        transient, so each one is a transient error taken for a permanent one."""
        return [f"{e['worker']} {e.get('ts')}: run {e.get('run_id')} attempt {e.get('attempt')}: "
                f"{e.get('error')}" for e in self.log_entries()
                if e.get("event") == "run attempt failed" and e.get("retryable") is False]

