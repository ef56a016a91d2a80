"""The declarative schema (supabase/schemas, in config.toml's order) builds the same database as
the migrations.

The stack's database is built from supabase/migrations by `supabase db reset`. This test builds
a scratch database in the same cluster from scripts/local/platform.sql and the schema files, dumps
both whole with pg_dump (all but the CLI's migration history) and compares them. A change made on
one side only (a delta migration without its schemas/ edit, or the reverse) fails it with the
diff. Role attributes and settings are the cluster's, shared by both databases, so they are not
compared: they belong to the platform (scripts/local/platform.sql), not to migrations.

The platform's part is applied as supabase_admin, the project's as postgres, as on hosted
Supabase. A second test applies the migrations to a scratch database whose default privileges
are those of a project made before 2026-05-30 (every new entity in public granted to the API
roles): it must end with the same privileges as the stack, a project of today.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import ROOT, Stack
from tests.integration.helpers import LEGACY_DEFAULTS, psql_file, schema_paths

pytestmark = pytest.mark.integration

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PROJECT_SCHEMAS = ("public", "private")
# The whole database is compared (every schema, extensions, publications, event triggers,
# default privileges, triggers on auth.users), but for the CLI's own migration history.
NOT_COMPARED = ("supabase_migrations",)
# Lines of pg_dump's own that say nothing about the schema: its header and per-object comment
# lines, its session settings and its per-run \restrict key. Lines inside function bodies are
# never dropped: they do not have these shapes.
NOISE = re.compile(
    r"^(--|-- (PostgreSQL database dump( complete)?|Dumped (from database|by pg_dump) version .*)"
    r"|-- Name: .*; Type: .*; Schema: .*; Owner: .*"
    r"|SET [a-z_]+ = .*;|SELECT pg_catalog\.set_config\('search_path', '', false\);"
    r"|\\(un)?restrict \S+|)$"
)


def database_url(stack: Stack, name: str) -> str:
    return stack.database_url.rsplit("/", 1)[0] + "/" + name


def admin_url(url: str) -> str:
    """The same database as supabase_admin, the local platform's superuser (the stack's
    PFL_ADMIN_DATABASE_URL names its login)."""
    admin = os.environ.get("PFL_ADMIN_DATABASE_URL") or subprocess.run(
        [str(ROOT / "scripts" / "stack"), "env"], check=True, capture_output=True, text=True
    ).stdout.split("PFL_ADMIN_DATABASE_URL=", 1)[1].splitlines()[0]
    return admin.rsplit("/", 1)[0] + "/" + url.rsplit("/", 1)[1]


def dump(url: str) -> list[str]:
    args = [str(PG_BIN / "pg_dump"), "--schema-only", url]
    for schema in NOT_COMPARED:
        args += ["--exclude-schema", schema]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if not NOISE.match(line)]


@pytest.fixture
def scratch_url(stack: Stack) -> Iterator[str]:
    """A new database of the stack's cluster with the platform's objects (platform.sql, as
    supabase_admin), owned by postgres as a hosted project's database is."""
    with scratch_database(stack) as url:
        yield url


@contextmanager
def scratch_database(stack: Stack) -> Iterator[str]:
    """`scratch_url`'s database as a context manager (its URL); dropped on leaving."""
    name = f"pfl_schema_source_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url(stack.database_url), autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        try:
            url = database_url(stack, name)
            psql_file(admin_url(url), ROOT / "scripts" / "local" / "platform.sql")
            yield url
        finally:
            admin.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def test_schema_files_build_the_database_the_migrations_build(stack: Stack, scratch_url: str):
    for path in schema_paths():
        try:
            psql_file(scratch_url, path)
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} does not apply: {exc.stderr}")

    from_migrations, from_schemas = dump(stack.database_url), dump(scratch_url)

    assert from_migrations, "pg_dump of the stack's database is empty"
    diff = "\n".join(difflib.unified_diff(
        from_migrations, from_schemas, "supabase/migrations", "supabase/schemas", lineterm="", n=2,
    ))
    if diff:
        pytest.fail("supabase/schemas and supabase/migrations build different databases:\n" + diff,
                    pytrace=False)


def test_the_migrations_grant_the_same_on_a_project_made_before_the_new_defaults(
    stack: Stack, scratch_url: str
):
    """Projects made before 2026-05-30 kept all privileges on new entities for the API roles
    until 2026-10-30 (the image's defaults): the migrations must not lean on them."""
    with psycopg.connect(admin_url(scratch_url), autocommit=True) as admin:
        admin.execute(LEGACY_DEFAULTS)
    migrations = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
    assert migrations
    for path in migrations:
        psql_file(scratch_url, path)

    # Sorted: an ACL lists its grantees in the order they were granted, and on the old project
    # service_role got some privileges at creation, before the explicit grants to others.
    # The default privileges themselves are the one intended difference.
    def compared(url: str) -> list[str]:
        return sorted(line for line in dump(url) if not line.startswith("ALTER DEFAULT PRIVILEGES"))

    from_stack, from_legacy = compared(stack.database_url), compared(scratch_url)
    diff = "\n".join(difflib.unified_diff(
        from_stack, from_legacy, "today's project", "a project with the old defaults",
        lineterm="", n=2,
    ))
    if diff:
        pytest.fail("the migrations build different databases:\n" + diff, pytrace=False)


def test_every_function_of_the_project_says_what_it_does(db: psycopg.Connection):
    """`comment on function` for every RPC, helper and trigger function: what goes in and out
    and what it raises, where `\\df+` and the dashboard show it."""
    undocumented = db.execute(
        "select p.oid::regprocedure::text from pg_proc p "
        "where p.pronamespace = any(%s::regnamespace[]) "
        "and coalesce(obj_description(p.oid, 'pg_proc'), '') = '' order by 1",
        (list(PROJECT_SCHEMAS),),
    ).fetchall()
    assert undocumented == []
