"""A short-lived memo of the predict path's database answers, refreshed in bulk.

Each prediction needs the caller (credential -> live key and tenant) and the deployed
version of the model it names. Asking the database for both costs a thread hop and three
queries, several times the batched forward pass itself, so the answers are memoized:

- A refresher (``refresh``, run by the app every ``ttl`` seconds) re-reads every memoized
  key and deployment in two queries, dropping keys that were revoked, expired or whose
  tenant was deleted, and deployments that changed. So changes made by another process
  (the CLI, another API worker) are seen within about ``ttl``.
- An entry older than twice ``ttl`` (the refresher stalled: a database outage) is not used;
  the request then goes to the database like a first one.
- Changes that other processes commit through tenancy's write functions are read from
  tenancy's change log on the same refresh (``tenancy.events.ChangeFeed``) and announced
  here as if made in this process: a tenant deleted through another replica or the CLI
  has its decrypted models dropped from this process's cache within about ``ttl``.
- Changes made in this process through tenancy's write functions (revoke a key, delete a
  tenant, deploy, roll back, change serving options, rotate a data key) clear the memo as
  they commit: serving/predict.py subscribes to ``tenancy.events``. No route has to.
- Liveness is tenancy's one rule (``tenancy.tenants.is_live``), on every hit (a key's own
  expiry) and on every refresh. Failed authentications are never kept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from sqlmodel import Session, SQLModel, col, select

from tenancy import events
from tenancy.tables import ApiKey, ModelVersion, Tenant
from tenancy.tenants import hash_key, is_live


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
        self._deployed: dict[tuple[str, str], tuple[float, ModelVersion]] = {}
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

    def deployed(self, tenant_id: str, name: str) -> ModelVersion | None:
        with self._lock:
            stamped = self._deployed.get((tenant_id, name))
        return stamped[1] if stamped is not None and self._fresh(stamped) else None

    def put_caller(self, presented: str, key: ApiKey, tenant: Tenant, generation: int) -> None:
        """Keep an answer read from the database while ``generation`` was current."""
        self._put(self._callers, hash_key(presented), Caller(key, tenant), generation)

    def put_deployed(self, row: ModelVersion, generation: int) -> None:
        self._put(self._deployed, (row.tenant_id, row.name), row, generation)

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
        """Forget everything: called when tenancy commits a change (and by anyone who must)."""
        with self._lock:
            self.generation += 1
            self._callers.clear()
            self._deployed.clear()

    def refresh(self, session: Session) -> None:
        """Apply other processes' changes, then re-read every memoized answer (blocking).

        Three queries: the change log, the keys, the deployments.
        """
        for change in self.feed.poll(session):
            # To this process's subscribers (the predict service clears this memo and
            # evicts a deleted tenant's models), never back to the log.
            events.publish(change)
        with self._lock:
            generation = self.generation
            callers = {digest: entry for digest, (_, entry) in self._callers.items()}
            pairs = set(self._deployed)
        now = time.monotonic()
        keys: dict[str, tuple[ApiKey, Tenant]] = {}
        if callers:
            ids = {entry.key.id for entry in callers.values()}
            for key, tenant in session.exec(
                select(ApiKey, Tenant)
                .join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
                .where(col(ApiKey.id).in_(ids))
            ):
                keys[key.id] = (key, tenant)
        new_callers: dict[str, tuple[float, Caller]] = {}
        for digest, entry in callers.items():
            row = keys.get(entry.key.id)
            if row is not None and row[0].key_hash == digest and is_live(*row):
                same = _same(entry.key, row[0]) and _same(entry.tenant, row[1])
                new_callers[digest] = (now, entry if same else Caller(*row))
        new_deployed: dict[tuple[str, str], tuple[float, ModelVersion]] = {}
        with self._lock:
            old_deployed = {pair: entry for pair, (_, entry) in self._deployed.items()}
        if pairs:
            tenant_ids = {tenant_id for tenant_id, _ in pairs}
            for version in session.exec(
                select(ModelVersion).where(
                    col(ModelVersion.tenant_id).in_(tenant_ids),
                    col(ModelVersion.deployed).is_(True),
                )
            ):
                pair = (version.tenant_id, version.name)
                if pair in pairs:
                    old = old_deployed.get(pair)
                    kept = old is not None and _same(old, version)
                    new_deployed[pair] = (now, old if kept and old is not None else version)
        with self._lock:
            if generation != self.generation:
                return  # cleared meanwhile: what was read may predate the change
            # Entries put while this ran are newer than what it read: keep them.
            for digest, kept_caller in self._callers.items():
                if digest not in callers:
                    new_callers[digest] = kept_caller
            for pair, kept_version in self._deployed.items():
                if pair not in pairs:
                    new_deployed[pair] = kept_version
            self._callers, self._deployed = new_callers, new_deployed


def _same(old: SQLModel, new: SQLModel) -> bool:
    """Whether two reads of a row hold the same values (then the memo keeps the old object:
    thousands of entries re-read every second would otherwise churn the heap)."""
    return _values(old) == _values(new)


def _values(row: SQLModel) -> dict[str, object]:
    return {k: v for k, v in vars(row).items() if not k.startswith("_")}
