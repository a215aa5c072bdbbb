"""Scale of simulations: seconds per round and peak memory with many tenants.

Runs `orchestration.simulation.simulate` (Flower's Simulation Engine, Opacus, the ledger)
with N tenants holding a little data each and a tiny `lstm`. Seconds per round come
from the ServerApp's own per-round records (one "train" row per accepted update); peak
memory is the largest sum of resident memory over this process and every Ray process,
sampled twice a second.

Prints one JSON object as its last line. Usage: python bench/scale.py [--quick] [--tenants 10 100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

# The JSON line's keys (tests/test_bench_smoke.py checks them on --smoke).
JSON_KEYS = {"runs": None, "cpu_cores": None}


def _rss_mb() -> float:
    """This process plus every ray process, in MiB (Linux /proc)."""
    total = 0
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
            if int(pid) != me and b"ray" not in cmd:
                continue
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def run(n: int, rounds: int, workdir: Path) -> dict[str, Any]:
    from sqlmodel import Session, col, select

    from fedtext.bootstrap import platform_from_settings, upgrade_schema
    from fedtext.settings import Settings
    from orchestration.simulation import SimulationConfig, simulate
    from tenancy.db import session_scope
    from tenancy.tables import RoundMetric
    from tenancy.tenants import create_tenant

    platform = platform_from_settings(Settings(data_dir=workdir / f"n{n}"))
    upgrade_schema(platform)
    names = [f"t{i}" for i in range(n)]
    with session_scope(platform.engine) as session:
        for name in names:
            create_tenant(session=session, keyring=platform.keyring, name=name)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    result = simulate(
        platform,
        SimulationConfig(
            tenants=names,
            model="lstm",
            rounds=rounds,
            epsilon=8.0,
            batch_size=16,
            max_train_examples=32,
            max_test_examples=16,
            personalize_epochs=0,
            min_nodes=n,
            secure_mode=False,
            model_config={"proj_dim": 8, "hidden_dim": 8, "dropout": 0.0},
        ),
    )
    total = time.monotonic() - started
    stop.set()
    sampler.join()
    with Session(platform.engine) as session:
        rows = session.exec(
            select(RoundMetric)
            .where(RoundMetric.run_id == result.run_id, RoundMetric.phase == "train")
            .order_by(col(RoundMetric.created_at))
        ).all()
    ends = {}
    for r in rows:
        ends[r.round] = max(ends.get(r.round, r.created_at), r.created_at)
    marks = [ends[k] for k in sorted(ends)]
    per_round = [(b - a).total_seconds() for a, b in itertools.pairwise(marks)]
    return {
        "tenants": n,
        "rounds": rounds,
        "seconds_total": round(total, 1),
        # Round 1 also pays start-up (Ray, imports, data); later rounds are steady state.
        "seconds_per_round_steady": round(sum(per_round) / len(per_round), 1)
        if per_round
        else None,
        "peak_rss_mb": round(peak[0], 1),
        "tenants_completed": len(result.summary["tenants"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10 tenants only")
    parser.add_argument(
        "--smoke", action="store_true", help="2 tenants, 1 round, same JSON keys (make test)"
    )
    parser.add_argument("--tenants", type=int, nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    sizes = args.tenants or ([2] if args.smoke else [10] if args.quick else [10, 100])
    if args.smoke:
        args.rounds = 1
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(n, args.rounds, Path(tmp)) for n in sizes]
    print(json.dumps({"runs": runs, "cpu_cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
