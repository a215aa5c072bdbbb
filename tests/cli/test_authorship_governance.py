"""`fedtext audit verify` and `sign-existing` on consents, policies and deployments (v0010),
through the real CLI: a database writer without keys forging each is named; rows from
before the revision are signed once, and a forged one blocks that."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from fedtext.bootstrap import platform_from_settings
from fedtext.cli import app
from fedtext.settings import Settings
from tests.factories import store_tiny_model

runner = CliRunner()
FEDTEXT = [str(Path(sys.executable).parent / "fedtext")]


def _sql(url: str, statement: str) -> None:
    engine = create_engine(url)  # a bare engine: no platform, no keys
    with engine.begin() as conn:
        conn.execute(text(statement))
    engine.dispose()


@pytest.fixture
def world(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """acme and globex; globex consents to acme; acme has a policy and a deployed model."""
    monkeypatch.setenv("FEDTEXT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEDTEXT_DATABASE_URL", database_url)
    for name in ("acme", "globex"):
        assert runner.invoke(app, ["tenant", "create", name]).exit_code == 0
    assert runner.invoke(app, ["policy", "set", "acme", "--deploy", "never"]).exit_code == 0
    platform = platform_from_settings(Settings(data_dir=tmp_path, database_url=database_url))
    from tenancy.db import session_scope
    from tenancy.tenants import get_tenant, set_partners

    with session_scope(platform.engine) as session:
        acme = get_tenant(session=session, name="acme")
        globex = get_tenant(session=session, name="globex")
        set_partners(session=session, tenant=globex, names=["acme"])
    store_tiny_model(platform, acme)
    store_tiny_model(platform, acme, deploy=False, seed=1)
    return {**os.environ, "FEDTEXT_DATA_DIR": str(tmp_path), "FEDTEXT_DATABASE_URL": database_url}


def test_forged_consent_policy_and_deployment_are_named_by_verify(
    world: dict[str, str], database_url: str
) -> None:
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0
    _sql(database_url, "UPDATE tenant_policy SET deploy = 'always'")
    _sql(database_url, "UPDATE model_version SET deployed = (version = 2)")
    _sql(
        database_url,
        "INSERT INTO federation_partner (tenant_id, partner_id, created_at) SELECT a.id, "
        "g.id, CURRENT_TIMESTAMP FROM tenant a, tenant g WHERE a.name = 'acme' "
        "AND g.name = 'globex'",
    )
    r = subprocess.run(
        [*FEDTEXT, "audit", "verify"], env=world, capture_output=True, text=True, timeout=300
    )
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 1, out
    assert "policy (deploy always" in out and "model lstm v2" in out
    assert "consent to partner" in out and "unsigned" in out
    assert "does not verify" in out
    refused = runner.invoke(app, ["audit", "sign-existing"])
    assert refused.exit_code == 1 and "Nothing was signed" in refused.output


def test_rows_from_before_v0010_are_signed_once(world: dict[str, str], database_url: str) -> None:
    for table in ("federation_partner", "tenant_policy", "model_version"):
        _sql(database_url, f"UPDATE {table} SET signature = NULL")
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 1 and "unsigned" in r.output
    dry = runner.invoke(app, ["audit", "sign-existing", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "1 consent(s), 2 polic(ies), 2 model version(s)" in " ".join(dry.output.split())
    done = runner.invoke(app, ["audit", "sign-existing"])
    assert done.exit_code == 0, done.output
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 0, r.output
