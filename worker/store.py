"""The only code that talks to Supabase: one RPC per state change, rows in, frozen models out.

Every call goes through the Supabase Python client with the service-role key. Transient failures
(network errors, timeouts, HTTP 5xx) are retried with exponential backoff and jitter; anything
the database rejected is raised at once as a StoreError carrying PostgREST's error code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypedDict, TypeVar, cast
from uuid import UUID

import httpx
from postgrest.exceptions import APIError
from postgrest.types import JSON
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from supabase import Client, ClientOptions, create_client
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from worker.config import WorkerSettings
from worker.models import (
    AuditComparison,
    LearningSettings,
    ModuleEvidence,
    ModuleState,
    RunDecision,
    WatchEvidence,
)
from worker.views import (
    ModuleFeedback,
    ReasonCount,
    RunEvidence,
    SpecVersion,
    TrendPoint,
    TwinOverview,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_Model = TypeVar("_Model", bound=BaseModel)

# PostgREST answers at most this many rows per request (PGRST_DB_MAX_ROWS, config.toml
# max_rows); longer reads page with Range.
PAGE_ROWS = 1000

# A batched read or completion sends its runs in requests of at most this many bytes of runs:
# nginx keeps a body larger than its client_body_buffer_size (8 KB by default) in a temporary
# file, and the local stack's nginx then forwards it about 40 ms later (measured: 44 ms for a
# 12 KB body against 1.4 ms for 9 KB; PostgREST directly: 1.4 ms), far more than the round trip
# of a second request.
BATCH_BODY_BYTES = 7_000

RunStatus = Literal["queued", "running", "completed", "failed"]

# Columns a run listing needs; the lease token never leaves the worker's own calls.
RUN_COLUMNS = (
    "id,twin_id,status,trigger,safe_mode,attempts,max_attempts,worker_id,learning_time,"
    "events_scanned,events_processed,events_unmatched,modules_updated,gate_passed,gate_report,"
    "publish_decision,hold_reason,published_spec_id,error,created_at,started_at,finished_at,"
    "rebuilt_modules,retry_not_before"
)


# The newest migration that changed what the worker calls (public.worker_schema_version()
# answers the database's); an older database is refused at start.
REQUIRED_SCHEMA_VERSION = "20261221000100"


class ConfigurationError(Exception):
    """The worker cannot run with these settings; the message is one line saying why and what
    to do."""


class StoreError(Exception):
    """The database refused a call; `code` is PostgREST's (SQLSTATE or PGRSTxxx)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class StaleLeaseError(StoreError):
    """The run's lease expired or another worker holds it: our work on it has no effect."""


class BatchChangedError(StoreError):
    """The twin's cursor, evidence or modules changed since the claim read the batch (events
    deleted or edited, a module added, edited or deleted): the run must read its batch again."""


class TransientStoreError(StoreError):
    """The API could not be reached or failed on its side; the same call may succeed later."""


