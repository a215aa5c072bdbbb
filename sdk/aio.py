"""The asynchronous fedtext client (httpx.AsyncClient).

Method for method the twin of the synchronous client; both send the ``Call`` objects of
sdk/_calls.py, so a call is described once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx

from sdk import _calls as calls
from sdk._core import Call, RetryPolicy, raise_for
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

T = TypeVar("T")
DEFAULT_TIMEOUT = 60.0


class AsyncClient:
    """The fedtext API (async): ``AsyncClient(base_url, key)``; results are the API's models.

    ``key`` is a tenant's API key, or the operator token for the tenant calls. Refusals
    raise ``sdk.ApiError`` subclasses (``NotFound``, ``RateLimited``, ...)
    carrying the status and the server's message; 429 and 503 are retried per ``retry``
    (``Retry-After`` honoured). Extra keywords go to ``httpx.AsyncClient`` (``verify=``, ``cert=``,
    ``transport=``, ``event_hooks=``).
    """

    def __init__(
        self,
        base_url: str,
        key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        **httpx_options: Any,
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retry = retry or RetryPolicy()
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, **httpx_options
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(self, call: Call[T]) -> T:
        """Send one call, retrying 429 and 503 per ``self.retry``; its parsed answer."""
        attempt = 0
        while True:
            response = await self.http.request(
                call.method, call.path, json=call.json, params=call.params or None
            )
            wait = self.retry.delay(response, attempt, call.repeatable)
            if wait is None:
                break
            attempt += 1
            await asyncio.sleep(wait)
        raise_for(response)
        return call.parse(response)

    async def create_tenant(
        self, name: str, *, budget_epsilon: float | None = None, budget_delta: float | None = None
    ) -> TenantCreated:
        """Create a tenant (operator token); the result holds its first admin key, shown once."""
        return await self.send(calls.create_tenant(name, budget_epsilon, budget_delta))

    async def list_tenants(self) -> list[TenantPublic]:
        """Every tenant (operator token)."""
        return await self.send(calls.list_tenants())

    async def delete_tenant(self, tenant_id: str) -> TenantDeleted:
        """Delete a tenant and destroy its data keys (operator token)."""
        return await self.send(calls.delete_tenant(tenant_id))

    async def create_key(
        self, scopes: list[str], *, name: str = "", expires_at: datetime | None = None
    ) -> KeyCreated:
        """A new API key (``admin``, ``predict``); its secret is shown once."""
        return await self.send(calls.create_key(scopes, name, expires_at))

    async def list_keys(self) -> list[KeyPublic]:
        """The tenant's keys (never their secrets)."""
        return await self.send(calls.list_keys())

    async def revoke_key(self, key_id: str) -> KeyPublic:
        """Revoke a key from the next request on."""
        return await self.send(calls.revoke_key(key_id))

    async def list_models(self) -> list[ModelPublic]:
        """The tenant's models and their deployed versions."""
        return await self.send(calls.list_models())

    async def list_versions(self, name: str) -> list[ModelVersionPublic]:
        """The versions of a model."""
        return await self.send(calls.list_versions(name))

    async def get_version(self, name: str, version: int) -> ModelVersionPublic:
        """One version of a model."""
        return await self.send(calls.get_version(name, version))

    async def deploy(self, name: str, version: int) -> ModelVersionPublic:
        """Serve ``version`` of ``name`` from the next prediction on."""
        return await self.send(calls.deploy(name, version))

    async def rollback(self, name: str) -> ModelVersionPublic:
        """Deploy the newest version older than the deployed one."""
        return await self.send(calls.rollback(name))

    async def predict(
        self, name: str, inputs: list[str], *, top_k: int = 1, explain: bool = False
    ) -> PredictResponse:
        """Top-``top_k`` labels per input (with per-word attributions when ``explain``)."""
        return await self.send(calls.predict(name, inputs, top_k, explain))

    async def explain(
        self, name: str, inputs: list[str], *, label: str | None = None, steps: int = 64
    ) -> ExplainResponse:
        """Per-word attributions of each input's predicted label (or ``label``)."""
        return await self.send(calls.explain(name, inputs, label, steps))

    async def create_run(self, participants: list[str] | None = None, **settings: Any) -> RunPublic:
        """Start a run of the caller's tenant and ``participants`` (RunSpec settings)."""
        return await self.send(calls.create_run(participants or [], settings))

    async def list_runs(self) -> list[RunPublic]:
        """The tenant's runs."""
        return await self.send(calls.list_runs())

    async def get_run(self, run_id: str) -> RunPublic:
        """One run, with the tenant's own metrics."""
        return await self.send(calls.get_run(run_id))

    async def cancel_run(self, run_id: str) -> RunPublic:
        """Stop a run's worker."""
        return await self.send(calls.cancel_run(run_id))

    async def budget(self) -> BudgetPublic:
        """The tenant's privacy budget: spent, reserved, remaining."""
        return await self.send(calls.budget())

    async def ledger(self) -> list[LedgerEntryPublic]:
        """The tenant's privacy ledger entries."""
        return await self.send(calls.ledger())

    async def run_privacy_unit(self, run_id: str) -> str | None:
        """What the run's epsilon protects for this tenant, from its ledger entries:
        "per user (k = 8)" or "per example"; None before the run charged it."""
        from sdk.units import run_unit

        return run_unit(await self.ledger(), run_id)

    async def audit_report(self) -> PrivacyReportPublic:
        """The audit report (it also signs a new ledger head)."""
        return await self.send(calls.audit_report())

    async def partners(self) -> Partners:
        """The tenants that may start runs including this tenant (its consent)."""
        return await self.send(calls.partners())

    async def set_partners(self, tenants: list[str]) -> Partners:
        """Replace the tenants that may start runs including this tenant; [] withdraws
        consent from all (runs already started are not stopped)."""
        return await self.send(calls.set_partners(list(tenants)))

    async def policy(self) -> PolicyPublic:
        """What this tenant allows runs that include it to do."""
        return await self.send(calls.policy())

    async def set_policy(self, **changes: Any) -> PolicyPublic:
        """Change parts of the tenant's policy (``deploy``, ``require_secure_mode``,
        ``max_epsilon``, ``clear_max_epsilon``, ``families``, ``dataset``); the rest stay."""
        return await self.send(calls.set_policy(changes))

    async def watch_run(
        self, run_id: str, *, poll: float = 2.0, timeout: float | None = None
    ) -> RunPublic:
        """Poll a run until it is finished (completed, failed, cancelled, interrupted).

        Raises ``TimeoutError`` after ``timeout`` seconds (None: wait as long as it takes).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = await self.get_run(run_id)
            if run.status.finished:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"Run {run_id} is still {run.status} after {timeout} s.")
            await asyncio.sleep(poll)

    async def export_ledger(
        self, path: str | Path, *, format: Literal["jsonl", "csv"] = "csv"
    ) -> Path:
        """Write the ledger for auditors (JSON Lines or CSV) to ``path``; the path."""
        content: bytes = await self.send(calls.ledger_export(format))
        target = Path(path)
        target.write_bytes(content)
        return target

    async def download_audit_report(
        self, path: str | Path, *, format: Literal["json", "html"] = "html"
    ) -> Path:
        """Write the audit report (HTML page or JSON) to ``path``; the path."""
        content: bytes = await self.send(calls.audit_report_file(format))
        target = Path(path)
        target.write_bytes(content)
        return target
