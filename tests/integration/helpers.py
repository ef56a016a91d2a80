"""Builders and checks shared by the worker's integration tests, over testkit."""

from __future__ import annotations

import subprocess
import tomllib
import uuid
from pathlib import Path

import psycopg

from testkit import env as testkit_env
from testkit.oracle import ModuleCounts, module_counts_from_scratch
from testkit.world import Twin, add_twin, module_row, scalar
from testkit.world import make_twin as create_twin

__all__ = [
    "LEGACY_DEFAULTS", "PSQL", "Refusal", "Twin", "add_twin", "counts_from_scratch", "create_twin",
    "module_row", "pfl", "psql_file", "scalar", "schema_paths", "time_passes", "worker_env",
]

# The stack's PostgreSQL 15 client; it also applies SQL files to the PostgreSQL 17 server of
# test_pg17_parity (psql speaks to newer servers).
PSQL = Path("/usr/lib/postgresql/15/bin/psql")

# The default privileges of a hosted project made before 2026-05-30 (the image's, kept for such
# projects until 2026-10-30): every new table, sequence and function postgres creates in public
# granted ALL to the API roles. On PostgreSQL 17 ALL on a table includes MAINTAIN.
LEGACY_DEFAULTS = """
alter default privileges for role postgres in schema public
  grant all on tables to anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on sequences to anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on functions to anon, authenticated, service_role;
"""


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


def psql_file(url: str, path: Path) -> None:
    """Applies one SQL file with psql, stopping at its first error
    (subprocess.CalledProcessError, psql's messages in .stderr)."""
    subprocess.run(
        [str(PSQL), url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path)],
        check=True, capture_output=True, text=True,
    )


def schema_paths() -> list[Path]:
    """The declarative schema's files (supabase/schemas), in config.toml's order."""
    config = tomllib.loads((testkit_env.ROOT / "supabase" / "config.toml").read_text())
    paths = config["db"]["migrations"]["schema_paths"]
    assert paths, "config.toml lists no [db.migrations] schema_paths"
    return [(testkit_env.ROOT / "supabase" / p).resolve() for p in paths]


class Refusal:
    """A throwaway trigger that makes the database refuse to complete the runs of one twin
    (a run then fails for good); `lift` drops it."""

    def __init__(self, db: psycopg.Connection, twin_id: str) -> None:
        self.db = db
        self.fn = f"public.test_refuse_{uuid.uuid4().hex[:8]}"
        db.execute(
            f"create function {self.fn}() returns trigger language plpgsql set search_path = ''"
            " as $$ begin raise exception 'refused for the test'; end $$"
        )
        db.execute(
            f"create trigger refuse before update on public.persona_modules for each row "
            f"when (new.twin_id = '{twin_id}'::uuid) execute function {self.fn}()"
        )
        self.lifted = False

    def lift(self) -> None:
        if not self.lifted:
            self.db.execute("drop trigger refuse on public.persona_modules")
            self.db.execute(f"drop function {self.fn}()")
            self.lifted = True


def time_passes(db: psycopg.Connection, twin_id: str) -> None:
    """A failed run's backoff ends for the twin: its not-before time, which the scheduler reads
    in private.learning_due, is moved to now (standing for the time passing; no sleep)."""
    db.execute(
        "update private.learning_due set not_before = now() where twin_id = %s", (twin_id,)
    )
