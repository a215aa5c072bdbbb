"""A database writer without keys forging consent, a tenant's policy or a deployment.

Plain SQL on a bare engine (no platform, no signing key), as the adversarial review did
(docs/SECURITY.md): a consent a tenant never gave, a policy rewritten from `never` to
`always`, a version deployed that the tenant's policy refused. The platform does not act
on any of them, names each for the auditor, and does not sign over them when it changes
the row later (a rotation, a serving option); ``sign-existing`` signs the rows written
before revision 0010 once, and refuses while a row is forged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlmodel import Session
from typer.testing import CliRunner

from fedtext.cli import app as cli
from orchestration.worker import LocalRunLauncher
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.governance import UNSIGNED_POLICY, get_policy, set_policy
from tenancy.platform import Platform
from tenancy.registry import (
    UntrustedDeployment,
    deployed_version,
    set_quantize,
    untrusted_deployment,
)
from tenancy.signing_audit import governance_problems, sign_governance, unsigned_governance
from tenancy.tenants import without_consent
from tests.factories import TenantFixture, agree, make_tenant, store_tiny_model

RUN = {
    "participants": ["globex"],
    "rounds": 1,
    "epsilon": 8.0,
    "batch_size": 16,
    "max_train_examples": 48,
    "max_test_examples": 16,
    "secure_mode": False,
}


def _sql(url: str, statement: str, **params: object) -> None:
    """What a database writer without keys does: a bare engine, no platform."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(statement), params)
    engine.dispose()


@pytest.fixture
def client(platform: Platform, tmp_path: Path) -> Iterator[TestClient]:
    # A launcher, so that run requests are answered (none here gets far enough to start).
    launcher = LocalRunLauncher(platform, tmp_path / "runs")
    app = create_app(platform, ServingConfig(lookup_ttl_s=0.05), run_launcher=launcher)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _problems(platform: Platform) -> list[str]:
    with Session(platform.engine) as session:
        return governance_problems(session, platform.keyring.signing.trusted())


def test_a_consent_inserted_by_plain_sql_is_no_consent(
    platform: Platform, database_url: str, client: TestClient
) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    _sql(
        database_url,
        "INSERT INTO federation_partner (tenant_id, partner_id, created_at) "
        "VALUES (:t, :p, CURRENT_TIMESTAMP)",
        t=globex.tenant.id,
        p=acme.tenant.id,
    )
    with Session(platform.engine) as session:
        assert without_consent(
            session=session, owner_id=acme.tenant.id, participants=[globex.tenant]
        ) == ["globex"]
    r = client.post("/v1/runs", json=RUN, headers=acme.admin)
    assert r.status_code == 403 and "'globex' cannot take part (not a partner)" in r.text
    assert client.get("/v1/partners", headers=globex.admin).json() == {"tenants": []}
    assert any(
        p.startswith(f"tenant {globex.tenant.id} consent to partner {acme.tenant.id}")
        and "unsigned" in p
        for p in _problems(platform)
    )
    # The admin's own consent is signed and is consent: the request now passes the consent
    # check and stops at globex's floor (secure mode), before anything starts.
    assert client.put("/v1/partners", json={"tenants": ["acme"]}, headers=globex.admin).is_success
    assert client.put(
        "/v1/policy", json={"require_secure_mode": True}, headers=globex.admin
    ).is_success
    r = client.post("/v1/runs", json=RUN, headers=acme.admin)
    assert r.status_code == 422 and "'globex' cannot take part (policy: secure_mode)" in r.text
    assert _problems(platform) == []


