"""DESIGN.md's security table, enforced through PostgREST.

Every actor (anon, another user, the twin owner, service_role) against every table and the Langfuse
outbox view, for select, insert, update and delete, then execute on every RPC in `public`. Each
case goes through the real HTTP path (nginx -> PostgREST -> Postgres) with a minted JWT and checks
both sides: what is allowed is returned or written (looked at afterwards through `db`), what is
denied answers with PostgREST's exact status and error body and changes nothing.

The world each test starts from is written with `db` (as the platform's services would), so that
every request under test is the only HTTP call that can change anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Stack, User
from tests.integration.helpers import add_twin, scalar
from worker.store import REQUIRED_SCHEMA_VERSION

pytestmark = pytest.mark.integration

ACTORS = ("anon", "other", "owner", "service")
VIEW = "persona_langfuse_outbox"
EVENTS = "persona_training_events"
RUNS = "persona_feedback_learning_runs"
WATCHES = "persona_spec_watches"


# ----------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class World:
    owner: User
    other: User
    twin: str  # the owner's twin; accepts feedback from the owner only
    open_twin: str  # the owner's twin that accepts feedback from any user
    other_twin: str  # the other user's own twin
    published_spec: str  # of `twin`
    draft_spec: str  # of `twin`
    module: str  # of `twin`
    change: int  # a recorded change of `module`
    run: str  # a scheduled run of `twin`, queued
    owner_vote: int  # the owner's feedback on `twin`
    other_vote: int  # the other user's feedback on `open_twin`
    audit: int  # the audit pipeline's audit of `twin`'s draft spec
    watch: str  # the production watch of `twin`'s published spec
    archived_spec: str  # of `twin`: published before `published_spec`

    @property
    def twins(self) -> list[str]:
        return [self.twin, self.open_twin, self.other_twin]

    @property
    def users(self) -> list[str]:
        return [self.owner.id, self.other.id]


@pytest.fixture
def world(db: psycopg.Connection, make_user: Callable[[str], User]) -> World:
    owner, other = make_user("owner"), make_user("other")
    twin = add_twin(db, owner.id, "Closed twin", "owner")
    open_twin = add_twin(db, owner.id, "Open twin", "any_user")
    other_twin = add_twin(db, other.id, "Other's twin", "owner")
    new_spec = "insert into public.persona_specs (twin_id, status, spec, published_at) " \
        "values (%s, %s, '{\"modules\": [\"evidence_answers\"]}', %s) returning id::text"
    published_spec = scalar(db, new_spec, twin, "published", "now")
    draft_spec = scalar(db, new_spec, twin, "draft", None)
    module = scalar(
        db,
        "insert into public.persona_modules (twin_id, module_key, intent_label) "
        "values (%s, 'evidence_answers', 'factual_with_evidence') returning id::text",
        twin,
    )
    run = scalar(
        db,
        "insert into public.persona_feedback_learning_runs (twin_id, trigger) "
        "values (%s, 'schedule') returning id::text",
        twin,
    )
    change = scalar(
        db,
        "insert into public.persona_module_changes (module_id, twin_id, run_id, confidence_before,"
        " confidence_after, status_before, status_after, success_weight, failure_weight)"
        " values (%s, %s, %s, 0.5, 0.6, 'insufficient_data', 'insufficient_data', 1, 0)"
        " returning id",
        module, twin, run,
    )
    new_vote = "insert into public.persona_training_events (twin_id, trace_id, score, reason, " \
        "intent_label, created_by) values (%s, 'trace-1', %s, %s, 'factual_with_evidence', %s) " \
        "returning id"
    owner_vote = scalar(db, new_vote, twin, 1, "helpful", owner.id)
    other_vote = scalar(db, new_vote, open_twin, -1, "incorrect", other.id)
    audit = scalar(
        db,
        "insert into public.persona_training_events (twin_id, source, trace_id, passed, "
        "intent_label, persona_spec_id) values (%s, 'persona_audit', 'trace-1', true, "
        "'factual_with_evidence', %s) returning id",
        twin, draft_spec,
    )
    archived_spec = scalar(
        db,
        "insert into public.persona_specs (twin_id, status, spec, published_at, archived_at) "
        "values (%s, 'archived', '{}', now() - interval '2 days', now() - interval '1 day') "
        "returning id::text",
        twin,
    )
    watch = scalar(
        db,
        "insert into public.persona_spec_watches (twin_id, spec_id, previous_spec_id, "
        "published_at) values (%s, %s, %s, now() - interval '1 day') returning id::text",
        twin, published_spec, archived_spec,
    )
    return World(owner, other, twin, open_twin, other_twin, published_spec, draft_spec, module,
                 change, run, owner_vote, other_vote, audit, watch, archived_spec)


def token_of(stack: Stack, w: World, actor: str) -> str:
    return {
        "anon": stack.anon_key,
        "other": w.other.token,
        "owner": w.owner.token,
        "service": stack.service_key,
    }[actor]


def call(stack: Stack, token: str, method: str, path: str, body: object = None) -> httpx.Response:
    """One request as supabase-js/-py send it: the anon key as apikey, the actor's JWT as bearer."""
    headers = {
        "apikey": stack.anon_key,
        "Authorization": f"Bearer {token}",
        "Prefer": "return=representation",
    }
    return httpx.request(method, f"{stack.rest}/{path}", headers=headers, json=body, timeout=20)


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    key: str  # the primary key as the API shows it
    row: str  # the World attribute of the owner's row that updates and deletes aim at
    insert: Callable[[World], dict]  # a row only privileges can stop
    patch: dict  # a change only privileges can stop

    def scope(self, name: str) -> str:
        """SQL that selects the world's rows of the table (the base table, for the view)."""
        if name == "twins":
            return "owner_id = any(%(users)s::uuid[]) or id = any(%(twins)s::uuid[])"
        return "twin_id = any(%(twins)s::uuid[])"


