"""The way to the console: its address, and an admin key made only for a tenant that never
had one (shown once), as simulate, demo and serve print them."""

from __future__ import annotations

import io

from rich.console import Console
from sqlmodel import Session, select

from fedtext.handoff import (
    console_url,
    first_admin_key,
    print_serving_console,
    tenants_without_admin_key,
)
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.tables import ApiKey
from tenancy.tenants import authenticate, create_tenant, revoke_api_key
from tests.factories import make_tenant


def _bare_tenant(platform: Platform, name: str) -> None:
    with session_scope(platform.engine) as session:
        create_tenant(session=session, keyring=platform.keyring, name=name)


def test_console_url_names_a_reachable_address() -> None:
    assert console_url() == "http://127.0.0.1:8000/console/"
    assert console_url("0.0.0.0", 9000, tls=True) == "https://127.0.0.1:9000/console/"
    assert console_url("::1", 8000) == "http://[::1]:8000/console/"


def test_an_admin_key_is_made_once_and_only_for_a_tenant_that_never_had_one(
    sqlite_platform: Platform,
) -> None:
    _bare_tenant(sqlite_platform, "sim-1")
    make_tenant(sqlite_platform, "acme")  # has an admin key already
    assert tenants_without_admin_key(sqlite_platform) == ["sim-1"]
    key = first_admin_key(sqlite_platform, "sim-1")
    assert key is not None and key.startswith("ftk_")
    with Session(sqlite_platform.engine) as session:
        found = authenticate(session=session, presented=key)
        assert found is not None and found[0].scopes == "admin"
    assert first_admin_key(sqlite_platform, "sim-1") is None  # shown once
    assert first_admin_key(sqlite_platform, "acme") is None
    # Revoking every admin key is a decision: no new one is made behind the admin's back.
    with session_scope(sqlite_platform.engine) as session:
        for row in session.exec(select(ApiKey)).all():
            revoke_api_key(session=session, tenant_id=row.tenant_id, key_id=row.id)
    assert first_admin_key(sqlite_platform, "sim-1") is None
    assert tenants_without_admin_key(sqlite_platform) == []


def test_serve_prints_the_console_and_at_most_a_few_new_keys(sqlite_platform: Platform) -> None:
    for i in range(1, 8):
        _bare_tenant(sqlite_platform, f"t-{i}")
    out = io.StringIO()
    print_serving_console(Console(file=out, width=200), sqlite_platform, console_url(), limit=5)
    text = out.getvalue()
    assert "Console: http://127.0.0.1:8000/console/ (sign in with a tenant's admin key)" in text
    assert text.count("admin key (shown once): ftk_") == 5
    assert "2 more tenant(s) have no admin key: fedtext keys create" in text
    assert tenants_without_admin_key(sqlite_platform) == ["t-6", "t-7"]


def test_the_serve_line_names_the_encoder_runtime_the_heads_need(sqlite_platform: Platform) -> None:
    """A head is served only on the variant it was trained on: the pasted serve line says it."""
    from fedtext.handoff import handoffs, print_handoffs
    from models import ModelSpec, build_model, save_weights
    from tenancy.registry import store_model_version
    from tenancy.tenants import get_tenant

    def stored(tenant: str, runtime: str) -> None:
        make_tenant(sqlite_platform, tenant)
        spec = ModelSpec.create("encoder-head", ["a", "b"], encoder_runtime=runtime)
        with session_scope(sqlite_platform.engine) as session:
            store_model_version(
                session=session, keyring=sqlite_platform.keyring, store=sqlite_platform.store,
                tenant=get_tenant(session=session, name=tenant), name="encoder-head",
                spec_json=spec.to_json(), weights=save_weights(build_model(spec)), deploy=True,
            )  # fmt: skip

    def serve_line(tenants: list[str]) -> str:
        out = io.StringIO()
        summary = {t: {"model": "encoder-head", "version": 1} for t in tenants}
        print_handoffs(Console(file=out, width=400), handoffs(sqlite_platform, summary))
        return next(line for line in out.getvalue().splitlines() if "fedtext serve" in line)

    stored("fast", "onnx-int8-static")
    stored("exact", "torch-fp32")
    assert "FEDTEXT_SERVE_ENCODER_RUNTIME=onnx-int8-static" in serve_line(["fast"])
    assert "FEDTEXT_SERVE_ENCODER_RUNTIME" not in serve_line(["exact"])
    # Mixed: no variant is picked for everyone; the note says which tenant needs which.
    assert "FEDTEXT_SERVE_ENCODER_RUNTIME=" not in serve_line(["fast", "exact"])
    out = io.StringIO()
    summary = {t: {"model": "encoder-head", "version": 1} for t in ("fast", "exact")}
    print_handoffs(Console(file=out, width=400), handoffs(sqlite_platform, summary))
    assert "onnx-int8-static for fast; torch-fp32 for exact" in out.getvalue()
