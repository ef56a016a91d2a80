"""The report's charts (worker/report.py) drawn from data alone: what a reader would miss."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from worker.models import LearningSettings, ModuleStatus
from worker.report import _last_run, chart_confidence
from worker.views import TrendPoint, TwinOverview

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


def test_a_module_changed_by_one_run_still_shows_its_confidence_line() -> None:
    # After a twin's first run every module has one change; the line (and the Wilson band)
    # holds its value until now instead of being a single point that draws nothing.
    point = TrendPoint(
        twin_id=uuid.uuid4(), module_id=uuid.uuid4(), module_key="evidence_answers",
        intent_label="factual_with_evidence", run_id=uuid.uuid4(),
        measured_at=NOW - timedelta(hours=1), confidence_before=0.5, confidence=0.8,
        status_before=ModuleStatus.insufficient_data, status=ModuleStatus.insufficient_data,
        success_weight=3.0, failure_weight=0.0, evidence_weight=3.0, wilson_lower=0.4,
        wilson_upper=1.0,
    )
    svg = chart_confidence([point], LearningSettings(), NOW)
    assert svg is not None
    # The first path stroked in the confidence colour is the panel's line (the second is the
    # legend's sample): it must have a segment, not only a move to its one point.
    line = re.search(r'<path d="([^"]*)"[^>]*style="[^"]*stroke: #1f4e79', svg)
    assert line is not None
    assert "L " in line.group(1)


def test_the_last_run_line_says_until_when_a_failed_run_holds_the_twin_back() -> None:
    def line(retry: datetime | None, next_run: str | None = None) -> str:
        overview = TwinOverview(
            twin_id=uuid.uuid4(), name="t", modules=1, modules_active=0, modules_probation=0,
            modules_disabled=0, modules_insufficient_data=1, pending_events=1,
            last_run_status="failed", last_run_finished_at=NOW,
            last_run_retry_not_before=retry, next_run_status=next_run,
        )
        return _last_run(overview)

    later = datetime.now(UTC) + timedelta(minutes=5)
    assert f"no scheduled run before {later.strftime('%Y-%m-%d %H:%M UTC')}" in line(later)
    # Its time passed, or a run (an owner's request) is queued: nothing holds the twin back.
    assert "no scheduled run" not in line(datetime.now(UTC) - timedelta(seconds=1))
    assert "no scheduled run" not in line(later, "queued")
    assert "no scheduled run" not in line(None)
