"""Request and response models; responses never carry hashes or wrapped keys."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models import training_defaults
from privacy.report import AuditReport
from tenancy.tables import TenantBase


class TenantCreate(TenantBase):
    pass


class TenantPublic(TenantBase):
    id: str
    created_at: datetime
    deleted_at: datetime | None = None


class TenantDeleted(BaseModel):
    tenant: TenantPublic
    revoked_keys: int
    destroyed_data_keys: int
    removed_blobs: int


class TenantCreated(BaseModel):
    tenant: TenantPublic
    admin_key: str = Field(description="Shown once; store it now.")


class KeyCreate(BaseModel):
    scopes: list[str] = Field(min_length=1)
    name: str = Field(default="", max_length=100)
    expires_at: datetime | None = None


class KeyPublic(BaseModel):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(BaseModel):
    key: KeyPublic
    secret: str = Field(description="Shown once; store it now.")


class RunCreate(BaseModel):
    """A training run of the calling tenant and the tenants it names: simulated on the
    server, or on the server's federation (SuperLink) when it has one."""

    participants: list[str] = Field(
        default_factory=list,
        max_length=15,
        description="Other existing tenants (by name) that train with the caller.",
    )
    # Left out (null): the model family's default, chosen on public data (docs/TRAINING.md).
    rounds: int | None = Field(default=None, ge=1, le=100)
    epsilon: float = Field(default=3.0, gt=0, le=100)
    model: Literal["encoder-head", "lstm", "transformer", "minilm"] = "encoder-head"
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    local_epochs: int | None = Field(default=None, ge=1, le=20)
    batch_size: int | None = Field(
        default=None, ge=0, le=4096, description="Expected batch; 0 sizes it by each tenant's data."
    )
    learning_rate: float | None = Field(default=None, gt=0, le=100)
    clip_norm: float = Field(default=1.0, gt=0, le=1000)
    personalize_epochs: int | None = Field(default=None, ge=0, le=20)
    # Simulation only (how simulated nodes share the demo corpus); a federation's nodes
    # train on their own files, so a server with a SuperLink refuses them (422).
    partitioning: Literal["iid", "dirichlet", "topic"] | None = Field(
        default=None, description="Simulation only; default iid."
    )
    max_train_examples: int | None = Field(
        default=None, ge=8, le=100_000, description="Simulation only; default 2000."
    )
    max_test_examples: int | None = Field(
        default=None, ge=8, le=100_000, description="Simulation only; default 500."
    )
    dataset: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    secure_mode: bool = True
    # JSON key "model_config", as on the CLI (the attribute name avoids pydantic's own).
    family_config: dict[str, int | float | str | bool] = Field(
        default_factory=dict, alias="model_config", max_length=32
    )

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _family_defaults(self) -> RunCreate:
        """What was left out takes the family's default, so the run's record shows it."""
        for name, value in training_defaults(self.model).fill(vars(self)).items():
            setattr(self, name, value)
        return self


class Partners(BaseModel):
    """Tenants (by name) that may start training runs including the caller's tenant."""

    tenants: list[str] = Field(max_length=100)


class RoundMetricPublic(BaseModel):
    round: int
    phase: str = Field(
        description="train: the tenant's update was accepted (no metric leaves a node); "
        "evaluate/personalize: figures from DP-noised confusion counts (docs/AUDIT.md)."
    )
    examples: int
    loss: float | None
    accuracy: float | None
    macro_f1: float | None


class RunPublic(BaseModel):
    id: str
    status: str = Field(
        description="created | running | completed | failed | cancelled | interrupted"
    )
    participants: list[str]
    rounds: int
    checkpoint_round: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    heartbeat_at: datetime | None
    metrics: list[RoundMetricPublic] = Field(description="The calling tenant's own metrics.")


class ModelVersionPublic(BaseModel):
    name: str
    version: int
    deployed: bool
    created_at: datetime
    run_id: str | None
    size_bytes: int
    spec: dict[str, object]
    metrics: dict[str, object]


class ModelPublic(BaseModel):
    name: str
    versions: int
    deployed_version: int | None


class PredictRequest(BaseModel):
    inputs: list[str] = Field(min_length=1)
    top_k: int = Field(default=1, ge=1)


class LabelScore(BaseModel):
    label: str
    score: float


class PredictResponse(BaseModel):
    model: str
    version: int
    predictions: list[list[LabelScore]]


class BudgetPublic(BaseModel):
    tenant: str
    budget_epsilon: float
    delta: float
    spent_epsilon: float
    spent_epsilon_rdp: float
    reserved_epsilon: float = Field(
        description="Held by active runs for releases they planned and have not charged yet."
    )
    reserved_releases: int = Field(description="How many planned releases are held.")
    remaining_epsilon: float = Field(
        description="Budget less spent and reserved: what a new run may still plan."
    )
    accountant: str
    events: int
    dataset_budgets: dict[str, float] = Field(
        default_factory=dict, description="Datasets with a budget of their own."
    )


class BudgetChangeRequest(BaseModel):
    epsilon: float = Field(gt=0, description="The new epsilon budget, at the tenant's delta.")
    dataset: str | None = Field(
        default=None, description="A dataset to budget on its own; omit for the whole tenant."
    )
    reason: str = Field(default="", max_length=500)


class BudgetChangePublic(BaseModel):
    seq: int
    dataset: str = Field(description='"*" for the whole tenant, else the dataset name.')
    created_at: datetime
    actor: str
    old_epsilon: float | None
    new_epsilon: float
    delta: float
    reason: str
    prev_hash: str
    entry_hash: str


class PrivacyReportPublic(AuditReport):
    """The audit report as JSON; the same fields the HTML page shows."""


class LedgerEntryPublic(BaseModel):
    tenant_id: str
    dataset: str
    seq: int
    run_id: str
    round: int
    created_at: datetime
    privacy_unit: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    accountant_version: str
    fedtext_version: str
    spec_sha256: str
    prev_hash: str
    entry_hash: str
    purpose: str = Field(
        default="train",
        description='"train" (a DP-SGD round) or "evaluate" (noised confusion counts).',
    )