def test_a_policy_rewritten_by_plain_sql_is_not_applied(
    platform: Platform,
    database_url: str,
    client: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    agree(platform, globex, "acme")
    with session_scope(platform.engine) as session:
        set_policy(session=session, tenant_id=globex.tenant.id, actor="t", deploy="never")
    _sql(
        database_url,
        "UPDATE tenant_policy SET deploy = 'always', max_epsilon = 1000 WHERE tenant_id = :t",
        t=globex.tenant.id,
    )
    with Session(platform.engine) as session:
        assert get_policy(session=session, tenant_id=globex.tenant.id) == UNSIGNED_POLICY
    # Not applied: the strictest is, and every run including globex is refused, saying so.
    r = client.post("/v1/runs", json=RUN, headers=acme.admin)
    assert r.status_code == 422
    assert "'globex' cannot take part (policy: a signed policy" in r.json()["detail"]
    shown = client.get("/v1/policy", headers=globex.admin)
    assert shown.json()["deploy"] == "never" and "not signed" in shown.headers["Warning"]
    assert any(
        f"tenant {globex.tenant.id} policy (deploy always" in p and "does not verify" in p
        for p in _problems(platform)
    )
    monkeypatch.setenv("FEDTEXT_DATA_DIR", str(tmp_path))  # the fixture's keys and database
    monkeypatch.setenv("FEDTEXT_DATABASE_URL", database_url)
    shown_cli = CliRunner().invoke(cli, ["policy", "show", "globex"])
    assert shown_cli.exit_code == 0, shown_cli.output
    said = " ".join(shown_cli.output.split())
    assert "not signed by the platform" in said and "deploy never" in said
    # The admin sets it again: from the defaults, not from what was forged.
    r = client.put("/v1/policy", json={"require_secure_mode": False}, headers=globex.admin)
    assert r.json()["deploy"] == "if-better" and r.json()["max_epsilon"] is None
    assert "Warning" not in client.get("/v1/policy", headers=globex.admin).headers
    assert _problems(platform) == []


def _predict(client: TestClient, tenant: TenantFixture) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = client.post("/v1/models/lstm/predict", json={"inputs": ["hi"]}, headers=tenant.predict)
    return r.status_code, r.json()


def test_a_version_deployed_by_plain_sql_is_not_served(
    platform: Platform, database_url: str, client: TestClient
) -> None:
    acme = make_tenant(platform, "acme")
    store_tiny_model(platform, acme.tenant, seed=1)
    v2 = store_tiny_model(platform, acme.tenant, deploy=False, seed=2)
    code, body = _predict(client, acme)
    assert code == 200 and body["version"] == 1  # memoized and cached
    # A second row marked deployed beside the real one: the signed one keeps serving.
    _sql(database_url, "UPDATE model_version SET deployed = TRUE WHERE id = :i", i=v2.id)
    time.sleep(0.2)  # past the memo's interval: the refresh sees the change
    code, body = _predict(client, acme)
    assert code == 200 and body["version"] == 1
    # Only the forged one marked deployed: nothing is served (a 5xx, not v2).
    _sql(
        database_url,
        "UPDATE model_version SET deployed = (id = :i) WHERE tenant_id = :t",
        i=v2.id,
        t=acme.tenant.id,
    )
    time.sleep(0.2)
    code, body = _predict(client, acme)
    # Not served: a 500 naming the integrity failure (not "no deployed version").
    assert code == 500 and "integrity" in body["detail"] and "version" not in body
    with Session(platform.engine) as session:
        assert deployed_version(session=session, tenant_id=acme.tenant.id, name="lstm") is None
        reason = untrusted_deployment(session=session, tenant_id=acme.tenant.id, name="lstm")
        assert reason is not None and "'lstm' (v2) is not signed" in reason
    problems = " ".join(_problems(platform))
    assert f"model lstm v2 (id {v2.id}, deployed): its signature does not verify" in problems
    assert "model lstm v1 (id" in problems  # its deployed flag was cleared around the platform
    # Changing the forged row through the platform does not sign over it.
    with session_scope(platform.engine) as session, pytest.raises(UntrustedDeployment):
        set_quantize(
            session=session, tenant_id=acme.tenant.id, name="lstm", version=2, quantize=None
        )
    r = client.post("/v1/models/lstm/versions/2/deploy", headers=acme.admin)
    assert r.status_code == 409 and "not signed" in r.json()["detail"]
    # Deploying v1 through the platform repairs it: v2's flag is cleared (back to what was
    # signed), v1 is deployed and signed again.
    r = client.post("/v1/models/lstm/versions/1/deploy", headers=acme.admin)
    assert r.status_code == 200, r.text
    assert _predict(client, acme)[0] == 200
    assert _problems(platform) == []


def test_a_rotation_does_not_sign_over_a_forged_version(
    platform: Platform, database_url: str
) -> None:
    from tenancy.rotation import rotate_dek

    acme = make_tenant(platform, "acme")
    store_tiny_model(platform, acme.tenant, seed=1)
    v2 = store_tiny_model(platform, acme.tenant, deploy=False, seed=2)
    _sql(database_url, "UPDATE model_version SET deployed = TRUE WHERE id = :i", i=v2.id)
    rotate_dek(platform.engine, platform.keyring, platform.store, tenant="acme")
    assert any(f"model lstm v2 (id {v2.id}, deployed)" in p for p in _problems(platform))


def test_rows_from_before_revision_0010_are_signed_once_and_forged_ones_block_it(
    platform: Platform, database_url: str
) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    agree(platform, globex, "acme")
    store_tiny_model(platform, acme.tenant)
    with session_scope(platform.engine) as session:
        set_policy(session=session, tenant_id=acme.tenant.id, actor="t", deploy="first")
    for table in ("federation_partner", "tenant_policy", "model_version"):
        _sql(database_url, f"UPDATE {table} SET signature = NULL")  # as upgraded to 0010
    assert len(_problems(platform)) == 4  # a consent, two policies (each tenant has one), a version
    with Session(platform.engine) as session:  # unsigned rows are not acted on meanwhile
        assert get_policy(session=session, tenant_id=acme.tenant.id) == UNSIGNED_POLICY
        assert deployed_version(session=session, tenant_id=acme.tenant.id, name="lstm") is None
    trusted = platform.keyring.signing.trusted()
    with session_scope(platform.engine) as session:
        todo, blockers = unsigned_governance(session, trusted)
        assert blockers == [] and len(todo) == 4
        counts = sign_governance(session, platform.keyring.signing, todo)
    assert counts == {"federation_partner": 1, "tenant_policy": 2, "model_version": 1}
    assert _problems(platform) == []
    with Session(platform.engine) as session:
        assert get_policy(session=session, tenant_id=acme.tenant.id).deploy == "first"
        row = deployed_version(session=session, tenant_id=acme.tenant.id, name="lstm")
        assert row is not None and row.version == 1
    # A changed row is tampering, not age: it blocks, and nothing is signed.
    _sql(database_url, "UPDATE tenant_policy SET deploy = 'always'")
    _sql(database_url, "UPDATE federation_partner SET signature = NULL")
    with Session(platform.engine) as session:
        todo, blockers = unsigned_governance(session, trusted)
    assert len(todo) == 1 and len(blockers) == 2  # both tenants' policies were changed
    assert all("policy (deploy always" in b for b in blockers)


def test_a_policy_row_deleted_by_plain_sql_is_the_strictest_not_the_default(
    platform: Platform, database_url: str, client: TestClient
) -> None:
    """Review finding: deleting globex's strict policy loosened it to the defaults, and
    verify said nothing. Each tenant is created with a signed row; a missing one is read as
    the strictest, named by verify, and sign-existing writes the default back."""
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    agree(platform, globex, "acme")
    with Session(platform.engine) as session:
        assert get_policy(session=session, tenant_id=acme.tenant.id).signed  # created with it
    with session_scope(platform.engine) as session:
        set_policy(session=session, tenant_id=globex.tenant.id, actor="t", deploy="never")
    _sql(database_url, "DELETE FROM tenant_policy WHERE tenant_id = :t", t=globex.tenant.id)
    with Session(platform.engine) as session:
        assert get_policy(session=session, tenant_id=globex.tenant.id) == UNSIGNED_POLICY
    r = client.post("/v1/runs", json=RUN, headers=acme.admin)
    assert r.status_code == 422 and "'globex' cannot take part (policy" in r.json()["detail"]
    assert _problems(platform) == [
        f"tenant {globex.tenant.id}: no policy row (each tenant is created with one): the "
        "strictest policy applies until `fedtext audit sign-existing` writes the default, or "
        "its admin sets one"
    ]
    with session_scope(platform.engine) as session:
        todo, blockers = unsigned_governance(session, platform.keyring.signing.trusted())
        assert blockers == [] and len(todo) == 1
        sign_governance(session, platform.keyring.signing, todo)
    assert _problems(platform) == []
    with Session(platform.engine) as session:
        restored = get_policy(session=session, tenant_id=globex.tenant.id)
    assert restored.signed and restored.deploy == "if-better"


def test_partners_route_answers_unknown_names_as_tenant_names(
    platform: Platform, client: TestClient
) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    initech = make_tenant(platform, "initech")
    answers = {}
    for name in ("globex", "ghost"):
        r = client.put("/v1/partners", json={"tenants": [name]}, headers=acme.admin)
        listed = client.get("/v1/partners", headers=acme.admin)
        answers[name] = (r.status_code, r.json(), listed.status_code, listed.json())
    assert answers["globex"] == (200, {"tenants": ["globex"]}, 200, {"tenants": ["globex"]})
    assert answers["ghost"] == (200, {"tenants": ["ghost"]}, 200, {"tenants": ["ghost"]})
    # A listed unknown name grants nothing: initech renamed nothing, and a run by globex
    # (not listed now) or by anyone else is still refused.
    r = client.post("/v1/runs", json={**RUN, "participants": ["acme"]}, headers=initech.admin)
    assert r.status_code == 403 and "'acme' cannot take part (not a partner)" in r.text
    # What no tenant name can be, and the caller's own name, are still refused.
    for names, message in ((["Not A Name"], "Invalid tenant name"), (["acme"], "its own runs")):
        r = client.put("/v1/partners", json={"tenants": names}, headers=acme.admin)
        assert r.status_code == 422 and message in r.json()["detail"]
    assert client.get("/v1/partners", headers=acme.admin).json() == {"tenants": ["ghost"]}
    assert globex  # listed above, consent withdrawn by the second PUT
