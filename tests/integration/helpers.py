"""Builders and checks shared by the worker's integration tests, over testkit."""

from __future__ import annotations

import psycopg

from testkit import env as testkit_env
from testkit.oracle import ModuleCounts, module_counts_from_scratch
from testkit.world import Twin, add_twin, module_row, scalar
from testkit.world import make_twin as create_twin

__all__ = [
    "Twin", "add_twin", "counts_from_scratch", "create_twin", "module_row", "pfl", "scalar",
    "worker_env",
]


def counts_from_scratch(db: psycopg.Connection, twin_id: str, module_key: str) -> ModuleCounts:
    """One module of the twin, stored and recomputed from scratch (testkit.oracle)."""
    return next(m for m in module_counts_from_scratch(db, twin_id) if m.module_key == module_key)


def worker_env(env: testkit_env.StackEnv, **extra: str) -> dict[str, str]:
    """A `pfl` process's environment on this stack, logging JSON and polling every 0.05-0.2 s."""
    quick_polls = {"PFL_POLL_MIN_SECONDS": "0.05", "PFL_POLL_MAX_SECONDS": "0.2"}
    return testkit_env.worker_env(env, PFL_LOG_FORMAT="json", **{**quick_polls, **extra})


def pfl(*args: str) -> list[str]:
    """The argv of the worker's CLI with these arguments."""
    return [str(testkit_env.PFL), *args]
