"""The stack environment: the variables `scripts/stack env` prints, read once."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supabase import Client

from worker.store import make_client

ROOT = Path(__file__).resolve().parent.parent
# The worker's CLI in the project's venv: what tests, bench and soak run as a process.
PFL = ROOT / ".venv" / "bin" / "pfl"
KEYS = (
    "SUPABASE_URL",
    "SUPABASE_ANON_KEY",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_JWT_SECRET",
    "DATABASE_URL",
)


class StackEnvMissing(RuntimeError):
    """The stack's variables are not set (the caller was not started by scripts/with-stack)."""


@dataclass(frozen=True)
class StackEnv:
    url: str
    anon_key: str
    service_key: str
    jwt_secret: str
    database_url: str
    # The local platform's superuser (supabase_admin); a hosted project has none to give.
    admin_database_url: str | None = None

    @property
    def rest(self) -> str:
        """PostgREST behind the gateway, as a hosted project lays it out."""
        return f"{self.url}/rest/v1"

    def client(self, token: str | None, timeout: float = 20.0) -> Client:
        """supabase-py as an app uses it: the anon key, and the session's token if any."""
        return make_client(self.url, self.anon_key, bearer=token, timeout=timeout)

    @classmethod
    def of(cls, values: Mapping[str, str]) -> StackEnv:
        missing = [k for k in KEYS if not values.get(k)]
        if missing:
            raise StackEnvMissing(f"{', '.join(missing)} not set")
        return cls(
            url=values["SUPABASE_URL"],
            anon_key=values["SUPABASE_ANON_KEY"],
            service_key=values["SUPABASE_SERVICE_ROLE_KEY"],
            jwt_secret=values["SUPABASE_JWT_SECRET"],
            database_url=values["DATABASE_URL"],
            admin_database_url=values.get("PFL_ADMIN_DATABASE_URL") or None,
        )

    @classmethod
    def from_environ(cls) -> StackEnv:
        """From this process's environment (scripts/with-stack exports it)."""
        return cls.of(os.environ)

    @classmethod
    def load(cls) -> StackEnv:
        """From the environment when it is set, else from `scripts/stack env` (the stack that
        PFL_STACK_DIR and the PFL_*_PORT variables name)."""
        if all(os.environ.get(k) for k in KEYS):
            return cls.from_environ()
        out = subprocess.run(
            [str(ROOT / "scripts" / "stack"), "env"], check=True, capture_output=True, text=True
        ).stdout
        return cls.of(dict(line.split("=", 1) for line in out.splitlines() if "=" in line))


def stack_dir() -> Path:
    """The running stack's state folder (PFL_STACK_DIR, relative to the repository)."""
    path = Path(os.environ.get("PFL_STACK_DIR", ".stack/dev"))
    return path if path.is_absolute() else ROOT / path


def worker_env(env: StackEnv, **extra: str) -> dict[str, str]:
    """The environment of a worker process (`pfl`) on this stack: this process's, without any
    LANGFUSE_* or PFL_* setting (so only `extra` configures the worker), plus the stack's URL
    and service-role key."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE_", "PFL_"))}
    return {
        **clean,
        "SUPABASE_URL": env.url,
        "SUPABASE_SERVICE_ROLE_KEY": env.service_key,
        **extra,
    }


def rows(response: object) -> list[dict[str, Any]]:
    """The rows of a PostgREST answer (supabase-py's `APIResponse`, or its `data`), checked to be
    a JSON array of objects; raises AssertionError naming what came back otherwise."""
    data = getattr(response, "data", response)
    assert isinstance(data, list) and all(isinstance(r, dict) for r in data), (
        f"expected a JSON array of rows, got {data!r:.200}"
    )
    return data