TABLES: dict[str, Table] = {
    "twins": Table(
        key="id", row="twin",
        insert=lambda w: {"name": "A new twin"},
        patch={"name": "Renamed twin", "feedback_from": "any_user"},
    ),
    "persona_learning_settings": Table(
        key="twin_id", row="twin",
        insert=lambda w: {"twin_id": w.twin, "half_life_days": 7},
        patch={"half_life_days": 7, "auto_publish": True},
    ),
    "persona_specs": Table(
        key="id", row="draft_spec",
        insert=lambda w: {"twin_id": w.twin, "spec": {"voice": "new", "modules": ["small_talk"]}},
        patch={"spec": {"voice": "edited"}},
    ),
    "persona_modules": Table(
        key="id", row="module",
        insert=lambda w: {
            "twin_id": w.twin, "module_key": "small_talk", "intent_label": "casual_conversation",
        },
        patch={"description": "Edited by hand"},
    ),
    "persona_module_changes": Table(
        key="id", row="change",
        insert=lambda w: {
            "module_id": w.module, "twin_id": w.twin, "run_id": w.run, "confidence_before": 0.6,
            "confidence_after": 0.7, "status_before": "insufficient_data",
            "status_after": "probation", "success_weight": 2, "failure_weight": 0,
        },
        patch={"confidence_after": 0.99},
    ),
    EVENTS: Table(
        key="id", row="owner_vote",
        insert=lambda w: {
            "twin_id": w.open_twin, "trace_id": "trace-new", "score": 1,
            "intent_label": "factual_with_evidence",
        },
        patch={"comment": "Edited afterwards"},
    ),
    RUNS: Table(
        key="id", row="run",
        insert=lambda w: {"twin_id": w.open_twin, "trigger": "manual"},
        patch={"error": "edited by hand"},
    ),
    WATCHES: Table(
        key="id", row="watch",
        insert=lambda w: {"twin_id": w.twin, "spec_id": w.draft_spec,
                          "published_at": "2026-12-01T00:00:00Z"},
        patch={"last_report": {"edited": "by hand"}},
    ),
    VIEW: Table(
        key="event_id", row="owner_vote",
        insert=lambda w: {
            "twin_id": w.open_twin, "trace_id": "trace-view", "score": 1,
            "intent_label": "factual_with_evidence", "created_by": w.other.id,
        },
        patch={"last_error": "edited by hand"},
    ),
}


def snapshot(db: psycopg.Connection, w: World, name: str) -> tuple[int, list]:
    """The table's total row count and every row of the world, as JSON (base table for the view)."""
    table = TABLES[name]
    base = EVENTS if name == VIEW else name
    key = "id" if name == VIEW else table.key
    rows = db.execute(
        f"select coalesce(jsonb_agg(to_jsonb(t) order by t.{key}::text), '[]') "
        f"from public.{base} t where {table.scope(name)}",
        {"users": w.users, "twins": w.twins},
    ).fetchone()[0]  # type: ignore[index]
    return scalar(db, f"select count(*) from public.{base}"), rows


def snapshot_all(db: psycopg.Connection, w: World) -> dict[str, tuple[int, list]]:
    return {name: snapshot(db, w, name) for name in TABLES if name != VIEW}


def fetch(db: psycopg.Connection, name: str, key_value: object) -> dict | None:
    row = db.execute(
        f"select to_jsonb(t) from public.{name} t where t.{TABLES[name].key}::text = %s",
        (str(key_value),),
    ).fetchone()
    return row[0] if row else None


# ----------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Rows:
    """A select returns exactly these rows of the world (World attribute names)."""

    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Denied:
    """PostgREST answers with this status and error, and nothing changes."""

    status: int
    code: str
    message: str


@dataclass(frozen=True)
class Filtered:
    """The write matches no row the actor may see: 200 with [], and nothing changes."""


@dataclass(frozen=True)
class Allowed:
    """The write goes through; `check` looks at the stored row afterwards."""

    check: Callable[[dict, World], bool] | None = None


def no_privilege(name: str, status: int = 403) -> Denied:
    kind = "view" if name == VIEW else "table"
    return Denied(status, "42501", f"permission denied for {kind} {name}")


def anon_denied(name: str) -> Denied:
    return no_privilege(name, 401)


def rls_violation(name: str) -> Denied:
    return Denied(403, "42501", f'new row violates row-level security policy for table "{name}"')


FEEDBACK_REFUSED = Denied(
    403, "42501", "twin_id: twin {twin} does not exist or does not accept feedback from this user"
)


def case(
    actor: str, table: str, action: str, expect: object, variant: str = "", *,
    body: Callable[[World], dict] | None = None, row: str | None = None,
    prepare: Callable[[psycopg.Connection, World], object] | None = None,
) -> Any:
    return pytest.param(
        actor, table, action, expect, body, row, prepare,
        id="-".join(p for p in (actor, table, action, variant) if p),
    )


def delete_settings(db: psycopg.Connection, w: World) -> None:
    db.execute("delete from public.persona_learning_settings where twin_id = %s", (w.twin,))


ALL_TWINS = ("twin", "open_twin", "other_twin")
ALL_EVENTS = ("owner_vote", "other_vote", "audit")

