"""Each tenant governs what a partner's run does to it (issue 24 findings 2, 3, 6, 7 and
the secure_mode part of 10): its deploy policy, its floor for run settings, the dataset its
budget is charged under, refusals that show nobody else's figures, cheap refusals.

Through the real surfaces: the HTTP API over a real app and database, and the ServerApp's
planning and charging over real tables (the run launcher records and starts nothing: these
tests are about what submission and planning decide, not the worker)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

import serving.protocols.v1.runs as runs_router
from privacy.accounting import _noise
from privacy.gate import _gaussian_sigma, gaussian_delta, gaussian_sigma
from privacy.ledger import tenant_events, verify_chain
from runs.spec import RunSpec
from server.charging import make_charge, plan_run
from server.discovery import NodeInfo
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.tables import TrainingRun
from tenancy.tenants import create_api_key
from tests.factories import TenantFixture, agree, make_tenant, tiny_spec

FAST = {"epsilon": 3.0, "rounds": 1, "batch_size": 16, "personalize_epochs": 0}


class RecordingLauncher:
    """Starts nothing: what submission decides is the subject here."""

    def __init__(self) -> None:
        self.launched: list[str] = []

    def check(self, config: dict[str, Any]) -> None:
        return None

    def launch(self, run_id: str) -> int:
        self.launched.append(run_id)
        return 0

    def cancel(self, run_id: str, pid: int | None) -> None:
        return None


def _client(platform: Platform, launcher: RecordingLauncher | None = None) -> TestClient:
    app = create_app(platform, ServingConfig(), run_launcher=launcher or RecordingLauncher())
    return TestClient(app)


def _partners(platform: Platform) -> tuple[TenantFixture, TenantFixture]:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    agree(platform, globex, "acme")
    return acme, globex


def _run_row(platform: Platform, run_id: str, owner: str | None = None) -> None:
    with session_scope(platform.engine) as session:
        session.add(TrainingRun(id=run_id, status="running", owner_tenant_id=owner))


def _nodes(dataset: str = "default") -> list[NodeInfo]:
    return [NodeInfo(1, "acme", 1000), NodeInfo(2, "globex", 1000, dataset=dataset)]


def _cfg(run_id: str, **settings: Any) -> RunSpec:
    base = {"participants": "acme,globex", "batch-size": 100, "rounds": 1,
            "personalize-epochs": 0, "epsilon": 2.0, "model": "lstm", "local-epochs": 1,
            "learning-rate": 0.01, "run-id": run_id}  # fmt: skip
    return RunSpec.from_run_config({**base, **settings})


# ------------------------------------------------------------------ the policy itself


def test_a_tenant_reads_and_sets_its_own_policy_and_bad_values_are_422(
    platform: Platform,
) -> None:
    acme, globex = _partners(platform)
    with _client(platform) as c:
        assert c.get("/v1/policy", headers=acme.admin).json() == {
            "deploy": "if-better", "require_secure_mode": False, "max_epsilon": None,
            "families": [], "dataset": "default",
        }  # fmt: skip
        r = c.put(
            "/v1/policy",
            json={"deploy": "never", "require_secure_mode": True, "max_epsilon": 2.0,
                  "families": ["LSTM", "encoder-head"], "dataset": "crm-2026"},
            headers=globex.admin,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json() == {
            "deploy": "never", "require_secure_mode": True, "max_epsilon": 2.0,
            "families": ["encoder-head", "lstm"], "dataset": "crm-2026",
        }  # fmt: skip
        # Parts left out keep their value; the limit on epsilon can be lifted.
        r = c.put("/v1/policy", json={"clear_max_epsilon": True}, headers=globex.admin)
        assert r.json()["max_epsilon"] is None and r.json()["deploy"] == "never"
        # Another tenant's policy is not changed by it, and a predict key cannot set one.
        assert c.get("/v1/policy", headers=acme.admin).json()["deploy"] == "if-better"
        assert (
            c.put("/v1/policy", json={"deploy": "always"}, headers=globex.predict).status_code
            == 403
        )
        for body, words in (
            ({"families": ["cnn"]}, "Unknown model family cnn"),
            ({"dataset": "../x"}, "Invalid dataset name"),
            ({"deploy": "sometimes"}, "deploy"),
            ({"max_epsilon": -1}, "max_epsilon"),
            ({"tenant": "acme"}, "tenant"),
            ({"max_epsilon": 3, "clear_max_epsilon": True}, "not both"),
        ):
            r = c.put("/v1/policy", json=body, headers=globex.admin)
            assert r.status_code == 422 and words in r.text, (body, r.text)


# ------------------------------------------------------------------ finding 2: deploys


def test_each_tenant_gets_the_stricter_of_its_deploy_policy_and_the_runs(
    sqlite_platform: Platform,
) -> None:
    platform = sqlite_platform
    acme, globex = _partners(platform)
    agree(platform, make_tenant(platform, "initech"), "acme")
    with _client(platform) as c:
        assert (
            c.put("/v1/policy", json={"deploy": "first"}, headers=globex.admin).status_code == 200
        )
    _run_row(platform, "r-always", owner=acme.tenant.id)
    nodes = [*_nodes(), NodeInfo(3, "initech", 1000)]
    cfg = _cfg("r-always", deploy="always", participants="acme,globex,initech")
    plans, refused = plan_run(platform, nodes, cfg)
    assert refused == []
    deploy = {p.tenant_name: p.deploy for p in plans.values()}
    # acme and initech never set a policy: the default (if-better) is stricter than always.
    assert deploy == {"acme": "if-better", "globex": "first", "initech": "if-better"}
    # A run may only be stricter than a tenant's policy.
    _run_row(platform, "r-never", owner=acme.tenant.id)
    plans, _ = plan_run(platform, _nodes(), _cfg("r-never", deploy="never"))
    assert {p.deploy for p in plans.values()} == {"never"}


# ------------------------------------------------------------------ finding 3: datasets


def test_a_partner_cannot_charge_a_tenant_under_another_dataset_label(
    platform: Platform,
) -> None:
    """The review's case: globex set epsilon 0.01 on "default"; acme's run named another
    label and got 202. Now a run cannot name a dataset at all, and the charge lands on
    globex's own."""
    acme, globex = _partners(platform)
    launcher = RecordingLauncher()
    with _client(platform, launcher) as c:
        r = c.post(
            "/v1/privacy/budget",
            json={"epsilon": 0.01, "dataset": "default", "reason": "pilot"},
            headers=globex.admin,
        )
        assert r.status_code == 201, r.text
        body = {**FAST, "participants": ["globex"]}
        r = c.post("/v1/runs", json={**body, "dataset": "anything-else"}, headers=acme.admin)
        assert r.status_code == 422
        assert "a run does not choose the dataset its charges land on" in r.text
        r = c.post("/v1/runs", json=body, headers=acme.admin)
        assert r.status_code == 409 and "tenant 'globex' cannot take part (budget)" in r.text
        assert launcher.launched == []
    # The ServerApp charges the dataset the tenant declared (its node on a federation,
    # its policy on a simulation), whatever the run says.
    _run_row(platform, "r1")
    for simulated in (True, False):
        plans, refused = plan_run(platform, _nodes("default"), _cfg("r1"), simulated=simulated)
        assert refused == ["tenant 'globex' cannot take part (budget)"]
        assert [p.tenant_name for p in plans.values()] == ["acme"]


