"""The privacy API's data shapes, pydantic only: a ledger entry, a signed head, the report.

Import-light (no SQL, no accountants): the SDK (``sdk``) reads them through
``serving.schemas``. ``LedgerEntryBase`` is the one field list of a ledger entry: the table
(``privacy.ledger.PrivacyEvent``), the export (``privacy.export``), the API's
``LedgerEntryPublic`` and the report's ``RoundRow`` derive from it. :mod:`privacy.heads` signs
and checks heads, :mod:`privacy.report` builds reports and :mod:`privacy.report_html`
renders them.
"""

from __future__ import annotations

import json
from datetime import datetime

from pydantic import BaseModel, Field

HEAD_FORMAT = "fedtext-signed-head/1"
DEFAULT_DATASET = "default"
PRIVACY_UNIT = "example"  # one training example of one tenant's dataset


class LedgerEntryBase(BaseModel):
    """One DP release (one round of one tenant) as the ledger records it.

    Field order is the export's column order (``privacy.export.EXPORT_FIELDS``): the hashed
    fields in ``PrivacyEvent.HASHED`` order, then ``purpose``, ``applied_json`` (hashed only
    when not their defaults, so older entries keep their hashes) and ``entry_hash``.
    Lengths are the table's column sizes.
    """

    tenant_id: str = Field(max_length=64)
    dataset: str = Field(default=DEFAULT_DATASET, max_length=63)
    seq: int  # position in this tenant's chain, from 1
    run_id: str = Field(max_length=64)
    round: int
    created_at: datetime
    privacy_unit: str = PRIVACY_UNIT
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    accountant_version: str
    fedtext_version: str
    spec_sha256: str = Field(max_length=64)
    prev_hash: str = Field(max_length=64)
    purpose: str = Field(
        default="train",
        max_length=16,
        # Also "personalize": the tenant's DP fine-tune after the last round.
        description='"train" (a DP-SGD round) or "evaluate" (noised confusion counts).',
    )
    applied_json: str = Field(
        default="{}",
        description="The run settings that applied to this tenant (docs/AUDIT.md), hashed.",
    )
    entry_hash: str = Field(max_length=64)


class Head(BaseModel):
    """What is signed: one tenant's chains and budget settings at one moment."""

    format: str = HEAD_FORMAT
    tenant_id: str
    ledger_seq: int
    ledger_hash: str
    budget_seq: int
    budget_hash: str
    budget_epsilon: float  # the tenant-wide budget in force
    budget_delta: float
    dataset_budgets: dict[str, float] = Field(default_factory=dict)
    signed_at: str  # UTC ISO 8601

    def canonical(self) -> bytes:
        """Sorted keys, no spaces, floats as ``repr``: the bytes that are signed."""
        data = {k: (repr(v) if isinstance(v, float) else v) for k, v in self.model_dump().items()}
        data["dataset_budgets"] = {k: repr(v) for k, v in sorted(self.dataset_budgets.items())}
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


class SignedHeadPublic(BaseModel):
    """A head with its Ed25519 signature and the public key that checks it."""

    head: Head
    key_id: str  # SHA-256 hex (first 32) of the raw public key
    public_key: str  # raw 32-byte Ed25519 public key, base64
    signature: str  # base64


class RoundRow(LedgerEntryBase):
    """One ledger entry (one round of one run) with the tenant's cumulative epsilon after it."""

    cumulative_epsilon: float | None  # PRV; None where the curve was thinned out
    cumulative_epsilon_rdp: float | None


class RunRow(BaseModel):
    """The releases of one run: its own epsilon, composed over its rounds."""

    run_id: str
    datasets: list[str]
    rounds: int
    first_at: datetime
    last_at: datetime
    epsilon: float
    epsilon_rdp: float


class DatasetRow(BaseModel):
    dataset: str
    events: int
    budget_epsilon: float | None  # None: only the tenant budget applies
    spent_epsilon: float
    spent_epsilon_rdp: float
    remaining_epsilon: float | None


class BudgetChangeRow(BaseModel):
    seq: int
    dataset: str  # "*" for the whole tenant
    created_at: datetime
    actor: str
    old_epsilon: float | None
    new_epsilon: float
    delta: float
    reason: str
    entry_hash: str


class ChainCheck(BaseModel):
    """Result of re-hashing both of the tenant's chains."""

    ledger_ok: bool
    ledger_entries: int
    ledger_problem: str | None
    ledger_head: str  # keep it: a deleted tail is detectable only against a known head
    budget_chain_ok: bool
    budget_changes: int
    budget_problem: str | None
    budget_head: str
    budget_matches_tenant: bool  # the last tenant-wide change equals the budget in force
    # Against the newest head the platform signed earlier (None: no earlier head kept).
    checked_head_at: str | None = None
    head_problems: list[str] = []

    @property
    def ok(self) -> bool:
        return (
            self.ledger_ok
            and self.budget_chain_ok
            and self.budget_matches_tenant
            and not self.head_problems
        )


class IndependentCheck(BaseModel):
    library: str
    method: str
    epsilon: float
    of_record: float
    abs_diff: float
    agrees: bool


class MethodologyItem(BaseModel):
    question: str
    answer: str


class AuditReport(BaseModel):
    """Everything an auditor needs about one tenant's privacy spend."""

    tenant: str
    tenant_id: str
    generated_at: datetime
    fedtext_version: str
    accountant: str
    accountant_version: str
    cross_check_accountant: str
    budget_epsilon: float
    delta: float
    spent_epsilon: float
    spent_epsilon_rdp: float
    remaining_epsilon: float
    events: int
    datasets: list[DatasetRow]
    runs: list[RunRow]
    rounds: list[RoundRow]
    budget_changes: list[BudgetChangeRow]
    chain: ChainCheck
    chain_ok: bool
    independent: IndependentCheck
    methodology: list[MethodologyItem]
    # The head signed as this report was made: keep it, and check later exports against it
    # with `fedtext audit verify --head FILE` (docs/AUDIT.md).
    signed_head: SignedHeadPublic | None = None
