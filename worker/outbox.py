"""Drains the Langfuse outbox: claim due feedback rows, send them as scores, record outcomes.

Score mapping (what a Langfuse user sees on the trace): name `user_feedback`, data type NUMERIC,
value -1 / 0 / +1 (the vote), comment = the user's comment, metadata = reason, intent label,
module key, twin id, event id and the app's own metadata. The score id is derived from (twin,
trace, user) and the timestamp is the first vote's time, so a changed vote updates the same score.
Persona audits are not mirrored: the audit pipeline writes them and owns their reporting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from worker.langfuse_check import (
    HEALTH_PATH,
    LangfuseConfigError,
    LangfuseUnavailable,
    LangfuseWait,
    check,
    generation,
)
from worker.langfuse_response import INGESTION_PATH, Outcome
from worker.langfuse_sender import Delivery, LangfuseSender, ScoreItem, score_id_for
from worker.store import DeliveryRecord, OutboxRow, Store

logger = logging.getLogger(__name__)

SCORE_NAME = "user_feedback"
NOT_CONFIGURED = "stored locally; Langfuse logging unavailable"
DEFAULT_VISIBILITY_SECONDS = 120
RECHECK_SECONDS = 300.0
"""A check that failed (keys refused, a host name that did not resolve or whose TLS failed, a
server too old, a proxy in the way, at the check or on a send) is repeated this often by
`serve`; `pfl outbox drain` checks once."""
CHECK_MARGIN_SECONDS = 10
"""Beyond its two requests' timeouts, how long a start-up check that is the hold's probe may
take (its store calls) before another worker may probe: `check_window`."""
UNSENT = (Outcome.off, Outcome.unreachable)
"""Outcomes of rows that are left as they were (not recorded): the mirror, not the row, failed."""


def score_item(row: OutboxRow) -> ScoreItem:
    """The Langfuse score of one claimed feedback row (the mapping above); `event_id` keys its
    delivery. Raises ValidationError for a row Langfuse cannot take
    (e.g. metadata that is not plain JSON)."""
    return ScoreItem(
        event_id=row.event_id,
        score_id=score_id_for(row.twin_id, row.trace_id, row.created_by),
        trace_id=row.trace_id,
        name=SCORE_NAME,
        value=float(row.score),
        comment=row.comment,
        metadata={
            **row.metadata,
            "reason": row.reason,
            "intent_label": row.intent_label,
            "module_key": row.module_key,
            "twin_id": str(row.twin_id),
            "event_id": row.event_id,
        },
        timestamp=row.score_timestamp,
    )


class OutboxDrainer:
    """Moves due feedback rows from the outbox to Langfuse, one batch per pass.

    One pass claims at most `batch_size` rows; `sender` None means Langfuse is not configured
    (rows are marked skipped), unless `config_error` says why the configuration cannot work: then
    nothing is claimed or changed (rows stay pending) and the reason is logged once. Before its
    first send the drainer checks the server (`ready`), through the mirror's hold: no check
    while it holds, and after it one worker's check (or claim) at a time is its probe (a
    check's for `check_window`, a claim's for `visibility_seconds`). Keys or
    requests refused, a host name that does not exist or TLS that cannot work, at that check or
    by a send later (a key pair rotated, a name removed mid-run), turn the mirror off the same
    way: one error line, the
    batch's rows left as they were (no attempt spent; due again once `visibility_seconds` have
    passed), and the check repeated every `recheck_seconds` (None: never, a one-shot drain), as
    is any other check that failed (a server too old, a proxy in the way). A send that cannot
    connect (refused, connect timeout, a resolver's temporary failure, a TLS handshake cut short)
    leaves its rows so too, and the check runs again next pass, as when Langfuse is down at
    start (one warning line per outage); if that claim was the hold's probe, the probe is
    freed (`record_langfuse_check('failed')`). A claimed row that cannot be a score (`score_item`
    refuses it: metadata read as Infinity) is recorded failed on its own, with the reason; the
    rest of its batch is sent. When Langfuse asks to wait
    (429, usage suspension, no route), the database holds every worker's claims until the wait
    is over (`record_langfuse_deliveries`, or `record_langfuse_check` for an answer to the
    check): a held pass claims nothing and sends nothing, and one
    line says so when the hold starts. A score fails for good after `max_attempts` deliveries;
    claimed rows stay hidden from other workers for `visibility_seconds`. The store's errors
    propagate.
    """

    def __init__(
        self,
        store: Store,
        sender: LangfuseSender | None,
        batch_size: int,
        max_attempts: int,
        visibility_seconds: int = DEFAULT_VISIBILITY_SECONDS,
        *,
        config_error: str | None = None,
        recheck_seconds: float | None = RECHECK_SECONDS,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.sender = sender
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        # Claimed rows stay hidden from other workers this long: a worker that dies mid-send
        # leaves them (and newer votes of the same feedback) waiting until it ends.
        self.visibility_seconds = visibility_seconds
        self.config_error = config_error
        self.recheck_seconds = recheck_seconds
        # `serve` stopping: a pass claims nothing more and starts no further request.
        self.stopping = stopping
        self._recheck_at: float | None = None  # time.monotonic() to check again
        self._reported = False  # the config_error was logged
        self._unreachable = False  # "not reachable" was logged, and no check has passed since
        self._holding = False  # the last answer recorded was a wait

    @property
    def holding(self) -> bool:
        """Whether the last answer this drainer recorded asked it to wait (a hold is in force,
        or its end has come and the next pass probes)."""
        return self._holding

    def ready(self) -> bool:
        """Whether a pass may claim rows. The sender's server is checked until a check passes;
        the check goes through the mirror's hold as a claim does (`claim_langfuse_check`): none
        while a hold is in force, and once it has passed only one worker's check, or claim, is
        its probe (False, nothing sent, for the others). A host, key pair or version that cannot
        work becomes the `config_error` (logged once, as an error; False until the check,
        repeated every `recheck_seconds`, passes); a wait answered to the check (429, usage
        suspension, a gateway's 5xx) or Langfuse's 500 sets the hold as a send's does; a server
        that cannot be asked now (down, hanging, another 5xx, a resolver's temporary failure,
        an answer that cannot be read) makes this pass a no-op,
        rows untouched (False), and is checked again next pass."""
        sender = self.sender
        if self._recheck_at is not None and time.monotonic() >= self._recheck_at:
            self.config_error, self._recheck_at = None, None
        if self.config_error is None and sender is not None and not sender.checked:
            turn = self.store.claim_check(check_window(sender.timeout_seconds))
            if turn.turn == "held":  # not even the check goes out before the hold ends
                if turn.hold_seconds > 0 and not self._holding:
                    self._say_hold(turn.hold_seconds, turn.hold_reason)
                elif turn.hold_seconds == 0:
                    logger.info(
                        "Langfuse's wait is over and another worker's request is its probe; "
                        "this pass sends nothing until its answer is recorded"
                    )
                return False
            probe = turn.turn == "probe"
            try:
                version = check(sender)
            except LangfuseConfigError as exc:
                self._probe_failed(probe)
                self._turn_off(str(exc))
            except LangfuseWait as exc:  # a 429, a suspension, a gateway's 5xx, a 500
                self._hold_for(exc.verdict.error, exc.verdict.retry_after_seconds)
                return False
            except LangfuseUnavailable as exc:
                self._probe_failed(probe)
                self._say_unreachable(str(exc))
                return False
            except BaseException:
                self._probe_failed(probe)
                raise
            else:
                if probe:  # the hold's probe was answered: every worker may send again
                    self.store.record_check("passed")
                self._reported = self._unreachable = False
                logger.info(
                    "Langfuse mirror ready",
                    extra={
                        "host": sender.host,
                        "version": ".".join(map(str, version)) if version else "unknown",
                        "generation": generation(version),
                        "environment": sender.environment,
                    },
                )
                if version is None:
                    logger.warning(
                        "Langfuse's version is unknown: %s%s is not served (a proxy in front of "
                        "Langfuse?), though its ingestion route is; scores need Langfuse 3.49 "
                        "or later, which cannot be checked",
                        sender.host,
                        HEALTH_PATH,
                    )
        if self.config_error is not None:
            self._say_off()
            return False
        return True

    def _probe_failed(self, probe: bool) -> None:
        """A check that was the hold's probe met neither a pass nor a wait: another worker
        may probe now (not after the probe's visibility)."""
        if probe:
            self.store.record_check("failed")

    def _say_off(self) -> None:
        """Logs the `config_error` as one error line, once until a check passes again."""
        if self._reported:
            return
        self._reported = True
        if self._recheck_at is not None:
            until = f"checked again every {self.recheck_seconds:g} s"
        elif self.recheck_seconds is None:  # `pfl outbox drain`: one pass, no second check
            until = "not sent by this drain"
        else:
            until = "until the worker restarts with a working configuration"
        logger.error(
            "Langfuse mirror off: %s; feedback stays pending, %s", self.config_error, until
        )

    def _say_unreachable(self, why: str) -> None:
        """Logs that Langfuse cannot be reached (`why`), once until a check passes again."""
        if not self._unreachable:
            self._unreachable = True
            logger.warning(
                "Langfuse not reachable (%s); outbox rows wait, no attempt spent, checked again "
                "each pass",
                why,
            )

    def _hold_for(self, error: str | None, retry_after_seconds: float | None) -> None:
        """Sets the database's hold for a wait met by the start-up check, no row in hand
        (`record_langfuse_check`: the same rules as a send's wait), then says so."""
        self.store.record_check("wait", error, retry_after_seconds)
        backlog = self.store.outbox_backlog()
        self._say_hold(backlog.hold_seconds, backlog.hold_reason)

    def _say_hold(self, seconds: float, reason: str | None, *, attempt: bool = False) -> None:
        """Logs the mirror's hold (`seconds` left, set by the answer `reason`): a warning when
        one starts, then a line at info level for each hold in a row (each probe that met
        another wait); `attempt`: the answer that set it spent an attempt of its rows (a
        top-level 500)."""
        until = datetime.now(UTC) + timedelta(seconds=seconds)
        log = logger.info if self._holding else logger.warning
        self._holding = True
        log(
            "Langfuse asked to wait (%s): no request to it before %s (%.0f s), from any worker; "
            "outbox rows wait, %s",
            reason or "a hold set by another worker",
            until.isoformat(timespec="seconds"),
            seconds,
            "one attempt spent for this answer" if attempt else "no attempt spent",
        )

    def _turn_off(self, error: str) -> None:
        """The mirror is off for `error` (what a check or a send met); the start-up check is
        repeated after `recheck_seconds` (never for None: a one-shot drain)."""
        self.config_error = error
        if self.sender is not None:
            self.sender.checked = False
        if self.recheck_seconds is not None:
            self._recheck_at = time.monotonic() + self.recheck_seconds

    def drain_once(self) -> int:
        """Handles one batch of due rows; returns how many rows it recorded (0, rows untouched,
        when the configuration cannot work, the server cannot be checked or reached, the keys
        were refused, or Langfuse's wait holds the outbox)."""
        if self.stopping() or not self.ready():
            return 0
        if self.sender is None:
            skipped = self.store.skip_outbox(self.batch_size)
            if skipped:
                logger.info("outbox rows skipped", extra={"rows": skipped, "why": NOT_CONFIGURED})
            return skipped
        rows = self.store.claim_outbox(self.batch_size, self.visibility_seconds)
        if not rows:
            return 0
        sender = self.sender
        items, refused = [], []
        for row in rows:  # a row Langfuse cannot take fails alone; the batch goes out
            try:
                items.append(score_item(row))
            except ValueError as exc:  # pydantic's ValidationError is one
                refused.append(Delivery(row.event_id, Outcome.failed, unsendable(exc), unsent=True))
        sent = sender.send(items, self.stopping) if items else []
        # Not sent as the worker stops: left as they were, due again after the claim window;
        # if this claim was the hold's probe, another worker may probe (a no-op otherwise).
        deliveries = [*(d for d in sent if d.outcome != Outcome.later), *refused]
        if len(deliveries) < len(sent) + len(refused):
            self.store.record_check("failed")
        unsent = next((d for d in deliveries if d.outcome in UNSENT), None)
        deliveries = [d for d in deliveries if d.outcome not in UNSENT]
        if deliveries:
            self.store.record_deliveries([_as_record(d) for d in deliveries], self.max_attempts)
        # Keys rotated or DNS gone mid-run (off), or Langfuse down (unreachable): as at start,
        # its rows stay as they were (no attempt spent), not failed one batch after another.
        if unsent is not None:
            # Langfuse was not reached: if this claim was the hold's probe, nothing answered
            # it, so free the probe for the next pass of any worker (this one's included) rather
            # than hold every worker for the visibility. A no-op when no hold has passed (none,
            # or one just set by an answer recorded above).
            self.store.record_check("failed")
        if unsent is not None and unsent.outcome == Outcome.off:
            self._turn_off(f"{sender.setting}={sender.host}: {unsent.error}")
            self._say_off()
        elif unsent is not None:
            sender.checked = False  # checked again next pass
            self._say_unreachable(f"{sender.host}{INGESTION_PATH}: {unsent.error}")
        if not deliveries:
            return 0
        counts: dict[str, int] = {}
        for d in deliveries:
            counts[d.outcome.value] = counts.get(d.outcome.value, 0) + 1
        if Outcome.wait in counts or any(d.hold for d in deliveries):
            attempt = any(d.hold for d in deliveries)
            backlog = self.store.outbox_backlog()  # the database's hold
            self._say_hold(backlog.hold_seconds, backlog.hold_reason, attempt=attempt)
        elif self._holding:
            self._holding = False
            logger.info("Langfuse takes scores again after its wait")
        if set(counts) != {Outcome.wait}:
            errors = sorted({d.error for d in deliveries if d.error})
            log = logger.warning if errors else logger.info
            log("outbox batch delivered", extra={**counts, "errors": errors[:3]})
        return len(deliveries)

    def drain(self) -> int:
        """Drains until nothing is due (rows waiting for a retry stay for a later pass), or a
        pass met a hold (Langfuse asked to wait, or is down: the next pass is a later one's)."""
        total = 0
        while (handled := self.drain_once()) > 0:
            total += handled
            if self._holding:
                break
        return total


def check_window(timeout_seconds: float) -> int:
    """Seconds a start-up check that is the hold's probe keeps the probe: its two requests (a
    health read, an empty batch), each bounded by the Langfuse timeout in all (from its start,
    once its host name is resolved: `worker.langfuse_http.Deadline`), and
    `CHECK_MARGIN_SECONDS`; not the outbox's visibility, so a worker killed mid-check holds the
    others only that long. 1 to 3600, as `claim_langfuse_check` takes it."""
    return max(1, min(3600, math.ceil(2 * timeout_seconds) + CHECK_MARGIN_SECONDS))


def unsendable(exc: ValueError) -> str:
    """Why a claimed row cannot become a Langfuse score (`score_item`'s error), as stored on
    the row: the first validation error, e.g. metadata with a number JSON readers take for
    Infinity (a row stored before the database refused such numbers)."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "row"
        why = f"{where}: {first.get('msg', 'invalid')}"
    else:
        why = str(exc) or type(exc).__name__
    text = " ".join(why.split())
    return f"not sent: Langfuse cannot take this row ({text})"[:300]


def _as_record(d: Delivery) -> DeliveryRecord:
    """A delivery as record_langfuse_deliveries reads it."""
    return {
        "event_id": d.event_id,
        "outcome": d.outcome.value,
        "error": d.error,
        "retry_after_seconds": d.retry_after_seconds,
        "hold": d.hold,
        "unsent": d.unsent,
    }
