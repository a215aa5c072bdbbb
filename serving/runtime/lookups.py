"""A short-lived memo of the predict path's database answers, refreshed in bulk.

Each prediction needs the caller (credential -> live key and tenant) and the deployed
version of the model it names. Asking the database for both costs a thread hop and three
queries, several times the batched forward pass itself, so the answers are memoized:

- A refresher (``refresh``, run by the app every ``ttl`` seconds) checks every memoized
  key and deployment against the database in two plain-row queries, dropping keys that
  were revoked, expired or whose tenant was deleted, and deployments that changed. So
  changes made by another process (the CLI, another API replica) are seen within about
  ``ttl``, at a few milliseconds per refresh for thousands of tenants.
- The same refresh reads tenancy's change log (``tenancy.events.ChangeFeed``): what other
  processes committed through tenancy's write functions is announced here as if made in
  this process, so a tenant deleted through another replica or the CLI also has its
  decrypted models dropped from this process's cache within about ``ttl``.
- An entry older than twice ``ttl`` (the refresher stalled: a database outage) is not used;
  the request then goes to the database like a first one.
- Changes made in this process through tenancy's write functions (revoke a key, delete a
  tenant, deploy, roll back, change serving options, rotate a data key) clear the changed
  tenant's entries as they commit: serving/predict.py subscribes to ``tenancy.events``.
  No route has to.
- A deployment enters the memo only as ``tenancy.registry.deployed_version`` returned it:
  a version row whose signature verifies (one Ed25519 check when the memo is filled, none
  per request). The refresh compares every column, the signature included, so a row
  changed around the platform is dropped and checked again by the next request.
- Liveness is tenancy's one rule (``tenancy.tenants.is_live``), on every hit (a key's own
  expiry) and on every refresh. Failed authentications are never kept.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, SQLModel, col, select

from tenancy import events
from tenancy.tables import ApiKey, ModelVersion, Tenant
from tenancy.tenants import hash_key, is_live


@dataclass(frozen=True, slots=True)
class DeployedRef:
    """What the predict path needs of a deployed version row: the model cache's key.

    The memo keeps this and a keyed digest of the row's values, not the ORM row itself
    (2,000 memoized tenants held ~2 MB of rows and their instance state).
    """

    tenant_id: str
    name: str
    version: int
    quantize: str | None
    fingerprint: bytes  # a keyed digest of the row's column values: the refresh compares it


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: a live key and its tenant (from the credential only)."""

    key: ApiKey
    tenant: Tenant


