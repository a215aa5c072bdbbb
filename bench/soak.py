"""Soak: mixed load on one `fedtext serve` for a long time; do resources stay flat?

Issue 28. Load, all at once against the real server on 127.0.0.1:

- predictions from many tenants (each its own predict key and deployed model), closed
  loop at a fixed concurrency;
- explanations (one in every ``EXPLAIN_EVERY`` requests);
- key changes (an admin creates a key and revokes it) and deploy changes (v1 <-> v2)
  every ``CHANGE_EVERY_S`` seconds;
- runs starting and finishing (a tiny one-round federated run over the API, one at a
  time) when ``--runs`` is on: the full and quick forms; the smoke form has no time for one.

Sampled each interval (a minute in the full form; shorter in --quick and --smoke): the
server's RSS, its open file descriptors, its database connections (PostgreSQL: rows in
pg_stat_activity for its database; SQLite: descriptors open on the database file), p99 of
the interval's predictions, and 5xx. The summary compares the last interval with the first
one after warm-up: the goal is RSS, descriptors and connections within 10%, p99 stable
(within 2x) and no 5xx.

    .venv/bin/python bench/soak.py            # 30 minutes, one-minute intervals
    .venv/bin/python bench/soak.py --quick    # 5 minutes, 30-second intervals (make bench)
    .venv/bin/python bench/soak.py --smoke    # under a minute, same JSON keys
    FEDTEXT_DATABASE_URL=postgresql+psycopg2://... bench/soak.py --quick   # on PostgreSQL
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPLAIN_EVERY = 25
CHANGE_EVERY_S = 5.0
CONCURRENCY = 4
FLAT_WITHIN = 0.10
P99_STABLE_WITHIN = 2.0
JSON_KEYS = {
    "mode": None,
    "duration_s": None,
    "interval_s": None,
    "tenants": None,
    "intervals": None,
    "requests": ["predict", "explain", "key_changes", "deploys", "runs_started", "runs_finished"],
    "statuses": None,
    "run_request_s": None,
    "server_errors": None,
    "drift_after_warmup": ["rss", "fds", "db_connections", "p99_ratio"],
    "goals": ["flat_within_10pct", "p99_stable", "no_5xx"],
    "load_average": None,
    "database": None,
}
TEXTS = [
    "the flight was delayed again and nobody told us anything",
    "great service and a friendly crew, thank you",
    "the new phone arrived today",
    "worst customer support I have ever dealt with",
]


def _log(msg: str) -> None:
    print(f"[bench/soak] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], p: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)


def setup(data_dir: Path, database_url: str | None, tenants: int) -> dict[str, Any]:
    """Tenants with two lstm versions (v1 deployed), keys, consent for runs."""
    from clients.data import DEMO_LABELS
    from fedtext.bootstrap import platform_from_settings, upgrade_schema
    from fedtext.settings import Settings
    from models import ModelSpec, build_model, save_weights
    from tenancy.db import session_scope
    from tenancy.registry import store_model_version
    from tenancy.tenants import Scope, create_api_key, create_tenant, set_partners

    settings = Settings(data_dir=data_dir, database_url=database_url, key_provider="file")
    platform = platform_from_settings(settings)
    upgrade_schema(platform)
    spec = ModelSpec.create("lstm", list(DEMO_LABELS))
    out: dict[str, Any] = {"tenants": []}
    names = ["acme", "globex"] + [f"t{i:03d}" for i in range(max(0, tenants - 2))]
    with session_scope(platform.engine) as session:
        for name in names[:tenants]:
            tenant = create_tenant(
                session=session, keyring=platform.keyring, name=name, budget_epsilon=1000
            )
            _, admin = create_api_key(session=session, tenant=tenant, scopes=[Scope.admin])
            _, predict = create_api_key(session=session, tenant=tenant, scopes=[Scope.predict])
            for v in (1, 2):
                store_model_version(
                    session=session, keyring=platform.keyring, store=platform.store,
                    tenant=tenant, name="sentiment", spec_json=spec.to_json(),
                    weights=save_weights(build_model(spec)), deploy=v == 1,
                )  # fmt: skip
            out["tenants"].append({"name": name, "admin": admin, "predict": predict})
            if name == "globex":
                set_partners(session=session, tenant=tenant, names=["acme"])
    platform.engine.dispose()
    return out


class Server:
    """``fedtext serve`` on 127.0.0.1 (its runs' workers are its children's children)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("ab")
        cmd = [sys.executable, "-m", "fedtext.cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=self._log, cwd=ROOT)

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fedtext serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("fedtext serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def _db_connections(pid: int, database_url: str | None, db_file: Path) -> int:
    if database_url is None:
        return sum(1 for target in _fds(pid) if target == str(db_file))
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


class Workload:
    """The mixed load; every answer's status and latency is kept per interval."""

    def __init__(self, url: str, world: dict[str, Any], runs: bool) -> None:
        self.url = url
        self.world = world
        self.runs = runs
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.interval_5xx = 0
        self.counts: Counter[str] = Counter()
        self.run_request_s: list[float] = []  # how long each POST /v1/runs took

    def _record(self, kind: str, status: int, seconds: float | None = None) -> None:
        with self.lock:
            self.statuses[f"{kind}:{status}"] += 1
            self.counts[kind] += 1
            if status >= 500:
                self.interval_5xx += 1
            if seconds is not None and status == 200:
                self.latencies.append(seconds)

    def take_interval(self) -> tuple[list[float], int]:
        with self.lock:
            lat, self.latencies = self.latencies, []
            errors, self.interval_5xx = self.interval_5xx, 0
        return lat, errors

    def predictor(self, worker: int) -> None:
        import httpx

        rng = random.Random(worker)
        tenants = self.world["tenants"]
        with httpx.Client(base_url=self.url, timeout=120) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                t = rng.choice(tenants)
                explain = i % EXPLAIN_EVERY == 0
                path = "/v1/models/sentiment/" + ("explain" if explain else "predict")
                body: dict[str, Any] = {"inputs": [rng.choice(TEXTS)]}
                started = time.perf_counter()
                try:
                    r = client.post(path, json=body, headers=_auth(t["predict"]))
                except httpx.TransportError:
                    self._record("transport", 0)
                    continue
                took = time.perf_counter() - started
                self._record("explain" if explain else "predict", r.status_code,
                             None if explain else took)  # fmt: skip

    def changer(self) -> None:
        import httpx

        tenants = self.world["tenants"]
        deployed = {t["name"]: 1 for t in tenants}
        i = 0
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.wait(CHANGE_EVERY_S):
                t = tenants[i % len(tenants)]
                i += 1
                admin = _auth(t["admin"])
                try:
                    r = client.post("/v1/keys", json={"scopes": ["predict"]}, headers=admin)
                    self._record("key_changes", r.status_code)
                    if r.status_code == 201:
                        key_id = r.json()["key"]["id"]
                        r = client.delete(f"/v1/keys/{key_id}", headers=admin)
                        self._record("key_changes", r.status_code)
                    v = 3 - deployed[t["name"]]
                    r = client.post(f"/v1/models/sentiment/versions/{v}/deploy", headers=admin)
                    self._record("deploys", r.status_code)
                    if r.status_code == 200:
                        deployed[t["name"]] = v
                except httpx.TransportError:
                    self._record("transport", 0)

    def runner(self) -> None:
        import httpx

        acme = self.world["tenants"][0]
        run = {
            "participants": ["globex"], "rounds": 1, "epsilon": 1.0, "batch_size": 16,
            "personalize_epochs": 0, "max_train_examples": 32, "max_test_examples": 16,
            "secure_mode": False,
        }  # fmt: skip
        with httpx.Client(base_url=self.url, timeout=300) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    r = client.post("/v1/runs", json=run, headers=_auth(acme["admin"]))
                except httpx.TransportError:  # a timeout too: the thread goes on
                    self._record("runs_transport", 0)
                    # The abandoned request may still be planning on the server (it holds
                    # the planning slot): posting again at once would only be answered 503.
                    self.stop.wait(60)
                    continue
                self.run_request_s.append(round(time.perf_counter() - started, 2))
                self._record("runs_started", r.status_code)
                if r.status_code != 202:
                    # Why it was refused (a 503 for a busy planner is backpressure, still a 5xx).
                    try:
                        detail = str(r.json().get("detail", ""))[:60]
                    except ValueError:
                        detail = r.text[:60]
                    self.statuses[f"runs_refused:{r.status_code}:{detail}"] += 1
                    self.stop.wait(max(10.0, float(r.headers.get("Retry-After", 0))))
                    continue
                run_id = r.json()["id"]
                while not self.stop.wait(2):
                    try:
                        s = client.get(f"/v1/runs/{run_id}", headers=_auth(acme["admin"]))
                    except httpx.TransportError:
                        continue
                    if s.json().get("status") not in ("created", "running"):  # RunStatus ACTIVE
                        # The GET answered 200; the run's own outcome is kept apart
                        # (a failed run is not a 5xx).
                        self._record("runs_finished", s.status_code)
                        self.statuses["run_outcome:" + s.json()["status"]] += 1
                        break
                else:
                    client.post(f"/v1/runs/{run_id}/cancel", headers=_auth(acme["admin"]))


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--no-runs", action="store_true", help="leave runs out of the mix")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    duration, interval, tenants = {
        "smoke": (6.0, 2.0, 4), "quick": (300.0, 30.0, 12), "full": (1800.0, 60.0, 40),
    }[mode]  # fmt: skip
    runs = mode != "smoke" and not args.no_runs
    database_url = os.environ.get("FEDTEXT_DATABASE_URL")
    work = Path(tempfile.mkdtemp(prefix="ftx-soak-"))
    data_dir = work / "data"
    _log(f"{mode}: {duration:.0f} s, {interval:.0f} s intervals, {tenants} tenants, runs={runs}")
    world = setup(data_dir, database_url, tenants)
    env = dict(os.environ, FEDTEXT_DATA_DIR=str(data_dir), FEDTEXT_LOG_LEVEL="WARNING",
               FEDTEXT_OPERATOR_TOKEN=secrets.token_urlsafe(32), TMPDIR=str(work),
               FEDTEXT_RATE_LIMIT_PER_SECOND="off", HF_HUB_OFFLINE="1")  # fmt: skip
    server = Server(env, work / "serve.log")
    samples: list[dict[str, Any]] = []
    load = None
    try:
        server.wait_ready()
        load = Workload(server.url, world, runs)
        threads = [threading.Thread(target=load.predictor, args=(w,)) for w in range(CONCURRENCY)]
        threads.append(threading.Thread(target=load.changer))
        if runs:
            threads.append(threading.Thread(target=load.runner))
        for t in threads:
            t.start()
        started = time.monotonic()
        db_file = data_dir / "fedtext.db"
        while time.monotonic() - started < duration:
            time.sleep(interval)
            lat, errors = load.take_interval()
            pid = server.proc.pid
            sample = {
                "t_s": round(time.monotonic() - started, 1),
                "rss_mb": _rss_mb(pid),
                "fds": len(_fds(pid)),
                "db_connections": _db_connections(pid, database_url, db_file),
                "predictions": len(lat),
                "p50_ms": _pct(lat, 0.5),
                "p99_ms": _pct(lat, 0.99),
                "server_errors": errors,
            }
            samples.append(sample)
            _log(json.dumps(sample))
    finally:
        if load is not None:
            load.stop.set()
        server.stop()
    warm = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]

    def drift(key: str) -> float:
        return round((last[key] - warm[key]) / max(warm[key], 1e-9), 3)

    p99s = [s["p99_ms"] for s in samples[1:] if s["p99_ms"] is not None] or [float("nan")]
    p99_ratio = round(max(p99s) / min(p99s), 2)
    server_errors = sum(s["server_errors"] for s in samples)
    assert load is not None
    flat = all(abs(drift(k)) <= FLAT_WITHIN for k in ("rss_mb", "fds", "db_connections"))
    result = {
        "mode": mode,
        "duration_s": duration,
        "interval_s": interval,
        "tenants": tenants,
        "intervals": samples,
        "requests": {k: load.counts[k] for k in JSON_KEYS["requests"]},  # type: ignore[union-attr]
        "statuses": dict(sorted(load.statuses.items())),
        "run_request_s": load.run_request_s,
        "server_errors": server_errors,
        "drift_after_warmup": {
            "rss": drift("rss_mb"),
            "fds": drift("fds"),
            "db_connections": drift("db_connections"),
            "p99_ratio": p99_ratio,
        },
        "goals": {
            "flat_within_10pct": flat,
            "p99_stable": p99_ratio <= P99_STABLE_WITHIN,
            "no_5xx": server_errors == 0,
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "database": "postgresql" if database_url else "sqlite",
    }
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
