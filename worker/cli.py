"""`pfl`: the worker's command line: run-once (cron), serve (long-lived), runs (history),
report (a twin's HTML report)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from pydantic import ValidationError

from worker import logs
from worker.config import WorkerSettings, key_role
from worker.explain import describe_watch, watch_outcome
from worker.runner import Runner, poll_until_stopped
from worker.store import ConfigurationError, Run, Store, StoreError

if TYPE_CHECKING:
    from worker.metrics import MetricsServer, WorkerMetrics
    from worker.outbox import OutboxDrainer

logger = logging.getLogger("worker")

Handler = Callable[[argparse.Namespace, WorkerSettings, Store], int]
"""A subcommand: its arguments, the settings and the store in; the exit status out."""


def summarize(run: Run, versions: Mapping[str, int]) -> str:
    """A run as an owner reads it: its outcome and figures, one fact per line. `versions` maps
    the twin's spec ids (text) to their version numbers, for the watch's sentence
    (`describe_watch`)."""
    decision = run.publish_decision or "-"
    if run.hold_reason:
        decision = f"{decision} ({run.hold_reason})"
    lines = [
        f"run {run.id}  twin {run.twin_id}",
        f"  status={run.status}  trigger={run.trigger}  safe_mode={str(run.safe_mode).lower()}"
        f"  attempts={run.attempts}/{run.max_attempts}",
        f"  events_scanned={_fig(run.events_scanned)}"
        f"  events_processed={_fig(run.events_processed)}"
        f"  events_unmatched={_fig(run.events_unmatched)}"
        f"  modules_updated={_fig(run.modules_updated)}",
        f"  gate_passed={_fig(run.gate_passed)}  publish_decision={decision}",
    ]
    watched = describe_watch(run.gate_report, versions)
    if watched:
        lines.append(f"  {watched}")
    for check in (run.gate_report or {}).get("checks", []):
        method = ""
        if check.get("method"):  # the interval and the counts behind the value
            evidence = check.get("evidence") or {}  # n first; jsonb does not keep key order
            keys = sorted(evidence, key=lambda k: (k != "n", k))
            counts = " ".join(f"{k}={evidence[k]}" for k in keys)
            method = f", {check['method']} {counts}".rstrip()
        lines.append(
            f"    {check['name']}: {check['verdict']}"
            f" (value {_fig(check.get('value'))}, threshold {_fig(check.get('threshold'))}"
            f"{method})"
        )
    if run.error:
        lines.append(f"  error={run.error}")
    if run.retry_not_before:
        lines.append(
            f"  retry_not_before={run.retry_not_before.isoformat()}  (no scheduled run of the"
            " twin before then; --request runs it now)"
        )
    return "\n".join(lines)


def _fig(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def runs_table(runs: Sequence[Run]) -> str:
    """The runs as an aligned text table, one line each after a header (`pfl runs`)."""
    header = (
        "created", "run", "status", "scanned", "processed", "modules", "gate", "decision", "watch",
    )
    rows = [header]
    for r in runs:
        rows.append(
            (
                r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                str(r.id)[:8],
                r.status,
                _fig(r.events_scanned),
                _fig(r.events_processed),
                _fig(r.modules_updated),
                _fig(r.gate_passed),
                (r.publish_decision or "-") + (f" ({r.hold_reason})" if r.hold_reason else ""),
                watch_outcome(r.gate_report),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def write_artifact(path: Path, runs: Sequence[Run]) -> None:
    """Writes the runs' rows as JSON to `path` (one object for one run, else an array),
    creating its folder. Raises OSError when the file cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = [r.model_dump(mode="json") for r in runs]
    path.write_text(json.dumps(doc[0] if len(doc) == 1 else doc, indent=2) + "\n")


def _cmd_run_once(args: argparse.Namespace, settings: WorkerSettings, store: Store) -> int:
    runner = Runner(
        store, settings.pfl_worker_id, settings.pfl_lease_seconds,
        claim_runs=settings.pfl_claim_runs,
    )
    safe_mode = True if args.safe_mode else False if args.auto_publish else None
    runs = runner.run_once(
        args.twin,
        safe_mode,
        request=args.twin is not None and (args.request or safe_mode is not None),
    )
    for run in runs:
        report = run.gate_report or {}
        # Specs by version, as `pfl runs` names them: only a run that watched or rolled back
        # names any.
        versions = (
            {str(v.id): v.version for v in store.spec_versions(run.twin_id)}
            if report.get("watch") or report.get("rollback") else {}
        )
        print(summarize(run, versions))
    if not runs:
        print("no run was due" + _held_back(store, args.twin))
    if args.output:
        write_artifact(args.output, runs)
    return 1 if any(r.status == "failed" for r in runs) else 0


