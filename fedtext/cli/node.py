"""`fedtext federation node`: a tenant's SuperNode, with its data file, device, node key and
the federation's CA certificate."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import tomli_w
import typer

from fedtext.cli.console import UserError, err, fail
from fedtext.cli.superlink import CaOpt, SuperlinkOpt
from orchestration.flower import (
    check_certificate,
    check_reachable,
    existing_file,
    flower_env,
    flower_executable,
)
from orchestration.supervisor import supervise
from tenancy.certificates import check_name, check_node_private_key

# Flower's exit code for "could not connect to / be activated by the SuperLink".
SUPERNODE_CONNECTION_ERROR = 305


def node(
    tenant: Annotated[
        str, typer.Option(envvar="FEDTEXT_NODE_TENANT", help="The tenant this site trains for.")
    ],
    data: Annotated[
        Path,
        typer.Option(
            envvar="FEDTEXT_NODE_DATA", help="The tenant's CSV or JSONL file (text, label)."
        ),
    ],
    superlink: SuperlinkOpt,
    credentials_dir: Annotated[
        Path | None,
        typer.Option(
            "--credentials",
            envvar="FEDTEXT_NODE_CREDENTIALS",
            help="This node's bundle (node.key, ca.crt), e.g. OUT/nodes/TENANT.",
        ),
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="The node's OpenSSH private key (node.key).")
    ] = None,
    ca: CaOpt = None,
    device: Annotated[
        str,
        typer.Option(
            envvar="FEDTEXT_NODE_DEVICE",
            help="'auto' (a GPU when present), 'cpu', 'cuda' or 'cuda:N'.",
        ),
    ] = "auto",
    port: Annotated[
        int, typer.Option(help="Local port of the node's ClientApp API (one per node).")
    ] = 9094,
    max_wait: Annotated[
        float, typer.Option(help="Give up after this many seconds without the SuperLink.")
    ] = 600.0,
    labels: Annotated[
        str, typer.Option(help="Labels the data file may use (comma-separated).")
    ] = "negative,neutral,positive",
    dataset: Annotated[
        str,
        typer.Option(
            envvar="FEDTEXT_NODE_DATASET",
            help="The dataset this node's data is, as the tenant's budgets name it: the "
            "dataset budget a run is charged to for this node (signed in its reply). "
            "Default: the tenant's default dataset.",
        ),
    ] = "",
    feature_cache: Annotated[
        Path | None,
        typer.Option(
            envvar="FEDTEXT_FEATURE_CACHE",
            help="Where this node keeps the sentence vectors of its data (private, 0700) "
            "so each round's process reuses them. Default: ~/.cache/fedtext/features/TENANT.",
        ),
    ] = None,
) -> None:
    """Start a tenant's SuperNode: its tenant, data, device, authentication key and CA."""
    check_name(tenant)
    if dataset:
        _check_dataset(dataset)
    if credentials_dir is not None:
        bundle = credentials_dir.expanduser()
        key = key or bundle / "node.key"
        ca = ca or bundle / "ca.crt"
    hint = " (--credentials DIR, or --key and --ca)"
    key_path = existing_file(key, "node private key", hint)
    ca_path = existing_file(ca, "CA certificate", hint)
    check_node_private_key(key_path)
    check_certificate(ca_path, "CA certificate")
    data_path = _check_data(data, labels, tenant)
    resolved_device = _check_device(device)
    check_reachable(superlink)
    scratch = Path(tempfile.mkdtemp(prefix=f"fedtext-node-{tenant}-"))
    node_config = scratch / "node-config.toml"
    node_config.write_bytes(
        tomli_w.dumps(
            {
                "tenant": tenant,
                "data-path": str(data_path),
                "device": device,
                "dataset": dataset,
                # The ClientApp signs the coordinator's discovery nonce with the node key
                # (the coordinator takes the tenant from the key's enrollment).
                "auth-key": str(key_path.resolve()),
            }
        ).encode()
    )
    cmd = [
        flower_executable("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca_path),
        "--auth-supernode-private-key",
        str(key_path),
        "--node-config",
        str(node_config),
        "--port",
        str(port),
        "--max-wait-time",
        str(max_wait),
    ]
    err.print(
        f"node: tenant {tenant}, dataset {dataset or '(default)'}, {data_path}, "
        f"device {resolved_device}, to {superlink}"
    )
    try:
        # The SuperNode starts one ClientApp process per message; the vectors computed
        # in round 1 are read back from here in every later round.
        cache = feature_cache or Path.home() / ".cache" / "fedtext" / "features" / tenant
        code, first = supervise(
            [("supernode", cmd)],
            flower_env({"FEDTEXT_FEATURE_CACHE": str(cache.expanduser())}),
            watch=("Failed to activate SuperNode", "CERTIFICATE_VERIFY_FAILED", "Exit Code: 305"),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Flower logs "Exit Code: 305" for both refusals, but the process may still exit 1
    # (its signal handler races the exit), so the log decides, not the exit code.
    if code:
        if "Failed to activate SuperNode" in first.seen:
            raise fail(
                f"The SuperLink refused this node: its key {key_path} is not registered. "
                "The operator registers it with `fedtext federation register`."
            )
        if "CERTIFICATE_VERIFY_FAILED" in first.seen:
            raise fail(
                f"The SuperLink's certificate does not verify against {ca_path}: "
                "wrong CA, or the address is not one of the certificate's hosts."
            )
        if code == SUPERNODE_CONNECTION_ERROR or "Exit Code: 305" in first.seen:
            raise fail(f"Could not connect to the SuperLink at {superlink} (Flower exit 305).")
        raise fail(f"flower-supernode exited with code {code}; see its output above", code)


def _check_dataset(name: str) -> None:
    from privacy.ledger import check_dataset

    try:
        check_dataset(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _check_data(data: Path, labels: str, tenant: str = "") -> Path:
    from clients.data import DataError, load_labeled_file, train_test_split
    from runs.spec import RunSpec
    from server.planning import PlanRefused, dp_schedule

    path = data.expanduser().resolve()
    names = [s.strip() for s in labels.split(",") if s.strip()]
    try:
        loaded = load_labeled_file(path, names)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if len(loaded) < 2:
        raise UserError(f"{path}: {len(loaded)} example(s); a node needs a train and a test split.")
    # The run's settings are the coordinator's; at the defaults, say now (not after the run
    # is submitted) whether this data is enough for DP-SGD.
    train, _ = train_test_split(loaded, 0.2, 0)
    spec = RunSpec()
    try:
        dp_schedule(
            tenant_name=tenant, num_train=len(train), target_epsilon=spec.epsilon,
            delta=1e-5, batch_size=spec.batch_size, local_epochs=spec.local_epochs,
            rounds=spec.rounds, personalize_epochs=spec.personalize_epochs,
        )  # fmt: skip
    except PlanRefused as exc:
        err.print(f"[yellow]note:[/yellow] at the default run settings, {exc}.")
    err.print(f"{tenant}: {len(train)} training examples in {path.name}.")
    return path


def _check_device(device: str) -> str:
    from clients.train import pick_device

    try:
        return str(pick_device(device))
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"Device {device!r}: {exc}") from None
