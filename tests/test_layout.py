"""The layout's own rules (DESIGN.md, Layout): modules stay small enough to have one job.

The import arrows are checked by import-linter (`.importlinter`, run by `make lint`).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "fedtext", "sdk", "orchestration", "runs", "models", "clients", "server", "privacy",
    "tenancy", "serving", "bench",
)  # fmt: skip
MAX_LINES = 450
GENERATED = ("migrations/versions/", "_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def test_no_module_is_over_450_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if not any(marker in str(path) for marker in GENERATED)
        and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def test_the_import_contracts_name_every_package() -> None:
    config = (ROOT / ".importlinter").read_text()
    for package in PACKAGES[:-1]:
        assert (ROOT / package / "__init__.py").exists(), package
        assert f"\n    {package}\n" in config, f"{package} is not under the import contracts"
