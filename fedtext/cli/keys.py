"""`fedtext keys ...`: a tenant's API keys, and key-encryption and data key rotation."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fedtext.cli.console import UserError, console, group, open_platform

keys_app = group("API keys of a tenant.")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: admin, predict.")] = "predict",
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    secret_only: Annotated[
        bool,
        typer.Option("--secret-only", help="Print only the key, e.g. KEY=$(fedtext keys ...)."),
    ] = False,
) -> None:
    """Create an API key for a tenant (printed once)."""
    from tenancy.db import session_scope
    from tenancy.errors import TenancyError
    from tenancy.tenants import create_api_key, get_tenant

    platform = open_platform()
    try:
        with session_scope(platform.engine) as session:
            row = get_tenant(session=session, name=tenant)
            key, secret = create_api_key(session=session, tenant=row, scopes=scopes, name=name)
    except TenancyError as exc:
        raise UserError(str(exc)) from None
    if secret_only:
        print(secret)
        return
    console.print(f"Key {key.prefix} ({key.scopes}) for {tenant} (shown once): {secret}")


@keys_app.command("list")
def keys_list(tenant: Annotated[str, typer.Option(help="Tenant name.")]) -> None:
    """List a tenant's API keys (prefixes and scopes; never secrets)."""
    from sqlmodel import col, select

    from tenancy.errors import TenancyError
    from tenancy.tables import ApiKey
    from tenancy.tenants import get_tenant

    platform = open_platform()
    table = Table("prefix", "scopes", "name", "created", "expires", "revoked")
    try:
        from sqlmodel import Session

        with Session(platform.engine) as session:
            row = get_tenant(session=session, name=tenant)
            for k in session.exec(
                select(ApiKey).where(ApiKey.tenant_id == row.id).order_by(col(ApiKey.created_at))
            ):
                table.add_row(
                    k.prefix, k.scopes, k.name, str(k.created_at), str(k.expires_at or ""),
                    str(k.revoked_at or ""),
                )  # fmt: skip
    except TenancyError as exc:
        raise UserError(str(exc)) from None
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(prefix: Annotated[str, typer.Argument(help="The key's prefix.")]) -> None:
    """Revoke an API key at once (by its prefix)."""
    from sqlmodel import select

    from tenancy.db import session_scope
    from tenancy.tables import ApiKey
    from tenancy.tenants import revoke_api_key

    platform = open_platform()
    with session_scope(platform.engine) as session:
        key = session.exec(select(ApiKey).where(ApiKey.prefix == prefix)).first()
        if key is None:
            raise UserError(f"No key with prefix {prefix!r}.")
        revoke_api_key(session=session, tenant_id=key.tenant_id, key_id=key.id)
    console.print(f"Key {prefix} revoked.")


@keys_app.command("rotate-kek")
def keys_rotate_kek(
    grace: Annotated[
        float, typer.Option(help="Seconds before unused old KEK versions are retired.")
    ] = 1.0,
) -> None:
    """New key-encryption key version; every data key rewrapped; unused old versions retired."""
    from tenancy.errors import TenancyError
    from tenancy.rotation import rotate_kek

    platform = open_platform()
    try:
        # The signing key and its history first: they record the head-signing keys derived
        # from the KEK versions this rotation may retire (heads signed before v0006).
        platform.keyring.signing.history(refresh=True)
        done = rotate_kek(
            platform.engine, platform.keyring, grace_seconds=grace, store=platform.store
        )
    except TenancyError as exc:
        raise UserError(str(exc)) from None
    kept = ", ".join(map(str, done.kept)) or "none"
    retired = ", ".join(map(str, done.retired)) or "none"
    console.print(
        f"KEK version {done.new_version} is current; {done.rewrapped} data key(s) rewrapped; "
        f"retired: {retired}; kept (still used by run checkpoints): {kept}."
    )


@keys_app.command("rotate-signing")
def keys_rotate_signing() -> None:
    """New signing-key version, endorsed by the current one (the KEK is not touched).

    Rows and heads signed before keep verifying under the old public key, which stays in
    the history (`fedtext audit keys`); processes sign with the new key once restarted.
    """
    from tenancy.errors import KeyProviderError

    platform = open_platform()
    try:
        record = platform.keyring.signing.rotate()
    except KeyProviderError as exc:
        raise UserError(str(exc)) from None
    console.print(
        f"Signing key version {record.version} is current ({record.key_id}), endorsed by "
        f"{record.endorsed_by}; give auditors the new history: fedtext audit keys --out FILE."
    )


@keys_app.command("rotate-dek")
def keys_rotate_dek(tenant: Annotated[str, typer.Option(help="Tenant name.")]) -> None:
    """New data key for a tenant; its model blobs re-encrypted; the old data key destroyed."""
    from tenancy.errors import TenancyError
    from tenancy.rotation import rotate_dek

    platform = open_platform()
    try:
        done = rotate_dek(platform.engine, platform.keyring, platform.store, tenant=tenant)
    except TenancyError as exc:
        raise UserError(str(exc)) from None
    console.print(
        f"Tenant {tenant}: new data key; {done.reencrypted} blob(s) re-encrypted; "
        "the old data key is destroyed."
    )
