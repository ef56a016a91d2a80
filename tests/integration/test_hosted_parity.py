"""The local stack holds the project to hosted Supabase's rules, and the worker refuses bad
configuration at start.

- pg-safeupdate: on hosted Supabase every Data API session (authenticator) loads it, and an
  UPDATE or DELETE without a WHERE clause is refused there. It is not packaged for Debian, so
  the rule it enforces is proved here instead: no SQL function a request can reach (every
  function of public and private, triggers included) and no client path of the worker issues
  one.
- The platform as hosted has it: postgres no superuser, the API roles' timeouts, auth.users
  without an id default and with RLS on.
- `pfl` started with the anon key, or against a database whose migrations are behind, says so
  in one line and exits 2, through the real CLI and the real stack.
"""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, Stack, User, wait_for
from tests.integration.helpers import pfl, scalar, worker_env
from worker.store import REQUIRED_SCHEMA_VERSION

pytestmark = pytest.mark.integration

# ----------------------------------------------------------------------------- safe updates

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_STRINGS = re.compile(r"'(?:[^']|'')*'|\$(\w*)\$.*?\$\1\$", re.S)
_TOKENS = re.compile(r"[a-z_][a-z0-9_$]*|[();]")
# Where a data-changing statement may begin: after another statement, in a CTE, after a WITH
# clause's last CTE (`with due as (...) update ...`), after RETURN QUERY, or after a PL/pgSQL
# block keyword. Everywhere else `update`/`delete` is part of something else (`for update`,
# `on delete cascade`, `do update set`, `before update` ...).
_STATEMENT_START = {None, ";", "(", ")", "query", "begin", "then", "else", "loop", "as"}


def unguarded_writes(body: str) -> list[str]:
    """The UPDATE and DELETE statements in a SQL or PL/pgSQL text that have no WHERE clause of
    their own (one at their own parenthesis level, before the statement ends), each as its first
    words. Comments and string literals are ignored."""
    text = _STRINGS.sub(" '' ", _COMMENTS.sub(" ", body.lower()))
    tokens = _TOKENS.findall(text)
    found = []
    for i, token in enumerate(tokens):
        previous = tokens[i - 1] if i else None
        if previous not in _STATEMENT_START:
            continue
        if token == "delete" and tokens[i + 1 : i + 2] == ["from"]:
            pass
        elif token != "update":
            continue
        depth, guarded = 0, False
        for t in tokens[i + 1 :]:
            if t == "(":
                depth += 1
            elif t == ")":
                depth -= 1
                if depth < 0:
                    break
            elif t == ";" and depth == 0:
                break
            elif t == "where" and depth == 0:
                guarded = True
                break
        if not guarded:
            found.append(" ".join(tokens[i : i + 4]))
    return found


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("update t set a = 1;", ["update t set a"]),
        ("update t set a = (select 1 from u where u.x) ; ", ["update t set a"]),
        ("with d as (delete from t returning 1) select 1", ["delete from t returning"]),
        ("begin if x then update t set a = 1; end if; end", ["update t set a"]),
        ("with d as (select 1 where true) update t set a = 1", ["update t set a"]),
        ("with d as (select id from t where x) delete from t", ["delete from t"]),
        ("with d as (select id from t) update t set a = 1 from d where t.id = d.id", []),
        ("begin return query delete from t returning id; end", ["delete from t returning"]),
        ("update t set a = 1 where id = 2;", []),
        ("update t set a = u.b from u where u.id = t.id", []),
        ("select * from t for update; delete from t where false", []),
        ("insert into t values (1) on conflict (id) do update set a = 2", []),
        ("-- update t set a = 1;\nselect 'delete from t'", []),
    ],
)
def test_the_scan_finds_exactly_the_unguarded_writes(body: str, expected: list[str]) -> None:
    assert unguarded_writes(body) == expected


def test_no_function_a_request_reaches_updates_or_deletes_without_where(
    db: psycopg.Connection,
) -> None:
    functions = db.execute(
        "select p.pronamespace::regnamespace || '.' || p.proname, p.prosrc from pg_proc p "
        "where p.pronamespace in ('public'::regnamespace, 'private'::regnamespace)"
    ).fetchall()
    bodies: dict[str, str] = dict(functions)
    # the scan saw the functions that write: not vacuous
    assert "public.complete_learning_run" in bodies
    assert any(re.search(r"\bupdate\b", b, re.I) for b in bodies.values())
    offenders = {name: w for name, body in bodies.items() if (w := unguarded_writes(body))}
    assert offenders == {}


