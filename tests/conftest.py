"""Shared fixtures: a platform on real SQLite and, when configured, real PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from privacy.db import create_tables as create_ledger_tables
from tenancy.db import create_tables, get_engine
from tenancy.platform import Platform

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PG_URL = os.environ.get("FEDTEXT_TEST_DATABASE_URL")
IN_CI = bool(os.environ.get("CI"))


def _database_params() -> list:  # type: ignore[type-arg]
    pg = pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            PG_URL is None and not IN_CI,
            reason="FEDTEXT_TEST_DATABASE_URL is not set (CI sets it to the local PostgreSQL)",
        ),
    )
    return ["sqlite", pg]


@pytest.fixture(params=_database_params())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A clean database: a fresh SQLite file, or the PostgreSQL test database emptied."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fedtext.db'}"
        return
    if PG_URL is None:
        pytest.fail("CI must set FEDTEXT_TEST_DATABASE_URL to the local PostgreSQL")
    _empty_postgres(PG_URL)
    yield PG_URL
    _empty_postgres(PG_URL)


def _empty_postgres(url: str) -> None:
    """Drop every object, Alembic's version table included, whatever state a test left.

    ``metadata.drop_all`` only knows the current tables and fails on drift (a table a
    migration test removed, a stamp without tables); a fresh schema never does.
    """
    engine = get_engine(url)
    engine.dispose()  # no pooled connection may hold a lock on what is dropped
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))


def _make_platform(database_url: str, tmp_path: Path) -> Platform:
    p = Platform.create(
        database_url=database_url,
        blob_dir=tmp_path / "blobs",
        key_provider="file",
        kek_file=tmp_path / "keys" / "kek.key",
    )
    create_tables(p.engine)
    create_ledger_tables(p.engine)
    return p


@pytest.fixture
def platform(database_url: str, tmp_path: Path) -> Platform:
    return _make_platform(database_url, tmp_path)


@pytest.fixture
def sqlite_platform(tmp_path: Path) -> Platform:
    """SQLite only, for tests about something other than the database."""
    return _make_platform(f"sqlite:///{tmp_path / 'fedtext.db'}", tmp_path)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private FEDTEXT_DATA_DIR with its own SQLite database, for CLI tests."""
    monkeypatch.setenv("FEDTEXT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FEDTEXT_DATABASE_URL", raising=False)
    return tmp_path
