"""Request and response models; responses never carry hashes or wrapped keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

# Import-light (pydantic only, no SQL, torch or accountants): the SDK (sdk) uses
# these models; tests/client/test_schemas.py checks the copies below against their sources.
from privacy.schemas import AuditReport, LedgerEntryBase
from runs.spec import SIMULATION_ONLY, request_model
from runs.status import RunStatus

MAX_BUDGET_DELTA = 1e-3  # tenancy.tenants.MAX_BUDGET_DELTA


class TenantBase(BaseModel):
    """tenancy.tables.TenantBase's fields, without its table machinery."""

    name: str = Field(max_length=63)
    budget_epsilon: float = 10.0
    budget_delta: float = 1e-5


class TenantCreate(TenantBase):
    budget_delta: float = Field(
        default=1e-5,
        gt=0,
        le=MAX_BUDGET_DELTA,
        description="Delta at which the budget is kept; far below 1/n (1e-5 is usual).",
    )


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


# The run settings a tenant admin may choose over HTTP; their defaults, bounds and choices
# are RunSpec's. The simulation-only ones are refused (422) by a server with a SuperLink.
RUN_SETTINGS = (
    "rounds",
    "epsilon",
    "model",
    "strategy",
    "local_epochs",
    "batch_size",
    "learning_rate",
    "clip_norm",
    "personalize_epochs",
    "partitioning",
    "max_train_examples",
    "max_test_examples",
    "dataset",
    "secure_mode",
    "family_config",
    "deploy",
)


# RunSpec's fields (defaults, bounds, choices) that a tenant admin may choose.
_RunSettings: Any = request_model(
    "RunSettings",
    RUN_SETTINGS,
    "Run settings a tenant admin may choose (RunSpec's).",
    participants=(
        list[str],
        Field(
            default_factory=list,
            max_length=15,
            description="Other existing tenants (by name) that train with the caller.",
        ),
    ),
)


class RunCreate(_RunSettings):
    """A training run of the calling tenant and the tenants it names: simulated on the
    server, or on the server's federation (SuperLink) when it has one."""

    def settings(self) -> dict[str, Any]:
        """The run's settings for the launcher: the simulation-only ones only when given
        (a federation refuses them; a simulation applies its defaults)."""
        left_out = {n for n in SIMULATION_ONLY if n not in self.model_fields_set}
        return self.model_dump(by_alias=True, exclude={"participants", *left_out})


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
    # The final phase's released figures with their uncertainty (from the run summary;
    # null for training rows and runs without one): SD and 95% interval, noise and
    # test-set size (privacy/uncertainty.py).
    accuracy_sd: float | None = None
    accuracy_low: float | None = None
    accuracy_high: float | None = None
    macro_f1_sd: float | None = None
    macro_f1_low: float | None = None
    macro_f1_high: float | None = None
    examples_sd: float | None = None


class ReleasedMetrics(BaseModel):
    """A model version's released held-out figures, each with its uncertainty: the same
    figures, named the same, on Runs (``result``), Models (``released``) and in the CLI."""

    model: str = Field(description='"global" or "personalized": what the version holds.')
    accuracy: float | None
    accuracy_sd: float | None = Field(description="SD: DP noise and test-set size.")
    accuracy_low: float | None = Field(description="95% interval, lower end.")
    accuracy_high: float | None = Field(description="95% interval, upper end.")
    macro_f1: float | None
    macro_f1_sd: float | None
    macro_f1_low: float | None
    macro_f1_high: float | None
    test_examples: int | None = Field(description="Released (noised) test-split size.")
    test_examples_sd: float | None
    confidence: float | None = Field(description="Level of the intervals (0.95).")
    uncertainty_warning: str | None = Field(
        description="Set when an interval is too wide to tell models apart: what to do."
    )
    model_choice: str | None = Field(description="Why the global or personalized model.")
    deploy_reason: str | None = Field(description="Why it was deployed, or not.")
    version: int | None = None

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], version: int | None = None) -> ReleasedMetrics:
        """From a version's stored metrics (or a run summary's tenant entry)."""
        fields = (
            "accuracy", "accuracy_sd", "accuracy_low", "accuracy_high", "macro_f1",
            "macro_f1_sd", "macro_f1_low", "macro_f1_high", "test_examples",
            "test_examples_sd", "confidence", "uncertainty_warning",
        )  # fmt: skip
        choice, deploy = metrics.get("model_choice"), metrics.get("deploy")
        return cls(
            model="personalized" if metrics.get("personalized") else "global",
            **{f: metrics.get(f) for f in fields},
            model_choice=choice.get("reason") if isinstance(choice, dict) else None,
            deploy_reason=deploy.get("reason") if isinstance(deploy, dict) else None,
            version=metrics.get("version", version),
        )


