"""Every benchmark runs: ``bench/*.py --smoke`` (tiny sizes) prints its JSON line.

Benchmarks are found by glob (``bench/_*.py`` are their helpers), so a new one is covered
the day it lands. A benchmark that declares ``JSON_KEYS`` (a module-level dict: key ->
the keys expected inside it, or None) gets those keys checked; any other must print a
non-empty JSON object as its last line. They run at once, each in its own process,
without network or GPU (what make test has).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 420  # per benchmark; the whole set took about 3 minutes on 2 busy cores


def declared_keys(path: Path) -> dict[str, list[str] | None] | None:
    """The benchmark's ``JSON_KEYS`` literal, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "JSON_KEYS" for t in targets):
                assert node.value is not None
                value = ast.literal_eval(node.value)
                assert isinstance(value, dict)
                return value
    return None


def test_benchmarks_are_found() -> None:
    names = {p.name for p in BENCHMARKS}
    assert {"serving.py", "accuracy.py", "dp_train.py", "scale.py"} <= names
    assert not any(n.startswith("_") for n in names)


@pytest.mark.slow
def test_every_benchmark_runs_in_smoke_mode_and_prints_its_json_keys(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_TMPDIR=str(tmp_path / "ray"),
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("FEDTEXT_DATABASE_URL", None)
    procs = {}
    for path in BENCHMARKS:
        out = (tmp_path / f"{path.stem}.out").open("w")
        err = (tmp_path / f"{path.stem}.err").open("w")
        procs[path] = (
            subprocess.Popen(
                [sys.executable, str(path), "--smoke"], cwd=ROOT, env=env, stdout=out, stderr=err
            ),
            time.monotonic(),
        )
    failures = []
    for path, (proc, started) in procs.items():
        try:
            code = proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            failures.append(f"{path.name}: no result in {TIMEOUT_S} s")
            continue
        stdout = (tmp_path / f"{path.stem}.out").read_text()
        stderr = (tmp_path / f"{path.stem}.err").read_text()
        if code != 0:
            failures.append(f"{path.name}: exit {code}\n{stderr[-3000:]}")
            continue
        lines = [line for line in stdout.splitlines() if line.strip()]
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            failures.append(f"{path.name}: last line is not JSON: {lines[-1:]!r}")
            continue
        if not isinstance(result, dict) or not result:
            failures.append(f"{path.name}: last line is not a non-empty JSON object")
            continue
        for key, inner in (declared_keys(path) or {}).items():
            if key not in result:
                failures.append(f"{path.name}: no {key!r} in its JSON line")
            elif inner:
                missing = sorted(set(inner) - set(result[key]))
                if missing:
                    failures.append(f"{path.name}: {key!r} lacks {missing}")
    assert not failures, "\n\n".join(failures)