def test_charges_land_on_the_dataset_the_tenant_declared_with_the_settings_that_applied(
    platform: Platform,
) -> None:
    acme, globex = _partners(platform)
    with _client(platform) as c:
        r = c.put("/v1/policy", json={"dataset": "crm"}, headers=globex.admin)
        assert r.status_code == 200
    _run_row(platform, "sim", owner=acme.tenant.id)
    plans, refused = plan_run(platform, _nodes("node-says"), _cfg("sim"), simulated=True)
    assert refused == []
    charge = make_charge(platform, "sim", tiny_spec(), lambda p: p.round_params)
    assert len(charge(1, list(plans.values()))) == 2
    _run_row(platform, "fed")
    plans, _ = plan_run(platform, _nodes("node-says"), _cfg("fed", epsilon=1.0))
    make_charge(platform, "fed", tiny_spec(), lambda p: p.round_params)(1, list(plans.values()))
    with Session(platform.engine) as session:
        sim, fed = tenant_events(session, globex.tenant.id)
        assert (sim.dataset, fed.dataset) == ("crm", "node-says")
        assert tenant_events(session, acme.tenant.id)[0].dataset == "default"
        assert json.loads(sim.applied_json) == {
            "secure_mode": True, "deploy": "if-better", "model": "lstm", "epsilon": 2.0,
            "owner": "tenant acme", "dataset": "crm", "dataset_declared_by": "tenant policy",
        }  # fmt: skip
        applied = json.loads(fed.applied_json)
        assert applied["owner"] == "operator (CLI or federation)"
        assert applied["dataset_declared_by"] == "node 2"
        # The record is hashed: the chain verifies, and an edited record would not.
        events = tenant_events(session, globex.tenant.id)
        assert verify_chain(events) is None
        events[0].applied_json = events[0].applied_json.replace("true", "false")
        problem = verify_chain(events)
        assert problem is not None and "edited" in problem.reason
        session.rollback()


