"""Shared fixtures. Integration tests talk to the local stack the way apps and the worker do:
supabase-py over HTTP, with tokens minted here from the stack's JWT secret. Each test makes its
own users and twins, so tests never depend on one another or on the seed."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
from supabase import Client

from worker.store import make_client

ROOT = Path(__file__).resolve().parent.parent
STACK_KEYS = (
    "SUPABASE_URL",
    "SUPABASE_ANON_KEY",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_JWT_SECRET",
    "DATABASE_URL",
)


@dataclass(frozen=True)
class Stack:
    url: str
    anon_key: str
    service_key: str
    jwt_secret: str
    database_url: str

    @property
    def rest(self) -> str:
        return f"{self.url}/rest/v1"


def _stack_env() -> dict[str, str]:
    if all(os.environ.get(k) for k in STACK_KEYS):
        return {k: os.environ[k] for k in STACK_KEYS}
    out = subprocess.run(
        [str(ROOT / "scripts" / "stack"), "env"], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def stack() -> Stack:
    env = _stack_env()
    s = Stack(
        url=env["SUPABASE_URL"],
        anon_key=env["SUPABASE_ANON_KEY"],
        service_key=env["SUPABASE_SERVICE_ROLE_KEY"],
        jwt_secret=env["SUPABASE_JWT_SECRET"],
        database_url=env["DATABASE_URL"],
    )
    try:
        httpx.get(f"{s.rest}/", headers={"apikey": s.anon_key}, timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"the local stack is not serving at {s.url} ({exc}); run scripts/stack up")
    return s


@pytest.fixture(scope="session")
def db(stack: Stack) -> Iterator[psycopg.Connection]:
    """A connection as postgres (as on hosted Supabase: no superuser, bypasses RLS), for setting
    up users and for looking under PostgREST."""
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        yield conn


def mint_token(
    stack: Stack, sub: str | None, role: str = "authenticated", expires_in: int = 3600,
    secret: str | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, object] = {"role": role, "iat": now, "exp": now + expires_in}
    if sub is not None:
        claims["sub"] = sub
        claims["aud"] = "authenticated"
    return jwt.encode(claims, secret or stack.jwt_secret, algorithm="HS256")


def client_for(stack: Stack, token: str | None) -> Client:
    return make_client(stack.url, stack.anon_key, bearer=token, timeout=20.0)


def close(client: Client) -> None:
    client.postgrest.session.close()


@dataclass(frozen=True)
class User:
    id: str
    email: str
    token: str
    client: Client


@pytest.fixture
def make_user(stack: Stack, db: psycopg.Connection) -> Iterator[Callable[[str], User]]:
    """Creates a user in auth.users (as the platform's auth service would) with a client."""
    made: list[User] = []

    def make(name: str = "user") -> User:
        email = f"{name}-{uuid.uuid4().hex[:10]}@test.local"
        # The auth service picks each user's id: auth.users.id has no default.
        row = db.execute(
            "insert into auth.users (id, email) values (%s, %s) returning id",
            (uuid.uuid4(), email),
        )
        user_id = str(row.fetchone()[0])  # type: ignore[index]
        token = mint_token(stack, user_id)
        made.append(User(id=user_id, email=email, token=token, client=client_for(stack, token)))
        return made[-1]

    yield make
    for user in made:
        close(user.client)


@pytest.fixture(scope="session")
def service(stack: Stack) -> Iterator[Client]:
    """The service-role client, as the worker and the audit pipeline use it."""
    client = client_for(stack, stack.service_key)
    yield client
    close(client)


@pytest.fixture(scope="session")
def anon(stack: Stack) -> Iterator[Client]:
    client = client_for(stack, None)
    yield client
    close(client)


def wait_for(condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.05):
    """Polls until `condition()` is truthy and returns its value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)
