"""Flower's own executables, called for the platform: ``flwr run|stop|ls``, the SuperLink
connection file, the Flower app and its run configuration.

Every failure is a :class:`FlowerError` (:class:`FlowerInputError`, also a ``ValueError``,
when an input is at fault) whose message is written for the person who can fix it (an
operator typing ``fedtext federation ...``, or a tenant admin reading a failed run); the
CLI and the run workers each turn it into their own kind of error, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

FLOWER_ENV_DEFAULTS = {
    # Without it the SuperLink `uv sync`s the app's dependencies at run time (a CUDA torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


class FlowerError(Exception):
    """Flower refused, could not be reached or is not installed; the message says why."""


class FlowerInputError(FlowerError, ValueError):
    """An input Flower would refuse: an address, a file, a certificate, the app or its run
    configuration."""


# ----------------------------------------------------------------- executables, addresses


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
        raise FlowerError(f"{name} is not installed; install fedtext with its flwr dependency.")
    return found


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", address.strip())
    if not match:
        raise FlowerInputError(f"{address!r} is not an address of the form host:port.")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise FlowerInputError(f"{address!r}: the port should be in 1..65535.")
    return host, port


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ``FlowerError`` unless a TCP connection to the SuperLink at ``address`` opens."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise FlowerError(
            f"The SuperLink at {address} is unreachable ({exc.strerror or exc}); "
            "is the coordinator running, and is the address right?"
        ) from None


def existing_file(path: Path | None, what: str, hint: str = "") -> Path:
    """``path``, absolute; ``FlowerError`` naming ``what`` (and ``hint``) when it is missing."""
    if path is None:
        raise FlowerInputError(f"Give the {what}{hint}.")
    path = path.expanduser()
    if not path.is_file():
        raise FlowerInputError(f"The {what} {path} does not exist{hint}.")
    return path.resolve()


def check_certificate(path: Path, what: str) -> None:
    """Raise ``FlowerError`` unless ``path`` holds a PEM certificate (``what`` names it)."""
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise FlowerInputError(f"Cannot read the {what} {path}: {exc.strerror}.") from None
    except ValueError:
        raise FlowerInputError(f"{path} is not a PEM certificate ({what}).") from None


# ------------------------------------------------------------------------ connection file


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
            raise FlowerInputError(f"{path} is not valid TOML ({exc}); fix or remove it.") from None
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", name)
    superlink[name] = {"address": address, "root-certificates": str(ca.resolve())}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        tomli_w.dump(config, fh)
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------------------- flwr CLI


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
        raise FlowerError(f"The SuperLink did not accept the run: {res.message}")
    return int(res.data["run-id"])


def stop_run(connection: str, flower_run_id: int, home: Path | None = None) -> None:
    """``flwr stop``; a run that has already finished counts as stopped."""
    res = flwr_json(["stop", str(flower_run_id), connection], timeout=120, home=home)
    if not res.ok and "already finished" not in res.message:
        raise FlowerError(f"Cannot stop Flower run {flower_run_id}: {res.message}")


def flower_run_status(
    connection: str, flower_run_id: int, home: Path | None = None
) -> tuple[str, str]:
    """Flower's ``(status, details)`` of a run, e.g. ``("finished:failed", "...")``."""
    res = flwr_json(["ls", connection, "--run-id", str(flower_run_id)], timeout=120, home=home)
    if not res.ok:
        raise FlowerError(f"Cannot read run {flower_run_id}: {res.message}")
    runs = res.data.get("runs") or []
    if not runs:
        raise FlowerError(f"The SuperLink knows no run {flower_run_id}.")
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


# ------------------------------------------------------------- the app and its run config


def find_app_dir(app: Path | None) -> Path:
    """The Flower app: ``app``, else the current directory or fedtext's source tree."""
    candidates = [app] if app else [Path.cwd(), Path(__file__).resolve().parents[1]]
    for candidate in candidates:
        pyproject = candidate.expanduser() / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app" in pyproject.read_text(encoding="utf-8"):
            return candidate.expanduser().resolve()
    raise FlowerInputError(
        "No Flower app found: give --app DIR (the directory holding fedtext's pyproject.toml)."
    )


def app_config_keys(app_dir: Path) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]``: the only run-config keys ``flwr run`` accepts."""
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
            raise FlowerInputError(f"--config {pair!r}: expected KEY=VALUE.")
        config[name.strip()] = _toml_value(value.strip())
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise FlowerInputError(
            f"Unknown run configuration key(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}."
        )
    for name, value in config.items():
        default = known[name]
        if default == "auto":
            # "auto" in pyproject: the model family's default; a number sets it.
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise FlowerInputError(f"{name}={value!r}: expected a number or 'auto'.")
            if isinstance(value, str) and value != "auto":
                raise FlowerInputError(f"{name}={value!r}: expected a number or 'auto'.")
            continue
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            config[name] = float(value)
        elif type(value) is not type(default):
            raise FlowerInputError(
                f"{name}={value!r}: expected {type(default).__name__} (like {default!r})."
            )
    return config


def validate_server_config(overrides: dict[str, Any]) -> None:
    """The ServerApp's own validation (RunSpec's), here, before anything is submitted."""
    from runs.spec import RunSpec

    try:
        RunSpec.from_run_config({k: v for k, v in overrides.items() if k != "run-id"})
    except ValueError as exc:
        raise FlowerInputError(str(exc)) from None
