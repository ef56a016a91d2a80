"""The report's charts (worker/report.py) drawn from data alone: what a reader would miss."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from worker.models import LearningSettings, ModuleStatus
from worker.report import chart_confidence
from worker.views import TrendPoint

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
