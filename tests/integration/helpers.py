"""Builders and checks shared by the worker's integration tests, over testkit."""

from __future__ import annotations

import psycopg

from testkit.oracle import ModuleCounts, module_counts_from_scratch
from testkit.world import Twin, add_twin, module_row, scalar
from testkit.world import make_twin as create_twin

__all__ = ["Twin", "add_twin", "counts_from_scratch", "create_twin", "module_row", "scalar"]


def counts_from_scratch(db: psycopg.Connection, twin_id: str, module_key: str) -> ModuleCounts:
    """One module of the twin, stored and recomputed from scratch (testkit.oracle)."""
    return next(m for m in module_counts_from_scratch(db, twin_id) if m.module_key == module_key)
