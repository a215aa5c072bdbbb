"""Fault-injection fixtures: a private PostgreSQL cluster, `fedtext serve` processes, checks.

The private cluster (initdb under a temporary folder, its own port) is the only PostgreSQL
a fault test restarts or whose connections it kills: the machine's main cluster serves
other tests and CI. initdb refuses root, so as root the cluster is created and run as the
``postgres`` user (``runuser``); CI runs as root.

Tests marked ``faults_full`` (minutes each: real runs, a SuperLink) are deselected unless
``FEDTEXT_FAULTS=all`` (``make faults``); the rest run inside ``make test``.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FEDTEXT_FAULTS") == "all":
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("faults_full") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        found = [p for p in (shutil.which("initdb"),) if p]
    if not found:
        raise RuntimeError("no initdb: install PostgreSQL's server package")
    return Path(found[-1]).parent


class PrivateCluster:
    """One PostgreSQL cluster of our own: started, stopped and restarted by the tests."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="ftx-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}\n{done.stderr}")
        return done

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop("immediate")  # a crash, as far as clients can tell
        self.start()

    def terminate_backends(self, database: str = "postgres") -> int:
        """pg_terminate_backend of every client connection to ``database`` but this one."""
        out = self._run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-At", "-c",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
        )  # fmt: skip
        return int(out.stdout.strip() or 0)

    def connections(self, database: str = "postgres") -> int:
        out = self._run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-At", "-c", f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'",
        )  # fmt: skip
        return int(out.stdout.strip())

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):  # pg_ctl failed: by the server's PID
            os.kill(int(pidfile.read_text().split()[0]), 9)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


def base_env(database_url: str, data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FEDTEXT_DATABASE_URL": database_url,
        "FEDTEXT_DATA_DIR": str(data_dir),
        "FEDTEXT_KEY_PROVIDER": "env",
        "FEDTEXT_KEK": base64.b64encode(secrets.token_bytes(32)).decode(),
        "FEDTEXT_OPERATOR_TOKEN": secrets.token_urlsafe(32),
        "FEDTEXT_SERVE_LOOKUP_TTL_S": "0.5",
        "FEDTEXT_SERVE_ENCODER_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }


class Server:
    """A `fedtext serve` process on its own port; SIGKILL and start again on the same port."""

    def __init__(self, env: dict[str, str], log_dir: Path, port: int | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedtext.cli", "serve", "--port", str(self.port)],
            env=self.env, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()

    def wait_ready(self, within: float = 180) -> float:  # start-up at load 20-25: 90-150 s
        started = time.monotonic()
        while time.monotonic() - started < within:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready within {within} s\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown handler runs
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtext.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def audit_verify(env: dict[str, str]) -> None:
    done = run_cli(env, "audit", "verify")
    assert done.returncode == 0, f"audit verify failed:\n{done.stdout}\n{done.stderr}"


def until(check: Callable[[], Any], within: float, what: str = "condition") -> float:
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not seen within {within} s")
        time.sleep(0.1)
