"""Atomic budgets: concurrent runs never overspend, reservations hold and are released."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from models import ModelSpec
from privacy.accounting import compose_epsilon
from privacy.ledger import tenant_events
from privacy.params import DPParams
from privacy.reservations import BudgetReservation, outstanding
from runs.lifecycle import active_run_ids, end_run
from runs.spec import RunSpec
from server.charging import make_charge, plan_run
from server.discovery import NodeInfo
from server.planning import TenantPlan, plan_tenant
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.tables import TrainingRun
from tests.factories import agree, make_tenant, tiny_spec

DELTA = 1e-5


def _run_row(platform: Platform, run_id: str, status: str = "running") -> None:
    with session_scope(platform.engine) as session:
        session.add(TrainingRun(id=run_id, status=status))


def _together(*work: Callable[[], Any]) -> list[Any]:
    """Start every callable at the same instant (a barrier) and return their results."""
    barrier = threading.Barrier(len(work))
    results: list[Any] = [None] * len(work)
    errors: list[BaseException] = []

    def run(i: int, fn: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # surfaced below, not swallowed by the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def _plan(tenant_id: str, params: DPParams) -> TenantPlan:
    return plan_tenant(
        tenant_id=tenant_id, tenant_name="acme", node_id=1, num_train=1000, num_test=0,
        target_epsilon=1.0, delta=DELTA, clip_norm=1.0, batch_size=100, local_epochs=1,
        rounds=1, budget_epsilon=1000.0, spent_events=[],
    )  # fmt: skip


def test_two_concurrent_charges_never_exceed_a_budget(platform: Platform) -> None:
    """The review's race: two runs' checks both before either append. Locked, one waits."""
    # Two different releases (no cached PRV figure shortens the window), each about 2.4
    # of a 3.0 budget: either fits alone, both do not.
    a, b = DPParams(1.2, 0.05, 100, 1.0, DELTA), DPParams(1.21, 0.05, 95, 1.0, DELTA)
    assert compose_epsilon([a], DELTA) < 3.0 and compose_epsilon([b], DELTA) < 3.0
    assert compose_epsilon([a, b], DELTA) > 3.0
    acme = make_tenant(platform, "acme", budget_epsilon=3.0).tenant
    for run in ("run-a", "run-b"):
        _run_row(platform, run)
    plan = _plan(acme.id, a)
    spec: ModelSpec = tiny_spec()
    charge_a = make_charge(platform, "run-a", spec, lambda _p: a)
    charge_b = make_charge(platform, "run-b", spec, lambda _p: b)
    results = _together(lambda: charge_a(1, [plan]), lambda: charge_b(1, [plan]))
    assert sorted(len(r) for r in results) == [0, 1]  # exactly one was dispatched
    with Session(platform.engine) as session:
        spent = compose_epsilon([e.params() for e in tenant_events(session, acme.id)], DELTA)
    assert spent <= 3.0


def test_two_runs_planned_at_once_cannot_both_reserve_the_remainder(platform: Platform) -> None:
    acme = make_tenant(platform, "acme", budget_epsilon=3.0).tenant
    make_tenant(platform, "globex", budget_epsilon=100.0)
    common = {"participants": "acme,globex", "batch-size": 100, "rounds": 2,
              "personalize-epochs": 0, "epsilon": 2.5, "eval-noise": 10.0,
              "model": "lstm", "local-epochs": 1, "learning-rate": 0.01}  # fmt: skip
    cfgs = [RunSpec.from_run_config({**common, "run-id": r}) for r in ("r1", "r2")]
    for cfg in cfgs:
        _run_row(platform, cfg.run_id)
    nodes = [NodeInfo(1, "acme", 1000), NodeInfo(2, "globex", 1000)]
    results = _together(*[lambda c=c: plan_run(platform, nodes, c) for c in cfgs])
    acme_plans = [p for plans, _ in results for p in plans.values() if p.tenant_name == "acme"]
    # Two runs of 2.5 compose to about 3.35 > 3: the second found the first's reservation.
    assert len(acme_plans) == 1
    refusals = [r for _, refused in results for r in refused]
    # The run's error is read by every admin it concerns: no tenant's figures in it.
    assert refusals == ["tenant 'acme' cannot take part (budget)"]
    with Session(platform.engine) as session:
        held = outstanding(session, acme.id, active_runs=active_run_ids(session))
        total = compose_epsilon([p for _, p in held], DELTA)
    assert 2.4 < total <= 3.0  # the winner's releases, training and evaluation


def test_a_reservation_holds_until_its_run_ends_and_charges_consume_it(
    sqlite_platform: Platform,
) -> None:
    platform = sqlite_platform
    acme = make_tenant(platform, "acme", budget_epsilon=3.0).tenant
    make_tenant(platform, "globex", budget_epsilon=100.0)
    base = {"participants": "acme,globex", "batch-size": 100, "rounds": 2,
            "personalize-epochs": 0, "epsilon": 2.5, "model": "lstm",
            "local-epochs": 1, "learning-rate": 0.01}  # fmt: skip
    nodes = [NodeInfo(1, "acme", 1000), NodeInfo(2, "globex", 1000)]
    first = RunSpec.from_run_config({**base, "run-id": "first"})
    _run_row(platform, "first")
    plans, _ = plan_run(platform, nodes, first)
    plan = plans[1]
    assert len(plan.releases()) == 3  # two rounds and the evaluation release
    # Charging round 1 turns one reserved release into a spent one.
    charge = make_charge(platform, "first", tiny_spec(), lambda p: p.round_params)
    assert charge(1, [plan]) == [plan]
    with Session(platform.engine) as session:
        left = outstanding(session, acme.id, active_runs=active_run_ids(session))
        row = session.get(BudgetReservation, 1)
        assert row is not None and row.stage == "plan"
    assert [p for _, p in left] == [plan.round_params, plan.eval_params]
    second = RunSpec.from_run_config({**base, "run-id": "second"})
    _run_row(platform, "second")
    plans2, refused = plan_run(platform, nodes, second)
    assert [p.tenant_name for p in plans2.values()] == ["globex"] and refused
    # The first run fails: what it did not charge is released, and the second fits now.
    assert end_run(platform.engine, "first", "failed", "node lost")
    plans3, refused3 = plan_run(platform, nodes, second)
    assert sorted(p.tenant_name for p in plans3.values()) == ["acme", "globex"], refused3


class RecordingLauncher:
    """Starts nothing: these tests are about what submission reserves, not the worker."""

    def __init__(self) -> None:
        self.launched: list[str] = []

    def check(self, config: dict[str, Any]) -> None:
        return None

    def launch(self, run_id: str) -> int:
        self.launched.append(run_id)
        return 0

    def cancel(self, run_id: str, pid: int | None) -> None:
        return None


def test_submission_reserves_and_refuses_a_run_that_does_not_fit_with_the_figures(
    platform: Platform,
) -> None:
    acme = make_tenant(platform, "acme", budget_epsilon=4.0)
    globex = make_tenant(platform, "globex", budget_epsilon=100.0)
    agree(platform, globex, "acme")
    launcher = RecordingLauncher()
    with TestClient(create_app(platform, ServingConfig(), run_launcher=launcher)) as client:
        before = client.get("/v1/privacy/budget", headers=acme.admin).json()
        assert before["reserved_epsilon"] == 0 and before["remaining_epsilon"] == 4.0
        body = {"participants": ["globex"], "epsilon": 3.0}
        first = client.post("/v1/runs", json=body, headers=acme.admin)
        assert first.status_code == 202, first.text
        held = client.get("/v1/privacy/budget", headers=acme.admin).json()
        assert held["spent_epsilon"] == 0 and held["reserved_releases"] == 2
        assert 3.0 <= held["reserved_epsilon"] < 3.5
        assert held["remaining_epsilon"] == pytest.approx(4.0 - held["reserved_epsilon"])
        second = client.post("/v1/runs", json=body, headers=acme.admin)
        assert second.status_code == 409
        detail = second.json()["detail"]
        assert "tenant 'acme'" in detail and "reserved by other runs 3." in detail
        assert "budget epsilon 4.000" in detail and "'globex'" not in detail
        assert len(launcher.launched) == 1
        # Cancelling the first run frees its reservation.
        with session_scope(platform.engine) as session:
            run = session.get(TrainingRun, launcher.launched[0])
            assert run is not None
            run.status = "cancelled"
        after = client.get("/v1/privacy/budget", headers=acme.admin).json()
        assert after["reserved_epsilon"] == 0 and after["remaining_epsilon"] == 4.0
        assert client.post("/v1/runs", json=body, headers=acme.admin).status_code == 202
