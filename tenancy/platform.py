"""The handles a platform process needs: database engine, keyring and blob store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from tenancy.blobs import BlobStore, create_blob_store
from tenancy.db import get_engine
from tenancy.hsm import Pkcs11Config
from tenancy.keyring import Keyring, create_key_provider
from tenancy.signing import attach


@dataclass(frozen=True)
class Platform:
    engine: Engine
    keyring: Keyring
    store: BlobStore

    def __post_init__(self) -> None:
        # Every ledger entry, budget change and key row written through this engine is
        # signed with the platform's signing key (tenancy/signing.py).
        attach(self.engine, self.keyring.signing)

    @classmethod
    def create(
        cls,
        *,
        database_url: str,
        blob_dir: Path,
        key_provider: str = "file",
        kek_file: Path,
        kek_env: str = "FEDTEXT_KEK",
        blob_store: str = "file",
        pkcs11: Pkcs11Config | None = None,
    ) -> Platform:
        provider = create_key_provider(
            key_provider, kek_file=kek_file, kek_env=kek_env, pkcs11=pkcs11
        )
        engine = get_engine(database_url)
        return cls(engine, Keyring(provider), create_blob_store(blob_store, engine, blob_dir))
