"""The declarative schema (supabase/schemas, in config.toml's order) builds the same database as
the migrations.

The stack's database is built from supabase/migrations by `supabase db reset`. This test builds
a scratch database in the same cluster from scripts/local/platform.sql and the schema files, dumps
both whole with pg_dump (all but the CLI's migration history) and compares them. A change made on
one side only (a delta migration without its schemas/ edit, or the reverse) fails it with the
diff. Role attributes and settings are the cluster's, shared by both databases, so they are not
compared: they belong to the platform (scripts/local/platform.sql), not to migrations.
"""

from __future__ import annotations

import difflib
import re
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import ROOT, Stack

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


def schema_paths() -> list[Path]:
    config = tomllib.loads((ROOT / "supabase" / "config.toml").read_text())
    paths = config["db"]["migrations"]["schema_paths"]
    assert paths, "config.toml lists no [db.migrations] schema_paths"
    return [(ROOT / "supabase" / p).resolve() for p in paths]


def database_url(stack: Stack, name: str) -> str:
    return stack.database_url.rsplit("/", 1)[0] + "/" + name


def psql_file(url: str, path: Path) -> None:
    subprocess.run(
        [str(PG_BIN / "psql"), url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path)],
        check=True, capture_output=True, text=True,
    )


def dump(url: str) -> list[str]:
    args = [str(PG_BIN / "pg_dump"), "--schema-only", url]
    for schema in NOT_COMPARED:
        args += ["--exclude-schema", schema]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if not NOISE.match(line)]


@pytest.fixture
def scratch_url(stack: Stack, db: psycopg.Connection) -> Iterator[str]:
    name = f"pfl_schema_source_{uuid.uuid4().hex[:12]}"
    db.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield database_url(stack, name)
    finally:
        db.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def test_schema_files_build_the_database_the_migrations_build(stack: Stack, scratch_url: str):
    psql_file(scratch_url, ROOT / "scripts" / "local" / "platform.sql")
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