MATRIX = [
    # ---------------------------------------------------------------- select
    # anon has no privilege on any table: a 401, not an empty list.
    *(case("anon", t, "select", anon_denied(t)) for t in TABLES),
    # twins: a user sees their own, the service every one.
    case("other", "twins", "select", Rows(("other_twin",))),
    case("owner", "twins", "select", Rows(("twin", "open_twin"))),
    case("service", "twins", "select", Rows(ALL_TWINS)),
    # settings follow the twin.
    case("other", "persona_learning_settings", "select", Rows(("other_twin",))),
    case("owner", "persona_learning_settings", "select", Rows(("twin", "open_twin"))),
    case("service", "persona_learning_settings", "select", Rows(ALL_TWINS)),
    # specs, modules, their changes and runs: the owner's rows are silently filtered for others.
    case("other", "persona_specs", "select", Rows()),
    case("owner", "persona_specs", "select",
         Rows(("published_spec", "draft_spec", "archived_spec"))),
    case("service", "persona_specs", "select",
         Rows(("published_spec", "draft_spec", "archived_spec"))),
    # production watches: the owner reads those of their twins, nobody else but the service.
    case("other", WATCHES, "select", Rows()),
    case("owner", WATCHES, "select", Rows(("watch",))),
    case("service", WATCHES, "select", Rows(("watch",))),
    case("other", "persona_modules", "select", Rows()),
    case("owner", "persona_modules", "select", Rows(("module",))),
    case("service", "persona_modules", "select", Rows(("module",))),
    case("other", "persona_module_changes", "select", Rows()),
    case("owner", "persona_module_changes", "select", Rows(("change",))),
    case("service", "persona_module_changes", "select", Rows(("change",))),
    case("other", RUNS, "select", Rows()),
    case("owner", RUNS, "select", Rows(("run",))),
    case("service", RUNS, "select", Rows(("run",))),
    # events: a voter reads their own feedback, the owner everything about their twins.
    case("other", EVENTS, "select", Rows(("other_vote",))),
    case("owner", EVENTS, "select", Rows(ALL_EVENTS)),
    case("service", EVENTS, "select", Rows(ALL_EVENTS)),
    # the outbox view is for the worker and operators only; it lists feedback, not audits.
    case("other", VIEW, "select", no_privilege(VIEW)),
    case("owner", VIEW, "select", no_privilege(VIEW)),
    case("service", VIEW, "select", Rows(("owner_vote", "other_vote"))),
    # ---------------------------------------------------------------- insert
    *(case("anon", t, "insert", anon_denied(t)) for t in TABLES),
    # any signed-in user creates twins; owner_id is forced to the caller.
    case("other", "twins", "insert", Allowed(lambda r, w: r["owner_id"] == w.other.id)),
    case("owner", "twins", "insert",
         Allowed(lambda r, w: r["owner_id"] == w.owner.id and r["feedback_from"] == "owner")),
    case("owner", "twins", "insert", no_privilege("twins"), "for-someone-else",
         body=lambda w: {"name": "Not mine", "owner_id": w.other.id}),
    case("other", "twins", "insert", no_privilege("twins"), "in-the-owners-name",
         body=lambda w: {"name": "Forged", "owner_id": w.owner.id}),
    case("service", "twins", "insert", Allowed(lambda r, w: r["owner_id"] == w.owner.id),
         body=lambda w: {"name": "Made by the service", "owner_id": w.owner.id}),
    # settings rows come with the twin; only the service writes them directly.
    case("other", "persona_learning_settings", "insert",
         no_privilege("persona_learning_settings")),
    case("owner", "persona_learning_settings", "insert",
         no_privilege("persona_learning_settings")),
    case("service", "persona_learning_settings", "insert",
         Allowed(lambda r, w: r["half_life_days"] == 7), prepare=delete_settings),
    # specs: the owner creates drafts (numbered by the database), nobody else.
    case("other", "persona_specs", "insert", rls_violation("persona_specs")),
    case("owner", "persona_specs", "insert", Allowed(
        lambda r, w: (r["status"], r["version"], r["created_by"]) == ("draft", 4, w.owner.id))),
    case("owner", "persona_specs", "insert", no_privilege("persona_specs"), "published",
         body=lambda w: {"twin_id": w.twin, "spec": {}, "status": "published"}),
    case("owner", "persona_specs", "insert", no_privilege("persona_specs"), "version",
         body=lambda w: {"twin_id": w.twin, "spec": {}, "version": 99}),
    case("service", "persona_specs", "insert",
         Allowed(lambda r, w: (r["status"], r["version"]) == ("draft", 4))),
    # modules, their history and runs are written by the worker alone.
    *(case(a, t, "insert", no_privilege(t))
      for t in ("persona_modules", "persona_module_changes", RUNS, WATCHES)
      for a in ("other", "owner")),
    case("service", WATCHES, "insert",
         Allowed(lambda r, w: (r["state"], r["looks_done"]) == ("watching", 0)),
         prepare=lambda db, w: db.execute(
             "delete from public.persona_spec_watches where id = %s", (w.watch,))),
    case("service", "persona_modules", "insert",
         Allowed(lambda r, w: r["module_key"] == "small_talk")),
    case("service", "persona_module_changes", "insert",
         Allowed(lambda r, w: r["status_after"] == "probation")),
    case("service", RUNS, "insert",
         Allowed(lambda r, w: (r["status"], r["trigger"]) == ("queued", "manual"))),
    # events: feedback on a twin open to the caller, in the caller's name only.
    case("other", EVENTS, "insert", Allowed(
        lambda r, w: r["created_by"] == w.other.id and r["langfuse_status"] == "pending")),
    case("owner", EVENTS, "insert", Allowed(lambda r, w: r["created_by"] == w.owner.id)),
    case("other", EVENTS, "insert", FEEDBACK_REFUSED, "owner-only-twin",
         body=lambda w: {**TABLES[EVENTS].insert(w), "twin_id": w.twin}),
    case("other", EVENTS, "insert", no_privilege(EVENTS), "as-the-owner",
         body=lambda w: {**TABLES[EVENTS].insert(w), "created_by": w.owner.id}),
    case("owner", EVENTS, "insert", no_privilege(EVENTS), "audit",
         body=lambda w: {**TABLES[EVENTS].insert(w), "source": "persona_audit", "passed": True,
                         "score": None}),
    case("other", EVENTS, "insert", no_privilege(EVENTS), "audit",
         body=lambda w: {**TABLES[EVENTS].insert(w), "source": "persona_audit", "passed": True,
                         "score": None}),
    case("owner", EVENTS, "insert", no_privilege(EVENTS), "superseded",
         body=lambda w: {**TABLES[EVENTS].insert(w), "superseded_at": "2026-01-01T00:00:00Z"}),
    # the audit pipeline writes audits with the service key.
    case("service", EVENTS, "insert", Allowed(
        lambda r, w: (r["source"], r["passed"], r["created_by"]) == ("persona_audit", True, None)),
         body=lambda w: {"twin_id": w.twin, "source": "persona_audit", "trace_id": "trace-9",
                         "passed": True, "intent_label": "factual_with_evidence",
                         "persona_spec_id": w.draft_spec}),
    case("other", VIEW, "insert", no_privilege(VIEW)),
    case("owner", VIEW, "insert", no_privilege(VIEW)),
    case("service", VIEW, "insert", Allowed(
        lambda r, w: r["created_by"] == w.other.id and r["status"] == "pending")),
    # ---------------------------------------------------------------- update
    *(case("anon", t, "update", anon_denied(t)) for t in TABLES),
    # twins and settings: the owner edits, another user's update matches nothing.
    case("other", "twins", "update", Filtered()),
    case("owner", "twins", "update", Allowed()),
    case("owner", "twins", "update", no_privilege("twins"), "give-away",
         body=lambda w: {"owner_id": w.other.id}),
    case("service", "twins", "update", Allowed()),
    case("other", "persona_learning_settings", "update", Filtered()),
    case("owner", "persona_learning_settings", "update", Allowed()),
    case("service", "persona_learning_settings", "update", Allowed()),
    # specs: the owner edits drafts only, and never their status.
    case("other", "persona_specs", "update", Filtered()),
    case("owner", "persona_specs", "update", Allowed()),
    case("owner", "persona_specs", "update", Filtered(), "published", row="published_spec"),
    case("owner", "persona_specs", "update", no_privilege("persona_specs"), "publish",
         body=lambda w: {"status": "published"}),
    case("owner", "persona_specs", "update", no_privilege("persona_specs"), "move-twin",
         body=lambda w: {"twin_id": w.open_twin}),
    case("service", "persona_specs", "update", Allowed()),
    # modules, changes, events and runs: no user may update them, not even their own vote.
    *(case(a, t, "update", no_privilege(t))
      for t in ("persona_modules", "persona_module_changes", EVENTS, RUNS, VIEW, WATCHES)
      for a in ("other", "owner")),
    # a watch's state is the worker's (and the owner's rollback RPC's) to change.
    case("owner", WATCHES, "update", no_privilege(WATCHES), "conclude",
         body=lambda w: {"state": "rolled_back", "concluded_at": "2026-12-01T00:00:00Z"}),
    case("other", EVENTS, "update", no_privilege(EVENTS), "own-vote", row="other_vote",
         body=lambda w: {"score": 1}),
    case("owner", EVENTS, "update", no_privilege(EVENTS), "supersede",
         body=lambda w: {"superseded_at": "2026-01-01T00:00:00Z"}),
    # processing is the twin's cursor moving; only the worker's completion moves it.
    case("owner", "twins", "update", no_privilege("twins"), "mark-processed",
         body=lambda w: {"learned_through_event_id": 2**40}),
    case("owner", RUNS, "update", no_privilege(RUNS), "complete",
         body=lambda w: {"status": "failed"}),
    *(case("service", t, "update", Allowed())
      for t in ("persona_modules", "persona_module_changes", EVENTS, RUNS, VIEW, WATCHES)),
    # ---------------------------------------------------------------- delete
    # no user deletes anything, not even their own twin; the service deletes everything but a
    # twin's settings row, which lives and dies with the twin (every run reads it).
    *(case(a, t, "delete", anon_denied(t) if a == "anon" else no_privilege(t))
      for t in TABLES for a in ("anon", "other", "owner")),
    *(case("service", t, "delete", Allowed()) for t in TABLES
      if t != "persona_learning_settings"),
    case("service", "persona_learning_settings", "delete",
         no_privilege("persona_learning_settings")),
]


