"""SQLModel tables of the platform (the ledger lives in privacy/ledger.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import Column, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class TenantBase(SQLModel):
    name: str = Field(index=True, unique=True, max_length=63)
    budget_epsilon: float = 10.0
    budget_delta: float = 1e-5


class Tenant(TenantBase, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"
    id: str = Field(default_factory=new_id, primary_key=True)
    tenant_id: str = Field(foreign_key="tenant.id", index=True)
    name: str = Field(default="", max_length=100)
    prefix: str = Field(index=True, unique=True, max_length=32)
    key_hash: str = Field(max_length=64)  # SHA-256 hex of the whole key; never the key
    scopes: str = Field(max_length=100)  # comma-separated
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    # Ed25519 by the platform's signing key over every field above (tenancy/signing.py):
    # a row written around the platform (plain SQL) does not authenticate.
    signature: str | None = Field(default=None, max_length=160)


class DataKey(SQLModel, table=True):
    __tablename__ = "data_key"
    id: str = Field(default_factory=new_id, primary_key=True)
    tenant_id: str = Field(foreign_key="tenant.id", index=True)
    wrapped: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    kek_version: int
    created_at: datetime = Field(default_factory=utcnow)


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)
    id: str = Field(default_factory=new_id, primary_key=True)
    tenant_id: str = Field(foreign_key="tenant.id", index=True)
    name: str = Field(max_length=63)
    version: int
    spec_json: str
    sha256: str = Field(max_length=64)  # of the encrypted blob, checked before decryption
    blob_key: str = Field(max_length=255)
    size_bytes: int
    run_id: str | None = None
    metrics_json: str = "{}"
    deployed: bool = False
    # Serving-time optimization chosen by the tenant admin (None: float32 as trained).
    quantize: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(default_factory=utcnow)
    # Ed25519 by the platform's signing key over the fields above, ``deployed`` included
    # (tenancy/signing.py): a version deployed around the platform is not served.
    signature: str | None = Field(default=None, max_length=160)


class TrainingRun(SQLModel, table=True):
    __tablename__ = "training_run"
    id: str = Field(default_factory=new_id, primary_key=True)
    status: str  # a runs.status.RunStatus; set only through runs.lifecycle
    config_json: str = "{}"
    summary_json: str = "{}"
    simulation_json: str | None = None  # how a simulated run's nodes get their data
    plans_json: str = "{}"  # per-tenant DP plan, fixed before round 1 (reused on resume)
    checkpoint_round: int = 0  # last round whose global model is checkpointed
    checkpoint_blob: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_kek_version: int | None = None
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    # Runs started over HTTP: the tenant whose admin created it (the only one that sees it),
    # and the background worker that runs it (its liveness decides "interrupted" at startup).
    owner_tenant_id: str | None = Field(default=None, index=True, max_length=64)
    worker_pid: int | None = None
    worker_host: str | None = Field(default=None, max_length=255)
    heartbeat_at: datetime | None = None
    # Who asked to cancel the run (set before its worker is stopped, so whatever ends the
    # worker, the run is recorded cancelled, never interrupted); a cancelled run is final.
    cancelled_by: str | None = Field(default=None, max_length=255)


class RoundMetric(SQLModel, table=True):
    __tablename__ = "round_metric"
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="training_run.id", index=True)
    tenant_id: str = Field(index=True)
    round: int
    # train (an accepted update: no metric leaves a node) | evaluate | personalize
    # (DP-released figures from noised confusion counts; see docs/AUDIT.md)
    phase: str
    examples: int
    loss: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class FederationPartner(SQLModel, table=True):
    """Consent: tenant ``tenant_id`` lets ``partner_id`` start runs that include it.

    A run spends every participant's privacy budget (and, on a federation, trains on the
    participant's own data), so a tenant is named in another tenant's run only if its
    admin said so.
    """

    __tablename__ = "federation_partner"
    tenant_id: str = Field(foreign_key="tenant.id", primary_key=True)
    partner_id: str = Field(foreign_key="tenant.id", primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)
    # Ed25519 by the platform's signing key (tenancy/signing.py): a consent row written
    # around the platform is not consent.
    signature: str | None = Field(default=None, max_length=160)


class UnmatchedPartner(SQLModel, table=True):
    """A name a tenant's admin listed as a partner that was no live tenant's name then.

    Kept and listed back like any partner, so that the consent route does not tell tenant
    names from unknown ones; it grants nothing, to anyone (not to a tenant created later
    under that name either: consent is given to a tenant, not to a name).
    """

    __tablename__ = "federation_partner_unmatched"
    tenant_id: str = Field(foreign_key="tenant.id", primary_key=True)
    name: str = Field(primary_key=True, max_length=63)
    created_at: datetime = Field(default_factory=utcnow)


class Blob(SQLModel, table=True):
    """An encrypted blob kept in the database (``FEDTEXT_BLOB_STORE=database``).

    Heads are kilobytes: replicas of the API that share one database then need no
    shared disk. The bytes are ciphertext; the key and hash live on ``model_version``.
    """

    __tablename__ = "blob"
    key: str = Field(primary_key=True, max_length=255)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class TenancyChange(SQLModel, table=True):
    """A committed tenancy change, for the API processes that did not make it.

    Each process announces its own changes at once (tenancy.events); the others read
    this log every lookup interval and apply the same change (forget memoized answers,
    drop a deleted tenant's decrypted models). ``origin`` names the writing process, so
    it skips its own rows. Old rows are pruned by the readers.
    """

    __tablename__ = "tenancy_change"
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32)
    tenant_id: str = Field(max_length=64)
    name: str | None = Field(default=None, max_length=63)
    origin: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, index=True)


TABLES = [
    Tenant,
    ApiKey,
    DataKey,
    ModelVersion,
    TrainingRun,
    RoundMetric,
    FederationPartner,
    UnmatchedPartner,
    Blob,
    TenancyChange,
]
