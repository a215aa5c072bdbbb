"""Build the platform handles (DB, keyring, blob store) from settings; migrate the schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, inspect, text

import privacy.reservations  # noqa: F401  (its table, like the ledger's, is migrated in tenancy)
from fedtext.settings import Settings
from privacy.db import create_tables as create_ledger_tables
from tenancy.db import create_tables
from tenancy.files import private_dir
from tenancy.platform import Platform

BASELINE = "0001"
_LOCK_ID = 0x66656474  # "fedt": one migrator at a time on PostgreSQL


def platform_from_settings(settings: Settings) -> Platform:
    private_dir(settings.data_dir)  # 0700 whatever the umask: keys, blobs and the database
    platform = Platform.create(
        database_url=settings.resolved_database_url,
        blob_dir=settings.blob_dir,
        key_provider=settings.key_provider,
        kek_file=settings.resolved_kek_file,
        kek_env=settings.kek_env,
        pkcs11=settings.pkcs11_config(),
        blob_store=settings.blob_store,
    )
    return platform


def alembic_config(connection: Connection) -> Config:
    """Alembic settings for the migrations shipped in ``tenancy/migrations``."""
    config = Config()
    config.set_main_option("script_location", "tenancy:migrations")
    config.attributes["connection"] = connection
    return config


def upgrade_schema(platform: Platform) -> None:
    """Bring the database to the newest migration (tenancy and ledger tables).

    An empty database is built by the migrations. A database created before migrations
    existed (``create_all``, no ``alembic_version``) is adopted: missing tables are
    created, it is stamped at the revision its columns match, then upgraded.
    """
    with platform.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        tables = set(inspect(conn).get_table_names())
        config = alembic_config(conn)
        if "alembic_version" in tables and "tenant" not in tables:
            # A version stamp without the schema it describes (the tables were dropped).
            conn.execute(text("DROP TABLE alembic_version"))
        elif "alembic_version" not in tables and "tenant" in tables:
            create_tables(conn)  # type: ignore[arg-type]
            create_ledger_tables(conn)  # type: ignore[arg-type]
            columns = {c["name"] for c in inspect(conn).get_columns("training_run")}
            command.stamp(config, "head" if "owner_tenant_id" in columns else BASELINE)
        command.upgrade(config, "head")


def scratch_platform(root: Path) -> Platform:
    """A migrated platform of its own under ``root``: SQLite, a key file, no env settings."""
    settings = Settings(data_dir=root, database_url=None, key_provider="file", kek_file=None)
    platform = platform_from_settings(settings)
    upgrade_schema(platform)
    return platform