@pytest.mark.parametrize(("actor", "table", "action", "expect", "body", "row", "prepare"), MATRIX)
def test_security_matrix(
    stack: Stack, db: psycopg.Connection, world: World, actor: str, table: str, action: str,
    expect: object, body: Callable[[World], dict] | None, row: str | None,
    prepare: Callable[[psycopg.Connection, World], object] | None,
) -> None:
    w = world
    spec = TABLES[table]
    if prepare:
        prepare(db, w)
    target = getattr(w, row or spec.row)
    token = token_of(stack, w, actor)
    request: tuple[str, str, dict[str, Any] | None]
    if action == "select":
        scope = "id" if table == "twins" else "twin_id"
        path = f"{table}?select={spec.key}&{scope}=in.({','.join(w.twins)})"
        request = ("GET", path, None)
    elif action == "insert":
        request = ("POST", table, (body or spec.insert)(w))
    elif action == "update":
        request = ("PATCH", f"{table}?{spec.key}=eq.{target}", body(w) if body else spec.patch)
    else:
        request = ("DELETE", f"{table}?{spec.key}=eq.{target}", None)

    before = snapshot(db, w, table)
    response = call(stack, token, *request)
    after = snapshot(db, w, table)

    if isinstance(expect, Rows):
        assert response.status_code == 200, response.text
        got = {str(r[spec.key]) for r in response.json()}
        assert got == {str(getattr(w, n)) for n in expect.names}
        return
    if isinstance(expect, Denied):
        assert response.status_code == expect.status, response.text
        error = response.json()
        assert error["code"] == expect.code
        twin = (request[2] or {}).get("twin_id")
        assert error["message"] == expect.message.format(twin=twin)
        assert after == before, "a denied request changed the table"
        return
    if isinstance(expect, Filtered):
        assert response.status_code == 200, response.text
        assert response.json() == []
        assert after == before, "a filtered write changed the table"
        return

    assert isinstance(expect, Allowed)
    rows = response.json()
    assert response.status_code == (201 if action == "insert" else 200), response.text
    assert len(rows) == 1
    stored = fetch(db, table, rows[0][spec.key])
    total_before, total_after = before[0], after[0]
    if action == "insert":
        assert stored is not None and total_after == total_before + 1
    elif action == "update":
        assert stored is not None and str(rows[0][spec.key]) == str(target)
        patch = body(w) if body else spec.patch
        assert {k: stored[k] for k in patch} == patch
    else:
        assert stored is None and total_after == total_before - 1
    if expect.check:
        assert stored is not None and expect.check(stored, w), stored


# ----------------------------------------------------------------------------- owner RPC


def runs_of(db: psycopg.Connection, twin: str) -> list[tuple[str, str, str]]:
    return db.execute(
        "select id::text, status, trigger from public.persona_feedback_learning_runs "
        "where twin_id = %s order by created_at, id", (twin,),
    ).fetchall()


def test_owner_requests_a_run_and_a_second_request_returns_the_same_run(
    stack: Stack, db: psycopg.Connection, world: World
) -> None:
    first = call(stack, world.owner.token, "POST", "rpc/request_learning_run",
                 {"p_twin_id": world.open_twin})
    assert first.status_code == 200, first.text
    run = first.json()
    assert (run["twin_id"], run["status"], run["trigger"]) == (
        world.open_twin, "queued", "owner_request")
    assert (run["requested_by"], run["safe_mode"]) == (world.owner.id, True)

    second = call(stack, world.owner.token, "POST", "rpc/request_learning_run",
                  {"p_twin_id": world.open_twin, "p_auto_publish": True})
    assert second.status_code == 200, second.text
    assert second.json()["id"] == run["id"]
    assert runs_of(db, world.open_twin) == [(run["id"], "queued", "owner_request")]


def test_owner_request_returns_the_run_already_queued_by_the_scheduler(
    stack: Stack, db: psycopg.Connection, world: World
) -> None:
    response = call(stack, world.owner.token, "POST", "rpc/request_learning_run",
                    {"p_twin_id": world.twin})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == world.run
    assert runs_of(db, world.twin) == [(world.run, "queued", "schedule")]


@pytest.mark.parametrize(
    ("actor", "twin", "status", "message"),
    [
        # another user may not queue runs of the owner's twin; the message names the field.
        ("other", "twin", 403, "twin_id: twin {twin} does not exist or is not yours"),
        ("other", "open_twin", 403, "twin_id: twin {twin} does not exist or is not yours"),
        # the service role is no owner either (it queues through enqueue_learning_run): the
        # private helper behind the RPC is executable by authenticated only.
        ("service", "open_twin", 403, "permission denied for function request_learning_run"),
        # anon may not execute it at all.
        ("anon", "open_twin", 401, "permission denied for function request_learning_run"),
    ],
)
def test_request_learning_run_is_refused_to_non_owners(
    stack: Stack, db: psycopg.Connection, world: World, actor: str, twin: str, status: int,
    message: str,
) -> None:
    twin_id = getattr(world, twin)
    before = snapshot_all(db, world)
    response = call(stack, token_of(stack, world, actor), "POST", "rpc/request_learning_run",
                    {"p_twin_id": twin_id})
    assert response.status_code == status, response.text
    assert response.json()["code"] == "42501"
    assert response.json()["message"] == message.format(twin=twin_id)
    assert snapshot_all(db, world) == before


