"""How a training command ends: per tenant, what it can use now.

Its model and version (and whether that version serves), a predict key (created when the
tenant has no live one; shown once), an admin key for the web console (created when the
tenant never had one; shown once), and a `fedtext serve`, the console's address and a curl
line to paste.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from sqlmodel import Session, col, select

from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.registry import deployed_version
from tenancy.tables import ApiKey, Tenant
from tenancy.tenants import Scope, create_api_key, get_tenant, is_live, key_scopes

# A token command that works wherever fedtext is installed (no openssl needed).
TOKEN_COMMAND = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
SAMPLE_INPUT = "my flight was delayed again"


@dataclass(frozen=True)
class Handoff:
    tenant: str
    model: str
    version: int
    serving: int | None  # the version that serves now, if any
    key: str | None  # a new predict key (shown once), or None when one exists
    key_prefix: str
    why: str = ""  # why a new version does not serve yet (the run's deploy decision)
    admin_key: str | None = None  # a new admin key (shown once), or None when one exists
    # The encoder runtime variant the serving version's head was trained on (encoder-head).
    encoder_runtime: str | None = None


def console_url(host: str = "127.0.0.1", port: int = 8000, tls: bool = False) -> str:
    """Where the web console of an API bound to ``host``:``port`` opens in a browser."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"{'https' if tls else 'http'}://{shown}:{port}/console/"


def first_admin_key(platform: Platform, tenant: str) -> str | None:
    """A new admin key for ``tenant`` when it never had one (shown once), else None.

    A tenant whose admin keys were all revoked gets none: revoking is a decision, and
    `fedtext keys create --tenant NAME --scopes admin` makes another.
    """
    with session_scope(platform.engine) as session:
        row = get_tenant(session=session, name=tenant)
        keys = session.exec(select(ApiKey).where(ApiKey.tenant_id == row.id)).all()
        if any(Scope.admin in key_scopes(k) for k in keys):
            return None
        _, secret = create_api_key(
            session=session, tenant=row, scopes=[Scope.admin], name="first admin key"
        )
        return secret


def tenants_without_admin_key(platform: Platform) -> list[str]:
    """Live tenants that never had an admin key (made by simulate or demo before keys were)."""
    with Session(platform.engine) as session:
        admins = {
            k.tenant_id for k in session.exec(select(ApiKey)).all() if Scope.admin in key_scopes(k)
        }
        tenants = session.exec(select(Tenant).where(col(Tenant.deleted_at).is_(None))).all()
        return sorted(t.name for t in tenants if t.id not in admins)


def print_serving_console(console: Console, platform: Platform, url: str, limit: int = 5) -> None:
    """`fedtext serve`'s lines: the console, and an admin key for each tenant that never had
    one (at most ``limit``; the others are named with the command that makes one)."""
    missing = tenants_without_admin_key(platform)
    keys = {}
    for name in missing[:limit]:
        key = first_admin_key(platform, name)
        if key is not None:
            keys[name] = key
    print_console(console, url, keys)
    if len(missing) > limit:
        console.print(
            f"  {len(missing) - limit} more tenant(s) have no admin key: "
            "fedtext keys create --tenant NAME --scopes admin"
        )


def print_console(console: Console, url: str, keys: dict[str, str] | None = None) -> None:
    """The console's address, how to sign in, and the admin keys just made (shown once)."""
    console.print(f"[bold]Console[/bold]: {url} (sign in with a tenant's admin key)")
    for tenant, key in (keys or {}).items():
        console.print(f"  {tenant} admin key (shown once): {key}")


def predict_key(platform: Platform, tenant: str) -> tuple[str | None, str]:
    """A new predict key for ``tenant`` when it has no live predict key: (secret, prefix);
    else (None, the newest live predict key's prefix)."""
    with session_scope(platform.engine) as session:
        row = get_tenant(session=session, name=tenant)
        keys = session.exec(
            select(ApiKey).where(ApiKey.tenant_id == row.id).order_by(col(ApiKey.created_at).desc())
        ).all()
        for k in keys:
            if Scope.predict in key_scopes(k) and is_live(k, row):
                return None, k.prefix
        created, secret = create_api_key(
            session=session, tenant=row, scopes=[Scope.predict], name="first predict key"
        )
        return secret, created.prefix


