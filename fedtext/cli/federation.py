"""`fedtext federation ...`: a real federation across machines on Flower's Deployment Engine.

Every command wraps Flower's own executables (``flower-superlink``, ``flower-supernode``,
``flwr``); nothing here is a transport of its own. TLS and SuperNode authentication are
always on: the coordinator refuses to start without its certificate, a node without its
CA certificate and authentication key.

    credentials   CA, SuperLink certificate (SANs), one ECDSA P-384 key pair per tenant node
    coordinator   SuperLink (TLS, node auth) + the fedtext API, on the platform database
                  (fedtext.cli.coordinator)
    register      register tenant nodes' public keys with the SuperLink
    enrollment-request  at a node's site: a request signed by its key to enroll it for a
                  tenant (proof of possession; the operator or the tenant's admin enrolls it)
    enroll        enroll a node key FOR a tenant (the node's tenant comes from it)
    enrolled      list (or --revoke) a tenant's enrolled node keys
    node          a tenant's SuperNode: its tenant, data file, device, key and CA
                  (fedtext.cli.node)
    run           submit a run (``flwr run``) and wait for its status, read back
    status        a run's status as Flower and as the platform record it
                  (fedtext.cli.federation_runs)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedtext.cli.console import (
    UserError,
    console,
    group,
    open_platform,
    write_out,
)
from fedtext.cli.coordinator import coordinator
from fedtext.cli.federation_runs import run, status
from fedtext.cli.node import node
from fedtext.cli.superlink import (
    DEFAULT_CONNECTION,
    CaOpt,
    ConnectionOpt,
    SuperlinkOpt,
    connect,
)
from orchestration.flower import (
    existing_file,
    flwr_json,
)
from tenancy.certificates import CredentialLayout, create_credentials

federation_app = group(
    "Run a real federation across machines (Flower Deployment Engine, TLS, node auth)."
)


def credentials(
    host: Annotated[
        list[str],
        typer.Option(
            "--host",
            help="A host name or IP address the nodes use to reach the SuperLink (repeat).",
        ),
    ],
    tenant: Annotated[
        list[str] | None,
        typer.Option("--tenant", help="A tenant node to create a key pair for (repeat)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory of the federation's credentials.")] = Path(
        "federation-credentials"
    ),
    renew_server_cert: Annotated[
        bool, typer.Option(help="Reissue the SuperLink certificate (e.g. for new hosts).")
    ] = False,
) -> None:
    """Create the CA, the SuperLink certificate and one node key pair per tenant.

    Existing files are kept. Ship OUT/superlink/ to the coordinator and OUT/nodes/TENANT/
    to that tenant's site; OUT/ca/ca.key stays with the operator.
    """
    made = create_credentials(
        out, hosts=list(host), tenants=list(tenant or []), renew_server_cert=renew_server_cert
    )
    table = Table("file", "state")
    for path in made.created:
        table.add_row(str(path), "created")
    for path in made.kept:
        table.add_row(str(path), "kept")
    console.print(table)
    console.print(
        f"Coordinator: {made.layout.superlink_dir}/  ·  tenant sites: "
        f"{made.layout.root / 'nodes'}/<tenant>/  ·  keep {made.layout.ca_key} offline."
    )
    console.print(
        "Each node key trains only for the tenant it is enrolled for: `fedtext federation "
        f"enroll --tenant TENANT {made.layout.root / 'nodes'}/TENANT/node.pub`."
    )


def register(
    superlink: SuperlinkOpt,
    ca: CaOpt = None,
    credentials_dir: Annotated[
        Path | None,
        typer.Option("--credentials", help="Register the node keys under DIR/nodes/."),
    ] = None,
    tenant: Annotated[
        list[str] | None,
        typer.Option("--tenant", help="Only these tenants' nodes (repeat)."),
    ] = None,
    key: Annotated[
        list[Path] | None,
        typer.Option("--key", help="A node public key file (node.pub) to register (repeat)."),
    ] = None,
    connection: ConnectionOpt = DEFAULT_CONNECTION,
) -> None:
    """Register tenant nodes' public keys with the SuperLink (flwr supernode register).

    A key that is already registered is reported as such; any other refusal fails.
    """
    keys: list[tuple[str, Path]] = []
    if credentials_dir is not None:
        layout = CredentialLayout(credentials_dir.expanduser())
        if ca is None:
            ca = layout.ca_cert
        nodes = layout.nodes()
        if tenant:
            missing = sorted(set(tenant) - {n.tenant for n in nodes})
            if missing:
                raise UserError(
                    f"No node key for {', '.join(missing)} under {layout.root / 'nodes'}; "
                    "create it with `fedtext federation credentials --tenant ...`."
                )
            nodes = [n for n in nodes if n.tenant in tenant]
        keys += [(n.tenant, n.public_key) for n in nodes]
    for path in key or []:
        keys.append((path.parent.name, existing_file(path, "public key")))
    if not keys:
        raise UserError("No node key to register: give --credentials DIR or --key FILE.")
    conn = connect(superlink, ca, connection)
    table = Table("tenant", "public key", "node id", "state")
    failed = []
    for name, path in keys:
        res = flwr_json(["supernode", "register", str(path), conn, "--name", name])
        if res.ok:
            table.add_row(name, str(path), str(res.data.get("node-id")), "registered")
        elif "already in use" in res.message:
            table.add_row(name, str(path), "", "already registered")
        else:
            table.add_row(name, str(path), "", "refused")
            failed.append(f"{name}: {res.message}")
    console.print(table)
    if failed:
        raise UserError("Registration failed: " + "; ".join(failed))


def _read_node_key(path: Path, tenant: str) -> tuple[str, str, bool]:
    """(fingerprint, OpenSSH text, proven) of a node public key file or of an enrollment
    request signed by the node's key for ``tenant``; a bad file is a UserError."""
    from privacy.node_proof import ProofError, fingerprint, load_public_key, openssh_text
    from serving.node_enrollment import EnrollmentError, check_request

    try:
        if str(path) == "-":  # e.g. `docker compose exec -T coordinator ... - < node.pub`
            data = sys.stdin.buffer.read()
        else:
            data = existing_file(path, "node public key").read_bytes()
        if data.lstrip().startswith(b"{"):
            try:
                request = json.loads(data)
            except ValueError:
                raise UserError(f"{path}: not an enrollment request (invalid JSON).") from None
            proven = check_request(request, tenant=tenant)
            return proven.fingerprint, proven.public_key, True
        key = load_public_key(data)
    except (ProofError, EnrollmentError) as exc:
        raise UserError(f"{path}: {exc}") from None
    return fingerprint(key), openssh_text(key), False


