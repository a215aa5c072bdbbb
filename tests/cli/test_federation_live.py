"""A real federation on 127.0.0.1: Flower's SuperLink and SuperNodes, TLS, node authentication.

Everything goes through the commands a user types (`fedtext federation ...`); nothing is
mocked. Each process is started in its own session and torn down by PID, nodes before the
SuperLink; the test then checks that no process and no port is left behind.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from clients.data import DEMO_LABELS
from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.cli.coordinator import api_superlink_env
from fedtext.settings import Settings
from orchestration.supervisor import descendants
from privacy.ledger import PrivacyEvent, verify_chain
from tenancy.certificates import create_credentials
from tenancy.db import session_scope
from tenancy.platform import Platform
from tenancy.tables import ModelVersion, Tenant, TrainingRun
from tenancy.tenants import Scope, create_api_key, create_tenant, get_tenant
from tests.factories import toy_data

pytestmark = pytest.mark.slow
TENANTS = ("acme", "globex")
FEDTEXT = [sys.executable, "-m", "fedtext.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (closed connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    known: set[int] = field(default_factory=set)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def remember(self) -> None:
        self.known |= descendants(self.popen.pid)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to its process group (the CLI passes it on), then SIGKILL by PID."""
        self.remember()
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        deadline = time.monotonic() + grace
        while any(alive(p) for p in self.known) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.known:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Federation:
    root: Path
    env: dict[str, str]
    platform: Platform
    superlink: str
    ports: list[int]
    creds: Path
    procs: list[Proc] = field(default_factory=list)
    nodes: dict[str, Proc] = field(default_factory=dict)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        """``cmd`` in its own session, logged to ROOT/NAME.log, stopped at teardown."""
        log = self.root / f"{name}.log"
        popen = subprocess.Popen(
            cmd,
            env=env or self.env,
            cwd=self.root,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start(self, name: str, *args: str) -> Proc:
        return self.spawn(name, [*FEDTEXT, "federation", *args])

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FEDTEXT, *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self, flower_run_id: int) -> subprocess.CompletedProcess[str]:
        """`fedtext federation status`: the run as Flower and the platform record it."""
        return self.cli(
            "federation",
            "status",
            str(flower_run_id),
            "--superlink",
            self.superlink,
            "--ca",
            str(self.creds / "ca" / "ca.crt"),
        )

    def node(
        self, tenant: str, *extra: str, data: str | None = None, name: str | None = None
    ) -> Proc:
        port = free_port()
        self.ports.append(port)
        return self.start(
            name or f"node-{tenant}",
            "node",
            "--tenant",
            tenant,
            "--data",
            str(self.root / "data" / f"{data or tenant}.csv"),
            "--superlink",
            self.superlink,
            "--credentials",
            str(self.creds / "nodes" / tenant),
            "--device",
            "cpu",
            "--port",
            str(port),
            "--max-wait",
            "60",
            *extra,
        )

    def tenant_nodes(self) -> list[Proc]:
        """One SuperNode per tenant, started on first use and kept for the module."""
        for tenant in TENANTS:
            if tenant not in self.nodes:
                self.nodes[tenant] = self.node(tenant)
        return [self.nodes[t] for t in TENANTS]

    def admin_key(self, tenant: str) -> str:
        with session_scope(self.platform.engine) as session:
            owner = get_tenant(session=session, name=tenant)
            _, secret = create_api_key(session=session, tenant=owner, scopes=[Scope.admin])
        return secret

    def api(
        self, method: str, path: str, key: str, body: object = None, port: int | None = None
    ) -> tuple[int, Any]:
        """A JSON request to the coordinator's API (or the API on ``port``)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{port or self.ports[1]}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def write_tenant_data(directory: Path) -> None:
    """60 labelled rows per tenant (48 train / 12 test), distinct per tenant."""
    directory.mkdir()
    for i, tenant in enumerate(TENANTS):
        data = toy_data(60 + 6 * i)
        with (directory / f"{tenant}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for text, label in zip(data.texts, data.labels, strict=True):
                writer.writerow([f"{text} at {tenant}", DEMO_LABELS[label]])


def wait_for(predicate: object, timeout: float, what: str, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        for p in procs:
            assert p.popen.poll() is None, f"{p.name} exited early:\n{p.output()[-3000:]}"
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.output()[-2000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    env = {
        **os.environ,
        # As in an activated venv: Flower's executables start their siblings by name.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(root / "flwr"),
        "RAY_TMPDIR": str(root / "ray"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "FEDTEXT_DATA_DIR": str(root / "var"),
        "FEDTEXT_OPERATOR_TOKEN": secrets.token_urlsafe(32),
    }
    for key in ("FEDTEXT_DATABASE_URL", "FEDTEXT_KEK_FILE", "FEDTEXT_KEY_PROVIDER"):
        env.pop(key, None)
    platform = platform_from_settings(Settings(data_dir=root / "var"))
    upgrade_schema(platform)
    with session_scope(platform.engine) as session:
        for name in TENANTS:
            # Several runs share this federation; each reserves its whole plan up front.
            create_tenant(session=session, keyring=platform.keyring, name=name, budget_epsilon=30.0)
    write_tenant_data(root / "data")
    link_port, api_port = free_port(), free_port()
    fed = Federation(
        root, env, platform, f"127.0.0.1:{link_port}", [link_port, api_port], root / "creds"
    )
    made = fed.cli(
        "federation",
        "credentials",
        "--out",
        str(fed.creds),
        "--host",
        "127.0.0.1",
        "--host",
        "localhost",
        *[a for t in (*TENANTS, "rogue", "acme-site-2") for a in ("--tenant", t)],
    )
    assert made.returncode == 0, made.stderr
    coordinator = fed.start(
        "coordinator",
        "coordinator",
        "--credentials",
        str(fed.creds),
        "--host",
        "127.0.0.1",
        "--port",
        str(link_port),
        "--api-host",
        "127.0.0.1",
        "--api-port",
        str(api_port),
    )
    try:
        wait_for(lambda: not port_is_free(link_port), 120, "the SuperLink", [coordinator])
        wait_for(lambda: not port_is_free(api_port), 120, "the API", [coordinator])
        registered = fed.cli(
            "federation",
            "register",
            "--superlink",
            fed.superlink,
            "--credentials",
            str(fed.creds),
            *[a for t in TENANTS for a in ("--tenant", t)],
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        assert registered.stdout.count("registered") == len(TENANTS)
        for tenant in TENANTS:  # each node key enrolled for its own tenant (issue 24)
            enrolled = fed.cli(
                "federation", "enroll", "--tenant", tenant,
                str(fed.creds / "nodes" / tenant / "node.pub"),
            )  # fmt: skip
            assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        yield fed
    finally:
        nodes = [p for p in fed.procs if p is not coordinator]
        for p in nodes:  # nodes before the SuperLink
            p.stop()
        coordinator.stop()
        leftover = [pid for p in fed.procs for pid in p.known | {p.popen.pid} if alive(pid)]
        busy = [port for port in fed.ports if not port_is_free(port)]
        assert not leftover, f"processes left behind: {leftover}"
        assert not busy, f"ports left bound: {busy}"


def test_nodes_without_a_registered_key_or_the_ca_are_refused(federation: Federation) -> None:
    other_ca = federation.root / "other-ca"
    made = federation.cli(
        "federation", "credentials", "--out", str(other_ca), "--host", "127.0.0.1"
    )
    assert made.returncode == 0, made.stderr
    # A valid key pair that the operator never registered.
    rogue = federation.node("rogue", data="acme")
    wrong_ca = federation.node(
        "acme", "--ca", str(other_ca / "ca" / "ca.crt")
    )  # registered key, but the node cannot verify the SuperLink
    # The bare Flower executable without any CA certificate: Flower's own refusal.
    port = free_port()
    federation.ports.append(port)
    bare_node = federation.spawn(
        "bare-node",
        [
            str(Path(sys.executable).parent / "flower-supernode"),
            "--superlink",
            federation.superlink,
            "--auth-supernode-private-key",
            str(federation.creds / "nodes" / "acme" / "node.key"),
            "--port",
            str(port),
            "--max-wait-time",
            "30",
        ],
    )
    bare, log = bare_node.popen, bare_node.log
    for proc in (rogue, wrong_ca, bare_node):
        proc.remember()
        proc.popen.wait(120)
    assert rogue.popen.returncode == 2, rogue.output()
    assert "Failed to activate SuperNode" in rogue.output()
    assert "its key" in rogue.output() and "is not registered" in rogue.output()
    assert wrong_ca.popen.returncode == 2, wrong_ca.output()
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.output()
    assert "does not verify against" in wrong_ca.output()
    # Flower logs exit code 305; the process itself may exit 1 (its exit handler races).
    assert bare.returncode != 0, log.read_text()
    assert "Exit Code: 305" in log.read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in log.read_text()


def test_two_tenant_dp_federation_completes_with_ledger_and_encrypted_models(
    federation: Federation,
) -> None:
    nodes = federation.tenant_nodes()
    started = time.monotonic()
    result = federation.cli(
        "federation",
        "run",
        "--superlink",
        federation.superlink,
        "--ca",
        str(federation.creds / "ca" / "ca.crt"),
        "--rounds",
        "2",
        "--epsilon",
        "3.0",
        "--batch-size",
        "16",
        "--personalize-epochs",
        "1",
        "--model",
        "lstm",
        "--model-config",
        json.dumps({"proj_dim": 8, "hidden_dim": 8}),
        "--config",
        "secure-mode=false",
        "--config",
        "round-timeout=600",
        "--poll",
        "5",
        timeout=900,
    )
    elapsed = time.monotonic() - started
    for node in nodes:
        assert node.popen.poll() is None, node.output()[-3000:]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished:completed" in result.stdout
    submitted = re.search(r"Submitted: Flower run (\d+), platform run (\S+)", result.stdout)
    assert submitted, result.stdout
    flower_run_id = int(submitted.group(1))
    assert submitted.group(2) == f"flwr-{flower_run_id}"
    run_id = f"flwr-{flower_run_id}"
    print(f"deployment run: {elapsed:.1f} s for 2 rounds + personalization")

    with Session(federation.platform.engine) as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None and run.status == "completed", run
        names = {t.id: t.name for t in session.exec(select(Tenant)).all()}
        events = session.exec(
            select(PrivacyEvent).where(PrivacyEvent.run_id == run_id).order_by(PrivacyEvent.seq)
        ).all()
        by_tenant: dict[str, list[PrivacyEvent]] = {}
        for ev in events:
            by_tenant.setdefault(names[ev.tenant_id], []).append(ev)
        # Two rounds, one personalization and its released evaluation each, charged in
        # order, chains intact.
        assert {n: [(e.round, e.purpose) for e in evs] for n, evs in by_tenant.items()} == {
            t: [(1, "train"), (2, "train"), (3, "personalize"), (3, "evaluate")] for t in TENANTS
        }
        for evs in by_tenant.values():
            assert verify_chain(evs) is None
            assert all(e.noise_multiplier > 0 for e in evs)
        versions = session.exec(select(ModelVersion)).all()
        assert sorted(names[v.tenant_id] for v in versions) == sorted(TENANTS)
        blobs = [federation.platform.store.get(v.blob_key) for v in versions]
    summary = json.loads(run.summary_json)
    assert set(summary["tenants"]) == set(TENANTS)
    for tenant in TENANTS:
        t = summary["tenants"][tenant]  # personalized and evaluated; kept only if better
        assert t["personalized_accuracy"] is not None
        assert "same test split" in t["model_choice"]["reason"]
        # The target covers training; the released evaluation is charged on top of it.
        assert 3.0 < summary["tenants"][tenant]["run_epsilon"] <= 3.2
    for raw in blobs:  # encrypted at rest: no safetensors header, no tensor names
        assert b"dtype" not in raw and b"weight" not in raw

    status = federation.status(flower_run_id)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "completed" in status.stdout

    # The coordinator's API serves the same platform.
    with urllib.request.urlopen(f"http://127.0.0.1:{federation.ports[1]}/readyz", timeout=10) as r:
        assert r.status == 200


# ------------------------------------------------------------ runs started over the API

API_RUN = {
    "participants": ["globex"],
    "rounds": 1,
    "epsilon": 8.0,
    "batch_size": 16,
    "personalize_epochs": 0,
    "secure_mode": False,
    "model": "lstm",
    "model_config": {"proj_dim": 8, "hidden_dim": 8},
}


def _follow(
    federation: Federation, run_id: str, key: str, until: Any, timeout: float, **kw: Any
) -> tuple[dict[str, Any], set[str]]:
    """Poll GET /v1/runs/{id} until ``until(body)``; also return the statuses seen."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        code, body = federation.api("GET", f"/v1/runs/{run_id}", key, **kw)
        assert code == 200, body
        seen.add(body["status"])
        if until(body):
            return body, seen
        assert time.monotonic() < deadline, f"timed out; last: {body}"
        time.sleep(1)


