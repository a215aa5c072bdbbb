"""Every route x every kind of credential, with the exact status, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.testclient import TestClient

from orchestration.worker import LocalRunLauncher
from privacy.node_proof import fingerprint, openssh_text
from serving.app import create_app
from serving.config import ServingConfig
from serving.limits import Limits
from tenancy.db import session_scope
from tenancy.nodes import enroll_node_key
from tenancy.platform import Platform
from tenancy.tables import ApiKey, TrainingRun
from tenancy.tenants import create_api_key
from tests.factories import make_tenant, store_tiny_model

OPERATOR = "op-" + "m" * 40
CREDENTIALS = [
    "no key",
    "malformed key",
    "revoked key",
    "expired key",
    "other tenant's admin key",
    "own predict key",
    "own admin key",
]
PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/redoc"}
PUBLIC |= {"/v2", "/v2/health/live", "/v2/health/ready"}  # the inference protocol's server calls


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as declared, e.g. /v1/models/{name}/versions
    url: str  # with acme's objects filled in
    kind: str  # object | collection | predict | operator
    ok: int  # status for acme's own admin key (and, for collections, the other admin's)
    body: Any = None


@dataclass
class World:
    app: FastAPI
    client: TestClient
    headers: dict[str, dict[str, str]]
    routes: list[Route]
    acme_ids: set[str]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def world(platform: Platform, tmp_path: Path) -> Iterator[World]:
    acme = make_tenant(platform, "acme")
    globex = make_tenant(platform, "globex")
    store_tiny_model(platform, acme.tenant, deploy=True, seed=0)
    store_tiny_model(platform, acme.tenant, deploy=False, seed=1)  # v2, to deploy
    store_tiny_model(platform, acme.tenant, name="other", deploy=True, seed=2)
    store_tiny_model(platform, acme.tenant, name="other", deploy=True, seed=3)  # to roll back
    with session_scope(platform.engine) as session:
        victim, _ = create_api_key(session=session, tenant=acme.tenant, scopes="predict")
        revoked_row, revoked = create_api_key(session=session, tenant=acme.tenant, scopes="admin")
        expired_row, expired = create_api_key(session=session, tenant=acme.tenant, scopes="admin")
        run = TrainingRun(owner_tenant_id=acme.tenant.id, status="running")
        session.add(run)
        session.flush()
        victim_id, run_id = victim.id, run.id
        node_key = ec.generate_private_key(ec.SECP384R1()).public_key()
        enroll_node_key(
            session, tenant_id=acme.tenant.id, fingerprint=fingerprint(node_key),
            public_key=openssh_text(node_key), enrolled_by="test",
        )  # fmt: skip
    with session_scope(platform.engine) as session:
        # Revoked and expired after creation, as in life (and read back from the database).
        for row_id, field in ((revoked_row.id, "revoked_at"), (expired_row.id, "expires_at")):
            row = session.get(ApiKey, row_id)
            assert row is not None
            setattr(row, field, row.created_at - timedelta(seconds=1))
            session.add(row)
    headers = {
        "no key": {},
        "malformed key": {"Authorization": "Bearer ftk_not-a-key"},
        "revoked key": _bearer(revoked),
        "expired key": _bearer(expired),
        "other tenant's admin key": globex.admin,
        "own predict key": acme.predict,
        "own admin key": acme.admin,
    }
    run_body = {"participants": [], "rounds": 1}
    routes = [
        Route("POST", "/v1/tenants", "/v1/tenants", "operator", 201, {"name": "initech"}),
        Route("GET", "/v1/tenants", "/v1/tenants", "operator", 200),
        Route("GET", "/metrics", "/metrics", "operator", 200),
        Route(
            "DELETE", "/v1/tenants/{tenant_id}", f"/v1/tenants/{acme.tenant.id}", "operator", 200
        ),
        # The Open Inference Protocol (serving/protocols/oip/rest.py) and explanations, before
        # the admin's deploy below changes which version of lstm is served.
        *_predict_routes(),
        Route("POST", "/v1/keys", "/v1/keys", "collection", 201, {"scopes": ["predict"]}),
        Route("GET", "/v1/keys", "/v1/keys", "collection", 200),
        Route("DELETE", "/v1/keys/{key_id}", f"/v1/keys/{victim_id}", "object", 200),
        Route("GET", "/v1/models", "/v1/models", "collection", 200),
        Route("GET", "/v1/models/{name}/versions", "/v1/models/lstm/versions", "object", 200),
        Route(
            "GET",
            "/v1/models/{name}/versions/{version}",
            "/v1/models/lstm/versions/2",
            "object",
            200,
        ),
        Route(
            "POST",
            "/v1/models/{name}/versions/{version}/deploy",
            "/v1/models/lstm/versions/2/deploy",
            "object",
            200,
        ),
        Route("POST", "/v1/models/{name}/rollback", "/v1/models/other/rollback", "object", 200),
        Route(
            "GET",
            "/v1/models/{name}/versions/{version}/serving",
            "/v1/models/lstm/versions/1/serving",
            "object",
            200,
        ),
        Route(
            "PUT",
            "/v1/models/{name}/versions/{version}/serving",
            "/v1/models/lstm/versions/1/serving",
            "object",
            200,
            {"quantize": None},
        ),
        Route(
            "POST",
            "/v1/models/{name}/predict",
            "/v1/models/lstm/predict",
            "predict",
            200,
            {"inputs": ["late again"]},
        ),
        Route("GET", "/v1/privacy/budget", "/v1/privacy/budget", "collection", 200),
        Route(
            "POST", "/v1/privacy/budget", "/v1/privacy/budget", "collection", 201, {"epsilon": 12.0}
        ),
        Route("GET", "/v1/privacy/budget/changes", "/v1/privacy/budget/changes", "collection", 200),
        Route("GET", "/v1/privacy/ledger", "/v1/privacy/ledger", "collection", 200),
        Route("GET", "/v1/privacy/report", "/v1/privacy/report", "collection", 200),
        Route("GET", "/v1/privacy/head", "/v1/privacy/head", "collection", 200),
        Route("GET", "/v1/privacy/signing-keys", "/v1/privacy/signing-keys", "collection", 200),
        # A run that names no participant: 422 proves the key got past authorization
        # without starting a federation (tests/serving/test_runs.py starts a real one).
        Route("POST", "/v1/runs", "/v1/runs", "collection", 422, run_body),
        Route("GET", "/v1/runs", "/v1/runs", "collection", 200),
        Route("GET", "/v1/partners", "/v1/partners", "collection", 200),
        Route("PUT", "/v1/partners", "/v1/partners", "collection", 200, {"tenants": []}),
        Route("GET", "/v1/policy", "/v1/policy", "collection", 200),
        Route("PUT", "/v1/policy", "/v1/policy", "collection", 200, {"deploy": "first"}),
        Route("GET", "/v1/runs/{run_id}", f"/v1/runs/{run_id}", "object", 200),
        # Node keys (serving/protocols/v1/nodes.py): a malformed key's 422 proves authorization.
        Route("GET", "/v1/federation/nodes", "/v1/federation/nodes", "collection", 200),
        Route(
            "POST",
            "/v1/federation/nodes",
            "/v1/federation/nodes",
            "collection",
            422,
            {"public_key": "not a key"},
        ),
        Route(
            "DELETE",
            "/v1/federation/nodes/{fingerprint}",
            f"/v1/federation/nodes/{fingerprint(node_key)}",
            "object",
            204,
        ),
        Route("POST", "/v1/runs/{run_id}/cancel", f"/v1/runs/{run_id}/cancel", "object", 200),
    ]
    app = create_app(
        platform,
        ServingConfig(operator_token=OPERATOR),
        limits=Limits(rate_per_second=None),
        run_launcher=LocalRunLauncher(platform, tmp_path / "runs"),
    )
    with TestClient(app) as client:
        yield World(app, client, headers, routes, {victim_id, run_id, acme.tenant.id})


def _predict_routes() -> list[Route]:
    tensor = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["late again"]}
    infer = {"inputs": [tensor]}
    explain = {"inputs": ["late again"], "steps": 8}
    v2, v2v = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
    return [
        Route("POST", "/v1/models/{name}/explain", "/v1/models/lstm/explain", "predict", 200,
              explain),
        Route("GET", v2, "/v2/models/lstm", "predict", 200),
        Route("GET", v2v, "/v2/models/lstm/versions/1", "predict", 200),
        Route("GET", f"{v2}/ready", "/v2/models/lstm/ready", "predict", 200),
        Route("GET", f"{v2v}/ready", "/v2/models/lstm/versions/1/ready", "predict", 200),
        Route("POST", f"{v2}/infer", "/v2/models/lstm/infer", "predict", 200, infer),
        Route("POST", f"{v2v}/infer", "/v2/models/lstm/versions/1/infer", "predict", 200, infer),
    ]  # fmt: skip


def expected(route: Route, credential: str) -> int:
    if credential in ("no key", "malformed key", "revoked key", "expired key"):
        return 401
    if route.kind == "operator":
        return 401  # no tenant key is the operator token
    if credential == "own admin key":
        return route.ok
    if credential == "own predict key":
        return 200 if route.kind == "predict" else 403
    # Another tenant's admin: acme's objects do not exist for it; collections are its own.
    return route.ok if route.kind == "collection" else 404


def test_matrix_covers_every_route(world: World) -> None:
    declared = {
        (method.upper(), path)
        for path, ops in world.app.openapi()["paths"].items()
        if path not in PUBLIC
        for method in ops
    }
    assert declared == {(r.method, r.path) for r in world.routes}


def test_authorization_matrix(world: World) -> None:
    results: dict[tuple[str, str], tuple[int, int, str]] = {}
    # Acme's own admin key last: its calls change state (revoke, deploy, cancel, delete).
    order = [c for c in CREDENTIALS if c != "own admin key"] + ["own admin key"]
    for credential in order:
        for route in world.routes:
            if route.kind == "operator" and credential == "own admin key":
                continue  # the operator token is checked below, after the tenant routes
            r = world.client.request(
                route.method, route.url, json=route.body, headers=world.headers[credential]
            )
            results[(f"{route.method} {route.path}", credential)] = (
                r.status_code,
                expected(route, credential),
                r.text[:200],
            )
            if r.status_code == 401:
                assert r.headers.get("www-authenticate") == "Bearer"
            if credential == "other tenant's admin key" and r.status_code < 300:
                assert not world.acme_ids & set(_ids(r.json())), route.path
    wrong = {k: v for k, v in results.items() if v[0] != v[1]}
    assert not wrong, "\n".join(f"{k}: got {v[0]}, want {v[1]} {v[2]}" for k, v in wrong.items())
    assert len(results) == len(world.routes) * len(CREDENTIALS) - 4
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    for route in [r for r in world.routes if r.kind == "operator"]:
        r = world.client.request(route.method, route.url, json=route.body, headers=operator)
        assert r.status_code == route.ok, (route.path, r.text)
    # Deleting acme (the last operator call) made its own admin key a 401 at once.
    r = world.client.get("/v1/keys", headers=world.headers["own admin key"])
    assert r.status_code == 401


def _ids(body: Any) -> list[str]:
    items = body if isinstance(body, list) else [body]
    return [str(i.get("id")) for i in items if isinstance(i, dict)]
