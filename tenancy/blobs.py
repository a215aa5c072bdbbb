"""Blob storage for ciphertexts: a local directory (default) or the platform database.

Blobs are AES-GCM ciphertexts whose SHA-256 is recorded on their ``model_version`` row;
a store never sees a key. The database backend lets several API replicas share one
PostgreSQL and no disk (heads are kilobytes).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from pathlib import Path

from sqlalchemy import Engine, create_engine, delete, insert, select

from tenancy.errors import InvalidInput, NotFound
from tenancy.files import private_dir
from tenancy.tables import Blob, utcnow

_KEY = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class BlobStore(ABC):
    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise InvalidInput(f"Invalid blob key {key!r}.")
    return key


class LocalBlobStore(BlobStore):
    """Files under ``root``, written atomically with mode 0600."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        private_dir(path.parent)  # every level 0700, whatever the umask
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            # A full disk (ENOSPC) stops the write midway: the partial file would keep the
            # space and a piece of the tenant's ciphertext (tests/faults, disk full).
            tmp.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        # A str path, not pathlib: pathlib interns every component, and each tenant's blob
        # names are distinct (2,000 cold loads grew the interned-string table by 7 MB).
        try:
            with open(os.path.join(self.root, check_key(key)), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise NotFound(f"Blob {key} is missing from the store.") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class DatabaseBlobStore(BlobStore):
    """Rows of the ``blob`` table, each write in its own transaction (PostgreSQL).

    A blob is written before the row that names it commits (as a file would be), so a
    write that is rolled back leaves an unreferenced blob, never a row without its blob.
    SQLite is refused: its single writer would make the blob's own transaction wait for
    the caller's open one.
    """

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name == "sqlite":
            raise ValueError(
                "Database blobs need PostgreSQL (FEDTEXT_DATABASE_URL); with SQLite keep "
                "FEDTEXT_BLOB_STORE=file."
            )
        # Its own pool: a blob is read while the caller's session holds a connection of
        # the platform's pool. Sharing that pool, concurrent cold loads could hold every
        # connection while each waits for one more (stuck until the pool's timeout).
        self.engine = create_engine(engine.url, pool_size=4, max_overflow=12, pool_pre_ping=True)
        self._table = Blob.__table__  # type: ignore[attr-defined]

    def put(self, key: str, data: bytes) -> None:
        table = self._table
        with self.engine.begin() as conn:
            conn.execute(delete(table).where(table.c.key == check_key(key)))
            conn.execute(insert(table).values(key=key, data=data, created_at=utcnow()))

    def get(self, key: str) -> bytes:
        table = self._table
        with self.engine.connect() as conn:
            data = conn.execute(select(table.c.data).where(table.c.key == check_key(key))).scalar()
        if data is None:
            raise NotFound(f"Blob {key} is missing from the store.")
        return bytes(data)

    def delete(self, key: str) -> None:
        table = self._table
        with self.engine.begin() as conn:
            conn.execute(delete(table).where(table.c.key == check_key(key)))


BLOB_STORES = ("file", "database")


def create_blob_store(kind: str, engine: Engine, root: Path) -> BlobStore:
    """The blob store named ``kind``: ``file`` (under ``root``) or ``database``."""
    if kind == "file":
        return LocalBlobStore(root)
    if kind == "database":
        return DatabaseBlobStore(engine)
    raise ValueError(f"Unknown blob store {kind!r}; known: {list(BLOB_STORES)}.")
