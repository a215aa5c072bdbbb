"""Node-key squatting: public keys are public, so a partner could enroll another tenant's
node key first and get that tenant's own enrollment refused (docs/SECURITY.md). An
enrollment request signed by the node's key proves possession; it wins over an unproven
enrollment, and it cannot be used for another tenant or forged without the key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlmodel import Session
from typer.testing import CliRunner

from fedtext.cli import app as cli
from privacy.node_proof import fingerprint, openssh_text
from serving.app import create_app
from serving.config import ServingConfig
from serving.node_enrollment import make_request
from tenancy.nodes import NodeKey, tenant_of_key
from tenancy.platform import Platform
from tests.factories import make_tenant

URL = "/v1/federation/nodes"


@pytest.fixture
def client(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform, ServingConfig())) as c:
        yield c


def _node() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def test_a_squatted_key_goes_to_the_tenant_whose_node_proves_it(
    platform: Platform, client: TestClient
) -> None:
    acme, globex = make_tenant(platform, "acme"), make_tenant(platform, "globex")
    node = _node()  # globex's node; its public key is public
    public = openssh_text(node.public_key())
    fp = fingerprint(node.public_key())
    assert client.post(URL, json={"public_key": public}, headers=acme.admin).status_code == 201
    refused = client.post(URL, json={"public_key": public}, headers=globex.admin)
    assert refused.status_code == 409 and "enrollment-request" in refused.json()["detail"]
    # acme cannot turn globex's own request to its use, nor forge one without the key.
    request = make_request(node, "globex")
    r = client.post(URL, json={"enrollment_request": request}, headers=acme.admin)
    assert r.status_code == 422 and "for tenant 'globex', not 'acme'" in r.json()["detail"]
    forged = {**make_request(_node(), "acme"), "public_key": public}
    r = client.post(URL, json={"enrollment_request": forged}, headers=acme.admin)
    assert r.status_code == 422 and "does not verify" in r.json()["detail"]
    # globex's node proves it: the key is globex's, proven, and acme's squat is gone.
    r = client.post(URL, json={"enrollment_request": request}, headers=globex.admin)
    assert r.status_code == 201, r.text
    assert r.json()["fingerprint"] == fp and r.json()["proven"] is True
    assert client.get(URL, headers=acme.admin).json() == {"keys": []}
    with Session(platform.engine) as session:
        owner = tenant_of_key(session, fp)  # signed anew: the coordinator believes it
        assert owner is not None and owner.name == "globex"
        row = session.get(NodeKey, fp)
        assert row is not None
        assert platform.keyring.signing.check_row("node_key", row) == "ok"
    # Now neither a bare enrollment nor a proof for acme (it has no key) takes it back.
    r = client.post(URL, json={"public_key": public}, headers=acme.admin)
    assert r.status_code == 409
    r = client.post(URL, json={"enrollment_request": request}, headers=globex.admin)
    assert r.status_code == 200  # already enrolled, proven: nothing changes


def test_a_request_must_be_fresh_well_formed_and_alone(
    platform: Platform, client: TestClient
) -> None:
    acme = make_tenant(platform, "acme")
    node = _node()
    old = make_request(node, "acme", now=datetime.now(UTC) - timedelta(days=31))
    r = client.post(URL, json={"enrollment_request": old}, headers=acme.admin)
    assert r.status_code == 422 and "Write a fresh one" in r.json()["detail"]
    changed = {**make_request(node, "acme"), "nonce": "00"}
    r = client.post(URL, json={"enrollment_request": changed}, headers=acme.admin)
    assert r.status_code == 422 and "does not verify" in r.json()["detail"]
    both = {"enrollment_request": make_request(node, "acme"), "public_key": "x"}
    assert client.post(URL, json=both, headers=acme.admin).status_code == 422
    assert client.post(URL, json={}, headers=acme.admin).status_code == 422
    r = client.post(URL, json={"enrollment_request": {"format": "x"}}, headers=acme.admin)
    assert r.status_code == 422 and "Not an enrollment request" in r.json()["detail"]
    # A bare public key still enrolls, unproven (backward compatible).
    public = openssh_text(node.public_key())
    r = client.post(URL, json={"public_key": public}, headers=acme.admin)
    assert r.status_code == 201 and r.json()["proven"] is False


def test_the_cli_writes_a_request_at_the_site_and_the_operator_enrolls_it(
    platform: Platform, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTEXT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEDTEXT_DATABASE_URL", database_url)
    runner = CliRunner()
    for name in ("acme", "globex"):
        assert runner.invoke(cli, ["tenant", "create", name]).exit_code == 0
    node = _node()
    key_file = tmp_path / "node.key"
    key_file.write_bytes(
        node.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "node.pub").write_text(openssh_text(node.public_key()))
    out = tmp_path / "req.json"
    made = runner.invoke(
        cli,
        ["federation", "enrollment-request", "--tenant", "globex", "--key", str(key_file),
         "--out", str(out)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert json.loads(out.read_text())["tenant"] == "globex"
    # acme squats the bare key first; the operator enrolling globex's request moves it.
    squat = runner.invoke(
        cli, ["federation", "enroll", "--tenant", "acme", str(tmp_path / "node.pub")]
    )
    assert squat.exit_code == 0 and "unproven" in squat.output
    wrong = runner.invoke(cli, ["federation", "enroll", "--tenant", "acme", str(out)])
    assert wrong.exit_code == 2 and "for tenant 'globex', not 'acme'" in wrong.output
    done = runner.invoke(cli, ["federation", "enroll", "--tenant", "globex", str(out)])
    assert done.exit_code == 0, done.output
    assert "proven by the node's signature" in " ".join(done.output.split())
    with Session(platform.engine) as session:
        owner = tenant_of_key(session, fingerprint(node.public_key()))
        assert owner is not None and owner.name == "globex"
