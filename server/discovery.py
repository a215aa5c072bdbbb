"""Who is there: the connected nodes, the tenants they serve, and which of them may train.

A federation node's tenant comes from its key, never from its reply. Flower's SuperNode
authentication ties each node id to the public key it registered (``grid.get_nodes()``
reports it); the QUERY carries a fresh nonce per node, and the node signs
``privacy.node_proof.proof_payload`` (nonce, run id, node id, tenant, dataset, example
count) with that key. A reply whose signature does not verify under the key Flower
authenticated for its node id is dropped here; ``bound_to_enrolled_keys`` then keeps a
node only when its key is enrolled (``tenancy.nodes``) for the very tenant it claims.

Simulated runs (Flower's Simulation Engine, an ``InMemoryGrid``) have no real nodes: the
platform itself starts each virtual node for a tenant it assigns, so those nodes are
bound by that assignment and carry no key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from sqlalchemy import Engine
from sqlmodel import Session

from privacy.ledger import check_dataset
from privacy.node_proof import (
    ProofError,
    fingerprint,
    load_public_key,
    new_nonce,
    proof_payload,
    verify_proof,
)
from privacy.schemas import DEFAULT_DATASET
from runs.spec import RunSpec
from server.errors import RunFailed
from server.replies import reply_failure
from tenancy.errors import NotFound
from tenancy.nodes import tenant_of_key
from tenancy.tables import Tenant
from tenancy.tenants import get_tenant


@dataclass
class NodeInfo:
    node_id: int
    tenant: str
    num_train: int  # stated by the node: planning needs it (docs/AUDIT.md)
    num_test: int = 0  # not reported: the held-out split's size stays on the node
    # The dataset the node declares it trains on (its node config, covered by its
    # signature): the dataset budget a federation run charges for this tenant.
    dataset: str = DEFAULT_DATASET
    # Fingerprint of the key Flower authenticated for this node and that signed its reply;
    # None for the platform's own simulated nodes.
    key_fingerprint: str | None = None


def is_simulation(grid: Grid) -> bool:
    """True on Flower's Simulation Engine, where the platform launches every node itself."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def authenticated_keys(grid: Grid) -> dict[int, bytes]:
    """Each connected node's public key as the SuperLink authenticated it (PEM), by id."""
    return {int(n.node_id): bytes(n.public_key) for n in grid.get_nodes() if n.public_key}


