"""Simulations larger than one machine: `fedtext simulate` joins an existing Ray cluster.

A one-machine Ray cluster (`ray start --head`) stands in for a real one: what matters is
that the simulation attaches to the cluster named by RAY_ADDRESS instead of starting its
own Ray, and that the whole run completes there. Torn down by PID afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cli.test_federation_live import alive, descendants, free_port, port_is_free

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_simulate_runs_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    port = free_port()
    # Ray's socket paths must stay short: a temp dir directly under /tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fedtext-ray-", dir="/tmp"))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FEDTEXT_DATA_DIR": str(tmp_path / "var"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("FEDTEXT_DATABASE_URL", None)
    log = tmp_path / "ray-head.log"
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={ray_tmp}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",
        ],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    known: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while port_is_free(port):
            assert head.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        known |= descendants(head.pid)
        started = time.monotonic()
        result = subprocess.run(
            [
                str(BIN / "fedtext"),
                "simulate",
                "--tenants",
                "2",
                "--rounds",
                "1",
                "--max-train-examples",
                "48",
                "--max-test-examples",
                "16",
                "--batch-size",
                "16",
                "--personalize-epochs",
                "0",
                "--insecure",
            ],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        print(f"simulation on the Ray cluster: {time.monotonic() - started:.1f} s")
        known |= descendants(head.pid)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # The simulation was a driver of this cluster and its client actors ran as this
        # cluster's workers: both leave logs in its session directory, which a Ray of the
        # simulation's own would not have used.
        logs = ray_tmp / "session_latest" / "logs"
        assert list(logs.glob("python-core-driver-*")), sorted(p.name for p in logs.iterdir())
        actors = [p for p in logs.glob("worker-*.out") if "actor_name:" in p.read_text()]
        assert actors, sorted(p.name for p in logs.iterdir())
    finally:
        known |= descendants(head.pid)
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in known) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in known:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not [p for p in known if alive(p)]
    assert port_is_free(port)
