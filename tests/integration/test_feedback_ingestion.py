"""Feedback ingestion as an app does it: a table insert through PostgREST with the user's JWT.

The database sets everything but the vote, turns a repeated vote into a change of vote, and
refuses bad input with PostgREST's error body (status, SQLSTATE code, a message naming the field
where the database can) without changing a single row.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from postgrest.exceptions import APIError

from testkit.env import rows
from tests.conftest import Stack, User, mint_token, wait_for
from tests.integration.helpers import scalar

pytestmark = pytest.mark.integration

INTENT = "factual_with_evidence"


@dataclass(frozen=True)
class World:
    owner: User
    voter: User  # a signed-in user who does not own the twins
    open_twin: str  # accepts feedback from any user
    closed_twin: str  # accepts feedback from its owner only
    published_spec: str  # of open_twin
    draft_spec: str  # of open_twin, newer than the published one
    voter_vote: int  # the voter's current vote on open_twin's "trace-1"

    @property
    def twins(self) -> list[str]:
        return [self.open_twin, self.closed_twin]


@pytest.fixture
def world(db: psycopg.Connection, make_user: Callable[[str], User]) -> World:
    owner, voter = make_user("owner"), make_user("voter")
    new_twin = "insert into public.twins (owner_id, name, feedback_from) values (%s, %s, %s) " \
        "returning id::text"
    open_twin = scalar(db, new_twin, owner.id, "Open twin", "any_user")
    closed_twin = scalar(db, new_twin, owner.id, "Closed twin", "owner")
    new_spec = "insert into public.persona_specs (twin_id, status, spec) values (%s, %s, '{}') " \
        "returning id::text"
    published_spec = scalar(db, new_spec, open_twin, "published")
    draft_spec = scalar(db, new_spec, open_twin, "draft")
    voter_vote = scalar(
        db,
        "insert into public.persona_training_events (twin_id, trace_id, score, intent_label, "
        "created_by) values (%s, 'trace-1', 1, %s, %s) returning id",
        open_twin, INTENT, voter.id,
    )
    return World(owner, voter, open_twin, closed_twin, published_spec, draft_spec, voter_vote)


def stored(db: psycopg.Connection, event_id: int) -> dict:
    row = db.execute(
        "select to_jsonb(e) from public.persona_training_events e where e.id = %s", (event_id,)
    ).fetchone()
    assert row is not None, f"event {event_id} is not stored"
    return row[0]


def votes(db: psycopg.Connection, twin: str, trace: str, user: str) -> list[dict]:
    return [r[0] for r in db.execute(
        "select to_jsonb(e) from public.persona_training_events e "
        "where twin_id = %s and trace_id = %s and created_by = %s order by id",
        (twin, trace, user),
    )]


def snapshot(db: psycopg.Connection, w: World) -> tuple[int, list]:
    """Every event of the stack counted, and every event of the world's twins as JSON."""
    rows = scalar(
        db,
        "select coalesce(jsonb_agg(to_jsonb(e) order by e.id), '[]') "
        "from public.persona_training_events e where twin_id = any(%s::uuid[])",
        w.twins,
    )
    return scalar(db, "select count(*) from public.persona_training_events"), rows


def send(user: User, **fields: object) -> dict:
    """Sends feedback with supabase-py as an app does; returns the row PostgREST answers with."""
    inserted = rows(user.client.table("persona_training_events").insert(fields).execute())
    assert len(inserted) == 1
    return inserted[0]


# ----------------------------------------------------------------------------- valid feedback


def test_valid_feedback_is_stored_with_server_set_fields(db: psycopg.Connection, world: World):
    row = send(
        world.voter, twin_id=world.open_twin, trace_id="trace-2", score=-1, reason="incorrect",
        intent_label=INTENT, module_key="evidence_answers", comment="Cited the wrong year.",
        metadata={"app": "web", "answer_ms": 812},
    )
    # What the client sent ...
    assert (row["twin_id"], row["trace_id"], row["score"], row["reason"]) == (
        world.open_twin, "trace-2", -1, "incorrect")
    assert (row["intent_label"], row["module_key"], row["comment"], row["metadata"]) == (
        INTENT, "evidence_answers", "Cited the wrong year.", {"app": "web", "answer_ms": 812})
    # ... and what the database set: the caller, no spec (feedback names none),
    # a fresh first vote that nothing processed yet, waiting in the Langfuse outbox.
    assert row["created_by"] == world.voter.id
    assert row["source"] == "user_feedback" and row["passed"] is None
    assert row["persona_spec_id"] is None  # the live spec follows from published_at/archived_at
    computed = world.voter.client.table("persona_training_events").select(
        "processed_at,processed_run_id").eq("id", row["id"]).execute().data
    assert computed == [{"processed_at": None, "processed_run_id": None}]
    assert row["first_vote_id"] == row["id"]
    assert row["supersedes_id"] is None and row["superseded_at"] is None
    assert (row["langfuse_status"], row["langfuse_attempts"]) == ("pending", 0)
    assert row["langfuse_next_attempt_at"] == row["created_at"]
    assert stored(db, row["id"]) == row


