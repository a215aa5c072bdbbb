"""Which data this node trains on: its own file (deployment) or a demo partition (simulation)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from clients.data import (
    DataError,
    LabeledData,
    bound_users,
    load_demo_corpus,
    load_labeled_file,
    partition,
    train_test_split,
)
from privacy.canary import canary_rows, make_canaries

# The node's own settings. A simulated node's share (tenants, partitioning, alpha, example
# caps) comes in the run config, whose defaults are runs.spec.RunSpec's.
CLIENT_DEFAULTS: dict[str, Any] = {
    "test-fraction": 0.2,
    # The train/test split's seed when neither the node's config nor the run's says.
    "seed": 7,
    # `fedtext audit canary`: insert the member canaries of this seed into one simulated
    # tenant's training data (the auditor regenerates them from the same seed).
    "canary-count": 0,
    "canary-seed": 0,
    "canary-tenant": "",
    # privacy-unit user: each canary is a user with this many rows (privacy.canary_rows).
    "canary-rows": 1,
}


class _RunConfig(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        raise DataError(f"The run config has no {key!r}; a run started by fedtext sets it.")


@dataclass(frozen=True)
class NodeData:
    tenant: str
    train: LabeledData
    test: LabeledData


def _int_or_none(value: Any) -> int | None:
    number = int(value)
    return None if number <= 0 else number


def resolve_node_data(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], labels: tuple[str, ...]
) -> NodeData:
    """The node's tenant and its train/test split.

    A node started with ``tenant`` and ``data-path`` in its node config reads that file;
    a simulated node (``partition-id``/``num-partitions``) is the tenant at its index in
    the run's ``tenants`` list and trains on that tenant's file (``data-files``, a JSON
    object), its share of one file (``data-file``) or its share of the demo corpus.
    """
    cfg = _RunConfig({**CLIENT_DEFAULTS, **run_config})
    data = _node_data(node_config, cfg, labels)
    if privacy_unit(cfg) != "user":
        return data
    # privacy-unit user: at most k held-out rows per user too, so one user moves at most k
    # counts of a released confusion matrix (the plan's evaluation sensitivity).
    k = int(cfg["max-examples-per-user"])
    return NodeData(data.tenant, data.train, bound_users(data.test, k)[0])


def privacy_unit(config: Mapping[str, Any]) -> str:
    """The run's privacy unit ("example" when the run config does not say)."""
    return str(config.get("privacy-unit") or "example").strip().lower()


