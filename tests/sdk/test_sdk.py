"""The Python SDK against a real API on 127.0.0.1 (uvicorn in a thread, real sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fedtext.server_thread import BackgroundServer
from orchestration.worker import LocalRunLauncher
from runs.status import RunStatus
from sdk import (
    AsyncClient,
    Client,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    RetryPolicy,
    Unauthorized,
    Unavailable,
)
from serving.app import create_app
from serving.config import ServingConfig
from serving.limits import Limits
from serving.schemas import ModelVersionPublic, PredictResponse
from tenancy.platform import Platform
from tests.factories import agree, make_tenant, store_tiny_model

TOKEN = "operator-token-for-the-sdk-tests-0123456789"


@pytest.fixture
def api(sqlite_platform: Platform, tmp_path: Path) -> Iterator[str]:
    launcher = LocalRunLauncher(sqlite_platform, tmp_path / "runs")
    app = create_app(sqlite_platform, ServingConfig(operator_token=TOKEN), run_launcher=launcher)
    with BackgroundServer(app) as server:
        yield server.url


def test_a_tenant_admin_path_with_typed_results_and_errors(
    api: str, sqlite_platform: Platform, tmp_path: Path
) -> None:
    with Client(api, TOKEN) as operator:
        created = operator.create_tenant("acme", budget_epsilon=8.0)
        assert created.tenant.name == "acme" and created.tenant.budget_epsilon == 8.0
        assert [t.name for t in operator.list_tenants()] == ["acme"]
        with pytest.raises(InvalidRequest) as invalid:
            operator.create_tenant("")
        assert invalid.value.status == 422 and "name" in invalid.value.message
    tenant = created.tenant
    for version in (1, 2):  # models come from training runs; two versions stored as one would
        store_tiny_model(sqlite_platform, _tenant_row(sqlite_platform, tenant.id),
                         name="sentiment", deploy=version == 2, seed=version)  # fmt: skip
    with Client(api, created.admin_key) as admin:
        key = admin.create_key(["predict"], name="app")
        assert key.secret and key.key.scopes == ["predict"]
        assert {k.name for k in admin.list_keys()} >= {"app"}
        (listed,) = admin.list_models()
        assert (listed.name, listed.versions, listed.deployed_version) == ("sentiment", 2, 2)
        assert [v.version for v in admin.list_versions("sentiment")] == [1, 2]
        rolled = admin.rollback("sentiment")
        assert isinstance(rolled, ModelVersionPublic) and rolled.version == 1 and rolled.deployed
        assert admin.deploy("sentiment", 2).version == 2
        assert admin.get_version("sentiment", 1).deployed is False
        budget = admin.budget()
        assert budget.budget_epsilon == 8.0 and budget.spent_epsilon == 0
        assert admin.ledger() == []
        csv = admin.export_ledger(tmp_path / "ledger.csv").read_text()
        assert csv.splitlines()[0].startswith("tenant_id,")
        report = admin.download_audit_report(tmp_path / "report.html").read_text()
        assert "<html" in report.lower() and "acme" in report
        assert admin.audit_report().tenant == "acme"
        with pytest.raises(NotFound) as missing:
            admin.list_versions("nosuch")
        assert missing.value.status == 404 and missing.value.message == "No model named 'nosuch'."
    with Client(api, key.secret) as app:
        answer = app.predict("sentiment", ["lovely crew", "lost my bag"], top_k=3)
        assert isinstance(answer, PredictResponse) and answer.version == 2
        assert [len(p) for p in answer.predictions] == [3, 3]
        assert answer.explanations is None
        explained = app.explain("sentiment", ["lovely crew"])
        assert [t.token for t in explained.explanations[0].tokens] == ["lovely", "crew"]
        with pytest.raises(Forbidden) as forbidden:
            app.list_keys()
        assert forbidden.value.status == 403 and "admin" in forbidden.value.message
        with pytest.raises(InvalidRequest):
            app.predict("sentiment", ["x"], top_k=0)
    with Client(api, created.admin_key) as admin:
        admin.revoke_key(key.key.id)
    with Client(api, key.secret) as app, pytest.raises(Unauthorized) as revoked:
        app.predict("sentiment", ["lovely crew"])
    assert revoked.value.status == 401 and "revoked" in revoked.value.message


def _tenant_row(platform: Platform, tenant_id: str):  # type: ignore[no-untyped-def]
    from sqlmodel import Session

    from tenancy.tables import Tenant

    with Session(platform.engine, expire_on_commit=False) as session:
        return session.get(Tenant, tenant_id)


def test_the_async_client_starts_watches_and_cancels_a_run(
    api: str, sqlite_platform: Platform
) -> None:
    acme, globex = make_tenant(sqlite_platform, "acme"), make_tenant(sqlite_platform, "globex")
    agree(sqlite_platform, globex, "acme")
    store_tiny_model(sqlite_platform, acme.tenant, name="sentiment")

    async def scenario() -> None:
        async with (
            AsyncClient(api, acme.admin_key) as admin,
            AsyncClient(api, acme.predict_key) as app,
        ):
            answers = await asyncio.gather(
                *(app.predict("sentiment", [f"text {i}"]) for i in range(8))
            )
            assert all(a.model == "sentiment" for a in answers)
            run = await admin.create_run(
                ["globex"], rounds=20, epsilon=8.0, batch_size=16, personalize_epochs=0,
                max_train_examples=48, max_test_examples=16, secure_mode=False,
            )  # fmt: skip
            assert run.status == RunStatus.CREATED and run.participants == ["acme", "globex"]
            with pytest.raises(TimeoutError):  # the run is live: a short watch gives up
                await admin.watch_run(run.id, poll=0.1, timeout=0.3)
            watch = asyncio.create_task(admin.watch_run(run.id, poll=0.2, timeout=60))
            await asyncio.sleep(0.3)
            assert not watch.done()
            await admin.cancel_run(run.id)
            done = await watch
            assert done.status == RunStatus.CANCELLED and done.finished_at is not None
            with pytest.raises(NotFound):  # another tenant's run, or none: a 404 at once
                await admin.watch_run("nosuch-run", poll=0.1, timeout=5)

    asyncio.run(scenario())


def test_429_is_retried_after_the_servers_retry_after(sqlite_platform: Platform) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    store_tiny_model(sqlite_platform, acme.tenant, name="sentiment")
    app = create_app(sqlite_platform, ServingConfig(), limits=Limits(rate_per_second=1, burst=1))
    statuses: list[int] = []
    hooks = {"response": [lambda r: statuses.append(r.status_code)]}
    with BackgroundServer(app) as server:
        with Client(server.url, acme.predict_key, event_hooks=hooks) as client:
            client.predict("sentiment", ["lovely crew"])
            started = time.monotonic()
            client.predict("sentiment", ["lovely crew"])  # the bucket is empty: 429, then ok
            waited = time.monotonic() - started
        assert statuses == [200, 429, 200]
        assert waited >= 0.9  # Retry-After: 1 was honoured (not a tight retry loop)
        impatient = Client(server.url, acme.predict_key, retry=RetryPolicy(max_retries=0))
        with impatient, pytest.raises(RateLimited) as limited:
            impatient.predict("sentiment", ["lovely crew"])
        assert limited.value.status == 429 and limited.value.retry_after == 1.0
        assert "Rate limit exceeded" in limited.value.message


def test_503_of_a_run_creation_is_raised_not_repeated(sqlite_platform: Platform) -> None:
    # A 503 may come after the server acted (a proxy's, or "could not start the worker"
    # after the run was recorded): creating a run is not sent twice (tests/sdk/
    # test_retries.py: idempotent calls are retried).
    acme = make_tenant(sqlite_platform, "acme")
    statuses: list[int] = []
    hooks = {"response": [lambda r: statuses.append(r.status_code)]}
    with BackgroundServer(create_app(sqlite_platform, ServingConfig())) as server:  # no launcher
        retry = RetryPolicy(max_retries=2, backoff=0.05)
        client = Client(server.url, acme.admin_key, retry=retry, event_hooks=hooks)
        with client, pytest.raises(Unavailable) as unavailable:
            client.create_run(["globex"])
    assert statuses == [503]
    assert unavailable.value.message == "This server starts no training runs."


def test_transport_errors_are_httpx_errors_not_api_errors() -> None:
    with (
        Client("http://127.0.0.1:9", "key", timeout=2) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.budget()


def test_a_runs_privacy_unit_reads_from_its_ledger_entries(
    api: str, sqlite_platform: Platform
) -> None:
    from privacy.ledger import record_event
    from privacy.params import DPParams
    from tenancy.db import session_scope

    with Client(api, TOKEN) as operator:
        created = operator.create_tenant("acme", budget_epsilon=20.0)
    with session_scope(sqlite_platform.engine) as session:
        record_event(
            session, tenant_id=created.tenant.id, run_id="run-users", round=1,
            params=DPParams(1.2, 0.1, 10, 1.0, 1e-5), spec_sha256="ab" * 32,
            privacy_unit="user", applied={"max_examples_per_user": 8},
        )  # fmt: skip
        record_event(
            session, tenant_id=created.tenant.id, run_id="run-rows", round=1,
            params=DPParams(1.2, 0.1, 10, 1.0, 1e-5), spec_sha256="ab" * 32,
        )  # fmt: skip
    with Client(api, created.admin_key) as admin:
        assert admin.run_privacy_unit("run-users") == "per user (k = 8)"
        assert admin.run_privacy_unit("run-rows") == "per example"
        assert admin.run_privacy_unit("never-charged") is None

    async def from_async() -> str | None:
        async with AsyncClient(api, created.admin_key) as admin:
            return await admin.run_privacy_unit("run-users")

    assert asyncio.run(from_async()) == "per user (k = 8)"