def test_the_owner_sends_feedback_on_a_twin_closed_to_others(world: World):
    row = send(world.owner, twin_id=world.closed_twin, trace_id="t", score=1, intent_label=INTENT)
    assert (row["created_by"], row["twin_id"]) == (world.owner.id, world.closed_twin)


def test_three_votes_on_one_trace_change_the_vote(db: psycopg.Connection, world: World):
    vote = {"twin_id": world.open_twin, "trace_id": "trace-3", "intent_label": INTENT}
    first = send(world.voter, **vote, score=1, reason="helpful")
    second = send(world.voter, **vote, score=-1, reason="outdated")
    third = send(world.voter, **vote, score=0)

    one, two, three = votes(db, world.open_twin, "trace-3", world.voter.id)
    assert [one["id"], two["id"], three["id"]] == [first["id"], second["id"], third["id"]]
    # each vote replaces the one before it ...
    assert (one["supersedes_id"], two["supersedes_id"], three["supersedes_id"]) == (
        None, one["id"], two["id"])
    # ... and all of them are one feedback, named by its first vote.
    assert {one["first_vote_id"], two["first_vote_id"], three["first_vote_id"]} == {one["id"]}
    assert one["superseded_at"] is not None and two["superseded_at"] is not None
    assert three["superseded_at"] is None
    assert one["superseded_at"] <= two["superseded_at"]
    # the latest vote wins; the replaced ones leave the outbox.
    assert [v["score"] for v in (one, two, three) if v["superseded_at"] is None] == [0]
    assert [v["langfuse_status"] for v in (one, two, three)] == [
        "superseded", "superseded", "pending"]
    # the voter's answer for the third vote already said what it replaced.
    assert (third["supersedes_id"], third["first_vote_id"]) == (second["id"], first["id"])


def test_two_users_on_one_trace_are_two_feedbacks(db: psycopg.Connection, world: World):
    vote = {"twin_id": world.open_twin, "trace_id": "trace-4", "intent_label": INTENT}
    by_voter = send(world.voter, **vote, score=1)
    by_owner = send(world.owner, **vote, score=-1, reason="off_persona")
    current = db.execute(
        "select id, created_by::text, first_vote_id, supersedes_id "
        "from public.persona_training_events where twin_id = %s and trace_id = 'trace-4' "
        "and superseded_at is null order by id", (world.open_twin,),
    ).fetchall()
    assert current == [
        (by_voter["id"], world.voter.id, by_voter["id"], None),
        (by_owner["id"], world.owner.id, by_owner["id"], None),
    ]


def test_a_vote_on_one_trace_leaves_the_voters_other_traces_alone(
    db: psycopg.Connection, world: World
):
    send(world.voter, twin_id=world.open_twin, trace_id="trace-5", score=-1, intent_label=INTENT)
    assert stored(db, world.voter_vote)["superseded_at"] is None


@pytest.mark.parametrize(
    ("fields", "column", "expected"),
    [
        # the bounds DESIGN.md names are inclusive.
        ({"trace_id": "t" * 200}, "trace_id", "t" * 200),
        ({"comment": "c" * 2000}, "comment", "c" * 2000),
        ({"intent_label": "a" + "b" * 63}, "intent_label", "a" + "b" * 63),
        ({"metadata": {"k": "v" * 4080}}, "metadata", {"k": "v" * 4080}),
        # the largest numbers a double reads as finite (below 2^1024 - 2^970) are stored.
        ({"metadata": {"n": [2**1024 - 2**970 - 1, -(2**1024 - 2**970 - 1), 1.5e-320]}},
         "metadata", {"n": [2**1024 - 2**970 - 1, -(2**1024 - 2**970 - 1), 1.5e-320]}),
        # a neutral vote is a vote.
        ({"score": 0}, "score", 0),
        # PostgREST casts JSON scalars to the column type: a numeric trace id is its text, a
        # numeric string a score.
        ({"trace_id": 12345}, "trace_id", "12345"),
        ({"score": "-1"}, "score", -1),
        # every documented reason.
        *(({"reason": r}, "reason", r) for r in (
            "incorrect", "unhelpful", "off_persona", "unsafe", "outdated", "helpful", "other")),
        # module keys are slugs with digits and underscores.
        ({"module_key": "career_advice_2"}, "module_key", "career_advice_2"),
        # no comment, reason or module key at all.
        ({"comment": None, "reason": None, "module_key": None}, "comment", None),
    ],
)
def test_accepted_inputs(
    db: psycopg.Connection, world: World, fields: dict, column: str, expected: object
):
    vote = {"twin_id": world.open_twin, "trace_id": "trace-6", "score": 1, "intent_label": INTENT}
    row = send(world.voter, **{**vote, **fields})
    assert stored(db, row["id"])[column] == expected


