"""Request and response models; responses never carry hashes or wrapped keys."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from privacy.report import AuditReport
from tenancy.tables import TenantBase


class TenantCreate(TenantBase):
    pass


class TenantPublic(TenantBase):
    id: str
    created_at: datetime


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
    remaining_epsilon: float
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