def enrollment_request(
    tenant: Annotated[str, typer.Option(help="The tenant this node trains for.")],
    key: Annotated[
        Path, typer.Option(help="The node's private key (node.key, OpenSSH or PEM ECDSA).")
    ],
    out: Annotated[
        Path, typer.Option(help="File to write the request to; '-' for standard output.")
    ] = Path("enrollment-request.json"),
) -> None:
    """Write a request, signed by this node's key, to enroll it for TENANT.

    Run it at the node's site (the private key does not leave it); hand the file to the
    operator (`fedtext federation enroll --tenant TENANT FILE`) or to the tenant's admin
    (`POST /v1/federation/nodes` with `{"enrollment_request": ...}`). It proves the key is
    this node's: no other tenant can enroll it first, and one that did without a proof
    gives it up. Valid for 30 days.
    """
    from privacy.node_proof import ProofError, load_private_key
    from serving.node_enrollment import make_request

    try:
        private = load_private_key(existing_file(key, "node private key"))
    except ProofError as exc:
        raise UserError(str(exc)) from None
    if write_out(out, json.dumps(make_request(private, tenant), indent=2) + "\n"):
        console.print(f"Enrollment request for tenant {tenant!r} written to {out}.")


def enroll(
    tenant: Annotated[str, typer.Option(help="The tenant these node keys are enrolled for.")],
    key: Annotated[
        list[Path],
        typer.Argument(
            help="Enrollment requests (`fedtext federation enrollment-request`, preferred) or "
            "node public key files (node.pub, OpenSSH or PEM); - reads stdin."
        ),
    ],
) -> None:
    """Enroll node keys for a tenant: the coordinator takes a node's tenant from the tenant
    its key is enrolled for, never from what the node says.

    An enrollment request signed by the node's key proves the key is the node's: it takes
    the key over from another tenant's enrollment that proved nothing. A bare public key
    (as before) is enrolled unproven: refused if another tenant holds the key, and it
    yields to a proven enrollment. Enrolling a key twice changes nothing. The key must
    also be registered with the SuperLink (`fedtext federation register`).
    """
    from sqlmodel import Session

    from tenancy.db import session_scope
    from tenancy.errors import Conflict, NotFound
    from tenancy.nodes import enroll_node_key
    from tenancy.tenants import get_tenant

    keys = [(path, *_read_node_key(path, tenant)) for path in key]
    platform = open_platform()
    with Session(platform.engine) as session:
        try:
            tenant_id = get_tenant(session=session, name=tenant).id
        except NotFound:
            raise UserError(f"No tenant {tenant!r}.") from None
    # One line per key (a table would cut the fingerprint on a narrow terminal).
    for path, fp, text, proven in keys:
        try:
            with session_scope(platform.engine) as session:
                _, created = enroll_node_key(
                    session,
                    tenant_id=tenant_id,
                    fingerprint=fp,
                    public_key=text,
                    enrolled_by="operator",
                    proven=proven,
                )
        except Conflict as exc:
            raise UserError(f"{path}: {exc}") from None
        state = "enrolled" if created else "already enrolled"
        how = "proven by the node's signature" if proven else "unproven: a bare public key"
        console.print(f"{state}: {path} (SHA-256 fingerprint {fp}; {how})")
    console.print(f"Nodes with these keys now train for tenant {tenant!r} only.")