def spec_states(db: psycopg.Connection, twin: str) -> list[tuple[str, str, str | None]]:
    return db.execute(
        "select id::text, status::text, rollback_reason from public.persona_specs "
        "where twin_id = %s order by version", (twin,),
    ).fetchall()


def test_owner_rolls_back_to_the_spec_published_before(
    stack: Stack, db: psycopg.Connection, world: World
) -> None:
    w = world
    response = call(stack, w.owner.token, "POST", "rpc/rollback_persona_spec",
                    {"p_twin_id": w.twin, "p_reason": "  users hate the new tone  "})
    assert response.status_code == 200, response.text
    run = response.json()
    assert (run["trigger"], run["status"], run["requested_by"]) == (
        "owner_rollback", "completed", w.owner.id)
    assert (run["publish_decision"], run["published_spec_id"]) == ("published", w.archived_spec)
    assert run["gate_report"]["rollback"]["reason"] == "users hate the new tone"
    assert run["gate_report"]["rollback"]["from_spec_id"] == w.published_spec
    assert spec_states(db, w.twin) == [
        (w.published_spec, "archived", "owner: users hate the new tone"),
        (w.draft_spec, "draft", None),
        (w.archived_spec, "published", None),
    ]
    assert scalar(db, "select state::text from public.persona_spec_watches where id = %s",
                  w.watch) == "rolled_back"
    # The owner reads the run and the watch through PostgREST.
    seen = call(stack, w.owner.token, "GET", f"{WATCHES}?id=eq.{w.watch}&select=state")
    assert seen.json() == [{"state": "rolled_back"}]


def _missing_twin(w: World) -> str:
    return "00000000-0000-4000-8000-00000000dead"


@pytest.mark.parametrize(
    ("actor", "twin", "status", "code", "message"),
    [
        # another user gets the answer a missing twin gets: nothing tells them it exists.
        ("other", "twin", 403, "42501", "twin_id: twin {twin} does not exist or is not yours"),
        ("owner", None, 403, "42501", "twin_id: twin {twin} does not exist or is not yours"),
        # the service role is no owner (only authenticated may execute the private helper).
        ("service", "twin", 403, "42501", "permission denied for function rollback_persona_spec"),
        ("anon", "twin", 401, "42501", "permission denied for function rollback_persona_spec"),
        # the owner's twin without a published spec: nothing to roll back.
        ("owner", "open_twin", 409, "PT409", "twin {twin} has no published spec to roll back"),
    ],
)
def test_rollback_persona_spec_is_refused_with_a_clear_error(
    stack: Stack, db: psycopg.Connection, world: World, actor: str, twin: str | None,
    status: int, code: str, message: str,
) -> None:
    twin_id = getattr(world, twin) if twin else _missing_twin(world)
    before = snapshot_all(db, world)
    response = call(stack, token_of(stack, world, actor), "POST", "rpc/rollback_persona_spec",
                    {"p_twin_id": twin_id, "p_reason": "bad"})
    assert response.status_code == status, response.text
    assert (response.json()["code"], response.json()["message"]) == (
        code, message.format(twin=twin_id))
    assert snapshot_all(db, world) == before


@pytest.mark.parametrize("reason", [None, "", "   ", "x" * 501])
def test_rollback_persona_spec_needs_a_reason(
    stack: Stack, db: psycopg.Connection, world: World, reason: str | None
) -> None:
    before = snapshot_all(db, world)
    response = call(stack, world.owner.token, "POST", "rpc/rollback_persona_spec",
                    {"p_twin_id": world.twin, "p_reason": reason})
    assert response.status_code == 400, response.text
    assert (response.json()["code"], response.json()["message"]) == (
        "22023", "p_reason: say why the spec is rolled back (1 to 500 characters)")
    assert snapshot_all(db, world) == before


def test_rollback_with_nothing_earlier_is_refused(
    stack: Stack, db: psycopg.Connection, world: World
) -> None:
    w = world
    db.execute("delete from public.persona_specs where id = %s", (w.archived_spec,))
    before = snapshot_all(db, w)
    response = call(stack, w.owner.token, "POST", "rpc/rollback_persona_spec",
                    {"p_twin_id": w.twin, "p_reason": "bad"})
    assert response.status_code == 409, response.text
    version = scalar(db, "select version from public.persona_specs where id = %s",
                     w.published_spec)
    assert response.json()["message"] == (
        f"twin {w.twin}: no spec was published before version {version} that was not itself "
        "rolled back; there is nothing to roll back to")
    assert snapshot_all(db, w) == before


# ----------------------------------------------------------------------------- worker RPCs


def claim_run(db: psycopg.Connection, w: World) -> str:
    """Claims the world's queued run as a worker would; returns the lease token."""
    return scalar(
        db, "select lease_token::text from public.claim_learning_run('test-worker', 60, %s)", w.twin
    )


def claim_batch(db: psycopg.Connection, w: World) -> str:
    token = claim_run(db, w)
    db.execute("select public.claim_learning_run_events(%s, %s)", (w.run, token))
    return token


def make_feedback_due_first(db: psycopg.Connection, w: World) -> None:
    """Puts the world's feedback ahead of every other due outbox row of the stack: the time
    mirrored around 1970, so that a later call is due earlier than any call before it."""
    db.execute(
        "update public.persona_training_events "
        "set langfuse_next_attempt_at = to_timestamp(-extract(epoch from clock_timestamp())) "
        "where twin_id = any(%s::uuid[]) and source = 'user_feedback'", (w.twins,),
    )


def skip_world_feedback(db: psycopg.Connection, w: World) -> None:
    db.execute(
        "update public.persona_training_events set langfuse_status = 'skipped' "
        "where twin_id = any(%s::uuid[]) and source = 'user_feedback'", (w.twins,),
    )


NO_MODULE_UPDATES = {
    "module_updates": [], "gate_passed": True, "gate_report": {"checks": []},
    "hold_reason": "no_draft",
}


@dataclass(frozen=True)
class WorkerCall:
    args: Callable[[World, str | None], dict]
    prepare: Callable[[psycopg.Connection, World], str | None] = lambda db, w: None


