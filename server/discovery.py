"""Who is there: the connected nodes, the tenants they serve, and which of them may train."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from sqlmodel import Session

from privacy.ledger import DEFAULT_DATASET
from runs.spec import RunSpec
from server.errors import RunFailed
from server.replies import reply_failure
from tenancy.errors import NotFound
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


def discover_nodes(grid: Grid, cfg: RunSpec) -> tuple[list[NodeInfo], list[str]]:
    """Ask every connected node which tenant it serves and how much data it holds."""
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
    query = ConfigRecord({"labels": ",".join(cfg.labels)})
    messages = [
        Message(
            content=RecordDict({"config": query}), message_type=MessageType.QUERY, dst_node_id=n
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
        if info is None or counts is None or "num-train" not in counts:
            problems.append(f"node {node_id} sent an incomplete description")
            continue
        num_train = counts["num-train"]
        if not isinstance(num_train, int):
            problems.append(f"node {node_id} sent a non-integer example count")
            continue
        nodes.append(NodeInfo(node_id, str(info["tenant"]), num_train))
    return nodes, problems


def unique_known_tenants(
    session: Session, nodes: list[NodeInfo]
) -> tuple[list[tuple[NodeInfo, Tenant]], list[str]]:
    """Each node with its tenant; a second node of one tenant, or an unknown tenant, is refused."""
    found, refused, seen = [], [], set()
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