def test_the_worker_writes_rows_only_through_rpcs() -> None:
    """The worker's table access (worker/*.py) is `.table(...).select(...)`: no update, delete,
    upsert or insert builder, so no statement of its own can miss a WHERE clause."""
    writes = []
    for path in sorted((ROOT / "worker").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("update", "delete", "upsert", "insert"):
                continue
            chain = [n for n in ast.walk(node.func.value) if isinstance(n, ast.Call)]
            if any(isinstance(c.func, ast.Attribute) and c.func.attr == "table" for c in chain):
                writes.append(f"{path.name}:{node.lineno}")
    assert writes == []
    # not vacuous: the store does read through .table(...)
    assert ".table(" in (ROOT / "worker" / "store.py").read_text()


def test_the_migrations_leave_the_platforms_roles_alone() -> None:
    """On hosted Supabase supautils reserves the platform's roles (anon, authenticated,
    service_role, authenticator, supabase_*): postgres may not create, alter or drop them, nor
    change their memberships. Locally postgres has CREATEROLE and could, so a migration doing it
    would pass here and fail there: none does. (Grants of privileges to them are fine.)"""
    role_ddl = re.compile(r"\b(create|alter|drop)\s+(role|user|group)\b", re.I)
    membership = re.compile(
        r"\bgrant\s+(anon|authenticated|service_role|authenticator|supabase_\w+)\b", re.I)
    files = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
    assert files
    offenders = [
        f"{path.name}: {m.group(0)}"
        for path in files
        for m in [*role_ddl.finditer(_COMMENTS.sub(" ", path.read_text())),
                  *membership.finditer(_COMMENTS.sub(" ", path.read_text()))]
    ]
    assert offenders == []


# ----------------------------------------------------------------------------- the platform


def test_the_platform_is_hosted_supabases(db: psycopg.Connection) -> None:
    roles = {r[0]: r[1:] for r in db.execute(
        "select rolname, rolsuper, rolbypassrls, rolinherit, "
        "coalesce(array_to_string(rolconfig, ','), '') from pg_roles "
        "where rolname in ('postgres', 'anon', 'authenticated', 'service_role', 'authenticator')"
    ).fetchall()}
    assert roles["postgres"][:2] == (False, True)  # no superuser, bypasses RLS
    assert roles["anon"] == (False, False, True, "statement_timeout=3s")
    assert roles["authenticated"] == (False, False, True, "statement_timeout=8s")
    assert roles["service_role"] == (False, True, True, "")
    assert roles["authenticator"] == (False, False, False, "statement_timeout=8s,lock_timeout=8s")
    assert scalar(db, "select current_user") == "postgres"
    assert scalar(db, "select pg_has_role('postgres', 'service_role', 'member')")
    assert scalar(
        db, "select column_default is null from information_schema.columns "
        "where table_schema = 'auth' and table_name = 'users' and column_name = 'id'")
    assert scalar(db, "select relrowsecurity from pg_class where oid = 'auth.users'::regclass")
    assert scalar(db, "select tableowner from pg_tables "
                      "where schemaname = 'auth' and tablename = 'users'") == "supabase_auth_admin"


# ----------------------------------------------------------------------------- worker start-up


def run_pfl(stack: Stack, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pfl("run-once"), env={**worker_env(stack), **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )


def test_the_worker_with_the_anon_key_says_so_and_stops(stack: Stack) -> None:
    done = run_pfl(stack, SUPABASE_SERVICE_ROLE_KEY=stack.anon_key)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "pfl: SUPABASE_SERVICE_ROLE_KEY holds a key of role anon, not the service-role key; "
        "the worker needs the service_role/secret key of the project"
    ]
    assert done.stdout == ""


def test_the_worker_with_a_key_of_another_project_says_so_and_stops(stack: Stack) -> None:
    from tests.conftest import mint_token

    foreign = mint_token(stack, None, role="service_role", secret="another-project-" + "x" * 24)
    done = run_pfl(stack, SUPABASE_SERVICE_ROLE_KEY=foreign)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("pfl: SUPABASE_SERVICE_ROLE_KEY was refused by the API at ")
    assert line.endswith("it is not a key of this project; use its service_role/secret key")


def test_the_worker_with_a_url_where_nothing_answers_says_so_and_stops(stack: Stack) -> None:
    with socket.socket() as probe:  # a port on this machine that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    done = run_pfl(stack, SUPABASE_URL=url, PFL_STORE_ATTEMPTS="2")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()  # one line: no warning per retry before it
    assert line.startswith(f"pfl: the Supabase Data API at {url} did not answer (")
    assert line.endswith(
        "check SUPABASE_URL (the project's API URL, no path) and that the project is up")


def test_the_worker_with_a_url_that_is_not_the_api_says_so_and_stops(stack: Stack) -> None:
    url = f"{stack.url}/not-the-api"  # the gateway answers, but routes nothing there
    done = run_pfl(stack, SUPABASE_URL=url, PFL_STORE_ATTEMPTS="2")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"pfl: the Supabase Data API at {url} did not answer (no route matched with those "
        "values); check SUPABASE_URL (the project's API URL, no path) and that the project is up"
    ]