WORKER_CALLS: dict[str, WorkerCall] = {
    "enqueue_due_learning_runs": WorkerCall(lambda w, lease: {"p_twin_id": w.open_twin}),
    "enqueue_learning_run": WorkerCall(
        lambda w, lease: {"p_twin_id": w.open_twin, "p_safe_mode": False}),
    "claim_learning_run": WorkerCall(
        lambda w, lease: {"p_worker_id": "api-worker", "p_twin_id": w.twin}),
    "extend_learning_run_lease": WorkerCall(
        lambda w, lease: {"p_run_id": w.run, "p_lease_token": lease, "p_lease_seconds": 900},
        claim_run),
    "claim_learning_run_events": WorkerCall(
        lambda w, lease: {"p_run_id": w.run, "p_lease_token": lease}, claim_run),
    "claim_production_watch": WorkerCall(
        lambda w, lease: {"p_run_id": w.run, "p_lease_token": lease}, claim_run),
    "complete_learning_run": WorkerCall(
        lambda w, lease: {"p_run_id": w.run, "p_lease_token": lease,
                          "p_result": NO_MODULE_UPDATES},
        claim_batch),
    "claim_learning_runs": WorkerCall(
        lambda w, lease: {"p_worker_id": "api-worker", "p_max_runs": 1}),
    "read_learning_runs": WorkerCall(
        lambda w, lease: {"p_runs": [{"run_id": w.run, "lease_token": lease}]}, claim_run),
    "complete_learning_runs": WorkerCall(
        lambda w, lease: {"p_completions": [{"run_id": w.run, "lease_token": lease,
                                             "result": NO_MODULE_UPDATES}]},
        claim_batch),
    "fail_learning_run": WorkerCall(
        lambda w, lease: {"p_run_id": w.run, "p_lease_token": lease, "p_error": "worker crashed",
                          "p_retryable": False},
        claim_run),
    "release_learning_run": WorkerCall(
        lambda w, lease: {"p_run_id": w.run, "p_lease_token": lease}, claim_run),
    "claim_langfuse_outbox": WorkerCall(
        lambda w, lease: {"p_limit": 2, "p_visibility_seconds": 300}, make_feedback_due_first),
    "record_langfuse_deliveries": WorkerCall(
        lambda w, lease: {"p_deliveries": [
            {"event_id": w.owner_vote, "outcome": "sent", "error": None}]}),
    "skip_langfuse_outbox": WorkerCall(lambda w, lease: {"p_limit": 2}, make_feedback_due_first),
    "requeue_langfuse_outbox": WorkerCall(
        lambda w, lease: {"p_status": "skipped"}, skip_world_feedback),
    "worker_schema_version": WorkerCall(lambda w, lease: {}),
    "langfuse_outbox_backlog": WorkerCall(lambda w, lease: {}),
    "end_langfuse_hold": WorkerCall(lambda w, lease: {}),
    "claim_langfuse_check": WorkerCall(lambda w, lease: {"p_visibility_seconds": 60}),
    "record_langfuse_check": WorkerCall(lambda w, lease: {"p_outcome": "failed"}),
}

# The project owner's functions (SQL as postgres, for the optional pg_cron schedule): no key may
# call them through the API, not even the service key.
OWNER_ONLY_CALLS: dict[str, dict] = {
    "schedule_learning_runs": {"p_schedule": "* * * * *"},
    "unschedule_learning_runs": {},
}


def test_every_public_function_is_covered(db: psycopg.Connection) -> None:
    """A new RPC must join this matrix before it ships."""
    names = {r[0] for r in db.execute(
        "select p.proname from pg_proc p where p.pronamespace = 'public'::regnamespace")}
    # processed_at and processed_run_id are computed fields of events, read as columns.
    assert names == {*WORKER_CALLS, *OWNER_ONLY_CALLS, "request_learning_run",
                     "rollback_persona_spec", "processed_at", "processed_run_id"}


@pytest.mark.parametrize("actor", ["anon", "other", "owner", "service"])
@pytest.mark.parametrize("function", list(OWNER_ONLY_CALLS))
def test_scheduling_functions_are_refused_to_every_key(
    stack: Stack, db: psycopg.Connection, world: World, function: str, actor: str
) -> None:
    before = snapshot_all(db, world)
    response = call(stack, token_of(stack, world, actor), "POST", f"rpc/{function}",
                    OWNER_ONLY_CALLS[function])
    assert response.status_code == (401 if actor == "anon" else 403), response.text
    assert response.json()["code"] == "42501"
    assert response.json()["message"] == f"permission denied for function {function}"
    assert snapshot_all(db, world) == before


@pytest.mark.parametrize("actor", ["anon", "other", "owner"])
@pytest.mark.parametrize("function", list(WORKER_CALLS))
def test_worker_functions_are_refused_to_users(
    stack: Stack, db: psycopg.Connection, world: World, function: str, actor: str
) -> None:
    # Arguments a worker would send (a real run and its live lease), so that only the caller's
    # role can stand in the way.
    worker_call = WORKER_CALLS[function]
    lease = worker_call.prepare(db, world)
    before = snapshot_all(db, world)
    response = call(stack, token_of(stack, world, actor), "POST", f"rpc/{function}",
                    worker_call.args(world, lease))
    assert response.status_code == (401 if actor == "anon" else 403), response.text
    assert response.json()["code"] == "42501"
    # Refused at the door (no EXECUTE), not merely by the tables the function touches.
    assert response.json()["message"] == f"permission denied for function {function}"
    assert snapshot_all(db, world) == before


def service_rpc(stack: Stack, world: World, db: psycopg.Connection, function: str) -> Any:
    worker_call = WORKER_CALLS[function]
    lease = worker_call.prepare(db, world)
    response = call(stack, stack.service_key, "POST", f"rpc/{function}",
                    worker_call.args(world, lease))
    assert response.status_code == 200, response.text
    return response.json()


def run_row(db: psycopg.Connection, run_id: str) -> dict:
    row = fetch(db, RUNS, run_id)
    assert row is not None
    return row


def outbox_status(db: psycopg.Connection, event_id: int) -> str:
    return scalar(db, "select langfuse_status from public.persona_training_events where id = %s",
                event_id)


def test_service_enqueues_due_runs(stack: Stack, db: psycopg.Connection, world: World) -> None:
    runs = service_rpc(stack, world, db, "enqueue_due_learning_runs")
    assert [(r["twin_id"], r["trigger"], r["status"]) for r in runs] == [
        (world.open_twin, "schedule", "queued")]
    assert runs_of(db, world.open_twin) == [(runs[0]["id"], "queued", "schedule")]


