"""World setup as the platform and the owners would have made it: users in auth.users, twins,
their settings, modules and specs. Written as the postgres superuser through psycopg, so it
needs no API and passes no policy."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

DEFAULT_MODULES = {"evidence_answers": "factual_with_evidence", "small_talk": "casual_chat"}


def connect(database_url: str) -> psycopg.Connection:
    """A connection in autocommit mode, as the URL's role (the stack's postgres: BYPASSRLS and
    no superuser, as on hosted Supabase)."""
    return psycopg.connect(database_url, autocommit=True)


def scalar(conn: psycopg.Connection, query: str, *args: object) -> Any:
    """The single value a query returns."""
    row = conn.execute(query, args).fetchone()
    assert row is not None, query
    return row[0]


@dataclass(frozen=True)
class AuthUser:
    id: str
    email: str


def make_users(conn: psycopg.Connection, prefix: str, n: int = 1) -> list[AuthUser]:
    """n users in auth.users, as the platform's auth service would have them; emails are unique
    per call (`<prefix>-<random>-<i>@test.local`)."""
    rows = conn.execute(
        # The auth service picks each user's id: auth.users.id has no default.
        "insert into auth.users (id, email) "
        "select gen_random_uuid(), format('%%s-%%s-%%s@test.local', %s::text, %s::text, g) "
        "from generate_series(1, %s) g order by g returning id::text, email",
        (prefix, uuid.uuid4().hex[:8], n),
    ).fetchall()
    return [AuthUser(user_id, email) for user_id, email in rows]


@dataclass(frozen=True)
class Twin:
    id: str
    owner_id: str
    modules: dict[str, str]  # module_key -> module id
    published_spec_id: str
    draft_spec_id: str | None = None

    @property
    def module_keys(self) -> list[str]:
        return list(self.modules)


def make_twin(
    conn: psycopg.Connection,
    owner_id: str,
    modules: Mapping[str, str] | None = None,
    *,
    name: str | None = None,
    feedback_from: str = "any_user",
    settings: Mapping[str, object] | None = None,
    draft: Mapping[str, object] | None = None,
) -> Twin:
    """A twin with modules (module_key -> intent_label), learning settings changed where given,
    a published spec listing the modules and, when `draft` is given, a draft spec of that body."""
    modules = dict(modules or DEFAULT_MODULES)
    twin_id = add_twin(conn, owner_id, name or f"twin-{uuid.uuid4().hex[:8]}", feedback_from)
    for column, value in (settings or {}).items():
        conn.execute(
            sql.SQL("update public.persona_learning_settings set {} = %s where twin_id = %s")
            .format(sql.Identifier(column)),
            (value, twin_id),
        )
    rows = conn.execute(
        "insert into public.persona_modules (twin_id, module_key, intent_label) "
        "select %s, k, i from unnest(%s::text[], %s::text[]) as m(k, i) "
        "returning module_key, id::text",
        (twin_id, list(modules), list(modules.values())),
    ).fetchall()
    published = add_spec(conn, twin_id, "published", {"modules": list(modules)})
    draft_id = add_spec(conn, twin_id, "draft", draft) if draft is not None else None
    return Twin(twin_id, owner_id, dict(rows), published, draft_id)


def add_twin(conn: psycopg.Connection, owner_id: str, name: str, feedback_from: str) -> str:
    """A bare twin (no modules, no spec; default settings); its id."""
    return str(
        scalar(
            conn,
            "insert into public.twins (owner_id, name, feedback_from) values (%s, %s, %s) "
            "returning id",
            owner_id,
            name,
            feedback_from,
        )
    )


def add_spec(
    conn: psycopg.Connection, twin_id: str, status: str, body: Mapping[str, object]
) -> str:
    """A persona spec of the twin; its id."""
    return str(
        scalar(
            conn,
            "insert into public.persona_specs (twin_id, status, spec) values (%s, %s, %s) "
            "returning id",
            twin_id,
            status,
            json.dumps(body),
        )
    )


def module_keys(count: int) -> list[str]:
    """Names of `count` generated modules: module_00, module_01, ..."""
    return [f"module_{k:02d}" for k in range(count)]


def many_modules(count: int, intents: int) -> dict[str, str]:
    """`count` generated modules over `intents` intents: module_k serves intent_(k mod intents)."""
    return {key: f"intent_{k % intents}" for k, key in enumerate(module_keys(count))}


def module_row(conn: psycopg.Connection, module_id: str) -> dict[str, Any]:
    """A module's learned state."""
    row = conn.execute(
        "select success_weight, failure_weight, confidence, status, evidence_at"
        " from public.persona_modules where id = %s",
        (module_id,),
    ).fetchone()
    assert row is not None, module_id
    s, f, c, st, at = row
    return {"success": s, "failure": f, "confidence": c, "status": st, "evidence_at": at}


def user_ids(users: Sequence[AuthUser]) -> list[str]:
    return [u.id for u in users]