# ----------------------------------------------------------------------------- bad input

MISSING = object()  # leave the field out of the body


# Every rule on an event's fields is declared in the catalog and named <field>_<rule>: closed sets
# are enum types (22P02, naming the type), the others check constraints (23514, naming the
# constraint). README's "Sending feedback" lists the same names.
RULES = {
    "trace_id": "trace_id_1_to_200_chars",
    "intent_label": "intent_label_slug",
    "module_key": "module_key_slug",
    "score": "score_minus_1_to_1",
    "comment": "comment_at_most_2000_chars",
    "metadata": "metadata_object_at_most_4096_compact_json_bytes",
    "score_required": "score_on_feedback_only",
    "passed_required": "passed_on_audits_only",
    "langfuse_status_required": "langfuse_status_on_feedback_only",
    "audit_origin_required": "audit_origin_on_audits_only",
    "audit_origin_of_a_draft": "audit_origin_replay_for_drafts",
}
ENUMS = {
    "source": "training_event_source",
    "reason": "training_event_reason",
    "langfuse_status": "langfuse_status",
    "audit_origin": "audit_origin",
}


def check(rule: str) -> str:
    """PostgreSQL's message for a broken check constraint: it names the field and the rule."""
    return (f'new row for relation "persona_training_events" violates check constraint '
            f'"{RULES[rule]}"')


def bad_enum(column: str, value: str) -> str:
    """PostgreSQL's message for a value outside a column's enum type, named for the field."""
    return f'invalid input value for enum {ENUMS[column]}: "{value}"'


def not_null(column: str) -> str:
    return (f'null value in column "{column}" of relation "persona_training_events" violates '
            f'not-null constraint')


def bad_type(pg_type: str, value: str) -> str:
    return f'invalid input syntax for type {pg_type}: "{value}"'


NO_PRIVILEGE = "permission denied for table persona_training_events"
BEYOND_DOUBLE = ("metadata: a number is beyond the range of a double (its magnitude must stay "
                 "below 2^1024 - 2^970, about 1.8e308): JSON readers take it for Infinity, so the "
                 "vote could not be mirrored to Langfuse; send it as a string")
REFUSED_TWIN = "twin_id: twin {twin} does not exist or does not accept feedback from this user"
GONE_TWIN = str(uuid.UUID(int=1))


@dataclass(frozen=True)
class Bad:
    fields: dict  # changes to a valid vote (MISSING drops a field; callables take the World)
    status: int
    code: str
    message: str  # exact; {twin} is the twin_id sent
    field: str | None  # the field the message names, where the database can name it
    token: str = "voter"