class PredictLookups:
    """Credential digest -> (key, tenant); (tenant id, model name) -> deployed version."""

    def __init__(self, ttl: float = 1.0, max_entries: int = 10_000) -> None:
        if ttl < 0:
            raise ValueError("The lookup memo's ttl should be zero (off) or positive.")
        self.ttl = ttl
        self.max_entries = max_entries
        self._lock = threading.Lock()  # filled from worker threads, read on the event loop
        self._callers: dict[str, tuple[float, Caller]] = {}
        self._deployed: dict[tuple[str, str], tuple[float, DeployedRef]] = {}
        # Bumped by clear(): an answer read before a change must not be kept after it.
        self.generation = 0
        self.feed = events.ChangeFeed()

    def _fresh(self, stamped: tuple[float, object] | None) -> bool:
        return stamped is not None and time.monotonic() - stamped[0] < 2 * self.ttl

    def caller(self, presented: str) -> Caller | None:
        with self._lock:
            stamped = self._callers.get(hash_key(presented))
        if stamped is None or not self._fresh(stamped):
            return None
        found = stamped[1]
        return found if is_live(found.key, found.tenant) else None

    def deployed(self, tenant_id: str, name: str) -> DeployedRef | None:
        with self._lock:
            stamped = self._deployed.get((tenant_id, name))
        return stamped[1] if stamped is not None and self._fresh(stamped) else None

    def put_caller(self, presented: str, key: ApiKey, tenant: Tenant, generation: int) -> None:
        """Keep an answer read from the database while ``generation`` was current."""
        self._put(self._callers, hash_key(presented), Caller(key, tenant), generation)

    def put_deployed(self, row: ModelVersion, generation: int) -> None:
        ref = DeployedRef(
            row.tenant_id, row.name, row.version, row.quantize, _fingerprint(row, _VERSION_COLS)
        )
        self._put(self._deployed, (row.tenant_id, row.name), ref, generation)

    def _put(self, table: dict, key: object, value: object, generation: int) -> None:  # type: ignore[type-arg]
        if self.ttl <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            if key not in table and len(table) >= self.max_entries:
                table.clear()  # more live keys than entries: rare; refilled on demand
            table[key] = (time.monotonic(), value)

    def clear(self) -> None:
        """Forget everything (anyone who must)."""
        with self._lock:
            self.generation += 1
            self._callers.clear()
            self._deployed.clear()

    def forget_tenant(self, tenant_id: str) -> None:
        """Forget one tenant's keys and deployments: called when tenancy commits its change."""
        with self._lock:
            self.generation += 1  # an answer being read now may predate the change
            self._callers = {
                digest: entry
                for digest, entry in self._callers.items()
                if entry[1].tenant.id != tenant_id
            }
            self._deployed = {
                pair: entry for pair, entry in self._deployed.items() if pair[0] != tenant_id
            }

    def refresh(self, session: Session) -> None:
        """Apply other processes' changes and check every memoized answer (blocking).

        Three queries: the change log, the keys with their tenants, the deployments. They
        read plain rows (no ORM objects) and compare them with what is memoized: an entry
        still the same is kept another ``ttl``, one that differs (or whose key is no longer
        live) is dropped, and its next request reads it again. So thousands of memoized
        tenants cost a few milliseconds a refresh, and any change, even one written around
        tenancy's functions, is seen within about ``ttl``.
        """
        for change in self.feed.poll(session):
            # To this process's subscribers (the predict service forgets the tenant here
            # and evicts a deleted tenant's models), never back to the log.
            events.publish(change)
        with self._lock:
            generation = self.generation
            callers = {digest: entry for digest, (_, entry) in self._callers.items()}
            deployed = {pair: entry for pair, (_, entry) in self._deployed.items()}
        now = time.monotonic()
        kept_callers: set[str] = set()
        if callers:
            key_cols, tenant_cols = _columns(ApiKey), _columns(Tenant)
            ids = {entry.key.id for entry in callers.values()}
            current: dict[str, tuple[Any, ...]] = {}
            for row in session.execute(
                select(*key_cols, *tenant_cols)
                .join_from(ApiKey, Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
                .where(col(ApiKey.id).in_(ids))
            ):
                current[row[0]] = tuple(row)
            for digest, entry in callers.items():
                now_values = current.get(entry.key.id)
                memo = _values(entry.key, key_cols) + _values(entry.tenant, tenant_cols)
                if now_values == memo and is_live(entry.key, entry.tenant):
                    kept_callers.add(digest)
        kept_deployed: set[tuple[str, str]] = set()
        if deployed:
            tenant_ids = {tenant_id for tenant_id, _ in deployed}
            rows = {
                (row.tenant_id, row.name): _digest(tuple(row))
                for row in session.execute(
                    select(*_VERSION_COLS).where(
                        col(ModelVersion.tenant_id).in_(tenant_ids),
                        col(ModelVersion.deployed).is_(True),
                    )
                )
            }
            for pair, ref in deployed.items():
                if rows.get(pair) == ref.fingerprint:
                    kept_deployed.add(pair)
        with self._lock:
            if generation != self.generation:
                return  # changed meanwhile: what was read may predate the change
            # Entries put while this ran are newer than what it read: keep them as they are.
            self._callers = {
                digest: ((now, entry[1]) if digest in kept_callers else entry)
                for digest, entry in self._callers.items()
                if digest in kept_callers or digest not in callers
            }
            self._deployed = {
                pair: ((now, entry[1]) if pair in kept_deployed else entry)
                for pair, entry in self._deployed.items()
                if pair in kept_deployed or pair not in deployed
            }


def _columns(table: type[SQLModel]) -> list[Any]:
    return list(table.__table__.columns)  # type: ignore[attr-defined]


def _values(row: SQLModel, columns: list[Any]) -> tuple[Any, ...]:
    return tuple(getattr(row, c.key) for c in columns)


def _fingerprint(row: SQLModel, columns: list[Any]) -> bytes:
    return _digest(_values(row, columns))


# Keyed per process: a row written to collide with a memoized one cannot be crafted (Python's
# hash() is not enough: it collides for chosen integers, hash(-1) == hash(-2)).
_DIGEST_KEY = secrets.token_bytes(32)


def _digest(values: tuple[Any, ...]) -> bytes:
    # repr is exact for the columns' types (str, int, bool, float, bytes, datetime, None).
    return hashlib.blake2b(repr(values).encode(), key=_DIGEST_KEY, digest_size=16).digest()


_VERSION_COLS = _columns(ModelVersion)