def _user_column(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> str | None:
    """The user column to read (node config wins over the run), or None for unit example."""
    if privacy_unit(cfg) != "user":
        return None
    return str(node_config.get("user-column") or cfg.get("user-column") or "user").strip()


def _node_data(
    node_config: Mapping[str, Any], cfg: _RunConfig, labels: tuple[str, ...]
) -> NodeData:
    seed = int(node_config.get("seed", cfg["seed"]))
    test_fraction = float(node_config.get("test-fraction", cfg["test-fraction"]))
    users = _user_column(cfg, node_config)
    if "data-path" in node_config:
        tenant = str(node_config.get("tenant", "")).strip()
        if not tenant:
            raise DataError("This node has a data-path but no tenant in its node config.")
        path = str(node_config["data-path"])
        return _file_data(tenant, path, labels, test_fraction, seed, users)
    if "partition-id" not in node_config:
        raise DataError("Start this node with node config 'tenant' and 'data-path'.")
    pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    names = [n.strip() for n in str(cfg["tenants"]).split(",") if n.strip()]
    if len(names) < parts:
        raise DataError(f"The run names {len(names)} tenants for {parts} simulated nodes.")
    caps = _int_or_none(cfg["max-train-examples"]), _int_or_none(cfg["max-test-examples"])
    files = json.loads(str(cfg.get("data-files") or "{}"))
    if files:  # `fedtext simulate --data acme=a.csv`: each tenant's own file
        data = _file_data(names[pid], str(files[names[pid]]), labels, test_fraction, seed, users)
        data = NodeData(data.tenant, data.train.head(caps[0]), data.test.head(caps[1]))
    elif cfg.get("data-file"):  # `fedtext simulate --data FILE`: one file split over tenants
        data = _shared_file_data(
            str(cfg["data-file"]), names[pid], pid, parts, str(cfg["partitioning"]),
            float(cfg["alpha"]), labels, test_fraction, seed, *caps, users,
        )  # fmt: skip
    else:
        if users:
            raise DataError(
                "privacy-unit user needs a user column; the demo corpus has none (one row "
                "per tweet, no author): give tenant files with a user column (--data)."
            )
        data = _demo_data(
            names[pid],
            pid,
            parts,
            str(cfg["partitioning"]),
            float(cfg["alpha"]),
            labels,
            test_fraction,
            seed,
            *caps,
        )
    if int(cfg["canary-count"]) > 0 and str(cfg["canary-tenant"]) == data.tenant:
        rows = int(cfg["canary-rows"])
        return with_canaries(data, int(cfg["canary-seed"]), int(cfg["canary-count"]), rows)
    return data


def split_shared_file(
    data: LabeledData, pid: int, parts: int, scheme: str, alpha: float, seed: int
) -> LabeledData:
    """Simulated tenant ``pid``'s share of one file split by ``scheme`` (the CLI's checks
    and the node use this same function, so they count the same examples)."""
    return data.subset(partition(data, scheme, parts, seed, alpha)[pid])


@lru_cache(maxsize=4)
def _shared_file_data(
    path: str,
    tenant: str,
    pid: int,
    parts: int,
    scheme: str,
    alpha: float,
    labels: tuple[str, ...],
    test_fraction: float,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    user_column: str | None = None,
) -> NodeData:
    data = load_labeled_file(path, labels, user_column)
    share = split_shared_file(data, pid, parts, scheme, alpha, seed)
    train, test = train_test_split(share, test_fraction, seed + pid)
    return NodeData(tenant, train.head(max_train), test.head(max_test))


def with_canaries(data: NodeData, seed: int, count: int, rows: int = 1) -> NodeData:
    """``data`` with the member canaries of ``seed`` appended to its training split; with a
    user column each canary is a user of ``rows`` rows (its own user, never a real one)."""
    members = [c for c in make_canaries(seed, count, len(data.train.label_names)) if c.member]
    users = data.train.users
    if users is None and rows != 1:
        raise DataError("Canary users (canary-rows > 1) need data with a user column.")
    texts = [t for c in members for t in canary_rows(c, rows)]
    train = LabeledData(
        data.train.texts + tuple(texts),
        data.train.labels + tuple(c.label for c in members for _ in range(rows)),
        data.train.label_names,
        None
        if users is None
        else users + tuple(f"canary-user-{i}" for i in range(len(members)) for _ in range(rows)),
    )
    return NodeData(data.tenant, train, data.test)


@lru_cache(maxsize=4)
def _file_data(
    tenant: str,
    path: str,
    labels: tuple[str, ...],
    test_fraction: float,
    seed: int,
    user_column: str | None = None,
) -> NodeData:
    data = load_labeled_file(path, labels, user_column)
    train, test = train_test_split(data, test_fraction, seed)
    return NodeData(tenant, train, test)


@lru_cache(maxsize=4)
def _partitions(scheme: str, parts: int, seed: int, alpha: float) -> list[list[int]]:
    return partition(load_demo_corpus(), scheme, parts, seed, alpha)


@lru_cache(maxsize=4)
def _demo_data(
    tenant: str,
    pid: int,
    parts: int,
    scheme: str,
    alpha: float,
    labels: tuple[str, ...],
    test_fraction: float,
    seed: int,
    max_train: int | None,
    max_test: int | None,
) -> NodeData:
    corpus = load_demo_corpus()
    if labels != corpus.label_names:
        raise DataError(
            f"The demo corpus has labels {', '.join(corpus.label_names)}; the run asks for "
            f"{', '.join(labels)}."
        )
    share = corpus.subset(_partitions(scheme, parts, seed, alpha)[pid])
    train, test = train_test_split(share, test_fraction, seed + pid)
    return NodeData(tenant, train.head(max_train), test.head(max_test))
