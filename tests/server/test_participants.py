"""A run's participants: who may train when the nodes that connect decide who is there."""

from __future__ import annotations

import pytest
from sqlmodel import Session

from runs.lifecycle import fail_run
from runs.spec import RunSpec
from server.charging import plan_run
from server.discovery import NodeInfo
from server.errors import RunFailed
from server.server_app import run_federation
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.tables import TrainingRun
from tests.factories import make_tenant


def _nodes(*tenants: str) -> list[NodeInfo]:
    return [
        NodeInfo(node_id=i + 1, tenant=t, num_train=2000, num_test=500)
        for i, t in enumerate(tenants)
    ]


def test_participants_parse_and_validate() -> None:
    cfg = RunSpec.from_run_config({"participants": " acme, globex ,"})
    assert cfg.participants == ("acme", "globex")
    assert RunSpec.from_run_config({}).participants == ()
    with pytest.raises(ValueError, match="name each tenant once"):
        RunSpec.from_run_config({"participants": "acme,acme"})
    with pytest.raises(ValueError, match="1 participant\\(s\\) cannot meet min-nodes 2"):
        RunSpec.from_run_config({"participants": "acme"})


def test_nodes_of_other_tenants_are_refused_and_missing_participants_reported(
    sqlite_platform: Platform,
) -> None:
    for name in ("acme", "globex", "initech", "umbrella"):
        make_tenant(sqlite_platform, name)
    cfg = RunSpec.from_run_config(
        {"participants": "acme,globex,umbrella", "batch-size": 64, "personalize-epochs": 0}
    )
    plans, refused = plan_run(sqlite_platform, _nodes("acme", "initech", "globex"), cfg)
    assert sorted(p.tenant_name for p in plans.values()) == ["acme", "globex"]
    assert refused == [
        "node 2 serves tenant 'initech', not a participant of this run (acme, globex, umbrella)",
        "participant 'umbrella' has no connected node",
    ]


def test_without_participants_every_known_node_trains(sqlite_platform: Platform) -> None:
    for name in ("acme", "globex"):
        make_tenant(sqlite_platform, name)
    cfg = RunSpec.from_run_config({"batch-size": 64, "personalize-epochs": 0})
    plans, refused = plan_run(sqlite_platform, _nodes("acme", "globex"), cfg)
    assert len(plans) == 2 and refused == []


def test_a_run_cancelled_before_its_serverapp_started_stands_down(
    sqlite_platform: Platform,
) -> None:
    with session_scope(sqlite_platform.engine) as session:
        session.add(TrainingRun(id="r1", status="cancelled", error="Cancelled by admin key x."))
    cfg = RunSpec.from_run_config({"run-id": "r1"})
    # The grid is never reached: the ServerApp stops before it asks any node.
    with pytest.raises(RunFailed, match="r1 was cancelled before it started"):
        run_federation(None, cfg, sqlite_platform)  # type: ignore[arg-type]
    with Session(sqlite_platform.engine) as session:
        row = session.get(TrainingRun, "r1")
        assert row is not None and row.status == "cancelled" and row.config_json == "{}"


def test_a_failure_does_not_overwrite_a_cancel(sqlite_platform: Platform) -> None:
    with session_scope(sqlite_platform.engine) as session:
        session.add(TrainingRun(id="stopped", status="cancelled", error="Cancelled."))
        session.add(TrainingRun(id="broken", status="running"))
    for run_id in ("stopped", "broken"):
        fail_run(sqlite_platform.engine, run_id, "the run was stopped")
    with Session(sqlite_platform.engine) as session:
        stopped, broken = session.get(TrainingRun, "stopped"), session.get(TrainingRun, "broken")
        assert stopped is not None and (stopped.status, stopped.error) == (
            "cancelled",
            "Cancelled.",
        )
        assert broken is not None and (broken.status, broken.error) == (
            "failed",
            "the run was stopped",
        )
        assert broken.finished_at is not None


def test_a_participant_written_into_an_owned_run_without_consent_is_not_planned(
    sqlite_platform: Platform,
) -> None:
    """The stored run request is not signed: consent is asked again when the run plans
    (and resumes), so a tenant added to acme's run around the API is refused, uncharged."""
    from server.charging import reserve_resumed
    from tests.factories import agree

    acme, globex, _ = (make_tenant(sqlite_platform, n) for n in ("acme", "globex", "initech"))
    agree(sqlite_platform, globex, "acme")  # globex lets acme include it; initech never did
    with session_scope(sqlite_platform.engine) as session:
        session.add(TrainingRun(id="owned", owner_tenant_id=acme.tenant.id, status="running"))
    cfg = RunSpec.from_run_config({"run-id": "owned", "batch-size": 64, "personalize-epochs": 0})
    plans, refused = plan_run(sqlite_platform, _nodes("acme", "globex", "initech"), cfg)
    assert sorted(p.tenant_name for p in plans.values()) == ["acme", "globex"]
    assert refused == ["tenant 'initech' cannot take part (not a partner)"]
    # On resume too: a consent withdrawn (or forged) since is no consent.
    everyone, _ = plan_run(
        sqlite_platform, _nodes("acme", "globex"), RunSpec.from_run_config({"batch-size": 64})
    )
    assert reserve_resumed(sqlite_platform, cfg, everyone) == []
    from tenancy.tenants import forget_partners

    with session_scope(sqlite_platform.engine) as session:
        forget_partners(session=session, tenant_id=globex.tenant.id)
    left = reserve_resumed(sqlite_platform, cfg, everyone)
    assert left == ["tenant 'globex' cannot take part (not a partner)"]
