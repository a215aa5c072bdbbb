"""Envelope encryption: a key-encryption key (KEK) from a KeyProvider wraps per-tenant data keys.

The providers are ``tenancy.key_providers`` (file, env) and ``tenancy.hsm`` (PKCS#11);
``create_key_provider`` is their registry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from tenancy import crypto
from tenancy.errors import KeyProviderError, NotFound
from tenancy.key_providers import EnvKeyProvider, FileKeyProvider, KeyProvider
from tenancy.signing import SigningKeys
from tenancy.signing_audit import chain_signature_problems, describe
from tenancy.tables import DataKey, Tenant

if TYPE_CHECKING:
    from tenancy.hsm import Pkcs11Config


def create_key_provider(
    name: str, *, kek_file: Path, kek_env: str, pkcs11: Pkcs11Config | None = None
) -> KeyProvider:
    """Registry of key providers; unknown names raise ValueError.

    ``pkcs11`` (the token's module, label and PIN) is needed by, and only by, "pkcs11".
    """
    if name == "file":
        return FileKeyProvider(kek_file)
    if name == "env":
        return EnvKeyProvider(kek_env)
    if name == "pkcs11":
        from tenancy.hsm import Pkcs11KeyProvider

        if pkcs11 is None:
            raise ValueError(
                "The pkcs11 key provider needs FEDTEXT_PKCS11_MODULE, FEDTEXT_PKCS11_TOKEN "
                "and FEDTEXT_PKCS11_PIN."
            )
        return Pkcs11KeyProvider(pkcs11)
    raise ValueError(f"Unknown key provider {name!r}; known: env, file, pkcs11.")


def _wrap_aad(tenant_id: str, kek_version: int) -> bytes:
    return f"fedtext:dek:{tenant_id}:kek-v{kek_version}".encode()


class Keyring:
    """Per-tenant data keys, stored only wrapped by the KEK."""

    def __init__(self, provider: KeyProvider) -> None:
        self.provider = provider
        # The platform's signing keys (tenancy/signing.py), apart from the KEK versions.
        self.signing = SigningKeys(provider)

    def signing_seed(self) -> bytes:
        """The current signing key's Ed25519 seed (heads and rows are signed with it)."""
        return self.signing.seed()

    def signing_key_ids(self) -> list[str]:
        """Key ids of every key in the signing history (KEK rotation never changes it)."""
        return list(self.signing.history(refresh=True).trusted())

    def chain_signature_problems(self, table: str, rows: Sequence[Any]) -> list[tuple[Any, str]]:
        """The rows of one chain whose signature the history does not accept, each with
        what is wrong (``tenancy.signing.chain_signature_problems``)."""
        trusted = self.signing.history(refresh=True).trusted()
        return [
            (row, describe(status))
            for row, status in chain_signature_problems(table, rows, trusted)
        ]

    def create_data_key(self, session: Session, tenant: Tenant) -> None:
        version = self.provider.current_version()
        wrapped = self.provider.wrap_key(
            version, crypto.generate_key(), _wrap_aad(tenant.id, version)
        )
        session.add(DataKey(tenant_id=tenant.id, wrapped=wrapped, kek_version=version))
        session.flush()

    def platform_key(self, purpose: str) -> tuple[int, bytes]:
        """(KEK version, key) for platform data such as run checkpoints, derived from the KEK."""
        version = self.provider.current_version()
        return version, self.provider.derive_key(version, f"fedtext:{purpose}")

    def platform_key_version(self, purpose: str, version: int) -> bytes:
        return self.provider.derive_key(version, f"fedtext:{purpose}")

    def _data_key_row(self, session: Session, tenant_id: str) -> DataKey:
        row = session.exec(
            select(DataKey)
            .where(DataKey.tenant_id == tenant_id)
            .order_by(col(DataKey.created_at).desc())
            .execution_options(populate_existing=True)
        ).first()
        if row is None:
            raise NotFound("This tenant has no data key (deleted or never created).")
        return row

    def data_key(self, session: Session, tenant_id: str) -> bytes:
        row = self._data_key_row(session, tenant_id)
        try:
            return self._unwrap(row)
        except KeyProviderError:
            # A KEK rotation rewrapped the row after we read it and retired the old
            # version: read the row again (its committed state) and unwrap that.
            return self._unwrap(self._data_key_row(session, tenant_id))

    def _unwrap(self, row: DataKey) -> bytes:
        return self.provider.unwrap_key(
            row.kek_version, row.wrapped, _wrap_aad(row.tenant_id, row.kek_version)
        )

    def replace_data_key(self, session: Session, tenant_id: str) -> tuple[bytes, bytes]:
        """A new data key for the tenant: returns (old key, new key), both unwrapped.

        The old row is deleted in the same transaction; the caller re-encrypts the
        tenant's blobs with the new key before committing.
        """
        old_rows = list(session.exec(select(DataKey).where(DataKey.tenant_id == tenant_id)))
        old = self.data_key(session, tenant_id)
        new = crypto.generate_key()
        version = self.provider.current_version()
        for row in old_rows:
            session.delete(row)
        session.flush()
        wrapped = self.provider.wrap_key(version, new, _wrap_aad(tenant_id, version))
        session.add(DataKey(tenant_id=tenant_id, wrapped=wrapped, kek_version=version))
        session.flush()
        return old, new

    def destroy_data_keys(self, session: Session, tenant_id: str) -> int:
        """Delete every wrapped data key of the tenant (crypto-shredding); returns how many."""
        rows = list(session.exec(select(DataKey).where(DataKey.tenant_id == tenant_id)))
        for row in rows:
            session.delete(row)
        session.flush()
        return len(rows)

    def rewrap_one(self, session: Session, row: DataKey, version: int) -> None:
        """Rewrap one data key under KEK ``version``; the row changes in one UPDATE."""
        key = self._unwrap(row)
        row.wrapped = self.provider.wrap_key(version, key, _wrap_aad(row.tenant_id, version))
        row.kek_version = version
        session.add(row)
        session.flush()