def test_service_enqueues_a_manual_run(stack: Stack, db: psycopg.Connection, world: World) -> None:
    run = service_rpc(stack, world, db, "enqueue_learning_run")
    assert (run["twin_id"], run["trigger"], run["safe_mode"]) == (world.open_twin, "manual", False)
    assert runs_of(db, world.open_twin) == [(run["id"], "queued", "manual")]


def test_service_claims_a_run(stack: Stack, db: psycopg.Connection, world: World) -> None:
    [run] = service_rpc(stack, world, db, "claim_learning_run")
    assert (run["id"], run["status"], run["worker_id"]) == (world.run, "running", "api-worker")
    stored = run_row(db, world.run)
    assert (stored["status"], stored["attempts"], stored["lease_token"]) == (
        "running", 1, run["lease_token"])


def test_service_extends_a_lease(stack: Stack, db: psycopg.Connection, world: World) -> None:
    expires = service_rpc(stack, world, db, "extend_learning_run_lease")
    assert scalar(db, "select %s::timestamptz > now() + interval '800 seconds'", expires)
    assert scalar(db, "select lease_expires_at = %s::timestamptz from "
                "public.persona_feedback_learning_runs where id = %s", expires, world.run)


def test_service_claims_a_runs_events(stack: Stack, db: psycopg.Connection, world: World) -> None:
    claimed = service_rpc(stack, world, db, "claim_learning_run_events")
    assert claimed["run"]["id"] == world.run
    assert "lease_token" not in claimed["run"]
    # the owner's vote and the audit of `twin`; the other vote is on another twin.
    assert claimed["events_scanned"] == 2
    assert run_row(db, world.run)["batch_last_event_id"] == world.audit


def test_service_claims_a_runs_production_watch(
    stack: Stack, db: psycopg.Connection, world: World
) -> None:
    claimed = service_rpc(stack, world, db, "claim_production_watch")["watch"]
    assert (claimed["watch_id"], claimed["spec_id"], claimed["previous_spec_id"]) == (
        world.watch, world.published_spec, world.archived_spec)
    assert claimed["settings"]["mode"] == "alert"
    # the owner's vote (+1, cast after the publish) is the new spec's; the audit is the draft's.
    counts = ("new_n", "new_passed", "old_n", "old_passed")
    assert [(c["kind"], *(c[k] for k in counts)) for c in claimed["twin"]] == [
        ("audits", 0, 0, 0, 0), ("votes", 1, 1, 0, 0)]
    assert [(m["module_key"], m["kind"]) for m in claimed["modules"]] == [
        ("evidence_answers", "votes")]


def test_service_completes_a_run(stack: Stack, db: psycopg.Connection, world: World) -> None:
    run = service_rpc(stack, world, db, "complete_learning_run")
    assert (run["status"], run["events_processed"], run["publish_decision"]) == (
        "completed", 2, "held")
    processed = db.execute(
        "select e.id, e.processed_run_id::text from public.persona_training_events e "
        "where e.twin_id = %s order by e.id", (world.twin,)).fetchall()
    assert processed == [(world.owner_vote, world.run), (world.audit, world.run)]


def test_service_reads_runs_in_a_batch(stack: Stack, db: psycopg.Connection, world: World) -> None:
    [read] = service_rpc(stack, world, db, "read_learning_runs")
    assert (read["run_id"], read["batch"]["run"]["id"], read["batch"]["events_scanned"]) == (
        world.run, world.run, 2)
    assert "lease_token" not in read["batch"]["run"]
    assert read["watch"]["watch"]["watch_id"] == world.watch


def test_service_completes_runs_in_a_batch(
    stack: Stack, db: psycopg.Connection, world: World
) -> None:
    [done] = service_rpc(stack, world, db, "complete_learning_runs")
    assert (done["run_id"], done["run"]["status"], done["run"]["events_processed"]) == (
        world.run, "completed", 2)
    assert "lease_token" not in done["run"]
    assert run_row(db, world.run)["status"] == "completed"


def test_service_fails_a_run(stack: Stack, db: psycopg.Connection, world: World) -> None:
    run = service_rpc(stack, world, db, "fail_learning_run")
    stored = run_row(db, world.run)
    assert (run["status"], stored["status"], stored["error"]) == (
        "failed", "failed", "worker crashed")


def test_service_releases_a_run(stack: Stack, db: psycopg.Connection, world: World) -> None:
    run = service_rpc(stack, world, db, "release_learning_run")
    assert (run["status"], run["attempts"]) == ("running", 0)
    assert scalar(db, "select lease_expires_at <= now() from public.persona_feedback_learning_runs "
                "where id = %s", world.run)


def test_service_claims_the_outbox(stack: Stack, db: psycopg.Connection, world: World) -> None:
    rows = service_rpc(stack, world, db, "claim_langfuse_outbox")
    assert sorted(r["event_id"] for r in rows) == [world.owner_vote, world.other_vote]
    assert scalar(db, "select bool_and(langfuse_next_attempt_at > now() + interval '200 seconds') "
                "from public.persona_training_events where id = any(%s)",
                [world.owner_vote, world.other_vote])


def test_service_records_deliveries(stack: Stack, db: psycopg.Connection, world: World) -> None:
    assert service_rpc(stack, world, db, "record_langfuse_deliveries") == 1
    assert outbox_status(db, world.owner_vote) == "sent"
    assert outbox_status(db, world.other_vote) == "pending"


def test_service_skips_the_outbox(stack: Stack, db: psycopg.Connection, world: World) -> None:
    assert service_rpc(stack, world, db, "skip_langfuse_outbox") == 2
    assert outbox_status(db, world.owner_vote) == outbox_status(db, world.other_vote) == "skipped"


def test_service_requeues_the_outbox(stack: Stack, db: psycopg.Connection, world: World) -> None:
    assert service_rpc(stack, world, db, "requeue_langfuse_outbox") >= 2
    assert outbox_status(db, world.owner_vote) == outbox_status(db, world.other_vote) == "pending"


def test_service_reads_the_worker_schema_version(
    stack: Stack, db: psycopg.Connection, world: World
) -> None:
    assert service_rpc(stack, world, db, "worker_schema_version") == REQUIRED_SCHEMA_VERSION


# ----------------------------------------------------------------------------- owner views
# The views of supabase/schemas/700_owner_views.sql (security_invoker) and the summary tables
# behind them, read by every actor after both owners' twins have learned: each owner sees their
# own twins only, anon nothing, the service everything; nobody writes through a view.

OWNER_VIEWS = (
    "persona_module_trend", "persona_module_feedback_reasons", "persona_module_feedback",
    "persona_twin_overview", "persona_training_events_state",
)
SUMMARIES = ("persona_feedback_daily", "persona_run_evidence")