def _flower_status(federation: Federation, flower_run_id: int) -> str:
    result = federation.status(flower_run_id)
    found = re.search(r"finished:\w+|running|pending|starting", result.stdout)
    assert found, result.stdout + result.stderr
    return found.group(0)


def _worker(federation: Federation, run_id: str) -> tuple[int, int]:
    """The run's worker PID and the Flower run id it recorded."""
    with Session(federation.platform.engine) as session:
        row = session.get(TrainingRun, run_id)
        assert row is not None and row.worker_pid is not None
        return row.worker_pid, int(json.loads(row.simulation_json or "{}")["flower_run_id"])


def test_a_run_started_over_the_api_trains_on_the_superlink(federation: Federation) -> None:
    nodes = federation.tenant_nodes()
    admin = federation.admin_key("acme")
    # globex's node would train on globex's data: its admin has to agree first.
    code, refused = federation.api("POST", "/v1/runs", admin, API_RUN)
    assert code == 403 and "globex" in refused["detail"], refused
    globex = federation.admin_key("globex")
    code, agreed = federation.api("PUT", "/v1/partners", globex, {"tenants": ["acme"]})
    assert code == 200 and agreed == {"tenants": ["acme"]}, agreed
    started = time.monotonic()
    code, run = federation.api("POST", "/v1/runs", admin, API_RUN)
    assert code == 202, run
    assert run["participants"] == ["acme", "globex"]
    done, seen = _follow(
        federation, run["id"], admin, lambda b: b["status"] not in ("created", "running"), 420
    )
    print(f"API run on the SuperLink: {time.monotonic() - started:.1f} s for 1 round")
    for node in nodes:
        assert node.popen.poll() is None, node.output()[-3000:]
    assert done["status"] == "completed", done
    assert "running" in seen  # the ServerApp's status is readable while it runs
    assert {(m["round"], m["phase"]) for m in done["metrics"]} == {(1, "train"), (1, "evaluate")}
    # The evaluate row's example count is the DP-released (noised, unclipped) total: on a
    # dozen test rows it may be 0 or below, so it is checked by its released SD instead.
    assert all(m["examples"] > 0 for m in done["metrics"] if m["phase"] == "train")
    assert all(m["examples_sd"] for m in done["metrics"] if m["phase"] == "evaluate")
    pid, flower_run_id = _worker(federation, run["id"])
    assert _flower_status(federation, flower_run_id) == "finished:completed"
    with Session(federation.platform.engine) as session:
        row = session.get(TrainingRun, run["id"])
        assert row is not None
        # The ServerApp ran this platform run, with exactly the caller and its participant.
        assert json.loads(row.config_json)["participants"] == ["acme", "globex"]
        assert set(json.loads(row.summary_json)["tenants"]) == {"acme", "globex"}
    wait_for(lambda: not alive(pid), 30, "the worker to exit", [])


