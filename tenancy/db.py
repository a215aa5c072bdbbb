"""Engines and sessions for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, event
from sqlmodel import Session, SQLModel, create_engine

from tenancy.files import private_file
from tenancy.nodes import NodeKey
from tenancy.tables import TABLES


@lru_cache
def get_engine(url: str) -> Engine:
    """One engine per URL per process; SQLite files get their directory and WAL mode."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            # Created 0600 before SQLite opens it; its -wal and -shm files copy that mode.
            private_file(Path(path))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the ServerApp
            # Deleted and overwritten content is zeroed, not left in free space: a destroyed
            # data key (crypto-shredding) must not be readable from the file afterwards.
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def create_tables(engine: Engine) -> None:
    from tenancy.governance import TenantPolicy  # beside its rules

    tables = (*TABLES, NodeKey, TenantPolicy)
    SQLModel.metadata.create_all(engine, tables=[t.__table__ for t in tables])  # type: ignore[attr-defined]


def checkpoint_wal(engine: Engine, *, attempts: int = 20) -> bool:
    """SQLite: copy the write-ahead log into the database file and truncate it to zero
    bytes, so what a transaction deleted is not left in the -wal file. True when done
    (False: readers kept it busy for every attempt). Other databases: True, nothing to do.
    """
    if engine.dialect.name != "sqlite":
        return True
    for attempt in range(attempts):
        with engine.connect() as conn:
            busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()[0]
        if not busy:
            return True
        time.sleep(0.05 * (attempt + 1))
    return False


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