class RunPublic(BaseModel):
    id: str
    status: RunStatus
    participants: list[str]
    rounds: int
    checkpoint_round: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    heartbeat_at: datetime | None
    metrics: list[RoundMetricPublic] = Field(description="The calling tenant's own metrics.")
    result: ReleasedMetrics | None = Field(
        default=None,
        description="The calling tenant's released final figures with their uncertainty "
        "(the model version the run stored); null until the run completes.",
    )
    privacy_unit: Literal["example", "user"] = Field(
        default="example",
        description="What the run's epsilon protects: one training example, or one user "
        "(all of a person's rows, at most max_examples_per_user of them used).",
    )
    max_examples_per_user: int | None = Field(
        default=None, description="k, the rows kept per user; null for privacy unit example."
    )


class ModelVersionPublic(BaseModel):
    name: str
    version: int
    deployed: bool
    created_at: datetime
    run_id: str | None
    size_bytes: int
    spec: dict[str, object]
    metrics: dict[str, object]
    released: ReleasedMetrics | None = Field(
        default=None, description="The released held-out figures with their uncertainty."
    )


class ModelPublic(BaseModel):
    name: str
    versions: int
    deployed_version: int | None


class PredictRequest(BaseModel):
    inputs: list[str] = Field(min_length=1)
    top_k: int = Field(default=1, ge=1)
    explain: bool = Field(
        default=False,
        description="Add per-word attributions of each predicted label (slower: "
        "POST /v1/models/{name}/explain says more).",
    )


class LabelScore(BaseModel):
    label: str
    score: float


class TokenAttribution(BaseModel):
    token: str = Field(description="A word as written in the input (word pieces merged).")
    start: int = Field(description="Its first character's index in the input.")
    end: int = Field(description="One past its last character.")
    attribution: float = Field(description="Its share of score - baseline_score.")


class Explanation(BaseModel):
    label: str = Field(description="The label explained (default: the predicted one).")
    score: float = Field(description="The label's probability for the input.")
    baseline_score: float = Field(
        description="The label's probability when every word's tokens are [PAD]."
    )
    method: Literal["integrated-gradients", "occlusion"] = Field(
        description="Integrated gradients on the input embeddings; occlusion (each word "
        "replaced by [PAD] alone) for int8 models, which have no gradients."
    )
    tokens: list[TokenAttribution]
    delta: float = Field(
        description="sum(attributions) - (score - baseline_score): the integration error "
        "(completeness); for occlusion, how far its parts are from the whole."
    )
    truncated: bool = Field(description="The input is longer than the model reads.")


class PredictResponse(BaseModel):
    model: str
    version: int
    predictions: list[list[LabelScore]]
    explanations: list[Explanation] | None = Field(
        default=None, description='With "explain": true, one per input.'
    )
    warnings: list[InputWarning] | None = Field(
        default=None, description="Inputs mostly unreadable by the model's vocabulary."
    )


class InputWarning(BaseModel):
    """An input most of whose tokens the vocabulary does not know ([UNK])."""

    input: int
    unknown_tokens: int
    tokens: int
    message: str


EXPLAIN_MAX_STEPS = 1024  # inputs x steps of one explanation request


class ExplainRequest(BaseModel):
    inputs: list[str] = Field(min_length=1, max_length=16)
    label: str | None = Field(
        default=None, description="The label to explain; default: each input's predicted one."
    )
    steps: int = Field(
        default=64, ge=8, le=512, description="Integration steps: more, smaller delta, slower."
    )

    @model_validator(mode="after")
    def _bounded_work(self) -> ExplainRequest:
        # Each step is a forward and a backward pass per input, and explanations are
        # computed one request at a time: bound one request's work.
        if len(self.inputs) * self.steps > EXPLAIN_MAX_STEPS:
            raise ValueError(
                f"inputs x steps is at most {EXPLAIN_MAX_STEPS} "
                f"(got {len(self.inputs)} x {self.steps}); send fewer inputs or steps."
            )
        return self


class ExplainResponse(BaseModel):
    model: str
    version: int
    explanations: list[Explanation]


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


class LedgerEntryPublic(LedgerEntryBase):
    """One ledger entry as the API gives it out (its fields: ``privacy.schemas``)."""


# Tenant governance (GET/PUT /v1/policy): its own deploy policy, floor and dataset.
DeployPolicy = Literal["always", "if-better", "first", "never"]


class PolicyPublic(BaseModel):
    """What a tenant allows runs that include it to do (its admin sets it)."""

    deploy: DeployPolicy = Field(
        description="Whether a version made by any run it joins serves at once; the run's "
        "request applies only where it is stricter (always < if-better < first < never)."
    )
    require_secure_mode: bool = Field(description="Refuse runs with secure_mode off.")
    max_epsilon: float | None = Field(description="Largest target epsilon per run; null: any.")
    families: list[str] = Field(description="Allowed model families; empty: any.")
    dataset: str = Field(description="The dataset its budget is charged under (simulated runs).")


class PolicyUpdate(BaseModel):
    """The parts of the policy to change; a field left out keeps its value."""

    model_config = {"extra": "forbid"}

    deploy: DeployPolicy | None = None
    require_secure_mode: bool | None = None
    max_epsilon: float | None = Field(default=None, gt=0, le=1e6)
    clear_max_epsilon: bool = Field(default=False, description="Allow any epsilon again.")
    families: list[str] | None = Field(default=None, max_length=16)
    dataset: str | None = Field(default=None, max_length=63)