BAD_INPUTS = {
    # wrong types: PostgreSQL's cast error names the value, not the column.
    "score-not-a-number": Bad({"score": "abc"}, 400, "22P02", bad_type("smallint", "abc"), None),
    "score-fraction": Bad({"score": 1.5}, 400, "22P02", bad_type("smallint", "1.5"), None),
    "score-boolean": Bad({"score": True}, 400, "22P02", bad_type("smallint", "true"), None),
    "twin-id-not-a-uuid": Bad({"twin_id": "twin-1"}, 400, "22P02", bad_type("uuid", "twin-1"),
                              None),
    # out of range: the check constraint is named after the column and the rule.
    "score-2": Bad({"score": 2}, 400, "23514", check("score"), "score"),
    "score-minus-2": Bad({"score": -2}, 400, "23514", check("score"), "score"),
    # outside a closed set: the enum type is named after the column.
    "reason-unknown": Bad({"reason": "meh"}, 400, "22P02", bad_enum("reason", "meh"), "reason"),
    "reason-empty": Bad({"reason": ""}, 400, "22P02", bad_enum("reason", ""), "reason"),
    "intent-not-a-slug": Bad({"intent_label": "Factual Answer"}, 400, "23514",
                             check("intent_label"), "intent_label"),
    "intent-starts-with-digit": Bad({"intent_label": "1st_intent"}, 400, "23514",
                                    check("intent_label"), "intent_label"),
    "intent-65-chars": Bad({"intent_label": "a" * 65}, 400, "23514", check("intent_label"),
                           "intent_label"),
    "intent-empty": Bad({"intent_label": ""}, 400, "23514", check("intent_label"),
                        "intent_label"),
    "module-key-not-a-slug": Bad({"module_key": "Evidence-Answers"}, 400, "23514",
                                 check("module_key"), "module_key"),
    "trace-empty": Bad({"trace_id": ""}, 400, "23514", check("trace_id"), "trace_id"),
    "trace-201-chars": Bad({"trace_id": "t" * 201}, 400, "23514", check("trace_id"), "trace_id"),
    "comment-2001-chars": Bad({"comment": "c" * 2001}, 400, "23514", check("comment"), "comment"),
    "metadata-array": Bad({"metadata": [1, 2]}, 400, "23514", check("metadata"), "metadata"),
    "metadata-string": Bad({"metadata": "note"}, 400, "23514", check("metadata"), "metadata"),
    "metadata-over-4kb": Bad({"metadata": {"k": "v" * 4096}}, 400, "23514", check("metadata"),
                             "metadata"),
    # a number sent with an exponent counts written out, as jsonb stores it: 3,819 bytes as sent
    # (1e+300), 4,114 as stored (1 and 300 zeros).
    "metadata-exponent-counts-written-out": Bad({"metadata": {"n": 1e300, "k": "v" * 3800}}, 400,
                                                "23514", check("metadata"), "metadata"),
    # a number beyond a double's range (magnitude 2^1024 - 2^970 or more) fits the size limit,
    # but JSON readers take it for Infinity: it could never be mirrored to Langfuse.
    "metadata-number-beyond-a-double": Bad({"metadata": {"n": 10**309}}, 400, "22003",
                                           BEYOND_DOUBLE, "metadata"),
    "metadata-number-beyond-a-double-nested": Bad(
        {"metadata": {"a": [1, {"b": -(2**1024 - 2**970)}]}}, 400, "22003", BEYOND_DOUBLE,
        "metadata"),
    # required fields missing or null.
    "score-missing": Bad({"score": MISSING}, 400, "23514", check("score_required"), "score"),
    "score-null": Bad({"score": None}, 400, "23514", check("score_required"), "score"),
    "trace-missing": Bad({"trace_id": MISSING}, 400, "23502", not_null("trace_id"), "trace_id"),
    "trace-null": Bad({"trace_id": None}, 400, "23502", not_null("trace_id"), "trace_id"),
    "intent-null": Bad({"intent_label": None}, 400, "23502", not_null("intent_label"),
                       "intent_label"),
    "metadata-null": Bad({"metadata": None}, 400, "23502", not_null("metadata"), "metadata"),
    # the twin is required, must exist and must accept feedback from the caller.
    "twin-missing": Bad({"twin_id": MISSING}, 400, "23502", not_null("twin_id"), "twin_id"),
    "twin-null": Bad({"twin_id": None}, 400, "23502", not_null("twin_id"), "twin_id"),
    "twin-unknown": Bad({"twin_id": GONE_TWIN}, 403, "42501", REFUSED_TWIN, "twin_id"),
    "twin-owner-only": Bad({"twin_id": lambda w: w.closed_twin}, 403, "42501", REFUSED_TWIN,
                           "twin_id"),
    # consent is checked before the vote's other rules: a refused twin is the answer.
    "twin-owner-only-and-metadata-beyond-a-double": Bad(
        {"twin_id": lambda w: w.closed_twin, "metadata": {"n": 10**309}}, 403, "42501",
        REFUSED_TWIN, "twin_id"),
    # an unknown column is PostgREST's own error.
    "unknown-column": Bad({"rating": 5}, 400, "PGRST204",
                          "Column 'rating' of relation 'persona_training_events' does not exist",
                          "rating"),
    # server columns: the column privileges refuse the whole insert.
    "forge-created-by": Bad({"created_by": lambda w: w.owner.id}, 403, "42501", NO_PRIVILEGE,
                            None),
    # processing state is computed (the twin's cursor), not a column a client could send.
    "forge-processed-at": Bad({"processed_at": "2026-01-01T00:00:00Z"}, 400, "PGRST204",
                              "Column 'processed_at' of relation 'persona_training_events' does "
                              "not exist", "processed_at"),
    "forge-processed-run": Bad({"processed_run_id": GONE_TWIN}, 400, "PGRST204",
                               "Column 'processed_run_id' of relation 'persona_training_events' "
                               "does not exist", "processed_run_id"),
    "forge-langfuse-status": Bad({"langfuse_status": "sent"}, 403, "42501", NO_PRIVILEGE, None),
    "forge-langfuse-attempts": Bad({"langfuse_attempts": 9}, 403, "42501", NO_PRIVILEGE, None),
    "forge-audit": Bad({"source": "persona_audit", "passed": True, "score": MISSING}, 403,
                       "42501", NO_PRIVILEGE, None),
    "forge-passed": Bad({"passed": True}, 403, "42501", NO_PRIVILEGE, None),
    "forge-audit-origin": Bad({"audit_origin": "production"}, 403, "42501", NO_PRIVILEGE, None),
    "forge-superseded-at": Bad({"superseded_at": "2026-01-01T00:00:00Z"}, 403, "42501",
                               NO_PRIVILEGE, None),
    "forge-supersedes-id": Bad({"supersedes_id": 1}, 403, "42501", NO_PRIVILEGE, None),
    "forge-first-vote-id": Bad({"first_vote_id": 1}, 403, "42501", NO_PRIVILEGE, None),
    "forge-persona-spec": Bad({"persona_spec_id": lambda w: w.draft_spec}, 403, "42501",
                              NO_PRIVILEGE, None),
    "forge-created-at": Bad({"created_at": "2020-01-01T00:00:00Z"}, 403, "42501", NO_PRIVILEGE,
                            None),
    # the identity column answers before the privilege check, naming itself.
    "forge-id": Bad({"id": 1}, 400, "428C9", 'cannot insert a non-DEFAULT value into column "id"',
                    "id"),
    # who is calling.
    "no-token": Bad({}, 401, "42501", NO_PRIVILEGE, None, token="anon"),
    "bad-signature": Bad({}, 401, "PGRST301", "JWSError JWSInvalidSignature", None,
                         token="bad_signature"),
    "expired-token": Bad({}, 401, "PGRST301", "JWT expired", None, token="expired"),
    "role-not-in-db": Bad({}, 400, "22023", 'role "pfl_no_such_role" does not exist', None,
                          token="unknown_role"),
    "role-postgres": Bad({}, 403, "42501", 'permission denied to set role "postgres"', None,
                         token="postgres_role"),
    "token-without-sub": Bad({}, 403, "42501", 'new row violates row-level security policy for '
                             'table "persona_training_events"', None, token="no_sub"),
    "user-not-in-auth": Bad({}, 409, "23503", 'insert or update on table "persona_training_events"'
                            ' violates foreign key constraint "persona_training_events_created_by_'
                            'fkey"', "created_by", token="ghost"),
}


