"""Build the platform handles (DB, keyring, blob store) from settings."""

from __future__ import annotations

from fedtext.settings import Settings
from privacy.ledger import create_tables as create_ledger_tables
from tenancy.db import create_tables
from tenancy.platform import Platform


def platform_from_settings(settings: Settings) -> Platform:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    platform = Platform.create(
        database_url=settings.resolved_database_url,
        blob_dir=settings.blob_dir,
        key_provider=settings.key_provider,
        kek_file=settings.resolved_kek_file,
        kek_env=settings.kek_env,
    )
    return platform


def upgrade_schema(platform: Platform) -> None:
    """Create every table that is missing (tenancy and ledger)."""
    create_tables(platform.engine)
    create_ledger_tables(platform.engine)
