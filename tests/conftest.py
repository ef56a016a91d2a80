"""Shared fixtures. Integration tests talk to the local stack the way apps and the worker do:
supabase-py over HTTP, with tokens minted from the stack's JWT secret (testkit). Each test makes
its own users and twins, so tests never depend on one another or on the seed."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import httpx
import psycopg
import pytest
from pydantic import SecretStr
from supabase import Client

from testkit import tokens
from testkit.env import ROOT, StackEnv
from testkit.wait import wait_until
from testkit.world import connect, make_users
from worker.config import WorkerSettings
from worker.runner import Runner
from worker.store import Store

__all__ = ["ROOT", "Stack", "User", "close", "mint_token", "wait_for"]

Stack = StackEnv
T = TypeVar("T")


@pytest.fixture(scope="session")
def stack() -> Stack:
    s = StackEnv.load()
    try:
        httpx.get(f"{s.rest}/", headers={"apikey": s.anon_key}, timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"the local stack is not serving at {s.url} ({exc}); run scripts/stack up")
    return s


@pytest.fixture(scope="session")
def db(stack: Stack) -> Iterator[psycopg.Connection]:
    """A connection as postgres (as on hosted Supabase: no superuser, bypasses RLS), for setting
    up users and for looking under PostgREST."""
    with connect(stack.database_url) as conn:
        yield conn


def mint_token(
    stack: Stack, sub: str | None, role: str = "authenticated", expires_in: int = 3600,
    secret: str | None = None,
) -> str:
    return tokens.mint_token(secret or stack.jwt_secret, sub, role, expires_in)


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
        user = make_users(db, name)[0]
        token = tokens.user_token(stack.jwt_secret, user.id)
        made.append(User(id=user.id, email=user.email, token=token, client=stack.client(token)))
        return made[-1]

    yield make
    for user in made:
        close(user.client)


@pytest.fixture(scope="session")
def service(stack: Stack) -> Iterator[Client]:
    """The service-role client, as the worker and the audit pipeline use it."""
    client = stack.client(stack.service_key)
    yield client
    close(client)


@pytest.fixture(scope="session")
def anon(stack: Stack) -> Iterator[Client]:
    client = stack.client(None)
    yield client
    close(client)


def wait_for(condition: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Polls until `condition()` is truthy and returns its value; fails after `timeout` seconds."""
    try:
        return wait_until(condition, timeout, every=interval)
    except TimeoutError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def make_runner(stack: Stack) -> Iterator[Callable[..., Runner]]:
    """Builds in-process workers on the stack (service-role key, 2 tries per store call):
    `make(name="test-worker", lease=30, store_class=Store)`; their connections are closed after
    the test."""
    made: list[Runner] = []

    def make(
        name: str = "test-worker", lease: int = 30, store_class: type[Store] = Store
    ) -> Runner:
        settings = WorkerSettings(
            supabase_url=stack.url,
            supabase_service_role_key=SecretStr(stack.service_key),
            pfl_worker_id=f"{name}-{uuid.uuid4().hex[:6]}",
            pfl_lease_seconds=lease,
            pfl_store_attempts=2,
        )
        made.append(Runner(store_class.connect(settings), settings.pfl_worker_id, lease))
        return made[-1]

    yield make
    for runner in made:
        runner.store.close()