def handoffs(platform: Platform, tenants: dict[str, dict[str, object]]) -> list[Handoff]:
    """One handoff per tenant of a run's summary (``summary["tenants"]``)."""
    out = []
    for name, info in tenants.items():
        model, version = str(info["model"]), int(str(info["version"]))
        with Session(platform.engine) as session:
            tenant = get_tenant(session=session, name=name)
            live = deployed_version(session=session, tenant_id=tenant.id, name=model)
        secret, prefix = predict_key(platform, name)
        admin = first_admin_key(platform, name)
        runtime = _encoder_runtime(live.spec_json) if live else None
        out.append(
            Handoff(
                name, model, version, live.version if live else None, secret, prefix, "", admin,
                runtime,
            )
        )  # fmt: skip
    return out


def _encoder_runtime(spec_json: str) -> str | None:
    """The variant an encoder-head spec's vectors come from (None: no encoder); the spec's
    own config says it, with its default for specs made before variants existed."""
    from models import ModelSpec
    from models.family_defaults import ENCODER_HEAD

    spec = ModelSpec.from_json(spec_json)
    return str(spec.family_config().encoder_runtime) if spec.family == ENCODER_HEAD else None


def _runtimes(items: list[Handoff]) -> dict[str, list[str]]:
    """Encoder runtime variant -> the tenants whose serving heads need it."""
    out: dict[str, list[str]] = {}
    for h in items:
        if h.encoder_runtime:
            out.setdefault(h.encoder_runtime, []).append(h.tenant)
    return out


def runtime_env(items: list[Handoff]) -> dict[str, str]:
    """FEDTEXT_SERVE_ENCODER_RUNTIME when every head handed off needs one variant other
    than a server's default (a head is served only on the vectors it was trained on)."""
    from models.runtimes import DEFAULT_RUNTIME

    needed = _runtimes(items)
    if len(needed) == 1 and (only := next(iter(needed))) != DEFAULT_RUNTIME:
        return {"FEDTEXT_SERVE_ENCODER_RUNTIME": only}
    return {}


def runtime_note(items: list[Handoff]) -> str | None:
    """When the heads need different variants: one server serves one, which for whom."""
    needed = _runtimes(items)
    if len(needed) < 2:
        return None
    per = "; ".join(f"{variant} for {', '.join(t)}" for variant, t in sorted(needed.items()))
    return (
        "These heads were trained on different encoder runtimes and one server serves one "
        f"(FEDTEXT_SERVE_ENCODER_RUNTIME): {per}."
    )


def serve_command(env: dict[str, str] | None = None, port: int = 8000) -> str:
    """A ready-to-paste `fedtext serve` line (with the settings a demo's directory needs)."""
    settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    token = f'FEDTEXT_OPERATOR_TOKEN="$({TOKEN_COMMAND})"'
    return " ".join(p for p in (settings, token, "fedtext serve --port", str(port)) if p)


def curl_command(model: str, key: str, text: str = SAMPLE_INPUT, port: int = 8000) -> str:
    body = json.dumps({"inputs": [text], "top_k": 2})
    return (
        f"curl -s -X POST localhost:{port}/v1/models/{model}/predict "
        f'-H "Authorization: Bearer {key}" -H "content-type: application/json" '
        f"-d {shlex.quote(body)}"
    )


def print_handoffs(
    console: Console,
    items: list[Handoff],
    *,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
    sample: str = SAMPLE_INPUT,
) -> None:
    """The lines a person pastes next: serve, then one curl per tenant."""
    console.print("[bold]Next[/bold]: start the API (leave it running), then ask a tenant's model:")
    console.print(f"  {escape(serve_command({**(env or {}), **runtime_env(items)}))}")
    if (note := runtime_note(items)) is not None:
        console.print(f"  {escape(note)}")
    print_console(console, console_url(), {h.tenant: h.admin_key for h in items if h.admin_key})
    for h in items:
        if h.serving == h.version:
            state = "serving"
        elif h.serving is None:
            state = "not deployed"
        else:
            state = (
                f"v{h.serving} still serves{': ' + h.why if h.why else ''}; deploy "
                f"v{h.version} with POST /v1/models/{h.model}/versions/{h.version}/deploy "
                "(admin key)"
            )
        console.print(f"[bold]{h.tenant}[/bold]: model {h.model} v{h.version} ({escape(state)})")
        if h.key:
            console.print(f"  predict key (shown once): {h.key}")
            key = h.key
        else:
            console.print(
                f"  predict key: your existing key {h.key_prefix}... "
                f"(another: fedtext keys create --tenant {h.tenant})"
            )
            key = f"$PREDICT_KEY_{h.tenant.upper().replace('-', '_')}"
        console.print(f"  {escape(curl_command(h.model, key, sample))}")
    if log_file is not None:
        console.print(f"Library logs: {log_file} (--verbose shows them here)")