@pytest.fixture
def learned_world(stack: Stack, db: psycopg.Connection, world: World) -> World:
    """The world, plus a module and a vote on the other user's twin, after a completed run of
    the owner's twin and of the other's: every view has rows of both owners."""
    from pydantic import SecretStr

    from worker.config import WorkerSettings
    from worker.runner import Runner
    from worker.store import Store

    db.execute("insert into public.persona_modules (twin_id, module_key, intent_label) "
               "values (%s, 'others_module', 'factual_with_evidence')", (world.other_twin,))
    db.execute("insert into public.persona_training_events (twin_id, trace_id, score, reason, "
               "intent_label, created_by) values (%s, 'trace-o', -1, 'outdated', "
               "'factual_with_evidence', %s)", (world.other_twin, world.other.id))
    settings = WorkerSettings(supabase_url=stack.url,
                              supabase_service_role_key=SecretStr(stack.service_key),
                              pfl_worker_id="matrix-views")
    runner = Runner(Store.connect(settings), settings.pfl_worker_id, 30)
    try:
        from uuid import UUID

        for twin in (world.twin, world.other_twin):
            runs = runner.run_once(UUID(twin))
            assert [r.status for r in runs] == ["completed"]
    finally:
        runner.store.close()
    return world


VIEW_READERS = {
    "other": ("other_twin",),
    "owner": ("twin",),
    "service": ("twin", "other_twin"),
}


@pytest.mark.parametrize("actor", ACTORS)
@pytest.mark.parametrize("relation", [*OWNER_VIEWS, *SUMMARIES])
def test_owner_views_show_each_owner_their_twins_only(
    stack: Stack, learned_world: World, relation: str, actor: str
) -> None:
    w = learned_world
    path = f"{relation}?select=twin_id&twin_id=in.({','.join(w.twins)})"
    response = call(stack, token_of(stack, w, actor), "GET", path)
    if actor == "anon":
        kind = "table" if relation in SUMMARIES else "view"
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "42501"
        assert response.json()["message"] == f"permission denied for {kind} {relation}"
        return
    assert response.status_code == 200, response.text
    seen = {r["twin_id"] for r in response.json()}
    # The owner's open twin has no module, run or event: it shows in the overview only.
    expected = {getattr(w, n) for n in VIEW_READERS[actor]}
    if relation == "persona_twin_overview" and actor in ("owner", "service"):
        expected.add(w.open_twin)
    if relation == "persona_training_events_state" and actor in ("owner", "service"):
        expected.add(w.open_twin)  # the other user's vote on the owner's open twin
    assert seen == expected


REFUSED_WRITE = {
    "POST": "cannot insert into view \"{}\"",
    "PATCH": "cannot update view \"{}\"",
    "DELETE": "cannot delete from view \"{}\"",
}


@pytest.mark.parametrize("actor", ACTORS)
@pytest.mark.parametrize("relation", OWNER_VIEWS)
@pytest.mark.parametrize("method", list(REFUSED_WRITE))
def test_nobody_writes_through_an_owner_view(
    stack: Stack, db: psycopg.Connection, world: World, relation: str, actor: str, method: str,
) -> None:
    # None of the views is automatically updatable (each joins or aggregates), so PostgreSQL
    # refuses the write before it looks at privileges, for every role alike (55000, which
    # PostgREST answers with 500); and only select is granted anyway.
    w = world
    before = snapshot_all(db, w)
    path = relation if method == "POST" else f"{relation}?twin_id=eq.{w.twin}"
    body = {"twin_id": w.twin} if method != "DELETE" else None
    response = call(stack, token_of(stack, w, actor), method, path, body)
    assert response.status_code == 500, response.text
    assert response.json()["code"] == "55000"
    assert response.json()["message"] == REFUSED_WRITE[method].format(relation)
    assert snapshot_all(db, w) == before


def test_owner_views_and_summaries_grant_select_only_and_nothing_to_anon(
    db: psycopg.Connection,
) -> None:
    grants = db.execute(
        "select table_name, grantee, "
        "string_agg(privilege_type, ',' order by privilege_type) "
        "from information_schema.role_table_grants where table_schema = 'public' "
        "and table_name = any(%s) and grantee in ('anon', 'authenticated', 'service_role') "
        "group by 1, 2 order by 1, 2", ([*OWNER_VIEWS, *SUMMARIES],),
    ).fetchall()
    assert grants == [(v, role, "SELECT") for v in sorted([*OWNER_VIEWS, *SUMMARIES])
                      for role in ("authenticated", "service_role")]


# ----------------------------------------------------------------------------- private tables


@pytest.mark.parametrize("actor", ["anon", "other", "owner", "service"])
@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("POST", {"twin_id": "00000000-0000-0000-0000-000000000000",
                              "trace_id": "t", "created_by": "00000000-0000-0000-0000-000000000000",
                              "first_vote_at": "2026-01-01T00:00:00Z"})],
)
def test_kept_first_vote_times_are_out_of_every_keys_reach(
    stack: Stack, db: psycopg.Connection, world: World, actor: str, method: str, body: object
) -> None:
    """private.feedback_first_votes (a feedback's first vote time, kept past its votes) is no
    API's: PostgREST does not serve the private schema, asked for by its profile header or not,
    and the rows stay as they were."""
    before = scalar(db, "select count(*) from private.feedback_first_votes")
    assert before > 0  # the world's votes left theirs
    token = token_of(stack, world, actor)
    profile = "Accept-Profile" if method == "GET" else "Content-Profile"
    for path, headers, status, code in [
        ("feedback_first_votes", {profile: "private"}, 406, "PGRST106"),
        # PostgREST 12 names the missing relation to a read, and answers a write with {}.
        ("feedback_first_votes", {}, 404, "42P01" if method == "GET" else None),
    ]:
        response = httpx.request(
            method, f"{stack.rest}/{path}", json=body, timeout=20,
            headers={"apikey": stack.anon_key, "Authorization": f"Bearer {token}", **headers},
        )
        assert (response.status_code, response.json().get("code")) == (status, code), response.text
    assert scalar(db, "select count(*) from private.feedback_first_votes") == before


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_kept_first_vote_times_grant_nothing_to_api_roles(
    db: psycopg.Connection, world: World, role: str
) -> None:
    """Under PostgREST too: the API roles may neither read nor write the table (authenticated
    has usage on the private schema, for the policies' helpers, but no privilege on it)."""
    for statement in [
        "select count(*) from private.feedback_first_votes",
        "delete from private.feedback_first_votes where true",
    ]:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute(f"set local role {role}")
            db.execute(statement)
