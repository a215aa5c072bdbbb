"""`fedtext audit canary` end to end: a real Flower simulation with canaries, a real attack."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from clients.local_data import resolve_node_data
from fedtext.cli import app
from privacy.canary import make_canaries

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_canaries_reach_only_the_named_tenants_training_split() -> None:
    # A run started by fedtext carries every simulated-share setting (RunSpec's).
    run = {"tenants": "a,b", "max-train-examples": 40, "max-test-examples": 10,
           "partitioning": "iid", "alpha": 0.5,
           "canary-count": 20, "canary-seed": 5, "canary-tenant": "a"}  # fmt: skip
    labels = ("negative", "neutral", "positive")
    a = resolve_node_data({"partition-id": 0, "num-partitions": 2}, run, labels)
    b = resolve_node_data({"partition-id": 1, "num-partitions": 2}, run, labels)
    members = [c for c in make_canaries(5, 20, 3) if c.member]
    assert a.train.texts[40:] == tuple(c.text for c in members)
    assert a.train.labels[40:] == tuple(c.label for c in members)
    assert len(b.train) == 40 and not set(b.train.texts) & {c.text for c in members}
    assert not set(a.test.texts) & {c.text for c in make_canaries(5, 20, 3)}


def test_canary_audit_reports_a_lower_bound_below_the_accounted_epsilon(tmp_path: Path) -> None:
    scratch = tmp_path / "canary"
    r = runner.invoke(
        app,
        [
            "audit",
            "canary",
            "--canaries",
            "48",
            "--rounds",
            "1",
            "--epsilon",
            "3",
            "--max-train-examples",
            "96",
            "--seed",
            "1234",
            "--insecure",
            "--data-dir",
            str(scratch),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "empirical epsilon lower bound" in r.output and "OK (per example): lower bound" in r.output
    )
    # The accounted figure is the canary tenant's ledger, recomposed.
    from fedtext.bootstrap import platform_from_settings
    from fedtext.settings import Settings
    from privacy.accounting import compose_epsilon
    from privacy.ledger import tenant_events
    from tenancy.tenants import get_tenant

    platform = platform_from_settings(Settings(data_dir=scratch))
    with Session(platform.engine) as session:
        tenant = get_tenant(session=session, name="canary-1")
        events = tenant_events(session, tenant.id)
        accounted = compose_epsilon([e.params() for e in events], 1e-5)
        # The target covers training; the released evaluation is charged on top of it.
        training = compose_epsilon([e.params() for e in events if e.purpose == "train"], 1e-5)
        train_canary_2 = len(
            tenant_events(session, get_tenant(session=session, name="canary-2").id)
        )
    assert f"{accounted:.4f}" in r.output and 0 < training <= 3.0 + 1e-6 <= accounted
    assert train_canary_2 >= 1


def test_user_level_canary_audit_from_the_cli_checks_the_user_epsilon(tmp_path: Path) -> None:
    scratch = tmp_path / "canary-users"
    r = runner.invoke(
        app,
        ["audit", "canary", "--privacy-unit", "user", "--rows-per-user", "4",
         "--canaries", "40", "--rounds", "1", "--epsilon", "3", "--max-train-examples", "160",
         "--seed", "99", "--insecure", "--data-dir", str(scratch)],
        terminal_width=200,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "per user (k = 4)" in r.output and "canary users (members)" in r.output
    assert "OK (per user (k = 4)): lower bound" in r.output
    from fedtext.bootstrap import platform_from_settings
    from fedtext.settings import Settings
    from privacy.accounting import compose_epsilon
    from privacy.ledger import tenant_events
    from tenancy.tenants import get_tenant

    platform = platform_from_settings(Settings(data_dir=scratch))
    with Session(platform.engine) as session:
        events = tenant_events(session, get_tenant(session=session, name="canary-1").id)
        accounted = compose_epsilon([e.params() for e in events], 1e-5)
        units = {e.privacy_unit for e in events}
    assert units == {"user"}
    # The accounted figure printed is the canary tenant's user-level ledger, recomposed,
    # and the empirical bound printed beside it is below it.
    line = next(x for x in r.output.splitlines() if "empirical epsilon lower bound" in x)
    bound = float(line.split("│")[2].split()[0])
    assert f"{accounted:.4f}" in r.output and 0 <= bound <= accounted
