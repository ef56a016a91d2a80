"""Drains the Langfuse outbox: claim due feedback rows, send them as scores, record outcomes.

Score mapping (what a Langfuse user sees on the trace): name `user_feedback`, data type NUMERIC,
value -1 / 0 / +1 (the vote), comment = the user's comment, metadata = reason, intent label,
module key, twin id, event id and the app's own metadata. The score id is derived from (twin,
trace, user) and the timestamp is the first vote's time, so a changed vote updates the same score.
Persona audits are not mirrored: the audit pipeline writes them and owns their reporting.
"""

from __future__ import annotations

import logging

from worker.langfuse_check import LangfuseConfigError, LangfuseUnavailable, check, generation
from worker.langfuse_sender import Delivery, LangfuseSender, ScoreItem, score_id_for
from worker.store import DeliveryRecord, OutboxRow, Store

logger = logging.getLogger(__name__)

SCORE_NAME = "user_feedback"
NOT_CONFIGURED = "stored locally; Langfuse logging unavailable"
DEFAULT_VISIBILITY_SECONDS = 120


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
    first send the drainer checks the server (`ready`). A score fails for good after
    `max_attempts` deliveries; claimed rows stay hidden from other workers for
    `visibility_seconds`. The store's errors propagate.
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
    ) -> None:
        self.store = store
        self.sender = sender
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        # Claimed rows stay hidden from other workers this long: a worker that dies mid-send
        # leaves them (and newer votes of the same feedback) waiting until it ends.
        self.visibility_seconds = visibility_seconds
        self.config_error = config_error
        self._reported = False

    def ready(self) -> bool:
        """Whether a pass may claim rows. The sender's server is checked once (until a check
        passes): a host, key pair or version that cannot work becomes the `config_error` (logged
        once, as an error; False from then on); a server that cannot be asked now (down, hanging,
        5xx) makes this pass a no-op, rows untouched (False), and is checked again next pass."""
        sender = self.sender
        if self.config_error is None and sender is not None and sender.version is None:
            try:
                version = check(sender)
            except LangfuseConfigError as exc:
                self.config_error = str(exc)
            except LangfuseUnavailable as exc:
                logger.warning("Langfuse not reachable; outbox rows wait", extra={"why": str(exc)})
                return False
            else:
                logger.info(
                    "Langfuse mirror ready",
                    extra={
                        "host": sender.host,
                        "version": ".".join(map(str, version)),
                        "generation": generation(version),
                        "environment": sender.environment,
                    },
                )
        if self.config_error is not None:
            if not self._reported:
                self._reported = True
                logger.error(
                    "Langfuse mirror off: %s; feedback stays pending until the worker restarts "
                    "with a working configuration",
                    self.config_error,
                )
            return False
        return True

    def drain_once(self) -> int:
        """Handles one batch of due rows; returns how many rows it handled (0, rows untouched,
        when the configuration cannot work or the server cannot be checked)."""
        if not self.ready():
            return 0
        if self.sender is None:
            skipped = self.store.skip_outbox(self.batch_size)
            if skipped:
                logger.info("outbox rows skipped", extra={"rows": skipped, "why": NOT_CONFIGURED})
            return skipped
        rows = self.store.claim_outbox(self.batch_size, self.visibility_seconds)
        if not rows:
            return 0
        deliveries = self.sender.send([score_item(r) for r in rows])
        self.store.record_deliveries([_as_record(d) for d in deliveries], self.max_attempts)
        counts: dict[str, int] = {}
        for d in deliveries:
            counts[d.outcome.value] = counts.get(d.outcome.value, 0) + 1
        errors = sorted({d.error for d in deliveries if d.error})
        log = logger.warning if errors else logger.info
        log("outbox batch delivered", extra={**counts, "errors": errors[:3]})
        return len(rows)

    def drain(self) -> int:
        """Drains until nothing is due (rows waiting for a retry stay for a later pass)."""
        total = 0
        while (handled := self.drain_once()) > 0:
            total += handled
        return total


def _as_record(d: Delivery) -> DeliveryRecord:
    """A delivery as record_langfuse_deliveries reads it."""
    return {
        "event_id": d.event_id,
        "outcome": d.outcome.value,
        "error": d.error,
        "retry_after_seconds": d.retry_after_seconds,
    }
