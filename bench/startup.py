"""Start-up benchmark: how long a person waits for `fedtext --help` and `import sdk`.

    .venv/bin/python bench/startup.py --quick      # about 20 s on 2 quiet cores

Each command runs in a fresh interpreter, alternating with ``python -c pass`` (the
interpreter alone) in one run, so the ratios compare like with like on a noisy machine;
the median of the repeats is reported, with the load average before and after. Also
measured: `fedtext tenant --help`, an error path (`fedtext simulate --data MISSING`) and
the SDK's peak resident memory. Goals (issue 25, on this machine when quiet): `--help`
under 1 s and the SDK import under 0.3 s.

The last line printed is one JSON object (keys in ``JSON_KEYS``). ``--smoke``: one repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS_S = {"help": 1.0, "sdk_import": 0.3}
JSON_KEYS = {
    "seconds": ["python", "help", "tenant_help", "error_path", "sdk_import"],
    "cpu_seconds": ["python", "help", "tenant_help", "error_path", "sdk_import"],
    "ratio_to_python": ["help", "tenant_help", "error_path", "sdk_import"],
    "goals_s": ["help", "sdk_import"],
    "met": ["help", "sdk_import"],
    "sdk_peak_rss_mb": None,
    "load_average": ["before", "after"],
    "repeats": None,
    "cpus": None,
}


def _commands(data_dir: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "fedtext.cli"]
    return {
        "python": [sys.executable, "-c", "pass"],
        "help": [*cli, "--help"],
        "tenant_help": [*cli, "tenant", "--help"],
        "error_path": [*cli, "simulate", "--data", os.path.join(data_dir, "missing.csv")],
        "sdk_import": [sys.executable, "-c", "import sdk"],
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds, and CPU seconds (user + system: what a quiet machine would wait,
    near enough, as imports run on one thread; a loaded machine stretches only the wall)."""
    cpu = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    expected = 2 if "--data" in argv else 0  # the error path exits 2, saying what is missing
    if proc.returncode != expected:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return took, cpu


def _sdk_peak_rss_mb(env: dict[str, str]) -> float:
    code = "import resource, sdk; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return round(int(out.stdout.strip()) / 1024, 1)  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats (make bench)")
    parser.add_argument("--smoke", action="store_true", help="1 repeat (make test)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.smoke else 5 if args.quick else 11)
    before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, FEDTEXT_DATA_DIR=tmp, COLUMNS="100")
        commands = _commands(tmp)
        _time(commands["help"], env)  # warm the file cache and .pyc files once
        samples: dict[str, list[float]] = {name: [] for name in commands}
        cpu_samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeats):
            for name, argv in commands.items():  # interleaved: load changes hit all alike
                wall, cpu = _time(argv, env)
                samples[name].append(wall)
                cpu_samples[name].append(cpu)
        rss = _sdk_peak_rss_mb(env)
    after = [round(x, 2) for x in os.getloadavg()]
    seconds = {name: round(statistics.median(s), 3) for name, s in samples.items()}
    cpu_seconds = {name: round(statistics.median(s), 3) for name, s in cpu_samples.items()}
    base = max(seconds["python"], 1e-3)
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "ratio_to_python": {n: round(s / base, 1) for n, s in seconds.items() if n != "python"},
        "goals_s": GOALS_S,
        "met": {n: seconds[n] < goal for n, goal in GOALS_S.items()},
        "sdk_peak_rss_mb": rss,
        "load_average": {"before": before, "after": after},
        "repeats": repeats,
        "cpus": os.cpu_count(),
    }
    for name, s in seconds.items():
        print(
            f"{name:12s} {s:7.3f} s wall (x{s / base:.1f} python -c pass), "
            f"{cpu_seconds[name]:.3f} s CPU"
        )
    print(f"SDK peak RSS {rss} MiB; load average before {before}, after {after}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
