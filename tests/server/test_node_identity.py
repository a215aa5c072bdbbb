"""Issue 24 finding 1: a federation node's tenant comes from its enrolled key, never from
its reply. The node's signed discovery reply (clients.client_app.describe_node) checked by
the coordinator (server.discovery) against the key Flower authenticated and the keys
enrolled per tenant (tenancy.nodes), and the enrollment itself: CLI and HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo as FlowerNodeInfo
from flwr.serverapp import Grid
from sqlmodel import Session

from clients.client_app import describe_node
from privacy.node_proof import fingerprint, new_nonce, openssh_text
from runs.spec import RunSpec
from server.discovery import (
    NodeInfo,
    bound_to_enrolled_keys,
    check_proof,
    discover_nodes,
    unique_known_tenants,
)
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.db import session_scope
from tenancy.errors import Conflict
from tenancy.nodes import enroll_node_key, list_node_keys, revoke_node_key
from tenancy.platform import Platform
from tests.factories import TenantFixture, make_tenant

RUN = "run-1"


class Node:
    """A node key pair written as `fedtext federation credentials` writes it."""

    def __init__(self, folder: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        folder.mkdir(parents=True, exist_ok=True)
        self.private = folder / "node.key"
        self.private.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        self.private.chmod(0o600)
        self.public = folder / "node.pub"
        self.public.write_text(openssh_text(self.key.public_key()))
        # What the SuperLink reports for an authenticated node (grid.get_nodes()).
        self.pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.fingerprint = fingerprint(self.key.public_key())

    def reply(
        self, *, node_id: int, tenant: str, nonce: str, dataset: str = "", num_train: int = 100
    ) -> tuple[NodeInfo, dict[str, str]]:
        said = describe_node(
            {"auth-key": str(self.private), "dataset": dataset},
            node_id=node_id, tenant=tenant, num_train=num_train, nonce=nonce, run_id=RUN,
        )  # fmt: skip
        return NodeInfo(node_id, said["tenant"], num_train), said


def _verify(info: NodeInfo, said: dict[str, str], *, key_pem: bytes, nonce: str) -> str | None:
    return check_proof(
        info, key_pem=key_pem, nonce=nonce, run_id=RUN,
        dataset=said.get("dataset", ""), signature=said.get("proof", ""),
    )  # fmt: skip


def _enroll(platform: Platform, tenant: TenantFixture, node: Node) -> None:
    with session_scope(platform.engine) as session:
        enroll_node_key(
            session, tenant_id=tenant.tenant.id, fingerprint=node.fingerprint,
            public_key=node.public.read_text(), enrolled_by="operator",
        )  # fmt: skip


@pytest.fixture
def acme(platform: Platform) -> TenantFixture:
    return make_tenant(platform, "acme")


@pytest.fixture
def globex(platform: Platform) -> TenantFixture:
    return make_tenant(platform, "globex")


def test_a_signed_reply_verifies_and_the_enrolled_tenant_is_kept(
    platform: Platform, acme: TenantFixture, tmp_path: Path
) -> None:
    node = Node(tmp_path / "acme")
    _enroll(platform, acme, node)
    nonce = new_nonce()
    info, said = node.reply(node_id=7, tenant="acme", nonce=nonce, dataset="tickets")
    assert _verify(info, said, key_pem=node.pem, nonce=nonce) is None
    assert info.key_fingerprint == node.fingerprint
    with Session(platform.engine) as session:
        found, refused = unique_known_tenants(session, [info])
    assert refused == [] and [(n.node_id, t.name) for n, t in found] == [(7, "acme")]


def test_a_reply_signed_by_another_key_than_the_authenticated_one_is_refused(
    tmp_path: Path,
) -> None:
    node, other = Node(tmp_path / "a"), Node(tmp_path / "b")
    nonce = new_nonce()
    info, said = node.reply(node_id=7, tenant="acme", nonce=nonce)
    why = _verify(info, said, key_pem=other.pem, nonce=nonce)
    assert why and "not signed by its authenticated key" in why
    assert info.key_fingerprint is None


def test_a_replayed_reply_does_not_verify_for_a_new_nonce(tmp_path: Path) -> None:
    node = Node(tmp_path / "a")
    old = new_nonce()
    info, said = node.reply(node_id=7, tenant="acme", nonce=old)
    assert _verify(info, said, key_pem=node.pem, nonce=old) is None
    replay = NodeInfo(7, "acme", 100)
    assert _verify(replay, said, key_pem=node.pem, nonce=new_nonce()) is not None
    # Nor for another node id, a changed dataset or count, or an unsigned reply.
    assert _verify(NodeInfo(8, "acme", 100), said, key_pem=node.pem, nonce=old)
    assert _verify(NodeInfo(7, "acme", 100), {**said, "dataset": "x"}, key_pem=node.pem, nonce=old)
    assert _verify(NodeInfo(7, "acme", 999), said, key_pem=node.pem, nonce=old)
    unsigned = describe_node({}, node_id=7, tenant="acme", num_train=100, nonce=old, run_id=RUN)
    assert "proof" not in unsigned
    assert _verify(NodeInfo(7, "acme", 100), unsigned, key_pem=node.pem, nonce=old)


def test_an_unenrolled_key_is_refused(
    platform: Platform, acme: TenantFixture, tmp_path: Path
) -> None:
    node = Node(tmp_path / "stranger")
    nonce = new_nonce()
    info, said = node.reply(node_id=3, tenant="acme", nonce=nonce)
    assert _verify(info, said, key_pem=node.pem, nonce=nonce) is None  # a real signature
    with Session(platform.engine) as session:
        kept, refused = bound_to_enrolled_keys(session, [info])
    assert kept == [] and refused == ["node 3 refused: its key is not enrolled for tenant 'acme'"]


def test_a_key_of_another_tenant_is_refused_and_the_real_node_still_kept(
    platform: Platform, acme: TenantFixture, globex: TenantFixture, tmp_path: Path
) -> None:
    acme_node, globex_node = Node(tmp_path / "acme"), Node(tmp_path / "globex")
    _enroll(platform, acme, acme_node)
    _enroll(platform, globex, globex_node)
    nonces = {1: new_nonce(), 2: new_nonce()}
    # acme's site claims globex with acme's key, and has the lower node id.
    impostor, said_i = acme_node.reply(node_id=1, tenant="globex", nonce=nonces[1])
    real, said_r = globex_node.reply(node_id=2, tenant="globex", nonce=nonces[2])
    assert _verify(impostor, said_i, key_pem=acme_node.pem, nonce=nonces[1]) is None
    assert _verify(real, said_r, key_pem=globex_node.pem, nonce=nonces[2]) is None
    with Session(platform.engine) as session:
        found, refused = unique_known_tenants(session, [impostor, real])
    assert [(n.node_id, t.name) for n, t in found] == [(2, "globex")]
    assert refused == ["node 1 refused: its key is not enrolled for tenant 'globex'"]
    assert "acme" not in " ".join(refused)  # which tenant holds the key is not said


def test_a_revoked_key_is_refused_and_the_platforms_simulated_nodes_are_kept(
    platform: Platform, acme: TenantFixture, tmp_path: Path
) -> None:
    node = Node(tmp_path / "acme")
    _enroll(platform, acme, node)
    with session_scope(platform.engine) as session:
        revoke_node_key(session, tenant_id=acme.tenant.id, fingerprint=node.fingerprint)
    nonce = new_nonce()
    info, said = node.reply(node_id=4, tenant="acme", nonce=nonce)
    assert _verify(info, said, key_pem=node.pem, nonce=nonce) is None
    simulated = NodeInfo(5, "acme", 100)  # no key: launched by the platform for acme
    with Session(platform.engine) as session:
        kept, refused = bound_to_enrolled_keys(session, [info, simulated])
    assert kept == [simulated] and len(refused) == 1


def test_one_key_is_enrolled_for_one_tenant_only(
    platform: Platform, acme: TenantFixture, globex: TenantFixture, tmp_path: Path
) -> None:
    node = Node(tmp_path / "acme")
    _enroll(platform, acme, node)
    _enroll(platform, acme, node)  # again: no change
    with pytest.raises(Conflict) as refused:
        _enroll(platform, globex, node)
    assert "acme" not in str(refused.value)
    with Session(platform.engine) as session:
        assert [k.fingerprint for k in list_node_keys(session, acme.tenant.id)] == [
            node.fingerprint
        ]
        assert list_node_keys(session, globex.tenant.id) == []


@pytest.fixture
def client(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform, ServingConfig(operator_token="op-token"))) as c:
        yield c


def test_a_tenant_admin_enrolls_lists_and_revokes_its_own_node_keys_over_http(
    client: TestClient, acme: TenantFixture, globex: TenantFixture, tmp_path: Path
) -> None:
    node = Node(tmp_path / "acme")
    url = "/v1/federation/nodes"
    r = client.post(url, json={"public_key": node.public.read_text()}, headers=acme.admin)
    assert r.status_code == 201, r.text
    assert r.json()["fingerprint"] == node.fingerprint
    again = client.post(url, json={"public_key": node.public.read_text()}, headers=acme.admin)
    assert again.status_code == 200
    # globex's admin cannot take acme's key, nor see or revoke it.
    taken = client.post(url, json={"public_key": node.public.read_text()}, headers=globex.admin)
    assert taken.status_code == 409 and "acme" not in taken.text
    assert client.get(url, headers=globex.admin).json() == {"keys": []}
    gone = client.delete(f"{url}/{node.fingerprint}", headers=globex.admin)
    assert gone.status_code == 404
    listed = client.get(url, headers=acme.admin).json()["keys"]
    assert [k["fingerprint"] for k in listed] == [node.fingerprint]
    # A predict key is not an admin's; a bad key is 422, not a traceback.
    assert client.get(url, headers=acme.predict).status_code == 403
    bad = client.post(url, json={"public_key": "ssh-rsa AAAA nope"}, headers=acme.admin)
    assert bad.status_code == 422 and "public key" in bad.json()["detail"].lower()
    assert client.delete(f"{url}/{node.fingerprint}", headers=acme.admin).status_code == 204
    assert client.get(url, headers=acme.admin).json() == {"keys": []}


def test_the_operator_enrolls_a_node_key_for_a_tenant_from_the_cli(
    platform: Platform, acme: TenantFixture, globex: TenantFixture, tmp_path: Path
) -> None:
    node = Node(tmp_path / "nodes" / "acme")
    env = {
        **os.environ,
        "FEDTEXT_DATABASE_URL": str(platform.engine.url.render_as_string(hide_password=False)),
        "FEDTEXT_DATA_DIR": str(tmp_path),
        "FEDTEXT_KEK_FILE": str(tmp_path / "keys" / "kek.key"),
    }

    def fedtext(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedtext.cli", "federation", *args],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    done = fedtext("enroll", "--tenant", "acme", str(node.public))
    assert done.returncode == 0, done.stderr
    assert node.fingerprint in done.stdout and "enrolled" in done.stdout
    other = fedtext("enroll", "--tenant", "globex", str(node.public))
    assert other.returncode == 2 and "enrolled elsewhere" in other.stderr
    assert "Traceback" not in other.stderr
    listed = fedtext("enrolled", "--tenant", "acme")
    assert listed.returncode == 0 and node.fingerprint in listed.stdout
    with Session(platform.engine) as session:
        assert [k.fingerprint for k in list_node_keys(session, acme.tenant.id)] == [
            node.fingerprint
        ]


def test_a_node_declaring_an_invalid_dataset_name_is_refused_before_it_starts(
    tmp_path: Path,
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fedtext.cli", "federation", "node", "--tenant", "acme",
         "--data", str(tmp_path / "none.csv"), "--superlink", "127.0.0.1:1",
         "--dataset", "no spaces/here"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Invalid dataset name" in r.stderr and "Traceback" not in r.stderr


class SignedNodesGrid(Grid):
    """Flower's Grid as the SuperLink presents it: the authenticated key of each node id,
    and each node answering the QUERY as its ClientApp does (describe_node), optionally
    replaying the answer it gave to an earlier nonce."""

    def __init__(self, nodes: dict[int, tuple[Node, str, str]], replay: set[int]) -> None:
        self.nodes, self.replay = nodes, replay
        self.first_nonce: dict[int, str] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self) -> list[FlowerNodeInfo]:
        return [FlowerNodeInfo(node_id=n, public_key=k.pem) for n, (k, _, _) in self.nodes.items()]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for msg in messages:
            node_id = msg.metadata.dst_node_id
            key, tenant, dataset = self.nodes[node_id]
            nonce = str(msg.content["config"]["nonce"])
            if node_id in self.replay:  # the answer to the first query it ever saw
                nonce = self.first_nonce.setdefault(node_id, new_nonce())
            said = describe_node(
                {"auth-key": str(key.private), "dataset": dataset}, node_id=node_id,
                tenant=tenant, num_train=100, nonce=nonce,
                run_id=str(msg.content["config"]["run"]),
            )  # fmt: skip
            counts = MetricRecord({"num-train": 100})
            replies.append(
                Message(RecordDict({"node": ConfigRecord(said), "counts": counts}), reply_to=msg)
            )
        return replies

    def set_run(self, run_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_discovery_keeps_only_signed_enrolled_nodes_with_the_dataset_they_declare(
    platform: Platform,
    acme: TenantFixture,
    globex: TenantFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # What a running ServerApp process has: the identity its messages are stamped with.
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    acme_key, acme_second = Node(tmp_path / "a1"), Node(tmp_path / "a2")
    globex_key = Node(tmp_path / "g")
    for key, tenant in ((acme_key, acme), (acme_second, acme), (globex_key, globex)):
        _enroll(platform, tenant, key)
    grid = SignedNodesGrid(
        {
            1: (acme_second, "globex", ""),  # acme's second site claims globex
            2: (globex_key, "globex", "tickets"),
            3: (acme_key, "acme", ""),
        },
        replay=set(),
    )
    cfg = RunSpec(min_nodes=1, round_timeout=5, run_id=RUN)
    nodes, problems = discover_nodes(grid, cfg, platform.engine)
    assert [(n.node_id, n.tenant, n.dataset) for n in nodes] == [
        (2, "globex", "tickets"),
        (3, "acme", "default"),
    ]
    assert problems == ["node 1 refused: its key is not enrolled for tenant 'globex'"]
    # Without the engine the signatures still decide; plan_run's check binds the rest.
    nodes, problems = discover_nodes(grid, cfg)
    assert [n.node_id for n in nodes] == [1, 2, 3] and problems == []
    with Session(platform.engine) as session:
        found, refused = unique_known_tenants(session, nodes)
    assert [(n.node_id, t.name) for n, t in found] == [(2, "globex"), (3, "acme")]
    assert refused == ["node 1 refused: its key is not enrolled for tenant 'globex'"]
    # A node that answers with a reply signed for an earlier nonce is refused.
    replaying = SignedNodesGrid({3: (acme_key, "acme", "")}, replay={3})
    discover_nodes(replaying, cfg, platform.engine)  # its first answer is the right one
    nodes, problems = discover_nodes(replaying, cfg, platform.engine)
    assert nodes == [] and problems == [
        "node 3 refused: its reply is not signed by its authenticated key"
    ]


def test_an_enrollment_written_around_the_platform_binds_nothing(
    platform: Platform,
    acme: TenantFixture,
    globex: TenantFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database writer without the signing key (plain SQL) enrolls its own key for globex
    and moves acme's second key to globex: the coordinator's binding believes neither row,
    with the refusal every unenrolled key gets; rows the platform signed (a revoked key
    enrolled again included) still bind."""
    from datetime import UTC, datetime

    from flwr.supercore.task_identity import TaskIdentity
    from sqlalchemy import create_engine, text

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    acme_key, acme_second = Node(tmp_path / "a1"), Node(tmp_path / "a2")
    stranger = Node(tmp_path / "x")
    for key in (acme_key, acme_second):
        _enroll(platform, acme, key)
    with session_scope(platform.engine) as session:  # revoked, then enrolled again: re-signed
        revoke_node_key(session, tenant_id=acme.tenant.id, fingerprint=acme_key.fingerprint)
    _enroll(platform, acme, acme_key)

    bare = create_engine(platform.engine.url)  # no platform, no keys
    with bare.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO node_key (fingerprint, tenant_id, public_key, enrolled_by, "
                "created_at) VALUES (:f, :t, :k, 'operator', :c)"
            ),
            {
                "f": stranger.fingerprint,
                "t": globex.tenant.id,
                "k": stranger.public.read_text(),
                "c": datetime.now(UTC).replace(microsecond=0),
            },
        )
        conn.execute(
            text("UPDATE node_key SET tenant_id = :t WHERE fingerprint = :f"),
            {"t": globex.tenant.id, "f": acme_second.fingerprint},
        )
    bare.dispose()

    grid = SignedNodesGrid(
        {
            1: (stranger, "globex", ""),  # enrolled for globex by plain SQL
            2: (acme_second, "globex", ""),  # acme's key moved to globex by plain SQL
            3: (acme_key, "acme", ""),
        },
        replay=set(),
    )
    cfg = RunSpec(min_nodes=1, round_timeout=5, run_id=RUN)
    with caplog.at_level("WARNING", logger="tenancy.signing"):
        nodes, problems = discover_nodes(grid, cfg, platform.engine)
    assert [(n.node_id, n.tenant) for n in nodes] == [(3, "acme")]
    assert problems == [
        "node 1 refused: its key is not enrolled for tenant 'globex'",
        "node 2 refused: its key is not enrolled for tenant 'globex'",
    ]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"node key enrollment {stranger.fingerprint[:16]} refused" in logged
    assert "signature is unsigned" in logged and "signature is bad" in logged
    # plan_run's check (unique_known_tenants) refuses them the same way.
    nodes, _ = discover_nodes(grid, cfg)
    with Session(platform.engine) as session:
        found, refused = unique_known_tenants(session, nodes)
    assert [(n.node_id, t.name) for n, t in found] == [(3, "acme")]
    assert len(refused) == 2 and all("not enrolled for tenant 'globex'" in r for r in refused)