@pytest.fixture
def database_behind(db: psycopg.Connection) -> Iterator[str]:
    """The stack's database answering as one whose migrations stop before the worker's."""
    older = "20261130000600"
    original = scalar(
        db, "select pg_get_functiondef('public.worker_schema_version()'::regprocedure)")
    assert f"'{REQUIRED_SCHEMA_VERSION}'" in original
    db.execute(original.replace(f"'{REQUIRED_SCHEMA_VERSION}'", f"'{older}'"))
    try:
        yield older
    finally:
        db.execute(original)


def test_the_worker_against_a_database_behind_says_so_and_stops(
    stack: Stack, database_behind: str
) -> None:
    done = run_pfl(stack)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"pfl: the database at {stack.url} is behind: its migrations reach {database_behind}, "
        f"the worker needs {REQUIRED_SCHEMA_VERSION}; apply the migrations (supabase db push)"
    ]


def test_the_worker_with_the_service_key_passes_the_check(stack: Stack) -> None:
    # `runs` of a twin of its own: every command checks first, and this one depends on no twin
    # that other tests left behind.
    done = subprocess.run(
        pfl("runs", "--twin", str(uuid.uuid4())), env=worker_env(stack), capture_output=True,
        text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "pfl:" not in done.stderr


# ----------------------------------------------------------------------------- API timeouts


@pytest.fixture
def timeout_probe(stack: Stack, db: psycopg.Connection) -> Iterator[str]:
    """A throwaway RPC that answers the timeouts its request runs under; dropped afterwards."""
    name = "pfl_test_timeouts"
    db.execute(
        f"create function public.{name}() returns text language sql stable "
        "set search_path = '' as $$ select current_setting('statement_timeout') || ' ' "
        "|| current_setting('lock_timeout') $$"
    )
    db.execute(f"grant execute on function public.{name}() to anon, authenticated, service_role")
    db.execute("notify pgrst, 'reload schema'")
    try:
        wait_for(lambda: call_rpc(stack, stack.anon_key, name).status_code == 200)
        yield name
    finally:
        db.execute(f"drop function if exists public.{name}()")
        db.execute("notify pgrst, 'reload schema'")


def call_rpc(stack: Stack, token: str, name: str) -> httpx.Response:
    return httpx.post(
        f"{stack.rest}/rpc/{name}", json={}, timeout=20,
        headers={"apikey": stack.anon_key, "Authorization": f"Bearer {token}"},
    )


def test_api_requests_run_under_hosted_timeouts(
    stack: Stack, timeout_probe: str, make_user: Callable[[str], User]
) -> None:
    """As on hosted Supabase: anon 3 s, a signed-in user 8 s, the service role authenticator's
    8 s (it has none of its own); lock waits 8 s. A worker RPC must end well inside 8 s."""
    user = make_user("timeouts")
    seen = {
        actor: call_rpc(stack, token, timeout_probe).json()
        for actor, token in (("anon", stack.anon_key), ("user", user.token),
                             ("service", stack.service_key))
    }
    assert seen == {"anon": "3s 8s", "user": "8s 8s", "service": "8s 8s"}
