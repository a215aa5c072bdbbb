"""Property-based API test: schemathesis drives every operation from /openapi.json.

With a valid admin key, no generated request may produce a 5xx or a response that breaks
the documented schema. ``POST /v1/runs`` is left out: a valid body would start a real
federation per example (tests/serving/test_runs.py covers it).
"""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from orchestration.worker import LocalRunLauncher
from serving.app import create_app
from serving.config import ServingConfig
from tenancy.platform import Platform
from tests.factories import make_tenant, store_tiny_model

OPERATOR = "op-" + "f" * 40


def test_no_5xx_and_responses_match_the_schema(sqlite_platform: Platform, tmp_path: Path) -> None:
    acme = make_tenant(sqlite_platform, "acme")
    store_tiny_model(sqlite_platform, acme.tenant)
    app = create_app(
        sqlite_platform,
        ServingConfig(operator_token=OPERATOR, max_predict_inputs=4, max_input_chars=50),
        run_launcher=LocalRunLauncher(sqlite_platform, tmp_path / "runs"),
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: dict[str, str] = {}
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) == ("POST", "/v1/runs"):
            continue
        ran.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers=acme.admin, checks=[not_a_server_error, response_schema_conformance]
            )

        try:
            check()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures[ran[-1]] = str(exc)[:800]
    assert len(ran) >= 20
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
