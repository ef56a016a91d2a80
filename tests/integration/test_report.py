"""`pfl report` through the real stack, opened in headless Chromium (Debian's, installed by
scripts/setup) with the network cut off: every chart draws, nothing fails, nothing is fetched,
and nothing of another owner's twin is in it. A screenshot lands in artifacts/report.png."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from tests.conftest import ROOT, Stack, User
from tests.integration.helpers import Twin, create_twin
from worker.config import WorkerSettings
from worker.runner import Runner
from worker.store import Store

pytestmark = pytest.mark.integration

CHARTS = ("confidence", "reasons", "approval", "runs", "specs")
ARTIFACTS = ROOT / "artifacts"


def chromium() -> str:
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or ""):
        if path and Path(path).exists():
            return path
    pytest.fail("Debian's chromium is not installed; run scripts/setup")


def vote(user: User, twin: Twin, trace: str, score: int, reason: str | None,
         intent: str = "factual_with_evidence") -> None:
    user.client.table("persona_training_events").insert({
        "twin_id": twin.id, "trace_id": trace, "score": score, "reason": reason,
        "intent_label": intent}).execute()


def test_the_report_draws_every_chart_offline(
    stack: Stack, service, db: psycopg.Connection, make_user: Callable[[str], User],
    tmp_path: Path,
) -> None:
    owner, stranger = make_user("owner"), make_user("stranger")
    voters = [make_user(f"voter{i}") for i in range(4)]
    twin = create_twin(db, owner.id)
    strangers_twin = create_twin(db, stranger.id,
                                 {"secret_module_of_stranger": "secret_intent"})
    service.table("persona_specs").insert(
        {"twin_id": twin.id, "spec": {"modules": ["evidence_answers"], "voice": "new"}}).execute()
    settings = WorkerSettings(supabase_url=stack.url,
                              supabase_service_role_key=SecretStr(stack.service_key),
                              pfl_worker_id=f"report-{uuid.uuid4().hex[:6]}")
    runner = Runner(Store.connect(settings), settings.pfl_worker_id, 30)
    try:
        # Three runs: the factual module sinks, small talk climbs; the stranger's twin learns too.
        for round_, (score, reason) in enumerate(((1, "helpful"), (-1, "incorrect"),
                                                  (-1, "outdated"))):
            for i, v in enumerate(voters):
                vote(v, twin, f"r{round_}-f{i}", score if i else -score,
                     reason if i else "other")
                vote(v, twin, f"r{round_}-c{i}", 1, "helpful", intent="casual_chat")
                vote(v, strangers_twin, f"r{round_}-s{i}", -1, "unsafe", intent="secret_intent")
            for t in (twin, strangers_twin):
                [run] = runner.run_once(uuid.UUID(t.id))
                assert run.status == "completed"
    finally:
        runner.store.close()

    out = tmp_path / "report.html"
    env = {"SUPABASE_URL": stack.url, "SUPABASE_SERVICE_ROLE_KEY": stack.service_key,
           "PATH": "/usr/bin:/bin", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "pfl"), "report", "--twin", twin.id,
                           "--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page_html = out.read_text()
    assert "secret_module_of_stranger" not in page_html and strangers_twin.id not in page_html
    assert "evidence_answers fell from" in page_html or "evidence_answers confidence" in page_html
    # Self-contained: no script, no stylesheet or image fetched from anywhere.
    for fetching in ("<script", "<link", "<img", "src=", "href=\"http", "url(http",
                     "@import"):
        assert fetching not in page_html, fetching

    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: requests.append(r.url))
            page.context.route("**/*", lambda route: route.continue_()
                               if route.request.url.startswith("file://") else route.abort())
            page.goto(out.as_uri(), wait_until="load")
            for name in CHARTS:
                figure = page.locator(f"figure#chart-{name}")
                assert figure.count() == 1, f"chart {name} is missing"
                box = figure.locator("svg").bounding_box()
                assert box is not None and box["width"] > 300 and box["height"] > 100, (name, box)
                # Something was drawn: paths (lines, bars, glyphs of titles and legends).
                assert figure.locator("svg path").count() > 20, name
                assert figure.locator("figcaption").inner_text().strip()
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith("file://")] == []
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