def _held_back(store: Store, twin_id: UUID | None) -> str:
    """Why `run-once --twin` found nothing, when a failed run holds the twin back: its
    retry_not_before in words (empty otherwise). Raises the store's errors."""
    if twin_id is None:
        return ""
    last = store.list_runs(twin_id, 1)
    held = last[0].retry_not_before if last else None
    if held is None or held <= datetime.now(UTC):
        return ""
    return (
        f": its last run failed, so no run is scheduled before {held.isoformat()}"
        " (--request runs it now)"
    )


def make_drainer(
    settings: WorkerSettings,
    store: Store,
    *,
    one_shot: bool = False,
    stopping: Callable[[], bool] = lambda: False,
) -> OutboxDrainer:
    """The outbox drainer the settings describe: with no sender when Langfuse is not configured
    (rows are skipped), with a `config_error` when its settings cannot work (rows stay pending).
    `one_shot` (`pfl outbox drain`): a check that fails is not repeated by this process;
    `stopping`: true once `serve` stops (`OutboxDrainer.stopping`)."""
    # Imported here: `pfl run-once` (cron) never needs the mirror's modules.
    from worker.langfuse_sender import LangfuseSender
    from worker.outbox import RECHECK_SECONDS, OutboxDrainer

    sender, error = None, None
    if settings.langfuse_missing:
        error = f"{', '.join(settings.langfuse_missing)} not set"
    elif settings.langfuse_configured:
        try:
            setting, url = settings.langfuse_url
            sender = LangfuseSender(
                url or "",
                settings.langfuse_public_key or "",
                settings.langfuse_secret_key.get_secret_value()
                if settings.langfuse_secret_key
                else "",
                settings.pfl_langfuse_timeout_seconds,
                environment=settings.langfuse_environment,
                batch_size=settings.pfl_langfuse_batch_size,
                setting=setting,
            )
        except ValueError as exc:
            error = str(exc)
    return OutboxDrainer(
        store,
        sender,
        settings.pfl_langfuse_batch_size,
        settings.pfl_langfuse_max_attempts,
        settings.pfl_langfuse_visibility_seconds,
        config_error=error,
        recheck_seconds=None if one_shot else RECHECK_SECONDS,
        stopping=stopping,
    )


# Seconds one scrape waits for the database's outbox backlog (Prometheus' default scrape
# timeout is 10 s).
SCRAPE_TIMEOUT = 3.0
MIRROR_JOIN_SECONDS = 30.0
"""At stop, how long `serve` waits for the mirror's pass in hand, beyond its requests in flight
(`mirror_stop_bound`): its store calls."""


def mirror_stop_bound(timeout_seconds: float) -> float:
    """Seconds `serve` waits at stop for the mirror's pass in hand. Once stop is set, a pass
    claims nothing more and starts no further request (`OutboxDrainer.stopping`: the batch's
    requests not yet started are left for later, due again after the claim window), so what
    is left is what is in flight: a start-up check's two requests at most, or one send
    request, each ending within `timeout_seconds` of its start once its host name is resolved
    (`worker.langfuse_http.Deadline`); the bound allows four timeouts a request, the rest for
    the system resolver's look-up, which no socket bounds; then its store calls,
    `MIRROR_JOIN_SECONDS`."""
    return MIRROR_JOIN_SECONDS + 2 * 4 * timeout_seconds


