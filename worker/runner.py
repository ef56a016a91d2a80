"""Executes learning runs: claim -> learn (pure) -> gate (pure) -> complete, one RPC each step.

`decide` is the pure middle: it turns a claimed batch into the run's `RunDecision`, which the
store writes with one RPC.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Literal
from uuid import UUID

from worker.gate import evaluate_gate
from worker.learning import learn
from worker.models import (
    GateInput,
    HoldReason,
    PublishDecision,
    RunDecision,
    WatchAction,
    WatchEvidence,
)
from worker.store import (
    BatchChangedError,
    Run,
    RunBatch,
    RunRead,
    StaleLeaseError,
    Store,
    StoreError,
    TransientStoreError,
)
from worker.watch import decide_watch

logger = logging.getLogger(__name__)

# How often one attempt reads its batch again when the completion finds that the evidence changed
# under it (a deletion or a module edit committed mid-run) before the attempt counts as failed.
READS_PER_ATTEMPT = 3
# The most runs one batched call may claim, read or complete (the database's bound).
MAX_CLAIM_RUNS = 100
# A rebuild started over this many times in one read (deletions or module edits between its
# calls) gives the attempt up: the run's attempts bound the work, as they bound re-reads.
REBUILD_RESTARTS_PER_READ = 3


def decide(
    batch: RunBatch, *, safe_mode: bool, watch: WatchEvidence | None = None
) -> RunDecision:
    """The pure part of a run: learn from the batch, gate the draft, look at the production
    watch, and decide.

    Takes the batch `claim_learning_run_events` aggregated, whether the run is in safe mode
    (never publishes) and the watch's evidence (`claim_production_watch`; None when no spec is
    watched); returns the run's decision for `Store.complete_run`. The gate report carries the
    watch's look (`watch`), its final test when the run publishes the next spec; a regression
    with watch_mode auto rolls the spec back, and the run then publishes nothing (held,
    rolled_back). Raises ValueError when the batch's evidence
    names a module the batch does not list.
    """
    evidence = {e.module_id: e for e in batch.evidence}
    updates = learn(batch.modules, evidence, batch.learning_time, batch.settings)
    report = evaluate_gate(
        GateInput(
            draft_spec_id=batch.draft_spec_id,
            baseline_spec_id=batch.baseline_spec_id,
            draft_modules=batch.draft_modules,
            module_status={u.module_key: u.status for u in updates},
            audits=batch.audits,
            safe_mode=safe_mode,
        ),
        batch.settings,
    )
    if watch is not None:
        # A run that publishes the next spec ends the watch: its final test comes first, and a
        # regression it finds (auto) rolls back and holds the draft instead.
        looked = decide_watch(
            watch, superseding=report.publish_decision is PublishDecision.published)
        if looked.action is WatchAction.roll_back:
            report = report.model_copy(
                update={
                    "publish_decision": PublishDecision.held,
                    "hold_reason": HoldReason.rolled_back,
                    "watch": looked,
                }
            )
        else:
            report = report.model_copy(update={"watch": looked})
    publish = report.publish_decision is PublishDecision.published
    return RunDecision(
        events_scanned=batch.events_scanned,
        events_processed=batch.events_scanned,
        events_unmatched=batch.events_unmatched,
        modules_updated=sum(u.changed for u in updates),
        module_updates=updates,
        gate_passed=report.passed,
        gate_report=report,
        publish_decision=report.publish_decision,
        publish_spec_id=report.draft_spec_id if publish else None,
        hold_reason=report.hold_reason,
        watch=report.watch,
    )


Outcome = Literal["completed", "failed", "retried", "lease_lost"]
"""How one attempt at a run ended: the run completed; it failed for good (no attempt left or a
refusal by the database); the attempt failed and the run waits for another; or the lease was
lost and another worker has the run."""

OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "retried", "lease_lost")

RunObserver = Callable[[Outcome, Run, float], None]
"""Told of every attempt a Runner made: its outcome, the run's row afterwards and the attempt's
wall-clock seconds from claim to end (the metrics of `serve`)."""


class Runner:
    """Claims and executes runs for one worker identity.

    `worker_id` names the worker on the runs it holds; `lease_seconds` is how long a claimed run
    stays ours (renewed once a run has taken half of it); `observer`, if given, is told of each
    attempt's end; `queue_every_seconds` is how long `step` goes on claiming from the queue
    before it queues what fell due meanwhile; `claim_runs` is how many runs `step` and
    `run_once` claim per call (1: one run at a time, `claim_learning_run`; more: the batched
    path, `process_many`).
    """

    def __init__(
        self,
        store: Store,
        worker_id: str,
        lease_seconds: int,
        observer: RunObserver | None = None,
        queue_every_seconds: float = 1.0,
        claim_runs: int = 1,
    ) -> None:
        if not 1 <= claim_runs <= MAX_CLAIM_RUNS:
            raise ValueError(f"claim_runs must be 1 to {MAX_CLAIM_RUNS}, got {claim_runs}")
        self.store = store
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.observer = observer
        self.queue_every_seconds = queue_every_seconds
        self.claim_runs = claim_runs
        self._queued_at = -math.inf

    def process(self, run: Run) -> Run:
        """Execute one claimed run to its end; returns the run's row afterwards.

        A failed attempt does not raise: a lost lease discards the work (another worker has the
        run), a store error or a crash is recorded on the run (retryable, except a refusal by
        the database), and the returned row says so. Raises StoreError only when, after a lost
        lease, reading the run back fails.
        """
        started = time.monotonic()
        log = _log_fields(run)
        logger.info("run claimed", extra=log)
        return self._observed(run, started, self._attempt(run, started, log))

    def _observed(self, run: Run, started: float, ended: tuple[Run, Outcome]) -> Run:
        """Tells the observer how the attempt at `run` begun at `started` ended; its row."""
        done, outcome = ended
        if self.observer is not None:
            self.observer(outcome, done, time.monotonic() - started)
        return done

    def _attempt(
        self, run: Run, started: float, log: dict[str, object], first_read: int = 1
    ) -> tuple[Run, Outcome]:
        """`process`'s work: the run's row afterwards and how the attempt ended. `first_read`
        is the number of this attempt's first read of the batch (a batched read came first)."""
        try:
            decision, done = self._learn_and_complete(run, started, log, first_read)
        except StoreError as exc:
            return self._refused(run, exc, log)
        except Exception as exc:  # a bug or bad data: record it on the run, retry up to the limit
            logger.exception("run crashed", extra=log)
            return self._fail(run, exc, retryable=True, log=log)
        return self._completed(done, decision, started, log), "completed"

    def _refused(
        self, run: Run, exc: StoreError, log: dict[str, object]
    ) -> tuple[Run, Outcome]:
        """How an attempt ends when the store refused one of its calls with `exc`: a lost
        lease discards the work; a changed batch or a transient error fails the attempt
        (retryable), any other refusal the run."""
        if isinstance(exc, StaleLeaseError):
            logger.warning(
                "run lease lost; its work was discarded", extra={**log, "error": str(exc)}
            )
            return self.store.get_run(run.id) or run, "lease_lost"
        retryable = isinstance(exc, (BatchChangedError, TransientStoreError))
        return self._fail(run, exc, retryable=retryable, log=log)

    @staticmethod
    def _completed(
        done: Run, decision: RunDecision, started: float, log: dict[str, object]
    ) -> Run:
        """Logs a completed run; its row."""
        logger.info(
            "run completed",
            extra={
                **log,
                "events_scanned": done.events_scanned,
                "events_processed": done.events_processed,
                "modules_updated": done.modules_updated,
                "gate_passed": done.gate_passed,
                "publish_decision": done.publish_decision,
                "hold_reason": decision.hold_reason,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return done

    def _learn_and_complete(
        self, run: Run, started: float, log: dict[str, object], first_read: int = 1
    ) -> tuple[RunDecision, Run]:
        """Reads the run's batch, decides and completes; returns the decision and the run's row.

        When the completion finds that the twin's evidence or modules changed since the batch
        was read (events deleted, a module edited: BatchChangedError), the batch is read and
        decided again, up to READS_PER_ATTEMPT reads in all (counting from `first_read`: the
        reads a batched call made before); the last refusal is raised, as are the store's other
        errors. `started` is the attempt's time.monotonic() (the lease's start).
        """
        renewed = started
        for read in range(first_read, READS_PER_ATTEMPT + 1):
            batch, renewed = self._read_batch(run, renewed, log)
            watch = self.store.claim_watch(run)
            decision = decide(batch, safe_mode=run.safe_mode, watch=watch)
            renewed = self._keep_lease(run, renewed)
            try:
                return decision, self.store.complete_run(run, decision)
            except BatchChangedError as exc:
                if read == READS_PER_ATTEMPT:
                    raise
                logger.info(
                    "evidence changed during the run; reading the batch again",
                    extra={**log, "read": read, "error": str(exc)},
                )
        raise AssertionError("unreachable: the last read returns or raises")

    def _read_batch(
        self, run: Run, renewed: float, log: dict[str, object]
    ) -> tuple[RunBatch, float]:
        """The run's batch, and when the lease was last renewed (`renewed` on entry; both
        time.monotonic()). A twin whose modules are rebuilt answers with one bounded step of
        the rebuild per call (each well inside the API's statement timeout); the calls go on,
        the lease kept, until the one that returns the batch. A deletion or module edit between
        two calls starts the rebuild over; after REBUILD_RESTARTS_PER_READ such restarts the
        read gives up with BatchChangedError, so that a twin whose evidence keeps changing uses
        up the run's attempts instead of holding a worker for ever."""
        steps, restarts = 0, 0
        while True:
            got = self.store.claim_events(run)
            if isinstance(got, RunBatch):
                return got, renewed
            if got.steps <= steps:
                restarts += 1
                if restarts > REBUILD_RESTARTS_PER_READ:
                    raise BatchChangedError(
                        f"run {run.id}: the twin's evidence or modules changed {restarts} times "
                        "while its modules were being rebuilt; the rebuild is left for a later "
                        "attempt",
                        "PT412",
                    )
            steps = got.steps
            logger.info(
                "rebuilding the twin's modules",
                extra={
                    **log,
                    "steps": got.steps,
                    "rebuilt_through_event_id": got.rebuilt_through_event_id,
                    "batch_last_event_id": got.batch_last_event_id,
                },
            )
            renewed = self._keep_lease(run, renewed)

    def _keep_lease(self, run: Run, renewed: float) -> float:
        """Renews the lease once half of it has passed since it was last renewed (`renewed`,
        time.monotonic()); returns when it was last renewed now."""
        if time.monotonic() - renewed > self.lease_seconds / 2:
            self.store.extend_lease(run, self.lease_seconds)
            return time.monotonic()
        return renewed

    def _fail(
        self, run: Run, exc: Exception, *, retryable: bool, log: dict[str, object]
    ) -> tuple[Run, Outcome]:
        """Records the failed attempt; the run's row afterwards and "failed" when the run ended
        so, else "retried"."""
        error = f"{type(exc).__name__}: {exc}"
        logger.warning("run attempt failed", extra={**log, "error": error, "retryable": retryable})
        try:
            failed = self.store.fail_run(run, error, retryable=retryable)
        except StoreError as fail_exc:
            # The lease will expire and another attempt (or the final failure) follows from it.
            logger.warning("could not record the failure", extra={**log, "error": str(fail_exc)})
            return run, "retried"
        if failed.status != "failed":
            return failed, "retried"
        # Why the twin is not queued again at once: the database's backoff after failed runs.
        logger.warning(
            "run failed; its twin is not scheduled again before retry_not_before",
            extra={**log, "retry_not_before": _iso(failed.retry_not_before)},
        )
        return failed, "failed"

    def process_many(self, runs: Sequence[Run]) -> list[Run]:
        """Executes claimed runs with one batched read and one batched completion; returns
        their rows afterwards, in the order given.

        Each run ends as `process` would end it: its batch and watch are read for all in one
        call (read_learning_runs), each is decided, and the decisions are completed in one
        call (complete_learning_runs), where each run's completion is its own transaction. A
        run the batched read left out (a rebuild, a large batch) or whose read is a rebuild in
        progress goes through the one-run path afterwards; a run whose completion found its
        evidence changed (BatchChangedError) reads again through the one-run path (the batched
        read was its first of READS_PER_ATTEMPT); any other refusal of one run (a lost lease, a
        refused payload) ends that run as `process` would, and the others are unaffected. The
        observer is told of each run. Raises StoreError only when, after a lost lease, reading
        a run back fails.
        """
        started = time.monotonic()
        logs = [_log_fields(run) for run in runs]
        for log in logs:
            logger.info("run claimed", extra=log)
        try:
            reads = self.store.read_runs(runs)
        except Exception:  # a bug or an answer of another shape: each run reads alone
            logger.exception("batched read failed; reading run by run")
            reads = [RunRead() for _ in runs]
        ended: dict[int, tuple[Run, Outcome]] = {}
        alone: list[int] = []
        decided: list[tuple[int, RunDecision]] = []
        for i, (run, read) in enumerate(zip(runs, reads, strict=True)):
            if read.error is not None:
                ended[i] = self._refused(run, read.error, logs[i])
            elif not isinstance(read.batch, RunBatch):
                alone.append(i)
            else:
                try:
                    decided.append(
                        (i, decide(read.batch, safe_mode=run.safe_mode, watch=read.watch))
                    )
                except Exception as exc:  # a bug or bad data, as in `process`
                    logger.exception("run crashed", extra=logs[i])
                    ended[i] = self._fail(run, exc, retryable=True, log=logs[i])
        if decided:
            self._complete_many(runs, decided, started, logs, ended)
        for i in alone:
            ended[i] = self._attempt(runs[i], started, logs[i])
        return [self._observed(run, started, ended[i]) for i, run in enumerate(runs)]

    def _complete_many(
        self,
        runs: Sequence[Run],
        decided: list[tuple[int, RunDecision]],
        started: float,
        logs: list[dict[str, object]],
        ended: dict[int, tuple[Run, Outcome]],
    ) -> None:
        """Completes the decided runs (index into `runs`, decision) in one call and records
        how each ended in `ended`."""
        if time.monotonic() - started > self.lease_seconds / 2:
            for i, _ in decided:  # as _keep_lease: a lease half gone is renewed first
                # A refusal here is the completion's to report.
                with contextlib.suppress(StoreError):
                    self.store.extend_lease(runs[i], self.lease_seconds)
        try:
            results = self.store.complete_runs([(runs[i], decision) for i, decision in decided])
        except Exception as exc:  # a bug or an answer of another shape: a crash of each run
            for i, _ in decided:
                logger.exception("batched completion crashed", extra=logs[i])
                ended[i] = self._fail(runs[i], exc, retryable=True, log=logs[i])
            return
        for (i, decision), result in zip(decided, results, strict=True):
            if isinstance(result, Run):
                ended[i] = self._completed(result, decision, started, logs[i]), "completed"
            elif isinstance(result, BatchChangedError):
                logger.info(
                    "evidence changed during the run; reading the batch again",
                    extra={**logs[i], "read": 1, "error": str(result)},
                )
                ended[i] = self._attempt(runs[i], started, logs[i], first_read=2)
            else:
                ended[i] = self._refused(runs[i], result, logs[i])

    def _claim(self) -> list[Run]:
        """Claims up to `claim_runs` runs: one call either way."""
        if self.claim_runs == 1:
            run = self.store.claim_run(self.worker_id, self.lease_seconds)
            return [] if run is None else [run]
        return self.store.claim_runs(self.worker_id, self.lease_seconds, self.claim_runs)

    def _execute(self, runs: list[Run]) -> list[Run]:
        """Executes claimed runs: one through `process`, several through `process_many`."""
        if len(runs) == 1 and self.claim_runs == 1:
            return [self.process(runs[0])]
        return self.process_many(runs)

    def run_once(
        self, twin_id: UUID | None = None, safe_mode: bool | None = None, *, request: bool = False
    ) -> list[Run]:
        """Burst mode: queue what is due, execute runs until none is left, return them.

        With `request`, an operator's run is queued for `twin_id` even without new evidence,
        in safe mode or not as `safe_mode` says (None: the twin's auto_publish setting).
        Returns the runs it executed, in order, as their rows say afterwards. It ends when a
        claim finds nothing: a twin whose run failed is not queued again before its
        retry_not_before (the database's backoff, at least 10 s), so a failing twin is not run
        over and over within one burst. Raises ValueError for `request` without a twin, and the
        store's errors when queuing or claiming fails.
        """
        if request:
            if twin_id is None:
                raise ValueError("a requested run needs a twin")
            self.store.enqueue_run(twin_id, safe_mode=safe_mode)
        finished: list[Run] = []
        while True:
            self.store.enqueue_due_runs(twin_id)
            if twin_id is None:
                runs = self._claim()
            else:  # one twin has one run at a time
                run = self.store.claim_run(self.worker_id, self.lease_seconds, twin_id)
                runs = [] if run is None else [run]
            if not runs:
                return finished
            finished.extend(
                self._execute(runs) if twin_id is None else [self.process(runs[0])]
            )

    def step(self) -> bool:
        """One poll: execute up to `claim_runs` runs if any is due; True if it did, False when
        nothing was claimed (`serve` then waits before the next poll).

        Within `queue_every_seconds` of its last queuing it claims from the queue first (each
        queuing is one more round trip, and a busy worker's queue already holds the next runs);
        it queues what is due when that claim finds nothing, or once that time has passed, so a
        twin that fell due behind a long queue waits at most that long to be queued. Raises the
        store's errors when queuing or claiming fails (`poll_until_stopped` logs them).
        """
        runs: list[Run] = []
        if time.monotonic() - self._queued_at < self.queue_every_seconds:
            runs = self._claim()
        if not runs:
            self.store.enqueue_due_runs()
            self._queued_at = time.monotonic()
            runs = self._claim()
        if not runs:
            return False
        self._execute(runs)
        return True


def _iso(value: datetime | None) -> str | None:
    """A time for a log line: ISO 8601, or None."""
    return None if value is None else value.isoformat()


def _log_fields(run: Run) -> dict[str, object]:
    """The fields every log line of a run's attempt carries."""
    return {"run_id": str(run.id), "twin_id": str(run.twin_id), "attempt": run.attempts}


def poll_until_stopped(
    name: str,
    step: Callable[[], bool],
    stop: threading.Event,
    min_wait: float,
    max_wait: float,
    on_failure: Callable[[], None] | None = None,
) -> None:
    """Calls `step` until `stop` is set; `name` names the poller in logs.

    `step` returns True when it found work. After a busy step it polls again at once; while idle
    the wait doubles from `min_wait` up to `max_wait` (seconds). A step in progress when `stop`
    is set finishes first. A step that raises counts as idle, so an outage slows polling down,
    and the poller goes on: a StoreError (the API or the database failing) is logged as a
    warning, any other exception (a bug, data the code did not expect) as an error with its
    traceback; either way `on_failure` is told (serve's metrics count it, and /healthz turns
    unhealthy once no poll has succeeded for too long). Only a BaseException that is not an
    Exception (KeyboardInterrupt, SystemExit) ends the poller.
    """
    wait = min_wait
    logger.info("poller started", extra={"poller": name})
    while not stop.is_set():
        try:
            busy = step()
        except StoreError as exc:
            logger.warning(
                "poll failed", extra={"poller": name, "error": str(exc), "code": exc.code}
            )
            busy = False
            _failed(on_failure)
        except Exception as exc:
            logger.exception(
                "poll crashed; the poller goes on",
                extra={"poller": name, "error": f"{type(exc).__name__}: {exc}"},
            )
            busy = False
            _failed(on_failure)
        if busy:
            wait = min_wait
            continue
        stop.wait(wait)
        wait = min(wait * 2, max_wait)
    logger.info("poller stopped", extra={"poller": name})


def _failed(on_failure: Callable[[], None] | None) -> None:
    """Tells `on_failure` of a failed poll; its own error is logged, never raised."""
    if on_failure is None:
        return
    try:
        on_failure()
    except Exception:
        logger.exception("could not count a failed poll")
