"""The checks after the drain: six properties read from the database (as superuser) and the
stand-in's receipts, and check 0, that the soak itself ran as planned."""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from soak.clients import Attempt
from soak.config import REL_TOL
from soak.processes import Pause
from testkit.oracle import module_counts_from_scratch, relative_error
from worker.langfuse_sender import score_id_for
from worker.learning import beta_mean


@dataclass
class Check:
    name: str
    passed: bool
    lines: list[str]
    figures: dict[str, Any] = field(default_factory=dict)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=REL_TOL)


class Checks:
    """The six properties, read from the database (as superuser), the stand-in's receipts and
    the workers' logs."""

    def __init__(self, db: psycopg.Connection, attempts: list[Attempt],
                 receipts: dict[str, list[dict[str, Any]]], permanent_failures: list[str],
                 table_duplicates: dict[str, int] | None = None, workers: int = 1,
                 pauses: list[tuple[Pause, list[str]]] | None = None) -> None:
        """`table_duplicates`: score ids with rows on more than one day of the stand-ins'
        score tables (Langfuse's key: day, name, id), i.e. a vote counted twice. `workers`: how
        many ran at once. `pauses`: each worker stopped while it held a run, with what it logged
        about that attempt of the run."""
        self.db, self.attempts, self.receipts = db, attempts, receipts
        self.permanent_failures = permanent_failures
        self.table_duplicates = table_duplicates or {}
        self.workers, self.pauses = workers, pauses or []

    def all(self) -> list[Check]:
        return [self.acknowledged_stored(), self.processed_once(), self.evidence_exact(),
                self.no_stuck_runs(), self.langfuse_exactly_once(), self.workers_shared()]

    def acknowledged_stored(self) -> Check:
        rows = {r[0]: r for r in self.db.execute(
            "select metadata->>'soak', id, twin_id::text, trace_id, created_by::text, score, passed"
            " from persona_training_events where metadata ? 'soak'").fetchall()}
        problems: list[str] = []
        writes = [a for a in self.attempts if a.kind != "run_request"]
        for a in writes:
            row = rows.get(a.nonce)
            if a.outcome == "acked":
                expected = (a.nonce, a.row_id, a.twin_id, a.trace_id, a.user_id, a.score, a.passed)
                if row != expected:
                    problems.append(f"acked {a.kind} {a.row_id}: stored as {row}, sent {expected}")
            elif a.outcome == "failed" and row is not None:
                problems.append(f"refused {a.kind} ({a.detail}) was stored as event {row[1]}")
        unknown = [a for a in writes if a.outcome == "unknown"]
        unknown_stored = sum(1 for a in unknown if a.nonce in rows)
        sent = {a.nonce for a in writes}
        phantoms = [r[1] for n, r in rows.items() if n not in sent]
        if phantoms:
            problems.append(f"{len(phantoms)} stored rows no client sent: {phantoms[:5]}")
        current = self.db.execute(
            """select count(*) filter (where n_current <> 1 or current_id <> last_id)
               from (select count(*) filter (where superseded_at is null) as n_current,
                            max(id) filter (where superseded_at is null) as current_id,
                            max(id) as last_id
                     from persona_training_events where source = 'user_feedback'
                     group by twin_id, trace_id, created_by) f""").fetchone()[0]  # type: ignore[index]
        if current:
            problems.append(f"{current} feedbacks whose latest vote is not their one current vote")
        acked = sum(1 for a in writes if a.outcome == "acked")
        not_acked = Counter(f"{a.outcome}: {a.detail}" for a in self.attempts if a.detail)
        lines = problems[:10] or [
            f"{acked} acknowledged writes stored with their twin/trace/user/score; "
            f"{sum(1 for a in writes if a.outcome == 'failed')} refused ones not stored; "
            f"{len(unknown)} unanswered: {unknown_stored} stored, "
            f"{len(unknown) - unknown_stored} not; one current vote per feedback, its latest"]
        if not_acked:
            lines.append(f"not acknowledged, by reason: {dict(not_acked)}")
        return Check(
            "1. every acknowledged write is stored as acknowledged", not problems, lines,
            {"acked_writes": acked, "unknown_writes": len(unknown),
             "unknown_writes_stored": unknown_stored, "not_acked_by_reason": dict(not_acked)})

    def processed_once(self) -> Check:
        problems: list[str] = []
        twins = self.db.execute(
            "select id::text, learned_through_event_id from twins order by id").fetchall()
        events: dict[str, list[tuple[int, str | None]]] = {}
        for twin_id, event_id, run_id in self.db.execute(
                "select e.twin_id::text, e.id, e.processed_run_id::text"
                " from persona_training_events e order by e.id"):
            events.setdefault(twin_id, []).append((event_id, run_id))
        runs: dict[str, list[tuple[int, int, str, int, int]]] = {}
        for row in self.db.execute(
                "select twin_id::text, batch_after_event_id, batch_last_event_id, id::text,"
                " events_scanned, events_processed from persona_feedback_learning_runs"
                " where status = 'completed' order by batch_after_event_id, batch_last_event_id"):
            runs.setdefault(row[0], []).append(row[1:])
        total = 0
        for twin_id, cursor in twins:
            covered = 0
            ids = [e for e, _ in events.get(twin_id, [])]  # ascending
            for after, last, run_id, scanned, processed in runs.get(twin_id, []):
                if after != covered:
                    problems.append(f"twin {twin_id}: run {run_id} covers ({after}, {last}] "
                                    f"after ({covered}]: {'overlap' if after < covered else 'gap'}")
                covered = max(covered, last)
                batch = events[twin_id][bisect.bisect_right(ids, after):
                                        bisect.bisect_right(ids, last)] if ids else []
                inside = [r for _, r in batch]
                if not (len(inside) == scanned == processed):
                    problems.append(f"run {run_id}: {len(inside)} events in its batch, "
                                    f"scanned {scanned}, processed {processed}")
                if any(r != run_id for r in inside):
                    problems.append(f"run {run_id}: events of its batch name another run")
            if covered != cursor:
                problems.append(f"twin {twin_id}: completed runs cover (0, {covered}], "
                                f"cursor {cursor}")
            beyond = [e for e, _ in events.get(twin_id, []) if e > cursor]
            if beyond:
                problems.append(f"twin {twin_id}: {len(beyond)} events beyond the cursor {cursor}")
            total += len(events.get(twin_id, []))
        return Check(
            "2. every event processed exactly once", not problems,
            problems[:10] or [f"{total} events of {len(twins)} twins, each in exactly one "
                              "completed run's batch; batches tile (0, cursor] per twin"],
            {"events": total})

    def evidence_exact(self) -> Check:
        problems: list[str] = []
        twins = [r[0] for r in self.db.execute("select id::text from twins order by id")]
        modules = [(t, m) for t in twins for m in module_counts_from_scratch(self.db, t)]
        worst = 0.0
        for twin_id, m in modules:
            key, (s, f), at = m.module_key, m.stored, m.evidence_at
            if at is None:
                if s or f:
                    problems.append(f"{twin_id}/{key}: evidence ({s}, {f}) but never learned")
                continue
            want_s, want_f = m.expected
            worst = max(worst, relative_error(s, want_s), relative_error(f, want_f))
            if not (close(s, want_s) and close(f, want_f)):
                problems.append(f"{twin_id}/{key}: stored (s={s!r}, f={f!r}), "
                                f"from scratch (s={want_s!r}, f={want_f!r}) at {at}")
            if not math.isclose(m.confidence, beta_mean(s, f), abs_tol=1e-12):
                problems.append(f"{twin_id}/{key}: confidence {m.confidence} is not "
                                "(s+1)/(s+f+2)")
        return Check(
            "3. module evidence equals a from-scratch recomputation", not problems,
            problems[:10] or [f"{len(modules)} modules; largest relative difference {worst:.2e}"],
            {"modules": len(modules), "max_relative_difference": worst})

    def no_stuck_runs(self) -> Check:
        """No run left queued or running. A run may fail after its last attempt (its workers
        kept dying), but never earlier: every fault the soak injects is transient."""
        by_status: dict[str, int] = dict(self.db.execute(
            "select status, count(*) from persona_feedback_learning_runs group by status"
        ).fetchall())
        failed = self.db.execute(
            "select id, twin_id, attempts, max_attempts, error from persona_feedback_learning_runs"
            " where status = 'failed' order by created_at").fetchall()
        stuck = by_status.get("queued", 0) + by_status.get("running", 0)
        early = [r for r in failed if r[2] < r[3]]
        lines = [f"runs by status: {by_status}"]
        lines += [f"failed run {r[0]} (twin {r[1]}, attempt {r[2]}/{r[3]}): {r[4]}"
                  for r in failed[:20]]
        if len(failed) > 20:
            lines.append(f"... and {len(failed) - 20} more failed runs")
        if early:
            lines.append(f"FAIL: {len(early)} runs failed for good before their last attempt")
        if self.permanent_failures:
            lines.append(f"FAIL: workers failed {len(self.permanent_failures)} run attempts as "
                         "not retryable on transient faults (recorded or not):")
            lines += [f"  {p}" for p in self.permanent_failures[:10]]
        errors = Counter((r[4] or "")[:80] for r in failed)
        return Check("4. no run stuck in queued or running, none failed for good on a transient "
                     "fault", stuck == 0 and not early and not self.permanent_failures, lines,
                     {"runs_by_status": by_status, "failed_run_errors": dict(errors),
                      "permanent_failures_logged": len(self.permanent_failures)})

    def langfuse_exactly_once(self) -> Check:
        problems: list[str] = []
        votes = self.db.execute(
            "select e.id, e.twin_id::text, e.trace_id, e.created_by::text, e.score,"
            " e.langfuse_status, e.first_vote_at"
            " from persona_training_events e"
            " where e.source = 'user_feedback' and e.superseded_at is null").fetchall()
        expected: set[str] = set()
        missing = wrong_value = wrong_time = not_sent = other_row = 0
        for event_id, twin_id, trace_id, user_id, score, status, first_at in votes:
            score_id = score_id_for(twin_id, trace_id, user_id)
            expected.add(score_id)
            if status != "sent":
                not_sent += 1
                problems.append(f"current vote {event_id}: outbox status {status}")
            versions = self.receipts.get(score_id)
            if not versions:
                missing += 1
                problems.append(f"current vote {event_id}: score {score_id} never received")
                continue
            latest = versions[-1]
            if latest.get("value") != float(score):
                wrong_value += 1
                problems.append(f"current vote {event_id}: score {score_id} ends "
                                f"{latest.get('value')}, vote is {score}")
            if parse_ts(latest.get("timestamp")) != first_at:
                wrong_time += 1
                problems.append(f"current vote {event_id}: score {score_id} timestamp "
                                f"{latest.get('timestamp')}, first vote at {first_at.isoformat()}")
            if (latest.get("metadata") or {}).get("event_id") != event_id:
                other_row += 1
        if self.table_duplicates:
            problems.append(f"{len(self.table_duplicates)} scores with rows on two days of the "
                            f"score table: {sorted(self.table_duplicates)[:3]}")
        strays = sorted(set(self.receipts) - expected)
        if strays:
            problems.append(f"{len(strays)} score ids received that match no vote: {strays[:3]}")
        received = sum(len(v) for v in self.receipts.values())
        seen: set[tuple[str, Any, Any]] = set()
        duplicates = 0
        for score_id, versions in self.receipts.items():
            for v in versions:
                key = (score_id, (v.get("metadata") or {}).get("event_id"), v.get("value"))
                duplicates += key in seen
                seen.add(key)
        outbox: dict[str, int] = dict(self.db.execute(
            "select langfuse_status, count(*) from persona_training_events"
            " where source = 'user_feedback' group by 1").fetchall())
        figures = {"current_votes": len(votes), "score_ids_received": len(self.receipts),
                   "receipts": received, "duplicate_receipts": duplicates, "missing": missing,
                   "wrong_final_value": wrong_value, "wrong_timestamp": wrong_time,
                   "current_votes_not_sent": not_sent, "stray_score_ids": len(strays),
                   "latest_receipt_from_an_older_vote_row": other_row, "outbox_by_status": outbox,
                   "scores_on_two_days": len(self.table_duplicates)}
        summary = (f"{len(votes)} current votes: {missing} score ids missing, {wrong_value} with "
                   f"a wrong final value, {wrong_time} with a wrong timestamp, {not_sent} outbox "
                   f"rows not sent; {received} receipts of {len(self.receipts)} score ids, "
                   f"{duplicates} duplicate receipts (same score, vote row and value: re-sends); "
                   f"latest receipt from an older vote row (same value): {other_row}; "
                   f"scores on two days of the score table: {len(self.table_duplicates)}; "
                   f"outbox {outbox}")
        return Check("5. every score delivered to Langfuse exactly once (upsert by id)",
                     not problems, [summary, *problems[:10]], figures)


    def workers_shared(self) -> Check:
        """The workers shared the runs (at least as many of them completed runs as ran at once),
        and a worker stopped while holding a run, whose run another worker took over, completed
        nothing of it when it came back: its late work was discarded, not learned twice (check 2
        proves the batches tile; this proves the fencing of the stalled worker)."""
        by_worker: dict[str, int] = dict(self.db.execute(
            "select worker_id, count(*) from persona_feedback_learning_runs"
            " where status = 'completed' group by worker_id order by worker_id").fetchall())
        problems = []
        if len(by_worker) < self.workers:
            problems.append(f"only {len(by_worker)} workers completed runs; {self.workers} ran")
        if not self.pauses:
            problems.append("no worker was stopped while holding a run")
        ends = []
        for pause, logged in self.pauses:
            late = [e for e in logged if e != "run claimed"]
            ends.append(f"{pause.worker}, run {pause.run_id} attempt {pause.attempt} (taken over "
                        f"by {pause.taken_over_by}): {late or 'nothing logged after the claim'}")
            if "run completed" in logged:
                problems.append(f"{pause.worker} completed run {pause.run_id} after another "
                                "worker took it over")
        lines = [f"runs completed by worker: {by_worker}", *ends, *problems]
        return Check("6. the workers shared the runs; a stalled worker's run taken over and its "
                     "late work discarded", not problems, lines,
                     {"completed_by_worker": by_worker,
                      "pauses": [asdict(p) | {"logged": logged} for p, logged in self.pauses]})


def parse_ts(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def harness_check(drained: bool, drain_s: float, drain_state: dict[str, Any],
                  fault_errors: list[str], worker_exits: dict[str, int]) -> Check:
    """Check 0: the soak did what it set out to do, so that the other checks mean something."""
    problems = list(fault_errors)
    if not drained:
        problems.insert(0, f"drain incomplete after {drain_s:.0f}s: {drain_state}")
    bad_exits = {k: v for k, v in worker_exits.items() if v != 0}
    if bad_exits:
        problems.append(f"workers that did not stop cleanly on SIGTERM: {bad_exits}")
    return Check("0. the soak ran as planned (faults applied, drained, clean stop)", not problems,
                 problems or ["every fault applied; drained; workers exited 0"])


def run_figures(db: psycopg.Connection) -> dict[str, int]:
    row = db.execute(
        "select count(*) filter (where status = 'completed'),"
        " count(*) filter (where status = 'completed' and attempts > 1),"
        " count(*) filter (where status = 'failed'),"
        " count(*) filter (where publish_decision = 'published')"
        " from persona_feedback_learning_runs").fetchone()
    names = ("completed", "taken_over", "failed", "published_a_spec")
    return dict(zip(names, row, strict=True))  # type: ignore[arg-type]

