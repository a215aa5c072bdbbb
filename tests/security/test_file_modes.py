"""What the platform writes is its owner's only (0600 files, 0700 folders), whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtext.bootstrap import platform_from_settings, upgrade_schema
from fedtext.settings import Settings
from tests.factories import make_tenant, store_tiny_model


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, str]:
    """Every path under ``root`` (and root) with its permission bits, as octal text."""
    out = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return out


def _assert_private(root: Path) -> None:
    modes = _modes(root)
    wrong = {
        name: mode
        for name, mode in modes.items()
        if mode != ("0o700" if (root / name).is_dir() else "0o600")
    }
    assert not wrong, f"readable by others under umask 000: {wrong}"


def test_platform_files_are_private_under_umask_000(tmp_path: Path, umask_000: None) -> None:
    data = tmp_path / "deep" / "data"  # parents created too
    platform = platform_from_settings(Settings(data_dir=data))
    upgrade_schema(platform)
    acme = make_tenant(platform, "acme")  # a data key wrapped by a new KEK file
    store_tiny_model(platform, acme.tenant)  # a blob in a new tenant folder
    names = {p.name for p in data.rglob("*")}
    assert {"fedtext.db", "kek.key", "keys", "blobs"} <= names
    assert any(n.endswith(".ftx") for n in names)
    _assert_private(data)
    assert oct(stat.S_IMODE((tmp_path / "deep").stat().st_mode)) == "0o700"


# The CLI (`fedtext serve` started under umask 000) is checked by
# tests/security/test_hostile_clients.py::test_what_the_server_wrote_is_private.


def test_a_database_file_left_readable_by_an_older_version_is_made_private(
    tmp_path: Path, umask_000: None
) -> None:
    # An install from before files were private has its database at 0644: opening the
    # platform again no longer leaves key hashes, wrapped keys and ledgers readable.
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    database = data / "fedtext.db"
    database.touch(mode=0o644)
    os.chmod(database, 0o644)
    platform = platform_from_settings(Settings(data_dir=data, database_url=f"sqlite:///{database}"))
    upgrade_schema(platform)
    platform.engine.dispose()
    assert oct(stat.S_IMODE(database.stat().st_mode)) == "0o600"


def test_a_key_file_left_readable_by_an_older_version_is_made_private(
    tmp_path: Path, umask_000: None
) -> None:
    from tenancy.key_providers import FileKeyProvider

    path = tmp_path / "keys" / "kek.key"
    FileKeyProvider(path).current_version()  # created 0600
    os.chmod(path, 0o644)  # as an install from before key files were kept private
    assert FileKeyProvider(path).current_version() == 1
    assert oct(stat.S_IMODE(path.stat().st_mode)) == "0o600"
