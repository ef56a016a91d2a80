"""The comparison of bench case 4, not part of the product: the feedback endpoint a user would
otherwise build (the shape of the system this project grew from), a FastAPI route that validates
the vote with pydantic and inserts it through supabase-py as the user.

    POST /feedback   body: one vote (the columns an app may set), header Authorization: Bearer
                     <the user's JWT>; 201 and no body when the row is written, 422 when the body
                     fails validation, the database's refusal (400 or 403, its message) otherwise

Configuration: PFL_BASELINE_SUPABASE_URL (the API gateway) and PFL_BASELINE_ANON_KEY. Run as the
bench runs it (bench/ingest.py, `BaselineServer`):

    uvicorn bench.fastapi_baseline:app --host 127.0.0.1 --port PORT --workers 2 \\
        --loop uvloop --http httptools --no-access-log

It is written as a careful user would write it, not as a straw man: async, one pooled HTTP client
per worker process (keep-alive to the gateway) handed to a supabase-py client made per request
with the caller's token (the documented way to act as the user on a server), `return=minimal`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal
from uuid import UUID

import httpx
from fastapi import FastAPI, Header, HTTPException, Response
from postgrest import APIError
from postgrest.types import ReturnMethod
from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator
from supabase import AsyncClient, AsyncClientOptions

Slug = Annotated[str, StringConstraints(max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]


class Feedback(BaseModel):
    """One vote: the README's rules for the columns an app may set."""

    model_config = ConfigDict(extra="forbid")

    twin_id: UUID
    trace_id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    score: Literal[-1, 0, 1]
    reason: (
        Literal["incorrect", "unhelpful", "off_persona", "unsafe", "outdated", "helpful", "other"]
        | None
    ) = None
    intent_label: Slug
    module_key: Slug | None = None
    comment: Annotated[str, StringConstraints(max_length=2000)] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(compact_json(value)) > 4096:
            raise ValueError("metadata is more than 4,096 bytes as compact JSON")
        return value


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=10) as http:
        app.state.http = http
        yield


app = FastAPI(lifespan=lifespan)
SUPABASE_URL = os.environ.get("PFL_BASELINE_SUPABASE_URL", "http://127.0.0.1:54321")
ANON_KEY = os.environ.get("PFL_BASELINE_ANON_KEY", "")


@app.post("/feedback", status_code=201)
async def record_feedback(body: Feedback, authorization: Annotated[str, Header()]) -> Response:
    options = AsyncClientOptions(
        headers={"Authorization": authorization}, httpx_client=app.state.http
    )
    client = AsyncClient(SUPABASE_URL, ANON_KEY, options)
    row = body.model_dump(mode="json", exclude_unset=True)
    try:
        await (
            client.table("persona_training_events")
            .insert(row, returning=ReturnMethod.minimal)
            .execute()
        )
    except APIError as exc:
        status = 403 if exc.code == "42501" else 400
        raise HTTPException(status_code=status, detail=exc.message) from exc
    return Response(status_code=201)
