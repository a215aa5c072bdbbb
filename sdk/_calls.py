"""The fedtext API's calls, described once for both clients (serving/protocols/v1/)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from sdk._core import Call, model, raw
from serving.schemas import (
    BudgetPublic,
    ExplainResponse,
    KeyCreated,
    KeyPublic,
    LedgerEntryPublic,
    ModelPublic,
    ModelVersionPublic,
    Partners,
    PolicyPublic,
    PredictResponse,
    PrivacyReportPublic,
    RunPublic,
    TenantCreated,
    TenantDeleted,
    TenantPublic,
)


def _seg(value: str | int) -> str:
    return quote(str(value), safe="")


# ------------------------------------------------------------------ tenants (operator token)


def create_tenant(
    name: str, budget_epsilon: float | None = None, budget_delta: float | None = None
) -> Call[TenantCreated]:
    body: dict[str, Any] = {"name": name}
    if budget_epsilon is not None:
        body["budget_epsilon"] = budget_epsilon
    if budget_delta is not None:
        body["budget_delta"] = budget_delta
    return Call("POST", "/v1/tenants", model(TenantCreated), json=body)


def list_tenants() -> Call[list[TenantPublic]]:
    return Call("GET", "/v1/tenants", model(list[TenantPublic]))


def delete_tenant(tenant_id: str) -> Call[TenantDeleted]:
    return Call("DELETE", f"/v1/tenants/{_seg(tenant_id)}", model(TenantDeleted))


# ------------------------------------------------------------------ keys (admin)


def create_key(
    scopes: list[str], name: str = "", expires_at: datetime | None = None
) -> Call[KeyCreated]:
    body: dict[str, Any] = {"scopes": scopes, "name": name}
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    return Call("POST", "/v1/keys", model(KeyCreated), json=body)


def list_keys() -> Call[list[KeyPublic]]:
    return Call("GET", "/v1/keys", model(list[KeyPublic]))


def revoke_key(key_id: str) -> Call[KeyPublic]:
    return Call("DELETE", f"/v1/keys/{_seg(key_id)}", model(KeyPublic))


# ------------------------------------------------------------------ models (admin)


def list_models() -> Call[list[ModelPublic]]:
    return Call("GET", "/v1/models", model(list[ModelPublic]))


def list_versions(name: str) -> Call[list[ModelVersionPublic]]:
    return Call("GET", f"/v1/models/{_seg(name)}/versions", model(list[ModelVersionPublic]))


def get_version(name: str, version: int) -> Call[ModelVersionPublic]:
    path = f"/v1/models/{_seg(name)}/versions/{_seg(version)}"
    return Call("GET", path, model(ModelVersionPublic))


def deploy(name: str, version: int) -> Call[ModelVersionPublic]:
    path = f"/v1/models/{_seg(name)}/versions/{_seg(version)}/deploy"
    return Call("POST", path, model(ModelVersionPublic), idempotent=True)  # the same version


def rollback(name: str) -> Call[ModelVersionPublic]:
    return Call("POST", f"/v1/models/{_seg(name)}/rollback", model(ModelVersionPublic))


# ------------------------------------------------------------------ predictions (predict key)


def predict(name: str, inputs: list[str], top_k: int, explain: bool) -> Call[PredictResponse]:
    body: dict[str, Any] = {"inputs": inputs, "top_k": top_k}
    if explain:
        body["explain"] = True
    return Call(
        "POST",
        f"/v1/models/{_seg(name)}/predict",
        model(PredictResponse),
        json=body,
        idempotent=True,
    )


def explain(name: str, inputs: list[str], label: str | None, steps: int) -> Call[ExplainResponse]:
    body: dict[str, Any] = {"inputs": inputs, "steps": steps}
    if label is not None:
        body["label"] = label
    return Call(
        "POST",
        f"/v1/models/{_seg(name)}/explain",
        model(ExplainResponse),
        json=body,
        idempotent=True,
    )


# ------------------------------------------------------------------ runs (admin)


def create_run(participants: list[str], settings: dict[str, Any]) -> Call[RunPublic]:
    body = {**settings, "participants": participants}
    return Call("POST", "/v1/runs", model(RunPublic), json=body)


def list_runs() -> Call[list[RunPublic]]:
    return Call("GET", "/v1/runs", model(list[RunPublic]))


def get_run(run_id: str) -> Call[RunPublic]:
    return Call("GET", f"/v1/runs/{_seg(run_id)}", model(RunPublic))


def cancel_run(run_id: str) -> Call[RunPublic]:
    return Call("POST", f"/v1/runs/{_seg(run_id)}/cancel", model(RunPublic))


# ------------------------------------------------------------------ privacy (admin)


def budget() -> Call[BudgetPublic]:
    return Call("GET", "/v1/privacy/budget", model(BudgetPublic))


def ledger() -> Call[list[LedgerEntryPublic]]:
    return Call("GET", "/v1/privacy/ledger", model(list[LedgerEntryPublic]))


def ledger_export(fmt: Literal["jsonl", "csv"]) -> Call[bytes]:
    return Call("GET", "/v1/privacy/ledger", raw, params={"format": fmt})


def audit_report() -> Call[PrivacyReportPublic]:
    return Call("GET", "/v1/privacy/report", model(PrivacyReportPublic))


def audit_report_file(fmt: Literal["json", "html"]) -> Call[bytes]:
    return Call("GET", "/v1/privacy/report", raw, params={"format": fmt})


# ------------------------------------------------------------------ the tenant's own say


def partners() -> Call[Partners]:
    return Call("GET", "/v1/partners", model(Partners))


def set_partners(tenants: list[str]) -> Call[Partners]:
    # The whole list is replaced: sending it twice leaves what sending it once does.
    return Call("PUT", "/v1/partners", model(Partners), json={"tenants": tenants})


def policy() -> Call[PolicyPublic]:
    return Call("GET", "/v1/policy", model(PolicyPublic))


def set_policy(changes: dict[str, Any]) -> Call[PolicyPublic]:
    return Call("PUT", "/v1/policy", model(PolicyPublic), json=changes)
