"""Encrypted blobs in the database: replicas of the API then need no shared disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session

from privacy.db import create_tables as create_ledger_tables
from tenancy.blobs import DatabaseBlobStore, create_blob_store
from tenancy.db import create_tables, get_engine
from tenancy.errors import InvalidInput, NotFound
from tenancy.platform import Platform
from tenancy.registry import read_model_weights
from tests.factories import make_tenant, store_tiny_model


def test_database_blobs_round_trip_replace_and_delete(database_url: str) -> None:
    engine = get_engine(database_url)
    create_tables(engine)
    if engine.dialect.name == "sqlite":
        with pytest.raises(ValueError, match="Database blobs need PostgreSQL"):
            create_blob_store("database", engine, Path("unused"))
        return
    store = create_blob_store("database", engine, Path("unused"))
    assert isinstance(store, DatabaseBlobStore)
    store.put("t1/m/v1.ftx", b"\x00ciphertext\xff")
    assert store.get("t1/m/v1.ftx") == b"\x00ciphertext\xff"
    store.put("t1/m/v1.ftx", b"rewritten")  # a rotation rewrites a blob under its key
    assert store.get("t1/m/v1.ftx") == b"rewritten"
    store.delete("t1/m/v1.ftx")
    store.delete("t1/m/v1.ftx")  # idempotent, like the file store
    with pytest.raises(NotFound, match="missing"):
        store.get("t1/m/v1.ftx")
    for bad in ("../etc/passwd", "a//b", "/abs", "a/../b"):
        with pytest.raises(InvalidInput):
            store.put(bad, b"x")
    with pytest.raises(ValueError, match="Unknown blob store"):
        create_blob_store("s3", engine, Path("unused"))


def test_a_model_stored_in_database_blobs_is_encrypted_there_and_reads_back(
    database_url: str, tmp_path: Path
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("database blobs are a PostgreSQL feature (refused on SQLite above)")
    platform = Platform.create(
        database_url=database_url, blob_dir=tmp_path / "no-such-dir", key_provider="file",
        kek_file=tmp_path / "kek.key", blob_store="database",
    )  # fmt: skip
    create_tables(platform.engine)
    create_ledger_tables(platform.engine)
    acme = make_tenant(platform, "acme")
    row = store_tiny_model(platform, acme.tenant)
    assert not (tmp_path / "no-such-dir").exists()  # nothing on disk
    with platform.engine.connect() as conn:
        stored = conn.execute(text("SELECT data FROM blob WHERE key = :k"), {"k": row.blob_key})
        data = bytes(stored.scalar_one())
    assert len(data) == row.size_bytes and b"weight" not in data  # ciphertext, not safetensors
    with Session(platform.engine) as session:
        weights = read_model_weights(
            session=session, keyring=platform.keyring, store=platform.store, row=row
        )
    assert b"weight" in weights  # safetensors header names the tensors


def test_blob_reads_do_not_wait_for_the_platform_pool(database_url: str) -> None:
    """Loads read a blob while their session holds a platform connection: with every
    platform connection held, a blob read must still go through (no pool deadlock)."""
    if database_url.startswith("sqlite"):
        pytest.skip("database blobs are a PostgreSQL feature")
    engine = get_engine(database_url)
    create_tables(engine)
    store = DatabaseBlobStore(engine)
    store.put("t/m/v1.ftx", b"sealed")
    pool = engine.pool
    held = [engine.connect() for _ in range(pool.size() + engine.pool._max_overflow)]  # type: ignore[attr-defined]
    try:
        assert store.get("t/m/v1.ftx") == b"sealed"
    finally:
        for conn in held:
            conn.close()
        store.engine.dispose()