# ------------------------------------------------------------------ floors and secure mode


def test_a_run_below_a_participants_floor_is_refused_naming_only_that_setting(
    platform: Platform,
) -> None:
    acme, globex = _partners(platform)
    launcher = RecordingLauncher()
    with _client(platform, launcher) as c:
        r = c.put(
            "/v1/policy",
            json={"require_secure_mode": True, "max_epsilon": 5.0, "families": ["lstm"]},
            headers=globex.admin,
        )
        assert r.status_code == 200
        body = {**FAST, "participants": ["globex"], "model": "lstm"}
        r = c.post("/v1/runs", json={**body, "secure_mode": False}, headers=acme.admin)
        assert r.status_code == 422
        # Only the setting the run fails; nothing of globex's other settings.
        assert r.json()["detail"] == "tenant 'globex' cannot take part (policy: secure_mode)."
        r = c.post("/v1/runs", json={**body, "epsilon": 6.0, "model": "transformer"},
                   headers=acme.admin)  # fmt: skip
        assert r.json()["detail"] == "tenant 'globex' cannot take part (policy: epsilon, model)."
        # The caller's own floor holds for its own runs too, told as its own.
        assert c.put("/v1/policy", json={"max_epsilon": 1.0}, headers=acme.admin).status_code == 200
        r = c.post("/v1/runs", json=body, headers=acme.admin)
        assert r.status_code == 422 and "your tenant's policy" in r.text and "epsilon" in r.text
        assert launcher.launched == []
        r = c.post("/v1/runs", json={**body, "epsilon": 1.0}, headers=acme.admin)
        assert r.status_code == 202, r.text
    # The ServerApp refuses the same before round 1 (a CLI or federation run).
    _run_row(platform, "cli")
    plans, refused = plan_run(
        platform, _nodes(), _cfg("cli", epsilon=1.0, **{"secure-mode": False})
    )
    assert refused == ["tenant 'globex' cannot take part (policy: secure_mode)"]
    assert [p.tenant_name for p in plans.values()] == ["acme"]


# ------------------------------------------------------------------ finding 6: refusals


def test_a_budget_refusal_shows_the_caller_its_own_figures_and_nothing_of_partners(
    platform: Platform,
) -> None:
    acme = make_tenant(platform, "acme", budget_epsilon=2.0)
    globex = make_tenant(platform, "globex", budget_epsilon=0.5)
    agree(platform, globex, "acme")
    with _client(platform) as c:
        r = c.post("/v1/runs", json={**FAST, "participants": ["globex"]}, headers=acme.admin)
    assert r.status_code == 409
    detail = r.json()["detail"]
    # Its own figures, the epsilon that still fits and how to raise the budget ...
    assert "tenant 'acme' would exceed budget: budget epsilon 2.000" in detail
    fits = float(detail.split("largest epsilon that fits now is ")[1].split(";")[0])
    assert 0.5 < fits < 2.0
    assert "POST /v1/privacy/budget" in detail and "fedtext tenant budget acme" in detail
    # ... and nothing of globex: a run acme's own budget refuses does not probe partners
    # (else acme, shrinking its own budget, bisects globex's for free).
    assert "globex" not in detail
    assert "0.5" not in detail and detail.count("budget epsilon") == 1
    # The epsilon it named fits acme; of globex it learns only that it cannot take part.
    with _client(platform) as c:
        r = c.post(
            "/v1/runs", json={**FAST, "epsilon": fits, "participants": ["globex"]},
            headers=acme.admin,
        )  # fmt: skip
    assert r.json()["detail"] == "tenant 'globex' cannot take part (budget)"


# ------------------------------------------------------------------ finding 7: cheap refusals