def test_a_restarted_api_follows_and_cancels_a_run_on_the_superlink(
    federation: Federation,
) -> None:
    federation.tenant_nodes()
    admin = federation.admin_key("acme")
    globex = federation.admin_key("globex")
    assert federation.api("PUT", "/v1/partners", globex, {"tenants": ["acme"]})[0] == 200
    code, run = federation.api("POST", "/v1/runs", admin, {**API_RUN, "rounds": 20})
    assert code == 202, run
    _follow(federation, run["id"], admin, lambda b: b["status"] == "running", 180)
    pid, flower_run_id = _worker(federation, run["id"])
    assert os.getsid(pid) == pid  # its own session: an API restart does not take it down
    # Another API process on the same platform, as after a restart: it knows nothing of
    # the worker but what the run's row says.
    port = free_port()
    federation.ports.append(port)
    restarted = federation.spawn(
        "api-restarted",
        [*FEDTEXT, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={
            **federation.env,
            "FEDTEXT_SUPERLINK": federation.superlink,
            "FEDTEXT_SUPERLINK_CA": str(federation.creds / "ca" / "ca.crt"),
        },
    )
    try:
        wait_for(lambda: not port_is_free(port), 120, "the restarted API", [restarted])
        body, _ = _follow(federation, run["id"], admin, lambda b: True, 10, port=port)
        assert body["status"] == "running", body
        code, body = federation.api("POST", f"/v1/runs/{run['id']}/cancel", admin, port=port)
        assert code == 200, body
        assert body["status"] == "cancelled"
        assert not alive(pid)
        group = subprocess.run(
            ["ps", "-o", "stat=", "-s", str(pid)], capture_output=True, text=True, check=False
        )
        assert [st for st in group.stdout.split() if not st.startswith("Z")] == []
        assert _flower_status(federation, flower_run_id) == "finished:stopped"
        # The stopped ServerApp's own failure does not overwrite the cancel.
        time.sleep(5)
        code, body = federation.api("GET", f"/v1/runs/{run['id']}", admin)
        assert body["status"] == "cancelled" and "Cancelled by admin key" in body["error"], body
    finally:
        restarted.stop()


def test_a_node_with_acmes_key_claiming_globex_is_refused_and_charges_nothing(
    federation: Federation,
) -> None:
    """Issue 24 finding 1: a node's tenant comes from its enrolled key, not its reply."""
    acme_node, globex_node = federation.tenant_nodes()
    # acme's second site key: registered with the SuperLink and enrolled for acme.
    second = federation.creds / "nodes" / "acme-site-2"
    steps = [
        ("federation", "register", "--superlink", federation.superlink,
         "--ca", str(federation.creds / "ca" / "ca.crt"), "--key", str(second / "node.pub")),
        ("federation", "enroll", "--tenant", "acme", str(second / "node.pub")),
    ]  # fmt: skip
    for step in steps:
        done = federation.cli(*step)
        assert done.returncode == 0, done.stdout + done.stderr
    impostor = federation.node(
        "globex", "--credentials", str(second), data="acme", name="node-impostor"
    )
    procs = [acme_node, globex_node, impostor]
    for node in procs:  # all three connected before the run is submitted
        wait_for(lambda n=node: "SuperNode ID" in n.output(), 120, f"{node.name} active", procs)
    node_id = {p.name: int(re.findall(r"SuperNode ID: (\d+)", p.output())[-1]) for p in procs}
    before = {p.name: len(p.output()) for p in procs}
    result = federation.cli(
        "federation", "run", "--superlink", federation.superlink,
        "--ca", str(federation.creds / "ca" / "ca.crt"),
        "--rounds", "1", "--epsilon", "8.0", "--batch-size", "16",
        "--personalize-epochs", "0", "--model", "lstm",
        "--model-config", json.dumps({"proj_dim": 8, "hidden_dim": 8}),
        "--config", "secure-mode=false", "--config", "round-timeout=600", "--poll", "3",
        timeout=600,
    )  # fmt: skip
    logs = {p.name: p.output()[before[p.name] :] for p in procs}
    impostor.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    submitted = re.search(r"platform run (\S+)", result.stdout)
    assert submitted, result.stdout
    with Session(federation.platform.engine) as session:
        run = session.get(TrainingRun, submitted.group(1))
        assert run is not None and run.status == "completed", run
        names = {t.id: t.name for t in session.exec(select(Tenant)).all()}
        charged: dict[str, list[tuple[int, str]]] = {}
        for ev in session.exec(
            select(PrivacyEvent).where(PrivacyEvent.run_id == run.id).order_by(PrivacyEvent.seq)
        ):
            charged.setdefault(names[ev.tenant_id], []).append((ev.round, ev.purpose))
    summary = json.loads(run.summary_json)
    refused = (
        f"node {node_id['node-impostor']} refused: its key is not enrolled for tenant 'globex'"
    )
    assert refused in summary["refused"], summary["refused"]
    assert set(summary["tenants"]) == {"acme", "globex"}
    # The impostor was asked who it is and nothing more; globex's own node trained.
    assert "Receiving: query message" in logs["node-impostor"], logs["node-impostor"][-3000:]
    assert "Receiving: train message" not in logs["node-impostor"]
    assert "Receiving: train message" in logs["node-globex"], logs["node-globex"][-3000:]
    # globex is charged for one node (its own), exactly as acme is for its one node.
    assert charged["globex"] == charged["acme"] and charged["globex"].count((1, "train")) == 1


def test_the_coordinators_api_reaches_its_superlink_by_a_certified_name(tmp_path: Path) -> None:
    made = create_credentials(tmp_path / "creds", hosts=["fl.example.org", "127.0.0.1"], tenants=[])
    cert, ca = made.layout.server_cert, made.layout.ca_cert
    settings = Settings(data_dir=tmp_path, superlink=None, superlink_ca=None)
    # Bound to every interface: loopback reaches it, and the certificate names 127.0.0.1.
    assert api_superlink_env(settings, "0.0.0.0", 9092, cert, ca) == {
        "FEDTEXT_SUPERLINK": "127.0.0.1:9092",
        "FEDTEXT_SUPERLINK_CA": str(ca),
    }
    named = api_superlink_env(settings, "fl.example.org", 9092, cert, ca)
    assert named["FEDTEXT_SUPERLINK"] == "fl.example.org:9092"
    # An address the certificate does not name would fail TLS verification: none is set.
    assert api_superlink_env(settings, "10.1.2.3", 9092, cert, ca) == {}
    # The operator's own choice is kept.
    chosen = Settings(data_dir=tmp_path, superlink="other.example.org:443", superlink_ca=ca)
    assert api_superlink_env(chosen, "0.0.0.0", 9092, cert, ca) == {}
    with pytest.raises(ValueError, match="FEDTEXT_SUPERLINK needs FEDTEXT_SUPERLINK_CA"):
        Settings(data_dir=tmp_path, superlink="other.example.org:443", superlink_ca=None)
