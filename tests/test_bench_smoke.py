"""Every benchmark runs: ``bench/*.py --smoke`` (tiny sizes) prints its JSON line.

Benchmarks are found by glob (``bench/_*.py`` are their helpers), so a new one is covered
the day it lands. A benchmark that declares ``JSON_KEYS`` (a module-level dict: key ->
the keys expected inside it, or None) gets those keys checked; any other must print a
non-empty JSON object as its last line. They run two at a time, each in its own
process, without network or GPU (what make test has).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 600  # per benchmark
# Started first: their --smoke takes the longest (scale.py: Ray with two virtual nodes;
# serving.py: five servers one after another).
LONGEST_FIRST = ("scale.py", "serving.py")


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
        # Short: Ray's socket paths under it must fit AF_UNIX's 107 bytes (a pytest
        # tmp_path does not).
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("FEDTEXT_DATABASE_URL", None)

    def run(path: Path) -> tuple[Path, int | None, float]:
        started = time.monotonic()
        with (
            (tmp_path / f"{path.stem}.out").open("w") as out,
            (tmp_path / f"{path.stem}.err").open("w") as err,
        ):
            try:
                code: int | None = subprocess.run(
                    [sys.executable, str(path), "--smoke"], cwd=ROOT, env=env, stdout=out,
                    stderr=err, timeout=TIMEOUT_S, check=False,
                ).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                code = None
        return path, code, time.monotonic() - started

    # Two at a time: all at once on 2 cores made servers miss their start-up deadlines.
    # The longest first (a Ray simulation, five servers), so that the short ones fill
    # the other slot instead of leaving one of them to run alone at the end.
    order = sorted(BENCHMARKS, key=lambda p: (p.name not in LONGEST_FIRST, p.name))
    with ThreadPoolExecutor(2) as pool:
        finished = list(pool.map(run, order))
    failures = []
    for path, code, seconds in finished:
        stdout = (tmp_path / f"{path.stem}.out").read_text()
        stderr = (tmp_path / f"{path.stem}.err").read_text()
        if code is None:
            failures.append(f"{path.name}: no result in {TIMEOUT_S} s\n{stderr[-2000:]}")
            continue
        if code != 0:
            failures.append(f"{path.name}: exit {code} after {seconds:.0f} s\n{stderr[-3000:]}")
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
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert not failures, "\n\n".join(failures)
