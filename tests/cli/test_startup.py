"""Start-up: help, tenant/key commands, error paths and the SDK load no heavy library.

Each check runs in a fresh interpreter (a test process has long since imported torch) and
reads ``sys.modules`` when it exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ("torch", "flwr", "transformers", "opacus", "ray")
# The CLI's probe: run `fedtext ARGS`, then print which heavy modules were loaded.
_PROBE = """
import atexit, json, os, sys
def _report():
    heavy = {heavy!r}
    seen = [m for m in heavy if m in sys.modules]
    os.write(int(os.environ["PROBE_FD"]), json.dumps(seen).encode())
atexit.register(_report)
sys.argv = ["fedtext", *{args!r}]
from fedtext.cli import main
main()
"""


def _loaded(code: str, env: dict[str, str]) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    read, write = os.pipe()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env, "COLUMNS": "120", "PROBE_FD": str(write)},
        capture_output=True,
        text=True,
        timeout=120,
        pass_fds=(write,),
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        seen = pipe.read()
    return json.loads(seen or "null"), proc


def _cli(
    args: list[str], tmp_path: Path, heavy: tuple[str, ...] = TRAINING
) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    env = {"FEDTEXT_DATA_DIR": str(tmp_path / "var")}
    return _loaded(_PROBE.format(heavy=heavy, args=args), env)


def test_help_loads_no_training_library_nor_sql(tmp_path: Path) -> None:
    loaded, proc = _cli(["--help"], tmp_path, (*TRAINING, "sqlmodel", "sqlalchemy"))
    assert proc.returncode == 0, proc.stderr
    assert "simulate" in proc.stdout
    assert loaded == []


@pytest.mark.parametrize(
    "args",
    [
        ["tenant", "--help"],
        ["keys", "--help"],
        ["simulate", "--help"],
        ["serve", "--help"],
        ["tenant", "create", "acme"],
        ["tenant", "list"],
        ["keys", "list", "--tenant", "nobody"],
        ["simulate", "--data", "no-such-file.csv"],
        ["simulate", "--tenants", "1"],
    ],
)
def test_tenant_keys_help_and_error_paths_load_no_training_library(
    tmp_path: Path, args: list[str]
) -> None:
    loaded, proc = _cli(args, tmp_path)
    assert loaded == [], (args, proc.stdout, proc.stderr)
    if "--help" not in args and args[:2] != ["tenant", "create"] and args[:2] != ["tenant", "list"]:
        assert proc.returncode == 2 and "error:" in proc.stderr, (args, proc.stderr)
    else:
        assert proc.returncode == 0, (args, proc.stderr)


def test_the_sdk_loads_no_torch_transformers_opacus_nor_sqlmodel() -> None:
    heavy = (*TRAINING, "sqlmodel", "sqlalchemy", "numpy")
    code = (
        "import atexit, json, os, sys\n"
        "atexit.register(lambda: os.write(int(os.environ['PROBE_FD']), json.dumps([m for m in "
        f"{heavy!r} "
        "if m in sys.modules]).encode()))\n"
        "import sdk\n"
        "from sdk import AsyncClient, Client\n"
    )
    loaded, proc = _loaded(code, {})
    assert proc.returncode == 0, proc.stderr
    assert loaded == []


def test_the_light_names_equal_the_registries() -> None:
    from clients.data import PARTITIONERS
    from models.family_defaults import FAMILIES
    from models.spec import _FAMILIES
    from runs import spec
    from server.strategy import strategy_names

    assert sorted(spec.STRATEGIES) == strategy_names()
    assert spec.PARTITIONERS == PARTITIONERS
    assert set(FAMILIES) == set(_FAMILIES)