def _cmd_serve(args: argparse.Namespace, settings: WorkerSettings, store: Store) -> int:
    metrics: WorkerMetrics | None = None
    server: MetricsServer | None = None
    scrape_store: Store | None = None
    if settings.pfl_metrics_port is not None:
        # Imported here: only `serve` with metrics on needs prometheus_client.
        from worker.metrics import MetricsServer, WorkerMetrics

        # Scrapes read the outbox backlog through a store of their own that tries once with a
        # short timeout, so that a scrape during an outage still answers within a scraper's
        # timeout (without the two outbox gauges) and shows the poll timestamps.
        scrape_store = Store.connect(
            settings.model_copy(
                update={"pfl_store_attempts": 1, "pfl_http_timeout_seconds": SCRAPE_TIMEOUT}
            )
        )
        metrics = WorkerMetrics(scrape_store, settings.pfl_health_max_age_seconds)
        try:
            server = MetricsServer(metrics, settings.pfl_metrics_host, settings.pfl_metrics_port)
        except OSError as exc:
            raise ConfigurationError(
                f"PFL_METRICS_PORT: cannot listen on "
                f"{settings.pfl_metrics_host}:{settings.pfl_metrics_port} ({exc})"
            ) from exc
    runner = Runner(
        store,
        settings.pfl_worker_id,
        settings.pfl_lease_seconds,
        observer=metrics.observe_run if metrics else None,
        claim_runs=settings.pfl_claim_runs,
    )
    stop = threading.Event()
    drainer = make_drainer(settings, store, stopping=stop.is_set)

    def learning_step() -> bool:
        if metrics:
            metrics.poll_started("learning-runs")
        busy = runner.step()
        if metrics:
            metrics.poll_succeeded("learning-runs")
        return busy

    def outbox_step() -> bool:
        # A pass that met a wait (429, suspension) is idle: the hold keeps the next ones empty.
        if metrics:
            metrics.poll_started("langfuse-outbox")
        busy = drainer.drain_once() > 0 and not drainer.holding
        if metrics:
            metrics.poll_succeeded("langfuse-outbox")
        return busy

    def _stop(signum: int, _frame: object) -> None:
        logger.info("stop requested; finishing the work in hand", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    waits = (settings.pfl_poll_min_seconds, settings.pfl_poll_max_seconds)

    def failed(poller: str) -> Callable[[], None] | None:
        return (lambda: metrics.poll_failed(poller)) if metrics else None

    # Langfuse is a mirror: its own thread, so a slow or down Langfuse never delays a run. A
    # pass that raises is logged and counted, and the thread goes on (poll_until_stopped).
    mirror = threading.Thread(
        target=poll_until_stopped,
        args=("langfuse-outbox", outbox_step, stop, *waits, failed("langfuse-outbox")),
        name="langfuse-outbox",
        daemon=True,  # a pass stuck past the join's bound does not keep the process alive
    )
    if server:
        server.start()
    mirror.start()
    try:
        poll_until_stopped("learning-runs", learning_step, stop, *waits, failed("learning-runs"))
    finally:
        stop.set()
        bound = mirror_stop_bound(settings.pfl_langfuse_timeout_seconds)
        mirror.join(bound)
        if mirror.is_alive():
            logger.warning(
                "the Langfuse mirror did not stop; exiting without it (its claimed rows come "
                "back after the visibility)",
                extra={"poller": "langfuse-outbox", "waited_seconds": bound},
            )
        if server:
            server.stop()
        if scrape_store:
            scrape_store.close()
    return 0


def _cmd_outbox(args: argparse.Namespace, settings: WorkerSettings, store: Store) -> int:
    if args.action == "requeue":
        status = "failed" if args.failed else "skipped"
        print(f"requeued {store.requeue_outbox(status)} {status} feedback rows")
        return 0
    drainer = make_drainer(settings, store, one_shot=True)
    handled = drainer.drain()
    if drainer.config_error is not None:
        return 1  # the drainer's log line ("Langfuse mirror off: ...") said why
    print(f"handled {handled} outbox rows")
    return 0


def runs_moves(store: Store, twin_id: UUID, runs: Sequence[Run]) -> dict[UUID, list[str]]:
    """For each completed run, the sentences explaining its notable module moves (status
    changes, confidence moves of at least a point), read through the store."""
    from worker.explain import explain_move, notable

    done = [r.id for r in runs if r.status == "completed"]
    changes = [c for c in store.run_changes(done) if notable(c)]
    if not changes:
        return {}
    evidence = store.run_evidence(sorted({c.run_id for c in changes}, key=str))
    learning = store.learning_settings(twin_id)
    recounted = {r.id for r in runs if r.rebuilt_modules}
    moves: dict[UUID, list[str]] = {}
    for c in changes:
        moves.setdefault(c.run_id, []).append(
            explain_move(c, evidence, learning, recounted=c.run_id in recounted))
    return moves


def _cmd_runs(args: argparse.Namespace, settings: WorkerSettings, store: Store) -> int:
    runs = store.list_runs(args.twin, limit=args.limit)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in runs], indent=2))
        return 0
    if not runs:
        print(f"twin {args.twin} has no runs")
        return 0
    print(runs_table(runs))
    versions = {str(v.id): v.version for v in store.spec_versions(args.twin)}
    watched = [(r, describe_watch(r.gate_report, versions)) for r in runs]
    if any(sentence for _, sentence in watched):
        print("\nProduction watch:")
        for r, sentence in watched:
            if sentence:
                print(f"  {str(r.id)[:8]}  {sentence}")
    moves = runs_moves(store, args.twin, runs)
    if moves:
        print("\nWhat moved:")
        for r in runs:
            for sentence in moves.get(r.id, []):
                print(f"  {str(r.id)[:8]}  {sentence}")
    return 0


