"""`pfl report`: one self-contained HTML page about a twin — how its modules moved, why users
voted as they did, what its runs decided and when its specs changed.

Charts are drawn with matplotlib (pinned in pyproject) and embedded as inline SVG: the page needs
no network, no script and no font of the reader's (the glyphs are paths). `collect` reads
everything through the store (the owner views, with the service role); `render` is pure: the
data and a clock in, the HTML out.
"""

from __future__ import annotations

import html
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from worker.explain import describe_watch, explain_move, notable
from worker.models import LearningSettings, ModuleStatus
from worker.store import Run, Store
from worker.views import (
    ModuleFeedback,
    ReasonCount,
    RunEvidence,
    SpecVersion,
    TrendPoint,
    TwinOverview,
)

STATUS_COLORS = {
    ModuleStatus.active: "#cdebd3",
    ModuleStatus.probation: "#fde9c4",
    ModuleStatus.disabled: "#f6c9c9",
    ModuleStatus.insufficient_data: "#e6e6e6",
}
REASON_COLORS = {
    "incorrect": "#c0392b",
    "outdated": "#e67e22",
    "off_persona": "#8e44ad",
    "unhelpful": "#d4ac0d",
    "unsafe": "#641e16",
    "other": "#7f8c8d",
    "helpful": "#27ae60",
    None: "#bdc3c7",
}
RUNS_SHOWN = 30
MAX_POINTS = 400  # per module in the confidence chart


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows, as the store read it."""

    overview: TwinOverview
    settings: LearningSettings
    trend: Sequence[TrendPoint]
    feedback: Sequence[ModuleFeedback]
    reasons: Sequence[ReasonCount]
    runs: Sequence[Run]
    run_changes: Sequence[TrendPoint]
    run_evidence: Sequence[RunEvidence]
    specs: Sequence[SpecVersion]
    moves: dict[UUID, list[str]] = field(default_factory=dict)


class TwinNotFound(LookupError):
    """The twin does not exist (or the store's role cannot see it)."""


def collect(store: Store, twin_id: UUID, runs_shown: int = RUNS_SHOWN) -> ReportData:
    """Reads the twin's overview, trend, feedback, last `runs_shown` runs with their module
    changes and evidence, and specs. Raises TwinNotFound, and the store's errors."""
    overview = store.twin_overview(twin_id)
    if overview is None:
        raise TwinNotFound(f"twin {twin_id} does not exist")
    runs = store.list_runs(twin_id, limit=runs_shown)
    run_ids = [r.id for r in runs if r.status == "completed"]
    return ReportData(
        overview=overview,
        settings=store.learning_settings(twin_id),
        trend=store.module_trend(twin_id),
        feedback=store.module_feedback(twin_id),
        reasons=store.feedback_reasons(twin_id),
        runs=runs,
        run_changes=store.run_changes(run_ids),
        run_evidence=store.run_evidence(run_ids),
        specs=store.spec_versions(twin_id),
    )


def run_moves(data: ReportData) -> dict[UUID, list[str]]:
    """The sentences explaining each run's notable module moves (`explain.notable`), by run id."""
    evidence: dict[UUID, list[RunEvidence]] = defaultdict(list)
    for e in data.run_evidence:
        evidence[e.run_id].append(e)
    recounted = {r.id for r in data.runs if r.rebuilt_modules}
    moves: dict[UUID, list[str]] = defaultdict(list)
    for change in data.run_changes:
        if notable(change):
            sentence = explain_move(change, evidence[change.run_id], data.settings,
                                    recounted=change.run_id in recounted)
            moves[change.run_id].append(sentence)
    return dict(moves)


# ----------------------------------------------------------------------------- charts


def _svg(fig: object) -> str:
    """The figure as an inline <svg> element (no XML prologue), with fixed ids so that one
    page's charts never share an id and output is stable."""
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    # The RDF metadata block says nothing to a reader; it only names namespaces.
    start, end = text.find("<metadata>"), text.find("</metadata>")
    if start != -1 and end != -1:
        text = text[:start] + text[end + len("</metadata>"):]
    return text


def _figure(width: float, height: float) -> object:
    import matplotlib

    matplotlib.rcParams.update({
        "svg.hashsalt": "pfl-report",
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
        "axes.spines.top": False,
        "axes.spines.right": False,
    })
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def chart_confidence(
    trend: Sequence[TrendPoint], settings: LearningSettings, now: datetime
) -> str | None:
    """Small multiples, one per module: confidence over time (line), its 95% Wilson interval
    (band) and the module's status as background bands. None without any change."""
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    by_module: dict[str, list[TrendPoint]] = defaultdict(list)
    for p in trend:
        by_module[p.module_key].append(p)
    if not by_module:
        return None
    keys = sorted(by_module)
    cols = 2 if len(keys) > 1 else 1
    rows = (len(keys) + cols - 1) // cols
    fig = _figure(11, 2.4 * rows + 0.8)
    assert isinstance(fig, Figure)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for i, key in enumerate(keys):
        ax = axes[i // cols][i % cols]
        points = thin(sorted(by_module[key], key=lambda p: p.measured_at))
        times = [p.measured_at for p in points]
        for status, start, end in status_bands(points, now):
            ax.axvspan(_days(start), _days(end), color=STATUS_COLORS[status], linewidth=0)
        lower = [p.wilson_lower if p.wilson_lower is not None else 0.0 for p in points]
        upper = [p.wilson_upper if p.wilson_upper is not None else 1.0 for p in points]
        confidence = [p.confidence for p in points]
        # The last values hold until now (as the last status band does): without that a
        # module changed by one run only would show no line and no band at all.
        times, lower, upper, confidence = ([*times, max(now, times[-1])], [*lower, lower[-1]],
                                           [*upper, upper[-1]], [*confidence, confidence[-1]])
        ax.fill_between(times, lower, upper, color="#2c3e50", alpha=0.15, linewidth=0,
                        step="post")
        ax.step(times, confidence, where="post", color="#1f4e79", linewidth=1.6)
        ax.axhline(settings.activate_lower_bound, color="#1e8449", linestyle="--", linewidth=0.8)
        ax.axhline(settings.disable_upper_bound, color="#a93226", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{key} — now {STATUS_WORDS_SHORT[points[-1].status]}, "
                     f"confidence {points[-1].confidence:.2f}", loc="left")
        ax.set_ylabel("confidence (0–1)")
        ax.grid(axis="y", color="#dddddd", linewidth=0.5)
    for j in range(len(keys), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    for row in axes:
        for ax in row:
            _date_axis(ax)
    for ax in axes[-1]:
        ax.set_xlabel("learning run time (UTC)")
    handles: list[Artist] = [
        *(Patch(color=c, label=f"status: {STATUS_WORDS_SHORT[s]}")
          for s, c in STATUS_COLORS.items()),
        Patch(color="#2c3e50", alpha=0.15, label="95% Wilson interval"),
    ]
    from matplotlib.lines import Line2D

    handles += [
        Line2D([], [], color="#1f4e79", linewidth=1.6, label="confidence"),
        Line2D([], [], color="#1e8449", linestyle="--",
               label=f"activate: lower bound >= {settings.activate_lower_bound:.2f}"),
        Line2D([], [], color="#a93226", linestyle="--",
               label=f"disable: upper bound < {settings.disable_upper_bound:.2f}"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
    fig.suptitle("Module confidence over time, with status bands", fontweight="bold")
    return _svg(fig)


def thin(points: Sequence[TrendPoint], most: int = MAX_POINTS) -> list[TrendPoint]:
    """At most about `most` of a module's points, evenly spaced, always keeping the first, the
    last and every status change (a chart cannot show more; a twin with hourly runs has
    thousands). `points` oldest first."""
    if len(points) <= most:
        return list(points)
    step = len(points) / most
    keep = {int(i * step) for i in range(most)} | {0, len(points) - 1}
    keep |= {i for i in range(1, len(points)) if points[i].status != points[i - 1].status}
    return [points[i] for i in sorted(keep)]


def status_bands(
    points: Sequence[TrendPoint], now: datetime
) -> list[tuple[ModuleStatus, datetime, datetime]]:
    """A module's status over time as (status, from, until) bands: consecutive changes with
    the same status merged; the last band runs until `now`. `points` oldest first."""
    bands: list[tuple[ModuleStatus, datetime, datetime]] = []
    for p, nxt in zip(points, [*points[1:], None], strict=True):
        end = nxt.measured_at if nxt else max(now, p.measured_at)
        if bands and bands[-1][0] is p.status:
            bands[-1] = (p.status, bands[-1][1], end)
        else:
            bands.append((p.status, p.measured_at, end))
    return bands


STATUS_WORDS_SHORT = {
    ModuleStatus.active: "active",
    ModuleStatus.probation: "probation",
    ModuleStatus.disabled: "disabled",
    ModuleStatus.insufficient_data: "insufficient data",
}


def chart_reasons(reasons: Sequence[ReasonCount]) -> str | None:
    """Stacked horizontal bars: each module's votes of the last 30 days by reason. None
    without votes."""
    from matplotlib.figure import Figure

    per_module: dict[str, dict[str | None, int]] = defaultdict(lambda: defaultdict(int))
    for r in reasons:
        if r.votes_30d:
            per_module[r.module_key][r.reason] += r.votes_30d
    if not per_module:
        return None
    keys = sorted(per_module, key=lambda k: sum(per_module[k].values()))
    fig = _figure(11, 0.5 * len(keys) + 1.8)
    assert isinstance(fig, Figure)
    ax = fig.subplots()
    left = [0] * len(keys)
    for reason, color in REASON_COLORS.items():
        values = [per_module[k].get(reason, 0) for k in keys]
        if not any(values):
            continue
        ax.barh(keys, values, left=left, color=color, label=reason or "no reason")
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("votes in the last 30 days (count)")
    ax.set_title("Why users voted, per module (last 30 days)", loc="left")
    fig.legend(loc="outside right upper", frameon=False, title="reason")
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    return _svg(fig)


def chart_approval(feedback: Sequence[ModuleFeedback]) -> str | None:
    """Each module's approval rate over 7 and 30 days with its 95% Wilson interval. None when
    no module had +1 or -1 votes."""
    from matplotlib.figure import Figure

    rows = [f for f in feedback
            if f.approval_rate_30d is not None or f.approval_rate_7d is not None]
    if not rows:
        return None
    rows.sort(key=lambda f: f.module_key, reverse=True)
    fig = _figure(11, 0.5 * len(rows) + 1.8)
    assert isinstance(fig, Figure)
    ax = fig.subplots()
    for offset, days, color in ((0.15, 7, "#1f77b4"), (-0.15, 30, "#ff7f0e")):
        ys, xs, lo, hi = [], [], [], []
        for i, f in enumerate(rows):
            rate = getattr(f, f"approval_rate_{days}d")
            if rate is None:
                continue
            ys.append(i + offset)
            xs.append(rate)
            # Clamped at 0: at a rate of 0 or 1 the bound equals it up to float noise.
            lo.append(max(0.0, rate - getattr(f, f"approval_lower_{days}d")))
            hi.append(max(0.0, getattr(f, f"approval_upper_{days}d") - rate))
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", color=color, capsize=3,
                    label=f"last {days} days (95% Wilson interval)")
    ax.set_yticks(range(len(rows)), [f.module_key for f in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("approval rate: +1 votes / (+1 and -1 votes)")
    ax.set_title("Approval per module", loc="left")
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    return _svg(fig)


def chart_runs(runs: Sequence[Run]) -> str | None:
    """Each run as a point in time: events processed (y; log scale when they span more than
    50x), colored by gate verdict,
    a star where it published. None without runs."""
    from matplotlib.figure import Figure

    done = sorted((r for r in runs if r.status in ("completed", "failed")),
                  key=lambda r: r.created_at)
    if not done:
        return None
    fig = _figure(11, 3.2)
    assert isinstance(fig, Figure)
    ax = fig.subplots()
    groups = (
        ("gate passed, held",
         lambda r: r.gate_passed is True and r.publish_decision != "published", "#27ae60", "o"),
        ("gate failed, held", lambda r: r.gate_passed is False, "#c0392b", "X"),
        ("published", lambda r: r.publish_decision == "published", "#1f4e79", "*"),
        ("run failed", lambda r: r.status == "failed", "#7f8c8d", "s"),
    )
    for label, pick, color, marker in groups:
        chosen = [r for r in done if pick(r)]
        if chosen:
            ax.scatter([_days(r.created_at) for r in chosen],
                       [max(1, r.events_processed or 0) for r in chosen],
                       color=color, marker=marker, s=90 if marker == "*" else 40, label=label,
                       zorder=3)
    ax.xaxis_date()
    # Some room either side, at least an hour: a single run would otherwise sit on an axis
    # of several years.
    first, last = _days(done[0].created_at), _days(done[-1].created_at)
    pad = max((last - first) * 0.05, 1 / 24)
    ax.set_xlim(first - pad, last + pad)
    counts = [max(1, r.events_processed or 0) for r in done]
    if max(counts) > 50 * min(counts):
        ax.set_yscale("log")
        ax.set_ylabel("events processed (count, log scale)")
    else:
        ax.set_ylim(0, max(counts) * 1.15)
        ax.set_ylabel("events processed (count)")
    _date_axis(ax)
    ax.set_xlabel("run queued at (UTC)")
    ax.set_title("Learning runs: gate verdicts and publish decisions", loc="left")
    fig.legend(loc="outside right upper", frameon=False)
    ax.grid(color="#dddddd", linewidth=0.5)
    return _svg(fig)


def chart_specs(specs: Sequence[SpecVersion], now: datetime) -> str | None:
    """The spec timeline: each version as a bar, draft then published then archived. None
    without specs."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not specs:
        return None
    fig = _figure(11, 0.45 * len(specs) + 1.8)
    assert isinstance(fig, Figure)
    ax = fig.subplots()
    colors = {"draft": "#aab7b8", "published": "#27ae60", "archived": "#d5d8dc"}
    start_all = min(s.created_at for s in specs)
    end_all = max(now, max(s.archived_at or s.published_at or s.created_at for s in specs))
    minimum = (end_all - start_all) / 200 or timedelta(seconds=1)
    for i, s in enumerate(specs):
        spans = []
        draft_end = s.published_at or s.archived_at or now
        spans.append((s.created_at, draft_end, "draft"))
        if s.published_at:
            spans.append((s.published_at, s.archived_at or now, "published"))
        if s.archived_at:
            spans.append((s.archived_at, end_all, "archived"))
        for start, end, kind in spans:
            width = max(end - start, minimum)
            ax.barh(i, width.total_seconds() / 86400, left=_days(start),
                    color=colors[kind], height=0.6)
    ax.set_yticks(range(len(specs)), [f"v{s.version} ({s.status})" for s in specs])
    ax.xaxis_date()
    _date_axis(ax)
    ax.set_xlabel("time (UTC)")
    ax.set_title("Persona spec timeline", loc="left")
    fig.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()],
               loc="outside right upper", frameon=False)
    return _svg(fig)


# ----------------------------------------------------------------------------- the page


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _days(value: datetime) -> float:
    """matplotlib's date units (days since its default epoch, 1970-01-01 UTC), as
    matplotlib.dates.date2num gives them (which is untyped)."""
    return (value - EPOCH).total_seconds() / 86400


def _date_axis(ax: object) -> None:
    """Dates on the x axis in concise form (2026-11-30, 14:00 ...) whatever the span."""
    from matplotlib.axes import Axes
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    assert isinstance(ax, Axes)
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]


def _t(value: datetime | None) -> str:
    return "—" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _e(value: object) -> str:
    return html.escape("—" if value is None else str(value))


def _card(title: str, big: str, small: str, cls: str = "") -> str:
    """A summary card; `big` and `small` are HTML-safe already (escaped by the caller)."""
    return f"<div class='card'>{title}<b class='{cls}'>{big}</b>{small}</div>"


def _last_run(o: TwinOverview) -> str:
    """The last run's gate and decision in words (escaped)."""
    gate = {True: "passed", False: "did not pass", None: "—"}[o.last_run_gate_passed]
    if o.last_run_trigger == "owner_rollback":
        gate = "not run (a rollback by hand)"
    if o.last_run_failed_checks:
        gate += f" ({', '.join(o.last_run_failed_checks)})"
    decision = o.last_run_publish_decision or "—"
    if o.last_run_hold_reason:
        decision += f" ({o.last_run_hold_reason})"
    under_way = f" · a run is {o.next_run_status}" if o.next_run_status else ""
    held = ""  # a failed run holding the scheduler back (its time not passed yet)
    retry = o.last_run_retry_not_before
    if retry and retry > datetime.now(UTC) and not o.next_run_status:
        held = _e(" · failed: no scheduled run before ") + _t(retry)
    return (
        _e(f"gate {gate} · {decision} · ") + _t(o.last_run_finished_at) + _e(under_way) + held
    )


GATE_WORDS = {True: "passed", False: "did not pass", None: None}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px}h1{margin-bottom:4px}.sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}.card{border:1px solid #ddd;
border-radius:8px;padding:10px 14px;min-width:150px}.card b{display:block;font-size:22px}
figure.chart{margin:24px 0;border:1px solid #eee;border-radius:8px;padding:8px}
figure.chart svg{width:100%;height:auto;display:block}figcaption{color:#555;font-size:14px;
margin:6px 4px}table{border-collapse:collapse;width:100%;font-size:13px}td,th{border-bottom:1px
solid #eee;padding:4px 6px;text-align:left;vertical-align:top}.bad{color:#a93226}.ok{color:#1e8449}
ul.moves{margin:2px 0;padding-left:18px}
"""


def render(data: ReportData, now: datetime) -> str:
    """The report as one HTML document (inline CSS and SVG only). `now` closes the open bands
    (the current status, the live spec) and stamps the page."""
    o = data.overview
    moves = data.moves or run_moves(data)
    charts = [
        ("confidence", chart_confidence(data.trend, data.settings, now),
         "Each panel is a module: its confidence after each learning run (line), the 95% Wilson "
         "interval of its weighted evidence (grey band; the status thresholds apply to its "
         "bounds) and its status (background)."),
        ("reasons", chart_reasons(data.reasons),
         "Votes learned by completed runs, cast in the last 30 UTC days, by the reason users "
         "gave."),
        ("approval", chart_approval(data.feedback),
         "Share of +1 among +1 and -1 votes; a wide interval means few votes."),
        ("runs", chart_runs(data.runs),
         ("The last run" if len(data.runs) == 1 else f"The last {len(data.runs)} runs")
         + ": whether the regression gate passed and whether the run published the draft "
         "spec."),
        ("specs", chart_specs(data.specs, now),
         "Each persona spec version: drafted, published, archived."),
    ]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Twin report: {_e(o.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(o.name)}</h1><p class='sub'>twin {_e(o.twin_id)} · report of {_t(now)}</p>",
        "<div class='cards'>",
        f"<div class='card'>modules<b>{o.modules}</b>{o.modules_active} active · "
        f"{o.modules_probation} probation · {o.modules_disabled} disabled · "
        f"{o.modules_insufficient_data} insufficient data</div>",
        _card("published spec", f"v{o.published_version}" if o.published_version else "—",
              f"since {_t(o.published_at)}"),
        _card("latest draft", f"v{o.draft_version}" if o.draft_version else "—",
              f"edited {_t(o.draft_updated_at)}"),
        _card("last run", _e(o.last_run_status), _last_run(o),
              # A rollback by hand ran no gate (gate_passed null): completed is all it says.
              "ok" if o.last_run_status == "completed" and o.last_run_gate_passed is not False
              else "bad"),
        _card("waiting evidence", str(o.pending_events), f"since {_t(o.pending_since)}"),
        _card("production watch", _e(o.watch_state), "of the spec published last"),
        "</div>",
    ]
    for name, svg, caption in charts:
        if svg is None:
            parts.append(f"<p class='empty' id='chart-{name}-empty'>No data yet for the "
                         f"{_e(name)} chart.</p>")
            continue
        parts.append(f"<figure class='chart' id='chart-{name}'>{svg}"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts.append("<h2>Runs and what moved</h2><table><tr><th>queued (UTC)</th><th>status</th>"
                 "<th>events</th><th>gate</th><th>decision</th><th>what moved</th></tr>")
    versions = {str(s.id): s.version for s in data.specs}
    for r in data.runs:
        checks = ", ".join(
            f"{c.get('name')}: {c.get('verdict')}" for c in (r.gate_report or {}).get("checks", [])
        )
        decision = (r.publish_decision or "—") + (f" ({r.hold_reason})" if r.hold_reason else "")
        gate = "not run" if r.trigger == "owner_rollback" else GATE_WORDS[r.gate_passed]
        watched = describe_watch(r.gate_report, versions)
        said = [*([watched] if watched else []), *moves.get(r.id, [])]
        sentences = "".join(f"<li>{_e(s)}</li>" for s in said)
        parts.append(
            f"<tr><td>{_t(r.created_at)}</td><td>{_e(r.status)}</td>"
            f"<td>{_e(r.events_processed)}</td><td>{_e(checks or gate)}</td>"
            f"<td>{_e(decision)}</td><td><ul class='moves'>{sentences}</ul>"
            f"{_e(r.error) if r.error else ''}</td></tr>"
        )
    parts.append("</table></body></html>")
    return "\n".join(parts)