def discover_nodes(
    grid: Grid, cfg: RunSpec, engine: Engine | None = None
) -> tuple[list[NodeInfo], list[str]]:
    """Ask every connected node which tenant it serves, which dataset it trains on and how
    much data it holds; on a real federation, keep only replies signed by the node's key,
    and with ``engine`` (the platform database) only nodes whose key is enrolled for the
    tenant they claim (``plan_run`` checks that again through ``unique_known_tenants``; a
    resumed run relies on this one)."""
    deadline = time.monotonic() + cfg.round_timeout
    # Named participants get until the timeout to connect; the run then goes on with
    # those present if they are enough (planning reports who is missing).
    wanted = max(cfg.min_nodes, len(cfg.participants))
    while len(node_ids := list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            if len(node_ids) >= cfg.min_nodes:
                break
            raise RunFailed(
                f"only {len(node_ids)} node(s) connected; the run needs {cfg.min_nodes}"
            )
        time.sleep(1)
    simulated = is_simulation(grid)
    keys = {} if simulated else authenticated_keys(grid)
    nonces = {n: new_nonce() for n in node_ids}
    messages = [
        Message(
            content=RecordDict(
                {
                    "config": ConfigRecord(
                        {"labels": ",".join(cfg.labels), "nonce": nonces[n], "run": cfg.run_id}
                    )
                }
            ),
            message_type=MessageType.QUERY,
            dst_node_id=n,
        )
        for n in node_ids
    ]
    nodes, problems = [], []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            problems.append(f"node {node_id} could not describe its data: {reply_failure(reply)}")
            continue
        info = reply.content.config_records.get("node")
        counts = reply.content.metric_records.get("counts")
        if info is None or counts is None or "num-train" not in counts or "tenant" not in info:
            problems.append(f"node {node_id} sent an incomplete description")
            continue
        num_train = counts["num-train"]
        if not isinstance(num_train, int):
            problems.append(f"node {node_id} sent a non-integer example count")
            continue
        # The dataset as declared ("" = none, signed as such): the default dataset then.
        declared = str(info.get("dataset", ""))
        node = NodeInfo(node_id, str(info["tenant"]), num_train)
        if not simulated:
            why = check_proof(
                node,
                key_pem=keys.get(node_id),
                nonce=nonces.get(node_id, ""),
                run_id=cfg.run_id,
                dataset=declared,
                signature=str(info.get("proof", "")),
            )
            if why:
                problems.append(why)
                continue
        try:
            node.dataset = check_dataset(declared) if declared else DEFAULT_DATASET
        except ValueError:
            problems.append(f"node {node_id} declared an invalid dataset name")
            continue
        nodes.append(node)
    if engine is not None:
        with Session(engine) as session:
            nodes, unbound = bound_to_enrolled_keys(session, nodes)
        problems += unbound
    return nodes, problems


def check_proof(
    node: NodeInfo,
    *,
    key_pem: bytes | None,
    nonce: str,
    run_id: str,
    dataset: str,
    signature: str,
) -> str | None:
    """Verify a node's signed reply; on success set ``node.key_fingerprint`` and return
    None, else return the refusal (which names no tenant the key may belong to)."""
    refused = f"node {node.node_id} refused: its reply is not signed by its authenticated key"
    if not key_pem or not nonce or not signature:
        return refused
    try:
        key = load_public_key(key_pem)
    except ProofError:
        return refused
    payload = proof_payload(
        nonce=nonce,
        run_id=run_id,
        node_id=node.node_id,
        tenant=node.tenant,
        dataset=dataset,
        num_train=node.num_train,
    )
    if not verify_proof(key, payload, signature):
        return refused
    node.key_fingerprint = fingerprint(key)
    return None


def bound_to_enrolled_keys(
    session: Session, nodes: list[NodeInfo]
) -> tuple[list[NodeInfo], list[str]]:
    """The nodes whose key is enrolled for the tenant they claim (and the platform's own
    simulated nodes); every other node is refused, naming only the tenant it claimed."""
    kept, refused = [], []
    for node in nodes:
        if node.key_fingerprint is None:  # the platform's own assignment (simulation)
            kept.append(node)
            continue
        owner = tenant_of_key(session, node.key_fingerprint)
        if owner is None or owner.name != node.tenant:
            refused.append(
                f"node {node.node_id} refused: its key is not enrolled for tenant {node.tenant!r}"
            )
            continue
        kept.append(node)
    return kept, refused


def unique_known_tenants(
    session: Session, nodes: list[NodeInfo]
) -> tuple[list[tuple[NodeInfo, Tenant]], list[str]]:
    """Each node with its tenant; a node whose key is not enrolled for the tenant it claims,
    a second node of one tenant, or an unknown tenant, is refused.

    The key binding is checked first: a node that merely claims a tenant cannot take that
    tenant's place (nor have the tenant's real node refused as its "second node").
    """
    nodes, refused = bound_to_enrolled_keys(session, nodes)
    found, seen = [], set()
    for node in sorted(nodes, key=lambda n: n.node_id):
        if node.tenant in seen:
            refused.append(
                f"node {node.node_id} also claims tenant {node.tenant!r}; one node per tenant"
            )
            continue
        try:
            tenant = get_tenant(session=session, name=node.tenant)
        except NotFound:
            refused.append(f"node {node.node_id} claims unknown tenant {node.tenant!r}")
            continue
        seen.add(node.tenant)
        found.append((node, tenant))
    return found, refused


def participating(
    nodes: list[NodeInfo], participants: tuple[str, ...]
) -> tuple[list[NodeInfo], list[str]]:
    """The nodes of the run's participants (all nodes when it names none)."""
    if not participants:
        return nodes, []
    listed = ", ".join(participants)
    kept = [n for n in nodes if n.tenant in participants]
    refused = [
        f"node {n.node_id} serves tenant {n.tenant!r}, not a participant of this run ({listed})"
        for n in nodes
        if n.tenant not in participants
    ]
    present = {n.tenant for n in kept}
    refused += [
        f"participant {p!r} has no connected node" for p in participants if p not in present
    ]
    return kept, refused
