"""`fedtext federation ...`: a real federation across machines on Flower's Deployment Engine.

Every command wraps Flower's own executables (``flower-superlink``, ``flower-supernode``,
``flwr``); nothing here is a transport of its own. TLS and SuperNode authentication are
always on: the coordinator refuses to start without its certificate, a node without its
CA certificate and authentication key.

    credentials   CA, SuperLink certificate (SANs), one ECDSA P-384 key pair per tenant node
    coordinator   SuperLink (TLS, node auth) + the fedtext API, on the platform database
    register      register tenant nodes' public keys with the SuperLink
    node          a tenant's SuperNode: its tenant, data file, device, key and CA
    run           submit a run (``flwr run``) and wait for its status, read back
    status        a run's status as Flower and as the platform record it
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Annotated, Any

import tomli_w
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from fedtext.credentials import (
    CredentialLayout,
    CredentialsError,
    certificate_hosts,
    check_certificate,
    check_name,
    check_node_private_key,
    create_credentials,
)
from fedtext.settings import Settings

federation_app = typer.Typer(
    no_args_is_help=True,
    help="Run a real federation across machines (Flower Deployment Engine, TLS, node auth).",
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_CONNECTION = "fedtext"
# Flower's exit code for "could not connect to / be activated by the SuperLink".
SUPERNODE_CONNECTION_ERROR = 305
FLOWER_ENV_DEFAULTS = {
    # Without it the SuperLink `uv sync`s the app's dependencies at run time (a CUDA torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

SuperlinkOpt = Annotated[
    str,
    typer.Option(
        "--superlink",
        envvar="FEDTEXT_SUPERLINK",
        help="The SuperLink's address as host:port (as named in its certificate).",
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        envvar="FEDTEXT_SUPERLINK_CA",
        help="The federation's CA certificate (ca.crt).",
    ),
]
ConnectionOpt = Annotated[
    str,
    typer.Option(
        help="Name of the SuperLink connection written to $FLWR_HOME/config.toml.",
    ),
]


class UserError(Exception):
    """A mistake the user can fix; reported as ``error: ...`` with exit code 2."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (UserError, CredentialsError) as exc:
        raise _fail(str(exc)) from None


# --------------------------------------------------------------------------- helpers


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's executables: this venv first on PATH, quiet defaults."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    for key, value in FLOWER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    """A Flower console script of this installation (the SuperLink spawns its siblings)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"{name} is not installed; install fedtext with its flwr dependency.")
    return found


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", address.strip())
    if not match:
        raise UserError(f"{address!r} is not an address of the form host:port.")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise UserError(f"{address!r}: the port should be in 1..65535.")
    return host, port


def check_reachable(address: str, timeout: float = 5.0) -> None:
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise UserError(
            f"The SuperLink at {address} is unreachable ({exc.strerror or exc}); "
            "is the coordinator running, and is the address right?"
        ) from None


def existing_file(path: Path | None, what: str, hint: str = "") -> Path:
    if path is None:
        raise UserError(f"Give the {what}{hint}.")
    path = path.expanduser()
    if not path.is_file():
        raise UserError(f"The {what} {path} does not exist{hint}.")
    return path.resolve()