def _cmd_report(args: argparse.Namespace, settings: WorkerSettings, store: Store) -> int:
    # Imported here: matplotlib is a second or so of start-up that only the report needs.
    from datetime import UTC, datetime

    from worker.report import TwinNotFound, collect, render

    try:
        data = collect(store, args.twin, runs_shown=args.runs)
    except TwinNotFound as exc:
        print(f"pfl: {exc}", file=sys.stderr)
        return 1
    out: Path = args.out or Path(f"report-{args.twin}.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data, datetime.now(UTC)), encoding="utf-8")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`pfl`'s arguments; each subcommand sets `handler` to its `Handler`."""
    parser = argparse.ArgumentParser(prog="pfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    once = sub.add_parser("run-once", help="queue what is due, execute runs until none is left")
    once.add_argument("--twin", type=UUID, help="only this twin")
    mode = once.add_mutually_exclusive_group()
    mode.add_argument("--safe-mode", action="store_true", help="learn and gate, never publish")
    mode.add_argument(
        "--auto-publish", action="store_true", help="publish the draft if the gate passes"
    )
    once.add_argument(
        "--request",
        action="store_true",
        help="with --twin: run even without new evidence (implied by --safe-mode/--auto-publish)",
    )
    once.add_argument("--output", type=Path, help="write the run(s) as a JSON artifact")
    once.set_defaults(handler=_cmd_run_once)

    serve = sub.add_parser(
        "serve",
        help="poll for runs until SIGTERM or SIGINT; with PFL_METRICS_PORT set, serve "
        "/healthz and Prometheus /metrics on it",
    )
    serve.set_defaults(handler=_cmd_serve)

    outbox = sub.add_parser("outbox", help="the Langfuse mirror of feedback")
    outbox.add_argument(
        "action",
        choices=("drain", "requeue"),
        help="drain: send every due row now; requeue: put skipped rows back (after configuring "
        "Langfuse), or failed ones with --failed",
    )
    outbox.add_argument("--failed", action="store_true", help="with requeue: failed rows")
    outbox.set_defaults(handler=_cmd_outbox)

    runs = sub.add_parser("runs", help="list a twin's recent runs")
    runs.add_argument("--twin", type=UUID, required=True)
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.set_defaults(handler=_cmd_runs)

    report = sub.add_parser(
        "report", help="write a twin's report: one self-contained HTML file with its charts"
    )
    report.add_argument("--twin", type=UUID, required=True)
    report.add_argument("--out", type=Path, help="the HTML file (default report-<twin>.html)")
    report.add_argument("--runs", type=int, default=30, help="runs listed (default 30)")
    report.set_defaults(handler=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `pfl` with `argv` (default: the process's); returns the exit status: 0 done, 1 a
    run failed or the store refused a call, 2 invalid settings, a key that is not the
    service-role key or a database whose migrations are behind, each said in one line on stderr
    (argparse exits 2 itself on bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        settings = WorkerSettings()  # filled from the environment
    except ValidationError as exc:
        print(f"pfl: invalid settings: {settings_errors(exc)}", file=sys.stderr)
        return 2
    logs.configure(settings.pfl_log_format)
    handler: Handler = args.handler
    try:
        store = preflight(settings)
        return handler(args, settings, store)
    except ConfigurationError as exc:
        print(f"pfl: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"pfl: {exc} (code {exc.code})", file=sys.stderr)
        return 1


def settings_errors(exc: ValidationError) -> str:
    """pydantic's errors of WorkerSettings in one line: each as `NAME: message` (the
    environment variable's name; a rule between settings has none), joined by `; `."""
    parts = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]).upper()
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{name}: {message}" if name else message)
    return "; ".join(parts)


def preflight(settings: WorkerSettings) -> Store:
    """The store, once the settings are fit to run with: the key acts as the service role and
    the database's migrations are not behind the worker's. Raises ConfigurationError (one line)
    otherwise; the store's errors when the API cannot be reached."""
    role = key_role(settings.supabase_service_role_key.get_secret_value())
    if role is not None and role != "service_role":
        raise ConfigurationError(
            f"SUPABASE_SERVICE_ROLE_KEY holds a key of role {role}, not the service-role key; "
            "the worker needs the service_role/secret key of the project"
        )
    store = Store.connect(settings)
    # Quiet while it checks: an API that does not answer is one line at the end, not a warning
    # per retry before it.
    store_logger = logging.getLogger("worker.store")
    level = store_logger.level
    store_logger.setLevel(logging.ERROR)
    try:
        store.check_worker_access(settings.supabase_url)
    finally:
        store_logger.setLevel(level)
    return store


if __name__ == "__main__":
    sys.exit(main())