class _Frozen(BaseModel):
    """Immutable; built from a row, whose columns it does not name are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Run(_Frozen):
    """A learning run as its row says (figures are None until the run has them).

    `gate_report` is the jsonb column as stored: a `GateReport` as JSON when this worker wrote it.
    """

    id: UUID
    twin_id: UUID
    status: RunStatus
    trigger: str
    safe_mode: bool
    attempts: int
    max_attempts: int
    worker_id: str | None = None
    lease_token: UUID | None = None
    learning_time: datetime | None = None
    events_scanned: int | None = None
    events_processed: int | None = None
    events_unmatched: int | None = None
    modules_updated: int | None = None
    gate_passed: bool | None = None
    gate_report: dict[str, Any] | None = None
    publish_decision: str | None = None
    hold_reason: str | None = None
    published_spec_id: UUID | None = None
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    rebuilt_modules: bool | None = None
    """True when the run recounted the twin's modules from the evidence that exists (evidence
    was deleted or edited since the last run) instead of adding its batch; None until claimed."""
    retry_not_before: datetime | None = None
    """For a run that failed: the scheduler queues no new run of its twin before this time (10 s
    after the first failure in a row, doubled for each further one, at most 1 hour; a request
    is not held back). None for any other run."""


class OutboxRow(_Frozen):
    """A feedback vote claimed for delivery to Langfuse (`metadata`: the app's JSON object;
    `score_timestamp`: the first vote's time, which keeps a re-sent score the same one)."""

    event_id: int
    twin_id: UUID
    trace_id: str
    created_by: UUID
    score: int
    reason: str | None = None
    intent_label: str
    module_key: str | None = None
    comment: str | None = None
    metadata: dict[str, Any] = {}
    attempts: int
    score_timestamp: datetime


class OutboxBacklog(_Frozen):
    """`langfuse_outbox_backlog()`: the feedback votes waiting for Langfuse (pending or
    retrying), the age in seconds of the oldest (None when none waits), the seconds until the
    mirror's hold ends (0 when none holds: no request to Langfuse before then, from any worker)
    and the answer that set it."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    rows: int = Field(ge=0)
    oldest_seconds: float | None = None
    hold_seconds: float = Field(0.0, ge=0)
    hold_reason: str | None = None


class CheckTurn(_Frozen):
    """`claim_langfuse_check()`: whether this worker may send its start-up check now. `turn`:
    "check" (no hold), "probe" (a hold has passed and this check is its one probe: record its
    answer with `record_check`) or "held" (a hold in force, `hold_seconds` left, or another
    worker's probe in flight, 0 left: send nothing); `hold_reason`: the answer that set it."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    turn: Literal["check", "probe", "held"]
    hold_seconds: float = Field(0.0, ge=0)
    hold_reason: str | None = None


class RunBatch(_Frozen):
    """What `claim_learning_run_events` aggregated for a run: all the pure logic needs.

    `evidence` holds the batch's weighted evidence per module, already decayed to
    `learning_time`; `modules` every module of the twin before the run.
    """

    learning_time: datetime
    events_scanned: int
    events_unmatched: int
    settings: LearningSettings
    modules: tuple[ModuleState, ...]
    evidence: tuple[ModuleEvidence, ...]
    draft_spec_id: UUID | None
    draft_modules: tuple[str, ...]
    baseline_spec_id: UUID | None
    audits: AuditComparison


class RebuildProgress(_Frozen):
    """`claim_learning_run_events`' answer while the run's rebuild (the exact path, for a twin
    whose evidence was deleted or modules edited) has steps left: it has summed the twin's
    events up to `rebuilt_through_event_id` of the batch's `batch_last_event_id`, in `steps`
    calls so far. The next call takes the next step."""

    rebuilt_through_event_id: int
    batch_last_event_id: int
    steps: int


@dataclass(frozen=True, slots=True)
class RunRead:
    """One run's part of `read_learning_runs`' answer: its batch (`RunBatch`), the rebuild's
    progress (`RebuildProgress`: the run goes on through the one-run path), or None when the
    batched read left the run to the one-run path; the production watch's evidence (None when
    nothing is watched or the batch was not read); or the error that run's read raised."""

    batch: RunBatch | RebuildProgress | None = None
    watch: WatchEvidence | None = None
    error: StoreError | None = None


class ModuleUpdatePayload(TypedDict):
    """One element of `module_updates` in complete_learning_run's p_result."""

    module_id: str
    success: float
    failure: float
    confidence: float
    status: str


class CompletionPayload(TypedDict):
    """complete_learning_run's p_result: exactly the keys its SQL reads.

    The run's figures are not in it: the function counts the processed events and the changed
    modules itself, and takes the decision's publish outcome from `publish_spec_id`.
    """

    module_updates: list[ModuleUpdatePayload]
    gate_passed: bool
    gate_report: dict[str, JSON]
    publish_spec_id: str | None
    hold_reason: str | None
    watch: dict[str, JSON] | None  # the production watch's decision (models.WatchReport)


class DeliveryRecord(TypedDict):
    """One element of record_langfuse_deliveries' p_deliveries."""

    event_id: int
    outcome: str  # "sent", "retry", "wait" or "failed": a langfuse_response.Outcome value
    error: str | None
    retry_after_seconds: float | None  # the least delay the server asked for
    hold: bool  # a retry that also holds every worker (a top-level 500); false otherwise
    unsent: bool  # a failed row that never left the worker: not Langfuse's answer


# The decision's fields that make the payload: the payload's keys, and of each module update
# only the columns the function applies.
_COMPLETION_FIELDS: dict[str, bool | dict[str, set[str]]] = {
    **{key: True for key in CompletionPayload.__required_keys__},
    "module_updates": {"__all__": set(ModuleUpdatePayload.__required_keys__)},
}


def completion_payload(decision: RunDecision) -> CompletionPayload:
    """The decision as complete_learning_run's p_result (JSON-ready: UUIDs and enums as strings;
    the gate report whole)."""
    payload = decision.model_dump(mode="json", include=_COMPLETION_FIELDS)
    # model_dump is typed dict[str, Any]; the include set above is CompletionPayload's keys,
    # and tests/unit hold those to the keys the SQL function reads.
    return cast(CompletionPayload, payload)


def make_client(url: str, api_key: str, *, bearer: str | None = None, timeout: float) -> Client:
    """A sync Supabase client for the project at `url`: the API key, optionally a user's JWT
    (`bearer`), one timeout in seconds for every request (given to the HTTP client: supabase-py
    truncates a float timeout to whole seconds) and no retries of the client's own (the store
    retries, with one policy for every call)."""
    return create_client(
        url,
        api_key,
        options=ClientOptions(
            headers={"Authorization": f"Bearer {bearer}"} if bearer else {},
            httpx_client=httpx.Client(timeout=httpx.Timeout(timeout)),
            postgrest_client_timeout=None,  # type: ignore[arg-type]  # the HTTP client's applies
            postgrest_client_retry=False,
            auto_refresh_token=False,
            persist_session=False,
        ),
    )


# PostgREST cannot reach the database or get a connection (PGRST000-003), the database is shutting
# down or starting (57P01, 57P03), the connection broke (08xxx), a lock wait timed out (55P03).
_TRANSIENT_CODES = frozenset(
    {"PGRST000", "PGRST001", "PGRST002", "PGRST003", "57P01", "57P03", "08006", "08001", "55P03"}
)


def _error_from(exc: APIError) -> StoreError:
    """The project's error for what PostgREST (or a gateway in front of it) answered."""
    return error_for(exc.code, exc.message or str(exc))


def error_for(code: str | None, message: str) -> StoreError:
    """The project's error for a code and message the database (or a gateway) answered with:
    a whole call's, or one run's in a batched call's answer."""
    if code == "PT409":
        return StaleLeaseError(message, code)
    # PT412: the twin's evidence or modules changed since the claim. (PT422, the twin's cursor
    # moved past the batch's start, is a refusal: the run fails and the next run reads anew.)
    if code == "PT412":
        return BatchChangedError(message, code)
    # A body that is not PostgREST's (a gateway's 502/503/504 while PostgREST restarts) carries
    # the HTTP status as its code: 5xx and 429 may succeed later. No code at all is an answer
    # broken off mid-way (seen around a database restart).
    if (
        not code
        or code in _TRANSIENT_CODES
        or (code.isdigit() and (code[0] == "5" or code == "429"))
    ):
        return TransientStoreError(message, code)
    return StoreError(message, code)


class Store:
    """Supabase access for the worker. Build it once per process with `Store.connect`.

    Every method is one call (one transaction for an RPC), tried up to `attempts` times on
    transient errors. Each raises `StaleLeaseError` when the run's lease is no longer ours,
    `BatchChangedError` when the batch moved under the run, `TransientStoreError` when the API
    stayed unreachable, and `StoreError` for anything else the database refused. A run's own
    calls raise ValueError for a run this worker does not hold (no lease token).
    """

    def __init__(self, client: Client, attempts: int = 4) -> None:
        self._client = client
        self._attempts = attempts

    @classmethod
    def connect(cls, settings: WorkerSettings) -> Store:
        """A store on a new service-role client with the settings' timeout and attempts."""
        key = settings.supabase_service_role_key.get_secret_value()
        client = make_client(settings.supabase_url, key, timeout=settings.pfl_http_timeout_seconds)
        return cls(client, attempts=settings.pfl_store_attempts)

    def close(self) -> None:
        """Closes the HTTP connections; the store is not used afterwards."""
        self._client.postgrest.session.close()

    def _call(self, what: str, request: Callable[[], _T]) -> _T:
        """`request()`, retried with backoff and jitter while it fails transiently; `what` names
        the call in errors."""

        def once() -> _T:
            try:
                return request()
            except APIError as exc:
                raise _error_from(exc) from exc
            except httpx.TransportError as exc:
                raise TransientStoreError(f"{what}: {type(exc).__name__}: {exc}") from exc

        retrying = Retrying(
            retry=retry_if_exception_type(TransientStoreError),
            stop=stop_after_attempt(self._attempts),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            before_sleep=before_sleep_log(logger, logging.WARNING),
            reraise=True,
        )
        return retrying(once)

    def _rpc(self, name: str, params: dict[str, object]) -> JSON:
        """Calls the SQL function `name`; returns its JSON result (a row, a scalar, or an array
        for a `setof` function)."""
        return self._call(name, lambda: self._client.rpc(name, params).execute().data)

    def check_worker_access(self, url: str) -> str:
        """Asks the database which version of the worker's functions it has, as the worker's
        key. Returns that version (a migration timestamp). Raises ConfigurationError (one line)
        when the key is refused or may not call the worker's functions (not the service-role
        key of this project), the database's migrations are behind REQUIRED_SCHEMA_VERSION, the
        Data API did not answer at `url` through the store's attempts (unreachable, or a gateway
        with no route there), or what answers there is not a Supabase project's API (an HTTP
        status without a JSON error body); the
        store's other errors as they come."""
        try:
            found = self._rpc("worker_schema_version", {})
        except TransientStoreError as exc:
            # Nothing listening, or a gateway with no route there (hosted's answers a wrong path
            # with 404 "no route matched with those values", no Data API error code).
            raise ConfigurationError(
                f"the Supabase Data API at {url} did not answer ({exc}); check SUPABASE_URL (the "
                "project's API URL, no path) and that the project is up"
            ) from exc
        except StoreError as exc:
            if exc.code and len(exc.code) == 3 and exc.code.isdigit():  # HTTP, not SQLSTATE
                raise ConfigurationError(
                    f"the server at {url} answered HTTP {exc.code} without the Data API's error "
                    "body: SUPABASE_URL is not a Supabase project's API URL"
                ) from exc
            if exc.code == "42501":
                raise ConfigurationError(
                    "SUPABASE_SERVICE_ROLE_KEY is not the service-role key: the API refused the "
                    "worker's functions (permission denied); use the service_role/secret key "
                    "of the project"
                ) from exc
            if exc.code in ("PGRST301", "PGRST302") and "expired" in str(exc).lower():
                raise ConfigurationError(
                    f"SUPABASE_SERVICE_ROLE_KEY has expired ({exc}); use the project's current "
                    "service_role/secret key"
                ) from exc
            if exc.code in ("PGRST301", "PGRST302"):
                raise ConfigurationError(
                    f"SUPABASE_SERVICE_ROLE_KEY was refused by the API at {url} ({exc}): it is "
                    "not a key of this project; use its service_role/secret key"
                ) from exc
            if exc.code == "PGRST202":
                raise ConfigurationError(
                    f"the database at {url} is behind: it lacks the worker's functions of "
                    f"migration {REQUIRED_SCHEMA_VERSION}; apply the migrations (supabase db push)"
                ) from exc
            raise
        if not isinstance(found, str) or found < REQUIRED_SCHEMA_VERSION:
            raise ConfigurationError(
                f"the database at {url} is behind: its migrations reach {found}, the worker needs "
                f"{REQUIRED_SCHEMA_VERSION}; apply the migrations (supabase db push)"
            )
        return found

    # Runs --------------------------------------------------------------------------------

    def enqueue_due_runs(self, twin_id: UUID | None = None) -> list[Run]:
        """Queues a run for every twin (or only `twin_id`) with unprocessed evidence and no run
        queued or running; returns the runs it queued."""
        rows = self._rpc("enqueue_due_learning_runs", {"p_twin_id": _opt(twin_id)})
        return [Run.model_validate(r) for r in _rows(rows)]

    def enqueue_run(self, twin_id: UUID, *, safe_mode: bool | None) -> Run:
        """Queues an operator's run for the twin even without new evidence (or returns the run
        already queued). `safe_mode` None: the twin's auto_publish setting decides."""
        row = self._rpc(
            "enqueue_learning_run", {"p_twin_id": str(twin_id), "p_safe_mode": safe_mode}
        )
        return Run.model_validate(row)

    def claim_run(
        self, worker_id: str, lease_seconds: int, twin_id: UUID | None = None
    ) -> Run | None:
        """Claims the oldest queued run (or one whose lease expired), of `twin_id` only if
        given, for `lease_seconds`; returns it with its lease token, or None if none is due."""
        rows = self._rpc(
            "claim_learning_run",
            {
                "p_worker_id": worker_id,
                "p_lease_seconds": lease_seconds,
                "p_twin_id": _opt(twin_id),
            },
        )
        claimed = _rows(rows)
        return Run.model_validate(claimed[0]) if claimed else None

    def claim_runs(self, worker_id: str, lease_seconds: int, max_runs: int) -> list[Run]:
        """Claims up to `max_runs` runs in one call (claim_learning_runs), each as `claim_run`
        claims one, in claim order; fewer when fewer are due, or after a run the batched read
        leaves to the one-run path (a rebuild, a large batch: it comes last), or once the
        batches claimed hold 50,000 events. Raises StoreError (22023) for a bad `max_runs`."""
        rows = self._rpc(
            "claim_learning_runs",
            {"p_worker_id": worker_id, "p_lease_seconds": lease_seconds, "p_max_runs": max_runs},
        )
        return [Run.model_validate(r) for r in _rows(rows)]

    def read_runs(self, runs: Sequence[Run]) -> list[RunRead]:
        """The batches and production watches of claimed runs in one call (read_learning_runs;
        one per BATCH_BODY_BYTES of runs), one `RunRead` per run in the same order. The runs of
        a request that failed as a whole (after the store's tries) are left unread (`RunRead()`:
        the one-run path reads them). Raises TypeError for an answer of another shape."""
        items: list[JSON] = [{"run_id": str(r.id), "lease_token": _token(r)} for r in runs]
        answer: list[JSON] = []
        for chunk in _chunks(items):
            try:
                answer.extend(_rows(self._rpc("read_learning_runs", {"p_runs": chunk})))
            except StoreError as exc:  # this request's runs are read one by one instead
                logger.warning("a batched read failed", extra={"error": str(exc)})
                answer.extend(
                    {"run_id": cast(dict[str, JSON], item)["run_id"], "batch": None}
                    for item in chunk
                )
        if len(answer) != len(runs):
            raise TypeError(f"read_learning_runs answered {len(answer)} runs of {len(runs)}")
        reads: list[RunRead] = []
        for run, item in zip(runs, answer, strict=True):
            if not isinstance(item, dict) or item.get("run_id") != str(run.id):
                raise TypeError(f"read_learning_runs: unexpected element {item!r:.200}")
            error = item.get("error")
            if isinstance(error, dict):
                reads.append(RunRead(error=_run_error(error)))
                continue
            doc = item.get("batch")
            if not isinstance(doc, dict):
                reads.append(RunRead())
                continue
            batch = _batch(doc)
            watch = item.get("watch")
            reads.append(
                RunRead(
                    batch=batch,
                    watch=_watch(watch)
                    if isinstance(batch, RunBatch) and isinstance(watch, dict)
                    else None,
                )
            )
        return reads

    def complete_runs(
        self, completions: Sequence[tuple[Run, RunDecision]]
    ) -> list[Run | StoreError]:
        """Completes several runs in one call (complete_learning_runs), each exactly as
        `complete_run` completes one and in a transaction of its own: per run, in the same
        order, its row afterwards or the error its completion raised (StaleLeaseError,
        BatchChangedError, StoreError), which left that run as it was. The runs go in requests
        of at most BATCH_BODY_BYTES; a request that failed as a whole (after the store's tries,
        or refused whatever its code) gives each of its runs that error as a
        TransientStoreError (its attempt fails, the run waits for another), and the other
        requests' runs stand. Raises TypeError for an answer of another shape."""
        items: list[JSON] = [
            {
                "run_id": str(run.id),
                "lease_token": _token(run),
                "result": cast(dict[str, JSON], completion_payload(decision)),
            }
            for run, decision in completions
        ]
        answer: list[JSON | StoreError] = []
        for chunk in _chunks(items):
            try:
                answer.extend(
                    _rows(self._rpc("complete_learning_runs", {"p_completions": chunk}))
                )
            except StoreError as exc:  # this request's runs only: the others stand
                # Refused as a whole (an outage, a statement timeout, a gateway's 413): not any
                # run's fault, so each run's attempt fails and the run waits for another.
                failed = exc if isinstance(exc, TransientStoreError) else TransientStoreError(
                    str(exc), exc.code)
                answer.extend([failed] * len(chunk))
        if len(answer) != len(completions):
            raise TypeError(
                f"complete_learning_runs answered {len(answer)} runs of {len(completions)}"
            )
        done: list[Run | StoreError] = []
        for (run, _), item in zip(completions, answer, strict=True):
            if isinstance(item, StoreError):
                done.append(item)
                continue
            if not isinstance(item, dict) or item.get("run_id") != str(run.id):
                raise TypeError(f"complete_learning_runs: unexpected element {item!r:.200}")
            error = item.get("error")
            done.append(
                _run_error(error) if isinstance(error, dict) else Run.model_validate(item["run"])
            )
        return done

    def extend_lease(self, run: Run, lease_seconds: int) -> None:
        """Renews the run's lease for `lease_seconds` from now."""
        self._rpc(
            "extend_learning_run_lease",
            {
                "p_run_id": str(run.id),
                "p_lease_token": _token(run),
                "p_lease_seconds": lease_seconds,
            },
        )

    def claim_events(self, run: Run) -> RunBatch | RebuildProgress:
        """The run's batch, aggregated: fixed by the run's first claim, the same on every
        later attempt. While the twin's modules are being rebuilt, one bounded step of that
        rebuild per call: its progress, until the call that takes the last step."""
        doc = self._rpc(
            "claim_learning_run_events", {"p_run_id": str(run.id), "p_lease_token": _token(run)}
        )
        return _batch(doc)

    def claim_watch(self, run: Run) -> WatchEvidence | None:
        """The production watch's evidence for the run (claim_production_watch): None when the
        twin has no spec being watched or its watch_mode is off."""
        doc = self._rpc(
            "claim_production_watch", {"p_run_id": str(run.id), "p_lease_token": _token(run)}
        )
        if not isinstance(doc, dict):
            raise TypeError(f"expected a JSON object, got {type(doc).__name__}")
        return _watch(doc)

    def complete_run(self, run: Run, decision: RunDecision) -> Run:
        """Writes the run's decision in one transaction: module updates and their history, the
        batch marked processed, the figures, and the publish if decided; returns the run's row.
        The one place a decision becomes complete_learning_run's payload."""
        row = self._rpc(
            "complete_learning_run",
            {
                "p_run_id": str(run.id),
                "p_lease_token": _token(run),
                "p_result": completion_payload(decision),
            },
        )
        return Run.model_validate(row)

    def fail_run(self, run: Run, error: str, *, retryable: bool) -> Run:
        """Records a failed attempt: a retryable error releases the run for another attempt
        while attempts remain; otherwise the run fails and its events wait for the next run."""
        row = self._rpc(
            "fail_learning_run",
            {
                "p_run_id": str(run.id),
                "p_lease_token": _token(run),
                "p_error": error,
                "p_retryable": retryable,
            },
        )
        return Run.model_validate(row)

    def release_run(self, run: Run) -> Run:
        """Gives the run back to the queue without counting an attempt against it."""
        row = self._rpc(
            "release_learning_run", {"p_run_id": str(run.id), "p_lease_token": _token(run)}
        )
        return Run.model_validate(row)

    def get_run(self, run_id: UUID) -> Run | None:
        """The run's row, or None if there is no such run."""
        rows = self._call(
            "get run",
            lambda: (
                self._client.table("persona_feedback_learning_runs")
                .select(RUN_COLUMNS)
                .eq("id", str(run_id))
                .execute()
                .data
            ),
        )
        return Run.model_validate(rows[0]) if rows else None

    def list_runs(self, twin_id: UUID, limit: int = 20) -> list[Run]:
        """The twin's `limit` most recent runs, newest first."""
        rows = self._call(
            "list runs",
            lambda: (
                self._client.table("persona_feedback_learning_runs")
                .select(RUN_COLUMNS)
                .eq("twin_id", str(twin_id))
                .order("created_at", desc=True)
                .limit(limit)
                .execute()
                .data
            ),
        )
        return [Run.model_validate(r) for r in rows]

    # Owner views (read-only; pfl report and pfl runs) -------------------------------------

    def _select_all(
        self,
        what: str,
        relation: str,
        model: type[_Model],
        filters: Sequence[tuple[str, str, str]],
        order: Sequence[tuple[str, bool]] = (),
        limit: int | None = None,
    ) -> list[_Model]:
        """Every row of `relation` matching `filters` ((column, operator, value) in PostgREST's
        terms: eq, in, ...) in `order` ((column, descending)), up to `limit`, paged by
        PAGE_ROWS; each validated as `model`."""
        rows: list[_Model] = []
        while limit is None or len(rows) < limit:
            start = len(rows)
            end = start + PAGE_ROWS - 1 if limit is None else min(start + PAGE_ROWS, limit) - 1

            def page(start: int = start, end: int = end) -> JSON:
                query = self._client.table(relation).select("*")
                for column, operator, value in filters:
                    query = query.filter(column, operator, value)
                for column, desc in order:
                    query = query.order(column, desc=desc)
                return query.range(start, end).execute().data

            got = _rows(self._call(what, page))
            rows.extend(model.model_validate(r) for r in got)
            if len(got) < end - start + 1:
                break
        return rows

    def twin_overview(self, twin_id: UUID) -> TwinOverview | None:
        """The twin at a glance (persona_twin_overview), or None when there is no such twin."""
        rows = self._select_all(
            "twin overview", "persona_twin_overview", TwinOverview,
            [("twin_id", "eq", str(twin_id))],
        )
        return rows[0] if rows else None

    def module_trend(self, twin_id: UUID) -> list[TrendPoint]:
        """Every recorded change of the twin's modules (persona_module_trend), oldest first."""
        return self._select_all(
            "module trend", "persona_module_trend", TrendPoint,
            [("twin_id", "eq", str(twin_id))],
            order=[("measured_at", False), ("module_key", False)],
        )

    def run_changes(self, run_ids: Sequence[UUID]) -> list[TrendPoint]:
        """The module changes the given runs made (persona_module_trend), by run and module."""
        if not run_ids:
            return []
        return self._select_all(
            "run changes", "persona_module_trend", TrendPoint,
            [("run_id", "in", f"({','.join(str(r) for r in run_ids)})")],
            order=[("measured_at", False), ("module_key", False)],
        )

    def module_feedback(self, twin_id: UUID) -> list[ModuleFeedback]:
        """Each module's votes and approval over 7 and 30 days (persona_module_feedback)."""
        return self._select_all(
            "module feedback", "persona_module_feedback", ModuleFeedback,
            [("twin_id", "eq", str(twin_id))], order=[("module_key", False)],
        )

    def feedback_reasons(self, twin_id: UUID) -> list[ReasonCount]:
        """Votes per module and reason over 7 and 30 days (persona_module_feedback_reasons)."""
        return self._select_all(
            "feedback reasons", "persona_module_feedback_reasons", ReasonCount,
            [("twin_id", "eq", str(twin_id))], order=[("module_key", False)],
        )

    def run_evidence(self, run_ids: Sequence[UUID]) -> list[RunEvidence]:
        """What the given runs learned from, per module, source, reason and outcome
        (persona_run_evidence)."""
        if not run_ids:
            return []
        return self._select_all(
            "run evidence", "persona_run_evidence", RunEvidence,
            [("run_id", "in", f"({','.join(str(r) for r in run_ids)})")],
        )

    def spec_versions(self, twin_id: UUID) -> list[SpecVersion]:
        """The twin's persona specs, oldest version first (without their documents)."""
        return self._select_all(
            "spec versions", "persona_specs", SpecVersion,
            [("twin_id", "eq", str(twin_id))], order=[("version", False)],
        )

    def learning_settings(self, twin_id: UUID) -> LearningSettings:
        """The twin's learning settings (thresholds the explanations name). Raises StoreError
        (code P0002) when the twin has none."""
        rows = self._select_all(
            "learning settings", "persona_learning_settings", LearningSettings,
            [("twin_id", "eq", str(twin_id))],
        )
        if not rows:
            raise StoreError(f"twin {twin_id} has no learning settings", "P0002")
        return rows[0]

    # Langfuse outbox ---------------------------------------------------------------------

    def claim_outbox(self, limit: int, visibility_seconds: int) -> list[OutboxRow]:
        """Claims up to `limit` due feedback rows, hidden from other workers for
        `visibility_seconds`, oldest first."""
        rows = self._rpc(
            "claim_langfuse_outbox",
            {"p_limit": limit, "p_visibility_seconds": visibility_seconds},
        )
        return [OutboxRow.model_validate(r) for r in _rows(rows)]

    def record_deliveries(self, deliveries: list[DeliveryRecord], max_attempts: int) -> int:
        """Records delivery outcomes of claimed rows (a retry waits with backoff, or the server's
        Retry-After if longer; a wait likewise, without counting an attempt; a row fails after
        `max_attempts`); returns how many rows it updated."""
        return _count(
            self._rpc(
                "record_langfuse_deliveries",
                {"p_deliveries": deliveries, "p_max_attempts": max_attempts},
            )
        )

    def claim_check(self, visibility_seconds: int) -> CheckTurn:
        """Whether the start-up check may go out now (`CheckTurn`); a probe's turn lasts
        `visibility_seconds` unless `record_check` records its answer first. Raises TypeError
        for an answer of another shape."""
        doc = self._rpc("claim_langfuse_check", {"p_visibility_seconds": visibility_seconds})
        try:
            return CheckTurn.model_validate(doc)
        except ValidationError as exc:
            raise TypeError(f"unexpected check turn {doc!r:.200}: {exc}") from exc

    def record_check(
        self, outcome: str, error: str | None = None, retry_after_seconds: float | None = None
    ) -> float:
        """Records the start-up check's answer for the mirror's hold: "wait" sets the hold (as a
        send's wait does: `retry_after_seconds` the server's delay, else the bare backoff),
        "passed" ends a hold that has passed, "failed" frees a probe for another worker. Returns
        the seconds until the hold ends (0: none)."""
        data = self._rpc(
            "record_langfuse_check",
            {"p_outcome": outcome, "p_error": error,
             "p_retry_after_seconds": retry_after_seconds},
        )
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise TypeError(f"expected a number of seconds, got {type(data).__name__}")
        return float(data)

    def skip_outbox(self, limit: int) -> int:
        """Marks up to `limit` due rows skipped (Langfuse not configured); returns how many."""
        return _count(self._rpc("skip_langfuse_outbox", {"p_limit": limit}))

    def outbox_backlog(self) -> OutboxBacklog:
        """The outbox's backlog and the mirror's hold (`OutboxBacklog`). Raises TypeError for
        an answer of another shape."""
        doc = self._rpc("langfuse_outbox_backlog", {})
        if not isinstance(doc, dict):
            raise TypeError(f"expected a JSON object, got {type(doc).__name__}")
        try:
            return OutboxBacklog.model_validate(doc)
        except ValidationError as exc:
            raise TypeError(f"unexpected outbox backlog {doc!r:.200}: {exc}") from exc

    def requeue_outbox(self, status: str, chunk: int = 10_000) -> int:
        """Puts rows of `status` ("skipped" or "failed") back to pending, `chunk` (1-10,000) per
        call so that each call stays well inside the API's statement timeout, until none is
        left; returns how many. Each call is its own transaction: a failure leaves the rows of
        the calls before it requeued."""
        total = 0
        while True:
            moved = _count(
                self._rpc("requeue_langfuse_outbox", {"p_status": status, "p_limit": chunk})
            )
            total += moved
            if moved == 0:
                return total


def _rows(data: JSON) -> Sequence[JSON]:
    """The rows a `setof` function answered with (a JSON array). Raises TypeError otherwise."""
    if data is None:
        return ()
    if isinstance(data, str) or not isinstance(data, Sequence):
        raise TypeError(f"expected a JSON array of rows, got {type(data).__name__}")
    return data


def _chunks(items: list[JSON]) -> Iterator[list[JSON]]:
    """`items` in order, cut into runs of consecutive items whose JSON takes at most
    BATCH_BODY_BYTES in all (an item larger than that alone)."""
    chunk: list[JSON] = []
    size = 0
    for item in items:
        length = len(json.dumps(item, separators=(",", ":"), ensure_ascii=False)) + 1
        if chunk and size + length > BATCH_BODY_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += length
    if chunk:
        yield chunk


def _batch(doc: JSON) -> RunBatch | RebuildProgress:
    """claim_learning_run_events' answer (also each run's batch in read_learning_runs'): the
    batch, or the progress of a rebuild step."""
    if isinstance(doc, dict) and doc.get("rebuild_pending"):
        return RebuildProgress.model_validate(doc)
    return RunBatch.model_validate(doc)


def _watch(doc: dict[str, JSON]) -> WatchEvidence | None:
    """claim_production_watch's answer (also each run's watch in read_learning_runs'): the
    evidence, or None when no spec is watched."""
    found = doc.get("watch")
    return None if found is None else WatchEvidence.model_validate(found)


def _run_error(error: dict[str, JSON]) -> StoreError:
    """One run's error in a batched call's answer ({code, message}) as the store's error."""
    code = error.get("code")
    return error_for(code if isinstance(code, str) else None, str(error.get("message")))


def _count(data: JSON) -> int:
    """The integer a counting function answered with. Raises TypeError otherwise."""
    if isinstance(data, bool) or not isinstance(data, int):
        raise TypeError(f"expected an integer, got {type(data).__name__}")
    return data


def _opt(value: UUID | None) -> str | None:
    return None if value is None else str(value)


def _token(run: Run) -> str:
    if run.lease_token is None:
        raise ValueError(f"run {run.id} is not held by this worker (no lease token)")
    return str(run.lease_token)
