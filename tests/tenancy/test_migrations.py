"""`fedtext db upgrade` builds the schema with Alembic; it matches the SQLModel tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from fedtext.bootstrap import upgrade_schema
from privacy.db import ledger_tables
from tenancy.db import create_tables, get_engine
from tenancy.migrations.schema import PRIVACY_TABLES, TABLES, target_metadata
from tenancy.platform import Platform
from tests.conftest import PG_URL


def _drop_everything(url: str) -> None:
    engine = get_engine(url)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))


@pytest.fixture
def empty_url(database_url: str) -> str:
    _drop_everything(database_url)
    yield database_url  # type: ignore[misc]
    _drop_everything(database_url)


def _diff(url: str) -> list[object]:
    with get_engine(url).connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), target_metadata()))


def test_db_upgrade_builds_every_table_and_matches_the_models(
    empty_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "FEDTEXT_DATA_DIR": str(tmp_path), "FEDTEXT_DATABASE_URL": empty_url}
    r = subprocess.run(
        [sys.executable, "-m", "fedtext.cli", "db", "upgrade"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    tables = set(inspect(get_engine(empty_url)).get_table_names())
    assert set(TABLES) | {"alembic_version"} == tables
    assert _diff(empty_url) == []
    with get_engine(empty_url).connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0010"


def test_upgrade_is_idempotent_and_adopts_a_create_all_database(
    empty_url: str, tmp_path: Path
) -> None:
    p = Platform.create(
        database_url=empty_url, blob_dir=tmp_path / "b", kek_file=tmp_path / "k" / "kek.key"
    )
    create_tables(p.engine)  # as before migrations existed (no ledger tables yet)
    upgrade_schema(p)
    upgrade_schema(p)
    assert _diff(empty_url) == []


def test_a_baseline_database_gets_the_new_run_columns(empty_url: str, tmp_path: Path) -> None:
    from alembic import command

    from fedtext.bootstrap import alembic_config

    engine = get_engine(empty_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    assert "owner_tenant_id" not in {c["name"] for c in inspect(engine).get_columns("training_run")}
    p = Platform.create(
        database_url=empty_url, blob_dir=tmp_path / "b", kek_file=tmp_path / "k" / "kek.key"
    )
    upgrade_schema(p)
    assert _diff(empty_url) == []


def test_the_migrated_privacy_tables_are_the_ones_privacy_declares() -> None:
    # Named, not imported, in tenancy; a table privacy adds or renames must be migrated.
    assert set(PRIVACY_TABLES) == {t.__tablename__ for t in ledger_tables()}  # type: ignore[attr-defined]


def test_pg_is_configured_in_ci() -> None:
    if os.environ.get("CI"):
        assert PG_URL, "CI must set FEDTEXT_TEST_DATABASE_URL"
