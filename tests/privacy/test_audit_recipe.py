"""The auditor's path: export over HTTP, run the docs/AUDIT.md recipe, get the report's numbers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from privacy.accounting import compose_epsilon
from privacy.ledger import record_event
from privacy.params import DPParams
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.platform import Platform
from tests.factories import TenantFixture, make_tenant

ROOT = Path(__file__).resolve().parents[2]
RUN_A = DPParams(1.1, 1 / 32, 32, 1.0, 1e-5)
RUN_B = DPParams(1.3, 1 / 16, 16, 0.5, 1e-5)


def recipe() -> dict[str, Any]:
    """The first python block of docs/AUDIT.md, run as an auditor would import it."""
    doc = (ROOT / "docs" / "AUDIT.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S)
    assert code is not None, "docs/AUDIT.md lost its recipe"
    namespace: dict[str, Any] = {"__name__": "recipe"}
    exec(compile(code.group(1), "AUDIT.md recipe", "exec"), namespace)
    return namespace


def fill(platform: Platform, tenant_id: str) -> None:
    with session_scope(platform.engine) as session:
        for rnd in (1, 2, 3):
            record_event(session, tenant_id=tenant_id, run_id="run-a", round=rnd,
                         params=RUN_A, spec_sha256="a" * 64)  # fmt: skip
        for rnd in (1, 2):
            record_event(session, tenant_id=tenant_id, run_id="run-b", round=rnd,
                         params=RUN_B, spec_sha256="b" * 64, dataset="tickets")  # fmt: skip


@pytest.fixture
def client(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform, ServingConfig(operator_token="o" * 40))) as c:
        yield c


@pytest.fixture
def acme(platform: Platform) -> TenantFixture:
    t = make_tenant(platform, "acme", budget_epsilon=8.0)
    fill(platform, t.tenant.id)
    other = make_tenant(platform, "globex")
    with session_scope(platform.engine) as session:
        record_event(session, tenant_id=other.tenant.id, run_id="run-a", round=1,
                     params=RUN_B, spec_sha256="c" * 64)  # fmt: skip
    return t


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_recipe_on_the_export_gives_the_reports_numbers(
    client: TestClient, acme: TenantFixture, tmp_path: Path, fmt: str
) -> None:
    export = client.get(f"/v1/privacy/ledger?format={fmt}", headers=acme.admin)
    assert export.status_code == 200
    assert "attachment" in export.headers["content-disposition"]
    path = tmp_path / f"ledger.{fmt}"
    path.write_bytes(export.content)
    report = client.get("/v1/privacy/report?format=json", headers=acme.admin).json()

    (result,) = recipe()["recompute"](str(path)).values()  # only acme's own entries
    assert result["chain"] == "intact" and result["entries"] == 5
    assert result["delta"] == report["delta"] == 1e-5
    # The recipe is exactly the report's independent recomputation ...
    assert result["epsilon"] == pytest.approx(report["independent"]["epsilon"], rel=1e-9)
    # ... and agrees with the figure of record (Opacus PRV) to within 2%.
    assert result["epsilon"] == pytest.approx(report["spent_epsilon"], rel=0.02)
    assert report["independent"]["agrees"] is True
    by_dataset = {d["dataset"]: d["spent_epsilon"] for d in report["datasets"]}
    assert set(result["datasets"]) == set(by_dataset) == {"default", "tickets"}
    for name, eps in result["datasets"].items():
        assert eps == pytest.approx(by_dataset[name], rel=0.02)


def test_recipe_finds_an_edited_export_entry(
    client: TestClient, acme: TenantFixture, platform: Platform, tmp_path: Path
) -> None:
    with platform.engine.begin() as conn:
        conn.execute(text("UPDATE privacy_event SET noise_multiplier = 9.0 WHERE seq = 4"))
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(client.get("/v1/privacy/ledger?format=jsonl", headers=acme.admin).content)
    (result,) = recipe()["recompute"](str(path)).values()
    assert result["chain"] == "entry 4: hash mismatch (edited)"


def test_report_json_has_every_field(client: TestClient, acme: TenantFixture) -> None:
    r = client.get("/v1/privacy/report", headers=acme.admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    rep = r.json()
    every = compose_epsilon([RUN_A] * 3 + [RUN_B] * 2, 1e-5)
    assert rep["tenant"] == "acme" and rep["budget_epsilon"] == 8.0
    assert rep["spent_epsilon"] == pytest.approx(every, rel=1e-6)
    assert rep["spent_epsilon_rdp"] >= rep["spent_epsilon"]
    assert rep["remaining_epsilon"] == pytest.approx(8.0 - every, rel=1e-6)
    assert rep["accountant"] == "prv" and rep["cross_check_accountant"] == "rdp"
    assert [(u["run_id"], u["rounds"], u["datasets"]) for u in rep["runs"]] == [
        ("run-a", 3, ["default"]),
        ("run-b", 2, ["tickets"]),
    ]
    assert rep["runs"][0]["epsilon"] == pytest.approx(compose_epsilon([RUN_A] * 3, 1e-5))
    rows = rep["rounds"]
    assert [w["seq"] for w in rows] == [1, 2, 3, 4, 5]
    fields = ("noise_multiplier", "sample_rate", "steps", "clip_norm", "delta", "privacy_unit",
              "mechanism", "accountant_version", "fedtext_version", "spec_sha256")  # fmt: skip
    assert all(w["dataset"] in ("default", "tickets") for w in rows)
    assert all(key in w for w in rows for key in fields)
    cumulative = [w["cumulative_epsilon"] for w in rows]
    assert cumulative == sorted(cumulative) and cumulative[-1] == pytest.approx(every)
    assert rep["chain"]["ledger_ok"] and rep["chain_ok"]
    assert rep["chain"]["ledger_head"] == rows[-1]["entry_hash"]
    questions = " ".join(m["question"] for m in rep["methodology"]).lower()
    answers = " ".join(m["answer"] for m in rep["methodology"]).lower()
    for needle in ("unit of privacy", "neighbouring relation", "delta", "not covered"):
        assert needle in questions
    for needle in ("evaluation", "torchcsprng", "add-or-remove one example", "1e-05"):
        assert needle in answers


def test_report_html_has_the_plot_and_the_tables(client: TestClient, acme: TenantFixture) -> None:
    r = client.get("/v1/privacy/report?format=html", headers=acme.admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    svg = page[page.index("<svg") : page.index("</svg>")]
    assert svg.count('class="point"') == 5  # one point per ledger entry
    assert "budget 8" in svg and "<path" in svg
    for needle in ("Chain check", "Independent recomputation", "Runs", "Rounds", "Methodology",
                   "NIST SP 800-226", "run-a", "tickets", "agrees"):  # fmt: skip
        assert needle in page
    assert "<script" not in page


def test_budget_change_over_http_is_recorded(client: TestClient, acme: TenantFixture) -> None:
    r = client.post(
        "/v1/privacy/budget", json={"epsilon": 12, "reason": "board approved"}, headers=acme.admin
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["old_epsilon"] == 8.0 and body["new_epsilon"] == 12.0 and body["dataset"] == "*"
    assert body["actor"].startswith("admin key ")
    r = client.post(
        "/v1/privacy/budget", json={"epsilon": 1.0, "dataset": "tickets"}, headers=acme.admin
    )
    assert r.status_code == 201
    budget = client.get("/v1/privacy/budget", headers=acme.admin).json()
    assert budget["budget_epsilon"] == 12.0 and budget["dataset_budgets"] == {"tickets": 1.0}
    changes = client.get("/v1/privacy/budget/changes", headers=acme.admin).json()
    assert [c["seq"] for c in changes] == [1, 2, 3]  # 1: the budget acme was created with
    rep = client.get("/v1/privacy/report", headers=acme.admin).json()
    assert rep["chain"]["budget_chain_ok"] and rep["chain"]["budget_matches_tenant"]
    assert [c["new_epsilon"] for c in rep["budget_changes"]] == [8.0, 12.0, 1.0]
    # Refusals: a predict key, a non-positive budget, a bad dataset name.
    assert client.post("/v1/privacy/budget", json={"epsilon": 99},
                       headers=acme.predict).status_code == 403  # fmt: skip
    assert client.post("/v1/privacy/budget", json={"epsilon": 0},
                       headers=acme.admin).status_code == 422  # fmt: skip
    bad = client.post("/v1/privacy/budget", json={"epsilon": 2, "dataset": "a b"},
                      headers=acme.admin)  # fmt: skip
    assert bad.status_code == 422 and "Invalid dataset name" in bad.json()["detail"]


def test_budget_changed_outside_the_record_shows_in_the_report(
    client: TestClient, acme: TenantFixture, platform: Platform
) -> None:
    client.post("/v1/privacy/budget", json={"epsilon": 9}, headers=acme.admin)
    with platform.engine.begin() as conn:
        conn.execute(text("UPDATE tenant SET budget_epsilon = 99 WHERE name = 'acme'"))
    rep = client.get("/v1/privacy/report", headers=acme.admin).json()
    assert rep["chain"]["budget_matches_tenant"] is False and rep["chain_ok"] is False


def test_ledger_json_default_and_format_validation(client: TestClient, acme: TenantFixture) -> None:
    rows = client.get("/v1/privacy/ledger", headers=acme.admin).json()
    assert [r["dataset"] for r in rows] == ["default"] * 3 + ["tickets"] * 2
    assert all(r["tenant_id"] == acme.tenant.id for r in rows)
    assert client.get("/v1/privacy/ledger?format=xml", headers=acme.admin).status_code == 422
    assert client.get("/v1/privacy/report?format=pdf", headers=acme.admin).status_code == 422
    assert client.get("/v1/privacy/report", headers=acme.predict).status_code == 403


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_recipe_covers_evaluation_releases_and_their_purpose(
    client: TestClient, acme: TenantFixture, platform: Platform, tmp_path: Path, fmt: str
) -> None:
    released = DPParams(10.0, 1.0, 2, 1.0, 1e-5)  # two noised confusion matrices
    with session_scope(platform.engine) as session:
        record_event(session, tenant_id=acme.tenant.id, run_id="run-b", round=3,
                     params=released, spec_sha256="b" * 64, purpose="evaluate")  # fmt: skip
    path = tmp_path / f"ledger.{fmt}"
    path.write_bytes(client.get(f"/v1/privacy/ledger?format={fmt}", headers=acme.admin).content)
    (result,) = recipe()["recompute"](str(path)).values()
    assert result["chain"] == "intact" and result["entries"] == 6
    report = client.get("/v1/privacy/report?format=json", headers=acme.admin).json()
    assert report["rounds"][-1]["purpose"] == "evaluate"
    assert result["epsilon"] == pytest.approx(report["spent_epsilon"], rel=0.02)
    # Relabelling the evaluation as a training round breaks its hash.
    text_ = path.read_text()
    path.write_text(text_.replace("evaluate", "train"))
    (result,) = recipe()["recompute"](str(path)).values()
    assert result["chain"] == "entry 6: hash mismatch (edited)"
