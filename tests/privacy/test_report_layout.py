"""The audit report as a browser shows it: no page overflow at 1280 px, personalization
named as such, no literal backticks (headless Chromium through Playwright)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from privacy.ledger import record_event
from privacy.params import DPParams
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.platform import Platform
from tests.factories import make_tenant

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs it)"),
]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_report_fits_1280_px_and_names_personalization(platform: Platform, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    acme = make_tenant(platform, "acme", budget_epsilon=8.0)
    round_params = DPParams(1.234567891234, 0.0625, 16, 1.0, 1e-5)
    with session_scope(platform.engine) as session:
        for run in (uuid.uuid4().hex, uuid.uuid4().hex):  # long ids, as runs have
            for rnd in range(1, 21):
                record_event(session, tenant_id=acme.tenant.id, run_id=run, round=rnd,
                             params=round_params, spec_sha256="a" * 64)  # fmt: skip
            record_event(session, tenant_id=acme.tenant.id, run_id=run, round=21,
                         params=round_params, spec_sha256="a" * 64,
                         purpose="personalize")  # fmt: skip
            record_event(session, tenant_id=acme.tenant.id, run_id=run, round=21,
                         params=DPParams(10.0, 1.0, 2, 1.0, 1e-5), spec_sha256="a" * 64,
                         purpose="evaluate")  # fmt: skip
    with TestClient(create_app(platform, ServingConfig(operator_token="o" * 40))) as client:
        page = client.get("/v1/privacy/report?format=html", headers=acme.admin).text
    report = tmp_path / "report.html"
    report.write_text(page)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.goto(report.as_uri())
        width = tab.evaluate("document.documentElement.scrollWidth")
        text = tab.inner_text("body")
        browser.close()
    assert width <= 1280, f"the page is {width} px wide at a 1280 px window"
    assert "`" not in text
    assert text.count("personalization") >= 2 and "final evaluation" in text
    assert "\t21\t" not in text  # the final phase is not shown as round 21