def token_for(stack: Stack, w: World, kind: str) -> str:
    voter = w.voter.id
    return {
        "voter": w.voter.token,
        "anon": stack.anon_key,
        "bad_signature": mint_token(stack, voter, secret="not-the-project-secret-" + "x" * 16),
        "expired": mint_token(stack, voter, expires_in=-60),
        "unknown_role": mint_token(stack, voter, role="pfl_no_such_role"),
        "postgres_role": mint_token(stack, voter, role="postgres"),
        "no_sub": mint_token(stack, None),
        "ghost": mint_token(stack, str(uuid.uuid4())),
    }[kind]


def post(stack: Stack, token: str, body: object) -> httpx.Response:
    headers = {
        "apikey": stack.anon_key,
        "Authorization": f"Bearer {token}",
        "Prefer": "return=representation",
    }
    content = body if isinstance(body, str) else None
    return httpx.post(f"{stack.rest}/persona_training_events", headers=headers,
                      json=None if content else body, content=content, timeout=20)


def valid_vote(w: World) -> dict:
    # A change of the voter's existing vote: a rejected request must not supersede that one.
    return {"twin_id": w.open_twin, "trace_id": "trace-1", "score": -1, "reason": "incorrect",
            "intent_label": INTENT}


def assert_rejected(response: httpx.Response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()
    assert (error["code"], error["message"]) == (code, message), error


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_rejected_and_changes_nothing(
    stack: Stack, db: psycopg.Connection, world: World, bad: Bad
):
    body = valid_vote(world)
    for name, value in bad.fields.items():
        if value is MISSING:
            del body[name]
        else:
            body[name] = value(world) if callable(value) else value
    before = snapshot(db, world)

    response = post(stack, token_for(stack, world, bad.token), body)

    assert_rejected(response, bad.status, bad.code, bad.message.format(twin=body.get("twin_id")))
    if bad.field:
        assert bad.field in response.json()["message"]
    assert snapshot(db, world) == before
    assert stored(db, world.voter_vote)["superseded_at"] is None


@pytest.mark.parametrize(
    ("batch", "status", "code", "message"),
    [
        # one row of three out of range: the statement fails as a whole.
        (lambda v: [{**v, "trace_id": "b1"}, {**v, "trace_id": "b2", "score": 5},
                    {**v, "trace_id": "b3"}], 400, "23514", check("score")),
        # one row without a twin.
        (lambda v: [{**v, "trace_id": "b1"}, {**v, "trace_id": "b2", "twin_id": None}],
         400, "23502", not_null("twin_id")),
        # rows with different keys are refused by PostgREST before the database sees them.
        (lambda v: [{**v, "trace_id": "b1"}, {k: x for k, x in v.items() if k != "reason"}],
         400, "PGRST102", "All object keys must match"),
    ],
    ids=["one-row-out-of-range", "one-row-without-twin", "keys-differ"],
)
def test_a_bad_row_rejects_the_whole_batch(
    stack: Stack, db: psycopg.Connection, world: World, batch: Callable, status: int, code: str,
    message: str,
):
    before = snapshot(db, world)
    response = post(stack, world.voter.token, batch(valid_vote(world)))
    assert_rejected(response, status, code, message)
    assert snapshot(db, world) == before


def test_a_good_batch_is_stored_whole(stack: Stack, db: psycopg.Connection, world: World):
    vote = valid_vote(world)
    response = post(stack, world.voter.token, [{**vote, "trace_id": f"b{i}"} for i in range(3)])
    assert response.status_code == 201, response.text
    ids = [r["id"] for r in response.json()]
    assert [stored(db, i)["trace_id"] for i in ids] == ["b0", "b1", "b2"]


def test_votes_on_one_trace_in_one_batch_are_recorded_in_order(
    stack: Stack, db: psycopg.Connection, world: World
):
    """README (Ingest): the later element of an array supersedes the earlier, as separate
    requests would; both rows are kept and linked."""
    vote = {**valid_vote(world), "trace_id": "b-twice"}
    body = [vote, {**vote, "trace_id": "b-once"}, {**vote, "score": 1, "reason": "helpful"}]
    response = post(stack, world.voter.token, body)
    assert response.status_code == 201, response.text
    first, _, last = (r["id"] for r in response.json())
    rows = votes(db, world.open_twin, "b-twice", world.voter.id)
    assert [r["id"] for r in rows] == [first, last]
    assert rows[0]["superseded_at"] is not None and rows[0]["langfuse_status"] == "superseded"
    assert (rows[1]["superseded_at"], rows[1]["supersedes_id"], rows[1]["score"]) == (
        None, first, 1
    )
    assert rows[1]["first_vote_id"] == first


def test_malformed_json_is_rejected(stack: Stack, db: psycopg.Connection, world: World):
    before = snapshot(db, world)
    response = post(stack, world.voter.token, '{"twin_id": ')
    assert_rejected(response, 400, "PGRST102", "Empty or invalid json")
    assert snapshot(db, world) == before


def test_supabase_py_surfaces_the_database_error(db: psycopg.Connection, world: World):
    before = snapshot(db, world)
    with pytest.raises(APIError) as raised:
        send(world.voter, **{**valid_vote(world), "score": 3})
    assert (raised.value.code, raised.value.message) == ("23514", check("score"))
    assert snapshot(db, world) == before


# ----------------------------------------------------------------------------- server writes


def patch_as_service(stack: Stack, event_id: int, change: dict) -> httpx.Response:
    return httpx.patch(
        f"{stack.rest}/persona_training_events?id=eq.{event_id}",
        json=change,
        headers={"apikey": stack.anon_key, "Authorization": f"Bearer {stack.service_key}"},
        timeout=20,
    )


def audit(w: World, **fields: object) -> dict:
    return {"twin_id": w.open_twin, "source": "persona_audit", "trace_id": "audit-1",
            "passed": True, "intent_label": INTENT, "persona_spec_id": w.draft_spec, **fields}


@pytest.mark.parametrize(
    ("fields", "code", "message", "column"),
    [
        ({"passed": None}, "23514", check("passed_required"), "passed"),
        ({"score": 1}, "23514", check("score_required"), "score"),
        ({"source": "survey"}, "22P02", bad_enum("source", "survey"), "source"),
        ({"module_key": "Module-1"}, "23514", check("module_key"), "module_key"),
        ({"audit_origin": "shadow"}, "22P02", bad_enum("audit_origin", "shadow"), "audit_origin"),
        # the audit pipeline's audit of a draft sent as production: a draft answered no user.
        ({"audit_origin": "production"}, "23514", check("audit_origin_of_a_draft"),
         "audit_origin"),
        # feedback sent by the service role with an audit's origin.
        ({"source": "user_feedback", "passed": None, "score": 1, "persona_spec_id": None,
          "created_by": lambda w: w.voter.id, "audit_origin": "production"}, "23514",
         check("audit_origin_required"), "audit_origin"),
    ],
    ids=["audit-without-outcome", "audit-with-a-vote", "unknown-source", "module-not-a-slug",
         "unknown-audit-origin", "draft-audit-as-production", "feedback-with-an-origin"],
)
def test_the_audit_pipeline_gets_the_same_rules(
    stack: Stack, db: psycopg.Connection, world: World, fields: dict, code: str, message: str,
    column: str,
):
    """The service role bypasses RLS, not the rules on the fields."""
    before = snapshot(db, world)
    fields = {k: v(world) if callable(v) else v for k, v in fields.items()}
    response = post(stack, stack.service_key, audit(world, **fields))
    assert_rejected(response, 400, code, message)
    assert column in response.json()["message"]
    assert snapshot(db, world) == before


@pytest.mark.parametrize(
    ("change", "code", "message", "column"),
    [
        ({"score": 5}, "23514", check("score"), "score"),
        ({"intent_label": "Not A Slug"}, "23514", check("intent_label"), "intent_label"),
        ({"langfuse_status": "lost"}, "22P02", bad_enum("langfuse_status", "lost"),
         "langfuse_status"),
        # a vote turned into an audit: it has no origin, is in the outbox, carries a score and
        # no outcome. PostgreSQL checks a table's constraints in name order: the origin rule
        # answers first.
        ({"source": "persona_audit"}, "23514", check("audit_origin_required"), "audit_origin"),
        ({"audit_origin": "replay"}, "23514", check("audit_origin_required"), "audit_origin"),
    ],
    ids=["score", "intent", "outbox-status", "feedback-into-audit", "feedback-given-an-origin"],
)
def test_updates_keep_the_rules(
    stack: Stack, db: psycopg.Connection, world: World, change: dict, code: str, message: str,
    column: str,
):
    before = snapshot(db, world)
    response = patch_as_service(stack, world.voter_vote, change)
    assert_rejected(response, 400, code, message)
    assert column in response.json()["message"]
    assert snapshot(db, world) == before


def test_an_audit_records_the_origin_the_pipeline_sends_or_the_default(
    stack: Stack, db: psycopg.Connection, world: World
):
    """The audit pipeline marks a replay (audit_origin replay); left out, an audit of the
    published spec is production and an audit of a draft a replay. Feedback has none."""
    sent = [
        ({"persona_spec_id": world.published_spec}, "production"),
        ({"persona_spec_id": world.published_spec, "audit_origin": "replay"}, "replay"),
        ({"persona_spec_id": world.published_spec, "audit_origin": "production"}, "production"),
        ({"persona_spec_id": world.draft_spec}, "replay"),
        ({"persona_spec_id": world.draft_spec, "audit_origin": "replay"}, "replay"),
    ]
    for i, (fields, origin) in enumerate(sent):
        response = post(stack, stack.service_key, audit(world, trace_id=f"origin-{i}", **fields))
        assert response.status_code == 201, response.text
        [row] = response.json()
        assert (row["audit_origin"], row["audit_of_draft"]) == (
            origin, fields["persona_spec_id"] == world.draft_spec), fields
    assert stored(db, world.voter_vote)["audit_origin"] is None


def test_a_valid_update_by_the_service_role_is_stored(
    stack: Stack, db: psycopg.Connection, world: World
):
    response = patch_as_service(stack, world.voter_vote, {"comment": "checked by support"})
    assert response.status_code == 204, response.text
    assert stored(db, world.voter_vote)["comment"] == "checked by support"


def test_two_devices_voting_on_one_trace_at_once_both_succeed(
    stack: Stack, db: psycopg.Connection, world: World
):
    """A vote sent while the voter's other device is still writing one on the same trace waits
    for it and then supersedes it, rather than colliding with it on the current-vote index."""
    trace = "trace-two-devices"
    claims = json.dumps({"sub": world.voter.id, "role": "authenticated"})
    waiting = "select count(*) from pg_locks where not granted"
    with psycopg.connect(stack.database_url) as first_device:  # its transaction stays open
        first_device.execute("set local role authenticated")
        first_device.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
        first = first_device.execute(
            "insert into public.persona_training_events (twin_id, trace_id, score, intent_label) "
            "values (%s, %s, 1, %s) returning id",
            (world.open_twin, trace, INTENT),
        ).fetchone()
        assert first is not None
        first_id = first[0]
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(post, stack, world.voter.token,
                                 {"twin_id": world.open_twin, "trace_id": trace, "score": -1,
                                  "reason": "outdated", "intent_label": INTENT})
            wait_for(lambda: scalar(db, waiting) == 1)
            assert not second.done()
            first_device.commit()
            response = second.result(timeout=20)

    assert response.status_code == 201, response.text
    second_id = response.json()[0]["id"]
    rows = votes(db, world.open_twin, trace, world.voter.id)
    assert [(r["id"], r["score"], r["superseded_at"] is None) for r in rows] == [
        (first_id, 1, False), (second_id, -1, True)
    ]
    assert (rows[1]["supersedes_id"], rows[1]["first_vote_id"]) == (first_id, first_id)


@pytest.mark.parametrize("deleted", ["voter", "twin"])
def test_a_vote_waiting_on_a_deletion_of_its_voter_or_twin_is_refused_by_the_events_table(
    stack: Stack, db: psycopg.Connection, world: World, deleted: str
):
    """A vote on a new trace, sent while the voter's account (or the twin) is being deleted in a
    transaction still open, waits for the deletion, then is refused by a foreign key (409,
    23503: the one of the kept first vote times, written first, names its private table).
    Nothing is stored, and the deletion goes through."""
    stored_for = "select count(*) from public.persona_training_events where twin_id = %s"
    kept_for = "select count(*) from private.feedback_first_votes where twin_id = %s"
    delete = ("delete from auth.users where id = %s", world.voter.id) if deleted == "voter" \
        else ("delete from public.twins where id = %s", world.open_twin)
    with psycopg.connect(stack.database_url) as deleting:  # its transaction stays open
        deleting.execute(delete[0], (delete[1],))
        with ThreadPoolExecutor(1) as pool:
            voting = pool.submit(post, stack, world.voter.token,
                                 {"twin_id": world.open_twin, "trace_id": "trace-new",
                                  "score": 1, "intent_label": INTENT})
            wait_for(lambda: scalar(
                db, "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                " and pid <> %s", deleting.info.backend_pid) == 1)
            deleting.commit()
            response = voting.result(timeout=20)
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["code"] == "23503"
    assert "violates foreign key constraint" in body["message"]
    # The voter's one earlier vote (and its kept time) went with the account or the twin.
    assert (scalar(db, stored_for, world.open_twin), scalar(db, kept_for, world.open_twin)) == (
        0, 0)


def test_one_transaction_records_thirty_thousand_votes(db: psycopg.Connection, world: World):
    """An import of many votes in one transaction: each vote takes row locks only (its feedback's
    kept time, its current vote), no slot of PostgreSQL's lock table, which every session shares
    (an advisory lock per vote ran out of them between 12,000 and 13,000 votes in flight, for
    every session: "out of shared memory"). A vote changed within the same statement supersedes
    the earlier one, as votes sent one by one do."""
    inserted = db.execute(
        "insert into public.persona_training_events (twin_id, trace_id, score, intent_label,"
        " created_by) select %s, 'import-' || (g %% 29990), case when g > 29990 then -1 else 1"
        " end, %s, %s from generate_series(1, 30000) g",
        (world.open_twin, INTENT, world.voter.id),
    )
    assert inserted.rowcount == 30_000
    imported = "from public.persona_training_events where trace_id like 'import-%%'"
    assert scalar(db, f"select count(*) {imported} and superseded_at is null") == 29_990
    assert scalar(db, f"select count(*) {imported} and supersedes_id is not null") == 10
    assert scalar(db, f"select count(*) {imported} and superseded_at is null and score = -1") == 10
    assert scalar(db, "select count(*) from private.feedback_first_votes where twin_id = %s"
                  " and trace_id like 'import-%%'", world.open_twin) == 29_990
    # Not left pending in the suite's one database: a later drain would send them all.
    db.execute("delete from public.twins where id = %s", (world.open_twin,))