def enrolled(
    tenant: Annotated[str, typer.Option(help="The tenant whose node keys to list.")],
    revoke: Annotated[
        list[str] | None,
        typer.Option(help="Revoke this key (its fingerprint) first (repeat)."),
    ] = None,
) -> None:
    """A tenant's enrolled node keys; --revoke FINGERPRINT revokes one."""
    from sqlmodel import Session

    from tenancy.db import session_scope
    from tenancy.errors import NotFound
    from tenancy.nodes import list_node_keys, revoke_node_key
    from tenancy.tenants import get_tenant

    platform = open_platform()
    with Session(platform.engine) as session:
        try:
            tenant_id = get_tenant(session=session, name=tenant).id
        except NotFound:
            raise UserError(f"No tenant {tenant!r}.") from None
    for fp in revoke or []:
        try:
            with session_scope(platform.engine) as session:
                revoke_node_key(session, tenant_id=tenant_id, fingerprint=fp.strip().lower())
        except NotFound as exc:
            raise UserError(str(exc)) from None
    with Session(platform.engine) as session:
        rows = list_node_keys(session, tenant_id)
    if not rows:
        console.print(f"No node key is enrolled for tenant {tenant!r}.")
    for row in rows:  # fingerprint, enrolled at, by whom, the key
        when = row.created_at.isoformat(timespec="seconds")
        console.print(f"{row.fingerprint}  {when}  {row.enrolled_by}  {row.public_key}")


# Registered here, in this order, for `fedtext federation --help`.
for _command in (
    credentials,
    coordinator,
    register,
    enrollment_request,
    enroll,
    enrolled,
    node,
    run,
    status,
):
    federation_app.command()(_command)