def test_a_tiny_epsilon_is_refused_cheaply_and_repeated_searches_are_cached(
    platform: Platform,
) -> None:
    acme, globex = _partners(platform)
    with session_scope(platform.engine) as session:
        session.get(type(globex.tenant), globex.tenant.id)
    with _client(platform) as c:
        # Old main: an accountant search that gave up ("privacy budget too low") -> 500.
        started = time.monotonic()
        r = c.post(
            "/v1/runs",
            json={**FAST, "epsilon": 0.0001, "participants": ["globex"]},
            headers=acme.admin,
        )
        assert r.status_code == 202, r.text  # a tiny epsilon fits every budget
        assert time.monotonic() - started < 5
    # The estimate is the closed-form Gaussian calibration: exact, and cached on the
    # target rounded to 3 digits (one entry for 0.00123 and 0.001234).
    sigma = gaussian_sigma(0.5, 1e-5)
    assert gaussian_delta(sigma, 0.5) <= 1e-5 < gaussian_delta(sigma * 0.99, 0.5)
    before = _gaussian_sigma.cache_info()
    gaussian_sigma(0.001234, 1e-5)
    gaussian_sigma(0.0012345, 1e-5)
    after = _gaussian_sigma.cache_info()
    assert after.currsize - before.currsize <= 1 and after.hits > before.hits
    # A planning noise search is cached on the rounded target as well.
    from server.planning import dp_schedule

    kw = {"tenant_name": "acme", "num_train": 1000, "delta": 1e-5, "batch_size": 100,
          "local_epochs": 1, "rounds": 2}  # fmt: skip
    dp_schedule(target_epsilon=2.0, **kw)
    size = _noise.cache_info().currsize
    assert dp_schedule(target_epsilon=2.0004, **kw) == dp_schedule(target_epsilon=2.0, **kw)
    assert _noise.cache_info().currsize == size


def test_planning_is_bounded_a_request_that_cannot_get_a_slot_is_503_with_retry_after(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    acme, _ = _partners(platform)
    monkeypatch.setattr(runs_router, "PLANNING_WAIT_S", 0.2)
    body = {**FAST, "participants": ["globex"]}
    with _client(platform) as c:
        # Every slot is taken (as by slow plannings in flight).
        taken = [
            runs_router._planning.acquire(timeout=1) for _ in range(runs_router.PLANNING_SLOTS)
        ]
        try:
            started = time.monotonic()
            r = c.post("/v1/runs", json=body, headers=acme.admin)
            waited = time.monotonic() - started
        finally:
            for _ in taken:
                runs_router._planning.release()
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert waited < 2
        # Once a slot is free the same request goes through, and releases its slot.
        assert c.post("/v1/runs", json=body, headers=acme.admin).status_code == 202
        assert runs_router._planning.acquire(timeout=0.1)
        runs_router._planning.release()


def test_concurrent_submissions_share_the_bounded_planner_and_all_get_answers(
    platform: Platform,
) -> None:
    acme, _ = _partners(platform)
    results: list[int] = []
    with _client(platform) as c:

        def submit(eps: float) -> None:
            r = c.post(
                "/v1/runs",
                json={**FAST, "epsilon": eps, "participants": ["globex"]},
                headers=acme.admin,
            )
            results.append(r.status_code)

        threads = [threading.Thread(target=submit, args=(0.5 + i / 100,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    # acme's budget of 10 holds a few runs; the rest are refused (409) or told to retry.
    assert len(results) == 6 and set(results) <= {202, 409, 503}
    assert 202 in results


def test_a_tenant_flooding_run_requests_gets_429_before_any_planning(
    platform: Platform,
) -> None:
    acme, globex = _partners(platform)
    other = make_tenant(platform, "initech")
    agree(platform, globex, "acme", "initech")
    body = {**FAST, "epsilon": 50.0, "participants": ["globex"]}
    with _client(platform) as c:
        codes = [c.post("/v1/runs", json=body, headers=acme.admin) for _ in range(14)]
        # Refused on budget (409) up to the burst, then 429 with Retry-After, cheaply.
        assert [r.status_code for r in codes[: runs_router.SUBMISSION_BURST]] == [409] * 10
        limited = [r for r in codes if r.status_code == 429]
        assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
        assert "Too many run requests from this key" in limited[0].text
        # A second key of the same tenant does not escape: the tenant has one allowance.
        with session_scope(platform.engine) as session:
            _, second = create_api_key(session=session, tenant=acme.tenant, scopes=["admin"])
        r = c.post("/v1/runs", json=body, headers={"Authorization": f"Bearer {second}"})
        assert r.status_code == 429 and "from tenant 'acme'" in r.text
        # Another tenant's run requests are not held back by acme's flood.
        r = c.post("/v1/runs", json=body, headers=other.admin)
        assert r.status_code == 409, r.text