def flwr_home() -> Path:
    """Flower's own rule: ``$FLWR_HOME`` or ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def write_connection(name: str, address: str, ca: Path, home: Path | None = None) -> Path:
    """Add or replace SuperLink connection ``name`` in ``HOME/config.toml`` (default
    ``$FLWR_HOME``).

    ``flwr`` commands then reach the federation as ``flwr ls <name>`` etc.; the file is
    private (0600 in a 0700 directory) and other connections in it are kept.
    """
    parse_address(address)
    home = home or flwr_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / "config.toml"
    config: dict[str, Any] = {}
    if path.exists():
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path} is not valid TOML ({exc}); fix or remove it.") from None
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", name)
    superlink[name] = {"address": address, "root-certificates": str(ca.resolve())}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        tomli_w.dump(config, fh)
    path.chmod(0o600)
    return path


def _connect(superlink: str, ca: Path | None, connection: str) -> str:
    ca_path = existing_file(ca, "CA certificate", " (--ca or FEDTEXT_SUPERLINK_CA)")
    check_certificate(ca_path, "CA certificate")
    check_reachable(superlink)
    write_connection(connection, superlink, ca_path)
    return connection


@dataclass
class FlwrResult:
    ok: bool
    data: dict[str, Any]
    message: str


def flwr_json(args: Sequence[str], timeout: float = 300.0, home: Path | None = None) -> FlwrResult:
    """Run ``flwr ARGS --format json`` (with ``FLWR_HOME=home`` when given); its exit code
    is 0 even on failure, so read the JSON."""
    cmd = [flower_executable("flwr"), *args, "--format", "json"]
    env = flower_env({"FLWR_HOME": str(home)} if home else None)
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return FlwrResult(False, {}, f"`flwr {args[0]}` did not answer within {timeout:.0f} s")
    data: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        start = proc.stdout.index("{")
        data = json.loads(proc.stdout[start:])
    if not data:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return FlwrResult(False, {}, " ".join(tail) or f"flwr exited with {proc.returncode}")
    message = str(data.get("error-message", ""))
    # Flower prefixes its messages with the connection it used; the reason is what follows.
    message = re.sub(r"^Using SuperLink: [^\n]*\n+", "", message).strip()
    return FlwrResult(bool(data.get("success")) and proc.returncode == 0, data, message)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise UserError("; ".join(str(e["msg"]) for e in exc.errors())) from None


# ------------------------------------------------------------------ process supervision


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[str]
    seen: list[str] = field(default_factory=list)


def _pump(stream: IO[str], out: IO[str], seen: list[str], patterns: Sequence[str]) -> None:
    for line in stream:
        out.write(line)
        out.flush()
        seen.extend(p for p in patterns if p in line)


def supervise(
    commands: Sequence[tuple[str, list[str]]],
    env: dict[str, str],
    watch: Sequence[str] = (),
    grace: float = 20.0,
) -> tuple[int, _Child]:
    """Run ``commands`` until one exits or a signal arrives; then stop the others.

    Returns the exit code and the child that ended first. A SIGTERM/SIGINT/SIGHUP is passed
    on as SIGTERM, then SIGKILL after ``grace`` seconds. Output is passed through; lines
    containing one of ``watch`` are remembered (to explain a failure).
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    children: list[_Child] = []
    pumps: list[threading.Thread] = []
    try:
        for name, cmd in commands:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                errors="replace",
            )
            child = _Child(name, proc)
            children.append(child)
            assert proc.stdout is not None
            pump = threading.Thread(
                target=_pump, args=(proc.stdout, sys.stdout, child.seen, watch), daemon=True
            )
            pump.start()
            pumps.append(pump)
        first: _Child | None = None
        while first is None and not stop.is_set():
            first = next((c for c in children if c.proc.poll() is not None), None)
            if first is None:
                stop.wait(0.5)
        for child in children:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        for pump in pumps:
            pump.join(timeout=2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if first is None:  # stopped by a signal: a clean shutdown
        return 0, children[0]
    return first.proc.returncode or 0, first


# ------------------------------------------------------------------------ credentials


@federation_app.command()
def credentials(
    host: Annotated[
        list[str],
        typer.Option(
            "--host",
            help="A host name or IP address the nodes use to reach the SuperLink (repeat).",
        ),
    ],
    tenant: Annotated[
        list[str] | None,
        typer.Option("--tenant", help="A tenant node to create a key pair for (repeat)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory of the federation's credentials.")] = Path(
        "federation-credentials"
    ),
    renew_server_cert: Annotated[
        bool, typer.Option(help="Reissue the SuperLink certificate (e.g. for new hosts).")
    ] = False,
) -> None:
    """Create the CA, the SuperLink certificate and one node key pair per tenant.

    Existing files are kept. Ship OUT/superlink/ to the coordinator and OUT/nodes/TENANT/
    to that tenant's site; OUT/ca/ca.key stays with the operator.
    """
    with _user_errors():
        made = create_credentials(
            out, hosts=list(host), tenants=list(tenant or []), renew_server_cert=renew_server_cert
        )
    table = Table("file", "state")
    for path in made.created:
        table.add_row(str(path), "created")
    for path in made.kept:
        table.add_row(str(path), "kept")
    console.print(table)
    console.print(
        f"Coordinator: {made.layout.superlink_dir}/  ·  tenant sites: "
        f"{made.layout.root / 'nodes'}/<tenant>/  ·  keep {made.layout.ca_key} offline."
    )


# ------------------------------------------------------------------------ coordinator


@federation_app.command()
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
    """
    with _user_errors():
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
        settings = _settings()
        if api and settings.operator_token is None and not settings.dev_mode:
            raise UserError(
                "The API needs FEDTEXT_OPERATOR_TOKEN (32+ random characters); "
                "or start with --no-api."
            )
        env = flower_env(_platform_env(settings))
        if api:
            env.update(_api_superlink_env(settings, host, port, cert, ca))
        state_db = (state or settings.data_dir / "superlink" / "state.db").expanduser()
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
            api_cmd += ["--host", api_host or settings.api_host]
            api_cmd += ["--port", str(api_port or settings.api_port)]
            commands.append(("api", api_cmd))
    err.print(
        f"coordinator: SuperLink on {host}:{port} (TLS, node auth), "
        f"platform {env['FEDTEXT_DATABASE_URL']}" + (", API" if api else "")
    )
    code, first = supervise(commands, env)
    if code:
        raise _fail(f"the {first.name} exited with code {code}; see its output above", code)


def _api_superlink_env(
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
    from fedtext.platform import platform_from_settings, upgrade_schema

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


# --------------------------------------------------------------------------- register


@federation_app.command()
def register(
    superlink: SuperlinkOpt,
    ca: CaOpt = None,
    credentials_dir: Annotated[
        Path | None,
        typer.Option("--credentials", help="Register the node keys under DIR/nodes/."),
    ] = None,
    tenant: Annotated[
        list[str] | None,
        typer.Option("--tenant", help="Only these tenants' nodes (repeat)."),
    ] = None,
    key: Annotated[
        list[Path] | None,
        typer.Option("--key", help="A node public key file (node.pub) to register (repeat)."),
    ] = None,
    connection: ConnectionOpt = DEFAULT_CONNECTION,
) -> None:
    """Register tenant nodes' public keys with the SuperLink (``flwr supernode register``).

    A key that is already registered is reported as such; any other refusal fails.
    """
    with _user_errors():
        keys: list[tuple[str, Path]] = []
        if credentials_dir is not None:
            layout = CredentialLayout(credentials_dir.expanduser())
            if ca is None:
                ca = layout.ca_cert
            nodes = layout.nodes()
            if tenant:
                missing = sorted(set(tenant) - {n.tenant for n in nodes})
                if missing:
                    raise UserError(
                        f"No node key for {', '.join(missing)} under {layout.root / 'nodes'}; "
                        "create it with `fedtext federation credentials --tenant ...`."
                    )
                nodes = [n for n in nodes if n.tenant in tenant]
            keys += [(n.tenant, n.public_key) for n in nodes]
        for path in key or []:
            keys.append((path.parent.name, existing_file(path, "public key")))
        if not keys:
            raise UserError("No node key to register: give --credentials DIR or --key FILE.")
        conn = _connect(superlink, ca, connection)
        table = Table("tenant", "public key", "node id", "state")
        failed = []
        for name, path in keys:
            res = flwr_json(["supernode", "register", str(path), conn, "--name", name])
            if res.ok:
                table.add_row(name, str(path), str(res.data.get("node-id")), "registered")
            elif "already in use" in res.message:
                table.add_row(name, str(path), "", "already registered")
            else:
                table.add_row(name, str(path), "", "refused")
                failed.append(f"{name}: {res.message}")
        console.print(table)
        if failed:
            raise UserError("Registration failed: " + "; ".join(failed))


# ------------------------------------------------------------------------------- node


@federation_app.command()
def node(
    tenant: Annotated[
        str, typer.Option(envvar="FEDTEXT_NODE_TENANT", help="The tenant this site trains for.")
    ],
    data: Annotated[
        Path,
        typer.Option(
            envvar="FEDTEXT_NODE_DATA", help="The tenant's CSV or JSONL file (text, label)."
        ),
    ],
    superlink: SuperlinkOpt,
    credentials_dir: Annotated[
        Path | None,
        typer.Option(
            "--credentials",
            envvar="FEDTEXT_NODE_CREDENTIALS",
            help="This node's bundle (node.key, ca.crt), e.g. OUT/nodes/TENANT.",
        ),
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="The node's OpenSSH private key (node.key).")
    ] = None,
    ca: CaOpt = None,
    device: Annotated[
        str,
        typer.Option(
            envvar="FEDTEXT_NODE_DEVICE",
            help="'auto' (a GPU when present), 'cpu', 'cuda' or 'cuda:N'.",
        ),
    ] = "auto",
    port: Annotated[
        int, typer.Option(help="Local port of the node's ClientApp API (one per node).")
    ] = 9094,
    max_wait: Annotated[
        float, typer.Option(help="Give up after this many seconds without the SuperLink.")
    ] = 600.0,
    labels: Annotated[
        str, typer.Option(help="Labels the data file may use (comma-separated).")
    ] = "negative,neutral,positive",
    feature_cache: Annotated[
        Path | None,
        typer.Option(
            envvar="FEDTEXT_FEATURE_CACHE",
            help="Where this node keeps the sentence vectors of its data (private, 0700) "
            "so each round's process reuses them. Default: ~/.cache/fedtext/features/TENANT.",
        ),
    ] = None,
) -> None:
    """Start a tenant's SuperNode: its tenant, data, device, authentication key and CA."""
    with _user_errors():
        check_name(tenant)
        if credentials_dir is not None:
            bundle = credentials_dir.expanduser()
            key = key or bundle / "node.key"
            ca = ca or bundle / "ca.crt"
        hint = " (--credentials DIR, or --key and --ca)"
        key_path = existing_file(key, "node private key", hint)
        ca_path = existing_file(ca, "CA certificate", hint)
        check_node_private_key(key_path)
        check_certificate(ca_path, "CA certificate")
        data_path = _check_data(data, labels)
        resolved_device = _check_device(device)
        check_reachable(superlink)
        scratch = Path(tempfile.mkdtemp(prefix=f"fedtext-node-{tenant}-"))
        node_config = scratch / "node-config.toml"
        node_config.write_bytes(
            tomli_w.dumps(
                {"tenant": tenant, "data-path": str(data_path), "device": device}
            ).encode()
        )
        cmd = [
            flower_executable("flower-supernode"),
            "--superlink",
            superlink,
            "--root-certificates",
            str(ca_path),
            "--auth-supernode-private-key",
            str(key_path),
            "--node-config",
            str(node_config),
            "--port",
            str(port),
            "--max-wait-time",
            str(max_wait),
        ]
    err.print(f"node: tenant {tenant}, {data_path}, device {resolved_device}, to {superlink}")
    try:
        # The SuperNode starts one ClientApp process per message; the vectors computed
        # in round 1 are read back from here in every later round.
        cache = feature_cache or Path.home() / ".cache" / "fedtext" / "features" / tenant
        code, first = supervise(
            [("supernode", cmd)],
            flower_env({"FEDTEXT_FEATURE_CACHE": str(cache.expanduser())}),
            watch=("Failed to activate SuperNode", "CERTIFICATE_VERIFY_FAILED", "Exit Code: 305"),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Flower logs "Exit Code: 305" for both refusals, but the process may still exit 1
    # (its signal handler races the exit), so the log decides, not the exit code.
    if code:
        if "Failed to activate SuperNode" in first.seen:
            raise _fail(
                f"The SuperLink refused this node: its key {key_path} is not registered. "
                "The operator registers it with `fedtext federation register`."
            )
        if "CERTIFICATE_VERIFY_FAILED" in first.seen:
            raise _fail(
                f"The SuperLink's certificate does not verify against {ca_path}: "
                "wrong CA, or the address is not one of the certificate's hosts."
            )
        if code == SUPERNODE_CONNECTION_ERROR or "Exit Code: 305" in first.seen:
            raise _fail(f"Could not connect to the SuperLink at {superlink} (Flower exit 305).")
        raise _fail(f"flower-supernode exited with code {code}; see its output above", code)


def _check_data(data: Path, labels: str) -> Path:
    from clients.data import DataError, load_labeled_file

    path = data.expanduser().resolve()
    names = [s.strip() for s in labels.split(",") if s.strip()]
    try:
        loaded = load_labeled_file(path, names)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if len(loaded) < 2:
        raise UserError(f"{path}: {len(loaded)} example(s); a node needs a train and a test split.")
    return path


def _check_device(device: str) -> str:
    from clients.train import pick_device

    try:
        return str(pick_device(device))
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"Device {device!r}: {exc}") from None


# -------------------------------------------------------------------------- run/status


def find_app_dir(app: Path | None) -> Path:
    """The Flower app: ``app``, else the current directory or fedtext's source tree."""
    candidates = [app] if app else [Path.cwd(), Path(__file__).resolve().parents[1]]
    for candidate in candidates:
        pyproject = candidate.expanduser() / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app" in pyproject.read_text(encoding="utf-8"):
            return candidate.expanduser().resolve()
    raise UserError(
        "No Flower app found: give --app DIR (the directory holding fedtext's pyproject.toml)."
    )


def app_config_keys(app_dir: Path) -> dict[str, Any]:
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(pyproject["tool"]["flwr"]["app"].get("config", {}))


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def build_run_config(
    known: dict[str, Any], options: dict[str, Any], pairs: Sequence[str]
) -> dict[str, Any]:
    """Run-config overrides from typed options and ``KEY=VALUE`` pairs, checked against the
    app's ``[tool.flwr.app.config]`` keys (flwr accepts no other key)."""
    config = {k: v for k, v in options.items() if v is not None}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--config {pair!r}: expected KEY=VALUE.")
        config[name.strip()] = _toml_value(value.strip())
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise UserError(
            f"Unknown run configuration key(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}."
        )
    for name, value in config.items():
        default = known[name]
        if default == "auto":
            # "auto" in pyproject: the model family's default; a number sets it.
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise UserError(f"{name}={value!r}: expected a number or 'auto'.")
            if isinstance(value, str) and value != "auto":
                raise UserError(f"{name}={value!r}: expected a number or 'auto'.")
            continue
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            config[name] = float(value)
        elif type(value) is not type(default):
            raise UserError(
                f"{name}={value!r}: expected {type(default).__name__} (like {default!r})."
            )
    return config


@dataclass
class RunStatus:
    flower_run_id: int
    flower_status: str
    flower_details: str
    platform_run_id: str
    platform_status: str | None
    platform_error: str | None
    summary: dict[str, Any]
    platform_note: str = "(no platform database here)"

    @property
    def completed(self) -> bool:
        flower_ok = self.flower_status == "finished:completed"
        return flower_ok and self.platform_status in (None, "completed")


def submit_run(
    app_dir: Path, connection: str, overrides: dict[str, Any], home: Path | None = None
) -> int:
    """``flwr run APP_DIR CONNECTION --run-config FILE``; returns Flower's run id."""
    with tempfile.TemporaryDirectory(prefix="fedtext-run-") as scratch:
        # A TOML file: flwr's inline KEY=VALUE syntax cannot carry a JSON string.
        run_config = Path(scratch) / "run-config.toml"
        run_config.write_bytes(tomli_w.dumps(overrides).encode())
        res = flwr_json(
            ["run", str(app_dir), connection, "--run-config", str(run_config)], home=home
        )
    if not res.ok:
        raise UserError(f"The SuperLink did not accept the run: {res.message}")
    return int(res.data["run-id"])


def stop_run(connection: str, flower_run_id: int, home: Path | None = None) -> None:
    """``flwr stop``; a run that has already finished counts as stopped."""
    res = flwr_json(["stop", str(flower_run_id), connection], timeout=120, home=home)
    if not res.ok and "already finished" not in res.message:
        raise UserError(f"Cannot stop Flower run {flower_run_id}: {res.message}")


def flower_run_status(
    connection: str, flower_run_id: int, home: Path | None = None
) -> tuple[str, str]:
    """Flower's ``(status, details)`` of a run, e.g. ``("finished:failed", "...")``."""
    res = flwr_json(["ls", connection, "--run-id", str(flower_run_id)], timeout=120, home=home)
    if not res.ok:
        raise UserError(f"Cannot read run {flower_run_id}: {res.message}")
    runs = res.data.get("runs") or []
    if not runs:
        raise UserError(f"The SuperLink knows no run {flower_run_id}.")
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def platform_record(run_id: str) -> tuple[str | None, str | None, dict[str, Any]] | None:
    """(status, error, summary) of the platform's TrainingRun, or None when this machine
    cannot see the platform database (an operator laptop, say)."""
    from sqlmodel import Session

    from tenancy.db import get_engine
    from tenancy.tables import TrainingRun

    settings = _settings()
    url = settings.resolved_database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    try:
        with Session(get_engine(url)) as session:
            row = session.get(TrainingRun, run_id)
    except Exception:  # no such table, unreachable server: not this machine's database
        return None
    if row is None:
        return (None, f"not recorded in {_redacted(url)}", {})
    return row.status, row.error, json.loads(row.summary_json or "{}")


def _redacted(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def read_status(connection: str, flower_run_id: int, run_id: str) -> RunStatus:
    status, details = flower_run_status(connection, flower_run_id)
    record = platform_record(run_id)
    if record is None:
        return RunStatus(flower_run_id, status, details, run_id, None, None, {})
    p_status, p_error, summary = record
    if p_status is None:  # this database does not know the run: say so, do not fail on it
        return RunStatus(flower_run_id, status, details, run_id, None, None, {}, p_error or "")
    return RunStatus(flower_run_id, status, details, run_id, p_status, p_error, summary, "")


def _print_status(st: RunStatus) -> None:
    table = Table("", "value")
    table.add_row("Flower run", str(st.flower_run_id))
    table.add_row(
        "Flower status",
        st.flower_status
        + (f" ({st.flower_details})" if st.flower_details not in ("", "N/A") else ""),
    )
    table.add_row("platform run", st.platform_run_id)
    table.add_row("platform status", st.platform_status or st.platform_note)
    if st.platform_error:
        table.add_row("error", st.platform_error)
    for name, t in sorted(st.summary.get("tenants", {}).items()):
        table.add_row(
            f"tenant {name}",
            f"{t.get('model')} v{t.get('version')}, accuracy {t.get('accuracy')}, "
            f"epsilon {t.get('run_epsilon')}",
        )
    console.print(table)


@federation_app.command()
def run(
    superlink: SuperlinkOpt,
    ca: CaOpt = None,
    app: Annotated[
        Path | None, typer.Option(help="The Flower app directory (fedtext's pyproject.toml).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon per tenant.")] = None,
    min_nodes: Annotated[int | None, typer.Option(help="Tenants a round needs.")] = None,
    model: Annotated[str | None, typer.Option(help="Model family.")] = None,
    model_config: Annotated[
        str | None, typer.Option(help="Model options as JSON, e.g. '{\"hidden_dim\": 64}'.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    personalize_epochs: Annotated[int | None, typer.Option(help="0: no personalization.")] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="Any other run configuration KEY=VALUE (repeat)."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option(help="Platform run id. Default: flwr-<Flower run id>.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the run to finish.")] = True,
    timeout: Annotated[float, typer.Option(help="Longest wait, in seconds.")] = 24 * 3600.0,
    poll: Annotated[float, typer.Option(help="Seconds between status reads.")] = 5.0,
    connection: ConnectionOpt = DEFAULT_CONNECTION,
) -> None:
    """Submit a run to the federation (``flwr run``) and wait for its status, read back.

    Exit 0 only when Flower reports finished:completed and the platform's TrainingRun
    (when this machine sees the platform database) is completed; 1 when the run failed.
    """
    with _user_errors():
        app_dir = find_app_dir(app)
        if model_config is not None:
            try:
                if not isinstance(json.loads(model_config), dict):
                    raise ValueError
            except ValueError:
                raise UserError(f"--model-config {model_config!r} is not a JSON object.") from None
        overrides = build_run_config(
            app_config_keys(app_dir),
            {
                "rounds": rounds,
                "epsilon": epsilon,
                "min-nodes": min_nodes,
                "model": model,
                "model-config": model_config,
                "batch-size": batch_size,
                "personalize-epochs": personalize_epochs,
                "run-id": run_id,
            },
            config or [],
        )
        validate_server_config(overrides)
        conn = _connect(superlink, ca, connection)
        flower_run_id = submit_run(app_dir, conn, overrides)
        platform_id = str(overrides.get("run-id") or _platform_run_id(flower_run_id))
        console.print(f"Submitted: Flower run {flower_run_id}, platform run {platform_id}")
        console.print(f"Follow its log with: flwr log {flower_run_id} {conn}")
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while True:
            status, _ = flower_run_status(conn, flower_run_id)
            if status.startswith("finished"):
                break
            if time.monotonic() > deadline:
                raise _fail(
                    f"Run {flower_run_id} is still {status} after {timeout:.0f} s; "
                    f"stop it with: flwr stop {flower_run_id} {conn}",
                    1,
                )
            time.sleep(poll)
        st = read_status(conn, flower_run_id, platform_id)
    _print_status(st)
    if not st.completed:
        raise _fail(_failure_reason(st), 1)


def _failure_reason(st: RunStatus) -> str:
    reason = f"run {st.flower_run_id} ended {st.flower_status}"
    if st.platform_error:
        reason += f": {st.platform_error}"
    elif st.platform_status not in (None, "completed"):
        reason += f"; the platform recorded {st.platform_status}"
    return reason + f" (details: flwr log {st.flower_run_id})"


def _platform_run_id(flower_run_id: int) -> str:
    from fedtext.flower_apps import platform_run_id

    return platform_run_id(flower_run_id)


def validate_server_config(overrides: dict[str, Any]) -> None:
    """The ServerApp's own validation, here, before anything is submitted."""
    from server.config import ServerRunConfig

    try:
        ServerRunConfig.from_mapping({k: v for k, v in overrides.items() if k != "run-id"})
    except ValueError as exc:
        raise UserError(str(exc)) from None


@federation_app.command()
def status(
    flower_run_id: Annotated[int, typer.Argument(help="The Flower run id that `run` printed.")],
    superlink: SuperlinkOpt,
    ca: CaOpt = None,
    run_id: Annotated[
        str | None, typer.Option(help="Platform run id, when one was given to `run`.")
    ] = None,
    connection: ConnectionOpt = DEFAULT_CONNECTION,
) -> None:
    """A run's status as Flower and the platform record it.

    Exit 0: completed; 1: failed or stopped; 3: not finished yet.
    """
    with _user_errors():
        conn = _connect(superlink, ca, connection)
        st = read_status(conn, flower_run_id, run_id or _platform_run_id(flower_run_id))
    _print_status(st)
    if not st.flower_status.startswith("finished"):
        raise typer.Exit(3)  # not finished yet: neither success nor failure
    if not st.completed:
        raise _fail(_failure_reason(st), 1)
