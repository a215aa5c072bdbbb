"""The web console in a real headless Chromium against a real uvicorn server on 127.0.0.1.

Every page is opened as a tenant admin would (sign in with a key, click, type) and its
screenshots, desktop and phone width, are written to ``$FEDTEXT_TEST_ARTIFACTS/console``
(default ``var/test-artifacts/console``). Each page is watched for console errors, page
errors and Content-Security-Policy violations; any of them fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from sqlmodel import Session

from clients.data import DEMO_LABELS
from fedtext.server_thread import BackgroundServer
from models import build_model, save_weights
from orchestration.worker import LocalRunLauncher
from privacy.db import create_tables as create_ledger_tables
from privacy.ledger import record_event
from privacy.params import DPParams
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import create_tables, session_scope
from tenancy.platform import Platform
from tenancy.registry import store_model_version
from tenancy.tables import RoundMetric, TrainingRun, utcnow
from tests.factories import TenantFixture, agree, make_tenant, tiny_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on PATH: install Debian's package (apt-get install -y chromium); "
        ".ci/run installs it",
    ),
]

# What headless Chromium needs as root on a machine without outside network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 812}
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FEDTEXT_TEST_ARTIFACTS", REPO / "var" / "test-artifacts"))
SHOTS = ARTIFACTS / "console"
LEDGER_ROUNDS = 6
BAD_KEY_MESSAGE = "Missing, invalid, revoked or expired API key."

# Records CSP violations where the test can read them (init scripts are exempt from CSP).
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


@dataclass
class Site:
    url: str
    platform: Platform
    acme: TenantFixture
    globex: TenantFixture
    initech: TenantFixture
    acme_run_id: str


def _store_version(
    platform: Platform, tenant: TenantFixture, name: str, seed: int, *, deploy: bool, acc: float
) -> None:
    import torch

    torch.manual_seed(seed)
    spec = tiny_spec()
    with session_scope(platform.engine) as session:
        store_model_version(
            session=session,
            keyring=platform.keyring,
            store=platform.store,
            tenant=tenant.tenant,
            name=name,
            spec_json=spec.to_json(),
            weights=save_weights(build_model(spec)),
            metrics={"accuracy": acc, "macro_f1": acc - 0.08, "personalized": True},
            deploy=deploy,
        )


def _seed_run_and_ledger(platform: Platform, tenant: TenantFixture) -> str:
    """A finished run with per-round metrics, and its rounds charged to the ledger."""
    with Session(platform.engine) as session:
        run = TrainingRun(
            owner_tenant_id=tenant.tenant.id,
            status="completed",
            simulation_json=json.dumps({"tenants": ["acme", "globex"], "rounds": 3}),
            checkpoint_round=3,
            finished_at=utcnow(),
        )
        session.add(run)
        session.commit()
        run_id = run.id
        for rnd, (acc, f1) in enumerate([(0.52, 0.41), (0.61, 0.55), (0.66, 0.6)], start=1):
            for phase, a, f in (("train", acc + 0.04, None), ("evaluate", acc, f1)):
                session.add(
                    RoundMetric(
                        run_id=run_id,
                        tenant_id=tenant.tenant.id,
                        round=rnd,
                        phase=phase,
                        examples=480,
                        loss=1.1 - acc,
                        accuracy=a,
                        macro_f1=f,
                    )
                )
        session.commit()
    with session_scope(platform.engine) as session:
        for rnd in range(1, LEDGER_ROUNDS + 1):
            record_event(
                session,
                tenant_id=tenant.tenant.id,
                run_id=run_id if rnd <= 3 else "earlier-run",
                round=(rnd - 1) % 3 + 1,
                params=DPParams(1.1, 0.05, 20, 1.0, 1e-5),
                spec_sha256="0" * 64,
                # The seeded run is user-level (k = 8), the earlier one per example.
                **(
                    {"privacy_unit": "user", "applied": {"max_examples_per_user": 8}}
                    if rnd <= 3
                    else {}
                ),
            )
    return run_id


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("console")
    platform = Platform.create(
        database_url=f"sqlite:///{root / 'fedtext.db'}",
        blob_dir=root / "blobs",
        key_provider="file",
        kek_file=root / "keys" / "kek.key",
    )
    create_tables(platform.engine)
    create_ledger_tables(platform.engine)
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    initech = make_tenant(platform, "initech")
    agree(platform, globex, "acme")
    agree(platform, acme, "globex")
    _store_version(platform, acme, "sentiment", 0, deploy=True, acc=0.68)
    _store_version(platform, acme, "sentiment", 1, deploy=False, acc=0.71)
    run_id = _seed_run_and_ledger(platform, acme)
    launcher = LocalRunLauncher(platform, root / "runs")
    app = create_app(platform, ServingConfig(), run_launcher=launcher)
    with BackgroundServer(app) as server:
        yield Site(server.url, platform, acme, globex, initech, run_id)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Watched:
    """A page whose console errors, page errors and CSP violations are collected."""

    page: Page
    errors: list[str] = field(default_factory=list)
    # Resource failures the test provokes on purpose (a refused key answers 401/403).
    allowed: re.Pattern[str] | None = None

    def on_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error" and not (self.allowed and self.allowed.search(msg.text)):
            self.errors.append(f"console: {msg.text}")

    def problems(self) -> list[str]:
        return [*self.errors, *(f"CSP: {v}" for v in self.page.evaluate("window.__csp || []"))]


def _open(browser: Browser, viewport: dict[str, int]) -> Watched:
    context = browser.new_context(
        viewport=viewport, locale="en-US", reduced_motion="reduce", accept_downloads=True
    )
    context.add_init_script(WATCH_CSP)
    page = context.new_page()
    page.set_default_timeout(15_000)
    watched = Watched(page)
    page.on("console", watched.on_console)
    page.on("pageerror", lambda exc: watched.errors.append(f"page error: {exc}"))
    return watched


@pytest.fixture
def desktop(browser: Browser) -> Iterator[Watched]:
    watched = _open(browser, DESKTOP)
    yield watched
    problems = watched.problems()
    watched.page.context.close()
    assert problems == []


@pytest.fixture
def phone(browser: Browser) -> Iterator[Watched]:
    watched = _open(browser, PHONE)
    yield watched
    problems = watched.problems()
    watched.page.context.close()
    assert problems == []


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, url: str, key: str) -> None:
    page.goto(f"{url}/console/")
    page.get_by_label("Admin API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def go(page: Page, section: str) -> None:
    page.get_by_role("navigation", name="Sections").get_by_role("link", name=section).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(section)


def test_console_is_served_with_a_strict_csp_and_no_inline_code(site: Site) -> None:
    with httpx.Client(base_url=site.url) as http:
        assert http.get("/console").headers["location"] == "/console/"
        page = http.get("/console/")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert page.headers["x-frame-options"] == "DENY"
        # Every script is a same-origin file; no inline code, no other host.
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page.text, re.S)
        assert scripts and all('src="/console/' in attrs and not body for attrs, body in scripts)
        assert not re.search(r"https?://", page.text)
        assets = re.findall(r'(?:src|href)="(/console/assets/[^"]+)"', page.text)
        assert {a.rsplit(".", 1)[1] for a in assets} == {"js", "css"}
        for asset in assets:
            r = http.get(asset)
            assert r.status_code == 200 and "immutable" in r.headers["cache-control"]
            assert r.headers["content-security-policy"] == csp
        for probe in ("/console/../serving/app.py", "/console/%2e%2e/console.py", "/console/x"):
            assert http.get(probe).status_code == 404
        # The console adds no route to the API's schema.
        assert not any(p.startswith("/console") for p in http.get("/openapi.json").json()["paths"])


def test_sign_in_deploy_roll_back_and_try_a_model(site: Site, desktop: Watched) -> None:
    page = desktop.page
    sign_in(page, site.url, site.acme.admin_key)
    expect(page.get_by_role("heading", level=1)).to_have_text("Runs")
    expect(page.locator(".tenant")).to_contain_text("acme")
    expect(page.get_by_role("link", name=site.acme_run_id[:8])).to_be_visible()
    # The key is in this tab's session storage only: not in the URL, not in a cookie.
    assert site.acme.admin_key not in page.url
    assert page.context.cookies() == []
    stored = page.evaluate("Object.values(sessionStorage)")
    assert stored == [site.acme.admin_key]
    assert page.evaluate("localStorage.length") == 0
    shot(page, "desktop-runs")

    page.get_by_role("link", name=site.acme_run_id[:8]).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Run {site.acme_run_id[:8]}")
    expect(page.get_by_role("img", name=re.compile("accuracy and macro-F1"))).to_be_visible()
    expect(page.locator("tbody tr")).to_have_count(6)  # 3 rounds x train/evaluate
    # What one epsilon of this run protects, from its ledger entries.
    expect(page.locator(".facts")).to_contain_text("Privacy unitper user (k = 8)")
    shot(page, "desktop-run")

    go(page, "Models")
    card = page.get_by_role("region", name=re.compile("^sentiment"))
    expect(card.get_by_role("heading", name="sentiment")).to_contain_text("v1 serving")
    card.get_by_role("button", name="Deploy version 2 of sentiment").click()
    expect(card.get_by_role("status")).to_have_text("Deployed: version 2 of sentiment now serves.")
    expect(page.get_by_role("heading", name="sentiment")).to_contain_text("v2 serving")
    page.get_by_role("button", name="Roll back").click()
    expect(page.get_by_role("heading", name="sentiment")).to_contain_text("v1 serving")

    # A sample sentence (ones the demo's models get right) fills the box and predicts.
    page.get_by_role("button", name="a negative one").click()
    expect(page.get_by_label("Sentence")).to_have_value(re.compile("Worst airline"))
    expect(page.locator("ol.scores li")).to_have_count(3)
    page.get_by_label("Sentence").fill("the flight was late again and the staff was rude")
    page.get_by_role("button", name="Predict").click()
    scores = page.locator("ol.scores li")
    expect(scores).to_have_count(3)
    labels = {scores.nth(i).locator(".label").inner_text() for i in range(3)}
    assert labels == set(DEMO_LABELS)
    expect(page.locator(".prediction")).to_contain_text("sentiment v1")
    shot(page, "desktop-models")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin API key")).to_be_focused()
    assert page.evaluate("sessionStorage.length") == 0


def test_privacy_shows_budget_chain_ledger_and_downloads_the_report(
    site: Site, desktop: Watched
) -> None:
    page = desktop.page
    sign_in(page, site.url, site.acme.admin_key)
    go(page, "Privacy")
    with httpx.Client(base_url=site.url, headers=site.acme.admin) as http:
        budget = http.get("/v1/privacy/budget").json()
    summary = page.get_by_test_id("budget-summary")
    expect(summary).to_contain_text(f"spent of {budget['budget_epsilon']:g}")
    expect(summary).to_contain_text(f"ε {round(budget['spent_epsilon'], 3):g}")
    expect(page.get_by_role("img", name=re.compile("Privacy budget"))).to_be_visible()
    # The chain check recomposes the ledger (PRV): seconds on a busy machine.
    chain = page.get_by_test_id("chain-status")
    expect(chain).to_contain_text("Both hash chains re-hash cleanly", timeout=30_000)
    expect(page.get_by_role("img", name=re.compile("Cumulative epsilon"))).to_be_visible()
    ledger = page.get_by_role("region", name="Ledger entries")
    expect(ledger.locator("tbody tr")).to_have_count(LEDGER_ROUNDS)
    expect(ledger.locator("tbody tr", has_text="per user (k = 8)")).to_have_count(3)
    expect(ledger.locator("tbody tr", has_text="per example")).to_have_count(LEDGER_ROUNDS - 3)
    shot(page, "desktop-privacy")

    with page.expect_download() as report:
        page.get_by_role("button", name="Audit report (HTML)").click()
    assert report.value.suggested_filename == "fedtext-audit-acme.html"
    html = Path(report.value.path()).read_text()
    assert "Methodology" in html and "acme" in html
    with page.expect_download() as export:
        page.get_by_role("button", name="Ledger (CSV)").click()
    rows = Path(export.value.path()).read_text().strip().splitlines()
    assert len(rows) == LEDGER_ROUNDS + 1  # a header, then one line per charge
    # The key never went into a download link (blob: URLs of fetched bodies).
    assert site.acme.admin_key not in report.value.url


def test_create_a_key_shown_once_then_revoke_it(site: Site, desktop: Watched) -> None:
    page = desktop.page
    sign_in(page, site.url, site.acme.admin_key)
    go(page, "Keys")
    page.get_by_label("Name", exact=True).fill("web shop")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_test_id("new-secret").get_by_role("textbox").input_value()
    assert secret.startswith("ftk_")
    predict = {"inputs": ["hello"], "top_k": 1}
    auth = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=site.url) as http:
        assert http.post("/v1/models/sentiment/predict", json=predict, headers=auth).is_success
    row = page.get_by_role("row", name=re.compile("web shop"))
    expect(row).to_contain_text("active")
    expect(page.get_by_role("row", name=re.compile("this session"))).to_have_count(1)
    shot(page, "desktop-keys")
    page.get_by_role("button", name="I have stored it").click()
    expect(page.get_by_test_id("new-secret")).to_have_count(0)
    assert secret not in page.content()

    row.get_by_role("button", name="Revoke key web shop").click()
    page.get_by_role("button", name="Confirm: revoke key web shop").click()
    expect(page.get_by_role("row", name=re.compile("web shop"))).to_contain_text("revoked")
    with httpx.Client(base_url=site.url) as http:
        r = http.post("/v1/models/sentiment/predict", json=predict, headers=auth)
    assert r.status_code == 401


def test_a_bad_key_and_a_predict_key_get_the_apis_message(site: Site, desktop: Watched) -> None:
    desktop.allowed = re.compile(r"Failed to load resource.*\b40[13]\b")
    page = desktop.page
    sign_in(page, site.url, "ftk_000000000000_not-a-key")
    expect(page.get_by_role("alert")).to_contain_text(BAD_KEY_MESSAGE)
    shot(page, "desktop-signin-refused")
    sign_in(page, site.url, site.acme.predict_key)
    expect(page.get_by_role("alert")).to_contain_text("This key lacks the admin scope.")
    assert page.evaluate("sessionStorage.length") == 0
    expect(page.get_by_role("navigation", name="Sections")).to_have_count(0)


def test_another_tenants_admin_sees_none_of_the_first_tenants_objects(
    site: Site, desktop: Watched
) -> None:
    desktop.allowed = re.compile(r"Failed to load resource.*\b404\b")
    page = desktop.page
    sign_in(page, site.url, site.initech.admin_key)
    expect(page.locator(".tenant")).to_contain_text("initech")
    expect(page.get_by_text("No runs yet.")).to_be_visible()
    go(page, "Models")
    expect(page.get_by_text("No model versions yet")).to_be_visible()
    go(page, "Privacy")
    expect(page.get_by_text("No release has been charged yet.")).to_be_visible()
    go(page, "Keys")
    keys = page.get_by_role("region", name="API keys")
    expect(keys.locator("tbody tr")).to_have_count(2)  # initech's own admin and predict keys
    for acme_key in (site.acme.admin_key, site.acme.predict_key):
        expect(keys).not_to_contain_text(acme_key.split("_")[1])
    page.goto(f"{site.url}/console/#/runs/{site.acme_run_id}")
    expect(page.get_by_role("alert")).to_contain_text("No such run.")


def test_phone_width_has_no_horizontal_scroll_and_works_by_keyboard(
    site: Site, phone: Watched
) -> None:
    page = phone.page
    page.goto(f"{site.url}/console/")
    shot(page, "phone-signin")
    # Keyboard only: the key field has focus; Enter submits.
    expect(page.get_by_label("Admin API key")).to_be_focused()
    page.keyboard.type(site.acme.admin_key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Runs")
    for section in ("Runs", "Models", "Privacy", "Keys", "Partners"):
        link = page.get_by_role("navigation", name="Sections").get_by_role("link", name=section)
        link.focus()
        page.keyboard.press("Enter")
        heading = page.get_by_role("heading", level=1)
        expect(heading).to_have_text(section)
        expect(heading).to_be_focused()  # focus follows the page, as on a full load
        expect(page.get_by_text("Loading…")).to_have_count(0)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{section} scrolls sideways by {overflow}px at 375px"
        shot(page, f"phone-{section.lower()}")
    expect(page.get_by_role("list", name="Partners")).to_contain_text("globex")


def test_start_a_tiny_run_see_its_rounds_appear_then_cancel_another(
    site: Site, desktop: Watched
) -> None:
    wayne, stark = make_tenant(site.platform, "wayne"), make_tenant(site.platform, "stark")
    agree(site.platform, stark, "wayne")
    desktop.allowed = re.compile(r"Failed to load resource.*\b403\b")
    page = desktop.page
    sign_in(page, site.url, wayne.admin_key)
    # The API's refusal is shown as its message: initech never agreed.
    page.get_by_label("Participants").fill("initech")
    page.get_by_role("button", name="Start run").click()
    expect(page.get_by_role("alert")).to_contain_text(
        "tenant 'initech' cannot take part (not a partner)"
    )

    page.get_by_label("Participants").fill("stark")
    page.get_by_role("spinbutton", name="Rounds").fill("1")
    page.get_by_label("Epsilon").fill("4")  # wayne's budget of 10 keeps room for the next run
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Batch size").fill("16")
    page.get_by_label("Personalization epochs").fill("0")
    page.get_by_label("Max training examples").fill("48")
    page.get_by_label("Max test examples").fill("16")
    # The form is built from the API's enums (/openapi.json): the default family, the one
    # that learns under DP, is preselected, and the run trains it.
    family = page.get_by_label("Model family")
    expect(family).to_have_value("encoder-head")
    options = family.locator("option").all_inner_texts()
    assert len(options) == 4 and options[0].startswith("Encoder + private head")
    expect(page.get_by_label("Deploy new versions")).to_have_value("if-better")
    page.get_by_label(re.compile("Secure mode")).uncheck()
    shot(page, "desktop-run-form")
    page.get_by_role("button", name="Start run").click()
    # Planning (each tenant's noise for the target) answers in seconds on a busy machine.
    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile(r"^Run "), timeout=60_000)
    run_id = page.locator(".facts .mono").inner_text()
    # The page follows the run: rounds done as progress, then the released final figures.
    expect(page.locator(".facts")).to_contain_text("completed", timeout=180_000)
    with Session(site.platform.engine) as session:
        stored = session.get(TrainingRun, run_id)
        assert stored is not None
        config = json.loads(stored.config_json)  # what the worker ran
    assert config["model"] == "encoder-head" and config["deploy"] == "if-better"
    # Released once at the end: each figure with its uncertainty, never a bare number.
    figures = page.get_by_label("Released final figures")
    expect(figures).to_contain_text("Macro-F1")
    expect(figures).to_contain_text("±")
    expect(page.get_by_role("progressbar", name="1 of 1 rounds done")).to_be_visible()
    shot(page, "desktop-run-live")
    with httpx.Client(base_url=site.url, headers=wayne.admin) as http:
        versions = http.get("/v1/models/encoder-head/versions").json()
    assert versions and versions[-1]["spec"]["family"] == "encoder-head"

    go(page, "Runs")
    page.get_by_label("Participants").fill("stark")
    page.get_by_role("spinbutton", name="Rounds").fill("20")
    page.get_by_role("button", name="Start run").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile(r"^Run "), timeout=60_000)
    page.get_by_role("button", name="Cancel run").click()
    page.get_by_role("button", name="Yes, cancel it").click()
    expect(page.locator(".facts")).to_contain_text("cancelled", timeout=30_000)
    expect(page.get_by_role("button", name="Cancel run")).to_have_count(0)
