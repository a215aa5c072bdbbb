"""`fedtext federation coordinator`: the SuperLink (TLS, SuperNode authentication) and the
fedtext API beside it, supervised together."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedtext.cli.console import UserError, err, fail, settings
from fedtext.cli.superlink import DEFAULT_SUPERLINK_PORT
from orchestration.flower import check_certificate, existing_file, flower_env, flower_executable
from orchestration.supervisor import RestartPolicy, supervise
from tenancy.certificates import CredentialLayout, certificate_hosts

if TYPE_CHECKING:
    from fedtext.settings import Settings


def coordinator(
    credentials_dir: Annotated[
        Path | None,
        typer.Option(
            "--credentials",
            help="Directory made by `fedtext federation credentials` (uses its superlink/).",
        ),
    ] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="SuperLink certificate (instead of --credentials).")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Its private key.")] = None,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(help="The CA certificate.")] = None,
    host: Annotated[str, typer.Option(help="SuperLink bind address.")] = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="SuperLink port (Fleet, Control and Runtime APIs).")
    ] = DEFAULT_SUPERLINK_PORT,
    state: Annotated[
        Path | None,
        typer.Option(help="SuperLink state database (nodes, runs). Default: DATA_DIR/superlink."),
    ] = None,
    api: Annotated[bool, typer.Option(help="Also serve the fedtext HTTP API.")] = True,
    api_host: Annotated[str | None, typer.Option(help="API bind address.")] = None,
    api_port: Annotated[int | None, typer.Option(help="API port.")] = None,
) -> None:
    """Start the SuperLink with TLS and SuperNode authentication, and the fedtext API.

    The ServerApp runs in a subprocess of the SuperLink and inherits the platform settings
    (FEDTEXT_DATA_DIR, FEDTEXT_DATABASE_URL, key provider), which this command resolves
    to absolute paths. The API's `POST /v1/runs` submits runs to this SuperLink (unless
    FEDTEXT_SUPERLINK names another). Stops both on SIGTERM/Ctrl-C.

    A SuperLink that dies is started again (after 1, 2, 4... s; at most 5 times in a
    row) on the same state database while the API goes on answering; the run it was
    executing ends interrupted, resumable (docs/RELIABILITY.md). The API exiting stops all.
    """
    if credentials_dir is not None:
        layout = CredentialLayout(credentials_dir.expanduser())
        ssl_certfile = ssl_certfile or layout.server_cert
        ssl_keyfile = ssl_keyfile or layout.server_key
        ssl_ca_certfile = ssl_ca_certfile or layout.superlink_ca_cert
    hint = " (--credentials DIR, or --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile)"
    cert = existing_file(ssl_certfile, "SuperLink certificate", hint)
    key = existing_file(ssl_keyfile, "SuperLink private key", hint)
    ca = existing_file(ssl_ca_certfile, "CA certificate", hint)
    check_certificate(cert, "SuperLink certificate")
    check_certificate(ca, "CA certificate")
    config = settings()
    if api and config.operator_token is None and not config.dev_mode:
        raise UserError(
            "The API needs FEDTEXT_OPERATOR_TOKEN (32+ random characters); or start with --no-api."
        )
    env = flower_env(_platform_env(config))
    if api:
        env.update(api_superlink_env(config, host, port, cert, ca))
    state_db = (state or config.data_dir / "superlink" / "state.db").expanduser()
    state_db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    superlink = [
        flower_executable("flower-superlink"),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--ssl-ca-certfile",
        str(ca),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state_db.resolve()),
    ]
    commands = [("superlink", superlink)]
    if api:
        api_cmd = [sys.executable, "-m", "fedtext.cli", "serve"]
        api_cmd += ["--host", api_host or config.api_host]
        api_cmd += ["--port", str(api_port or config.api_port)]
        commands.append(("api", api_cmd))
    err.print(
        f"coordinator: SuperLink on {host}:{port} (TLS, node auth), "
        f"platform {env['FEDTEXT_DATABASE_URL']}" + (", API" if api else "")
    )
    code, first = supervise(commands, env, restart=RestartPolicy(names=("superlink",)))
    if code:
        raise fail(f"the {first.name} exited with code {code}; see its output above", code)


def api_superlink_env(
    settings: Settings, bind_host: str, port: int, cert: Path, ca: Path
) -> dict[str, str]:
    """FEDTEXT_SUPERLINK(_CA) for the API: this SuperLink, by a name its certificate covers
    (TLS verification checks the name), unless the operator chose one."""
    if settings.superlink:
        return {}
    hosts = certificate_hosts(cert)
    if bind_host in ("0.0.0.0", "::", ""):
        # Every interface: loopback reaches it; otherwise a name of this machine.
        loopback = [h for h in ("127.0.0.1", "localhost", "::1") if h in hosts]
        choice = (loopback or hosts or [None])[0]
    else:
        choice = bind_host if bind_host in hosts else None
    if choice is None:
        err.print(
            f"[yellow]warning:[/yellow] {cert} names none of the SuperLink's addresses "
            f"({bind_host}); the API will simulate runs unless FEDTEXT_SUPERLINK is set."
        )
        return {}
    address = f"[{choice}]:{port}" if ":" in choice else f"{choice}:{port}"
    return {"FEDTEXT_SUPERLINK": address, "FEDTEXT_SUPERLINK_CA": str(settings.superlink_ca or ca)}


def _platform_env(settings: Settings) -> dict[str, str]:
    """The platform settings, absolute, for the ServerApp subprocess; the schema upgraded."""
    from fedtext.bootstrap import platform_from_settings, upgrade_schema

    data_dir = settings.data_dir.expanduser().resolve()
    resolved = settings.model_copy(update={"data_dir": data_dir})
    try:
        upgrade_schema(platform_from_settings(resolved))
    except Exception as exc:  # a wrong URL, an unreachable server, a bad key file
        raise UserError(f"The platform database is not usable: {exc}") from None
    env = {
        "FEDTEXT_DATA_DIR": str(data_dir),
        "FEDTEXT_DATABASE_URL": resolved.resolved_database_url,
    }
    if resolved.key_provider == "file":
        env["FEDTEXT_KEK_FILE"] = str(resolved.resolved_kek_file.expanduser().resolve())
    return env
