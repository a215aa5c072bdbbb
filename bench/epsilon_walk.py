"""How far a run's target epsilon travels through the code, from the CLI to the ledger.

Runs ``fedtext simulate --epsilon 3.75`` in process (two tenants, one round, a few
examples) with a profiler on every thread. Each call of a function of fedtext's packages
whose arguments hold the target epsilon (as a number, a string, an attribute of an
argument, or a value of a dict argument) is a step of the walk, in time order, until the
first call of ``record_event`` (the function that writes a charge to the ledger).
Consecutive calls within one function are one step. It reports:

- ``steps``: the walk's length; ``files``: distinct files on it;
- ``climbs``: steps that go up a layer (DESIGN.md's: models, privacy, tenancy <
  clients, runs < server, serving < orchestration < fedtext, sdk);
- ``forms``: distinct ways the value is held (float argument, RunSpec attribute, ...);
- ``entries``: per file, how many separate times the walk enters it.

Measured the same way before and after a refactor (docs/BENCHMARKS.md). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "models": 0, "privacy": 0, "tenancy": 0, "clients": 1, "runs": 1, "server": 2,
    "serving": 2, "orchestration": 3, "fedtext": 4, "sdk": 4,
}  # fmt: skip
TARGET = "record_event"
EPSILON = 3.75  # unusual, so that no default equals it
JSON_KEYS = {"walk": ["steps", "files", "climbs", "forms"], "entries": None}


@cache
def _package(filename: str) -> str | None:
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return rel.parts[0] if rel.parts and rel.parts[0] in LAYERS else None


def _holds(value: Any, depth: int = 0) -> str | None:
    """How ``value`` holds the target epsilon, or None."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        return "number" if value == EPSILON else None
    if isinstance(value, str):
        return "string" if value.strip() == str(EPSILON) else None
    if depth >= 1:
        return None
    if isinstance(value, dict):
        for v in list(value.values())[:200]:
            if _holds(v, depth + 1):
                return "dict"
        return None
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict) and type(value).__module__.split(".")[0] in LAYERS:
        for v in list(fields.values())[:200]:
            if _holds(v, depth + 1):
                return type(value).__name__
    return None


def measure(args: list[str]) -> dict[str, Any]:
    walk: list[tuple[str, str, str]] = []
    done = threading.Event()
    lock = threading.Lock()

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event != "call" or done.is_set():
            return
        code = frame.f_code
        if _package(code.co_filename) is None:
            return
        if code.co_name == TARGET:
            with lock:
                walk.append((_rel(code.co_filename), code.co_name, "ledger"))
            done.set()
            return
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        local = frame.f_locals
        for name in names:
            form = _holds(local.get(name))
            if form is not None:
                with lock:
                    walk.append((_rel(code.co_filename), code.co_name, form))
                return

    from typer.testing import CliRunner

    from fedtext.cli import app

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    if result.exit_code != 0:
        raise SystemExit(f"fedtext {' '.join(args)} failed:\n{result.output}")
    if not done.is_set():
        raise SystemExit(f"no call of {TARGET} was seen: the walk cannot be measured")
    steps = [w for i, w in enumerate(walk) if i == 0 or walk[i - 1][:2] != w[:2]]
    layer = [LAYERS[Path(p).parts[0]] for p, _, _ in steps]
    climbs = [
        f"{steps[i - 1][0]}:{steps[i - 1][1]} -> {steps[i][0]}:{steps[i][1]}"
        for i in range(1, len(steps))
        if layer[i] > layer[i - 1]
    ]
    entries: dict[str, int] = {}
    for i, (path, _, _) in enumerate(steps):
        if i == 0 or steps[i - 1][0] != path:
            entries[path] = entries.get(path, 0) + 1
    return {
        "walk": {
            "steps": len(steps),
            "files": len({p for p, _, _ in steps}),
            "climbs": len(climbs),
            "forms": sorted({f for _, _, f in steps}),
        },
        "path": [f"{p}:{fn} [{form}]" for p, fn, form in steps],
        "climbs": climbs,
        "entries": dict(sorted(entries.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _rel(filename: str) -> str:
    return str(Path(filename).resolve().relative_to(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(the same: it is quick)")
    parser.add_argument("--smoke", action="store_true", help="(the same: it is quick)")
    parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ft-walk-") as tmp:
        os.environ["FEDTEXT_DATA_DIR"] = tmp
        os.environ.pop("FEDTEXT_DATABASE_URL", None)
        args = [
            "simulate", "--tenants", "2", "--rounds", "1", "--local-epochs", "1",
            "--max-train-examples", "40", "--max-test-examples", "20", "--epsilon", str(EPSILON),
        ]  # fmt: skip
        out = measure(args)
    out["command"] = "fedtext " + " ".join(args)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
