"""Files and folders only their owner can read (0600 / 0700), whatever the umask.

The database, the key file, the blobs and the logs name tenants, hold key hashes and
wrapped keys: another local user must not read them. ``os.mkdir``'s mode is filtered by
the umask and ``Path.mkdir(parents=True)`` gives parents the default mode, so each folder
we create is made here, one level at a time, and set to 0700 exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700 (existing ones are left)."""
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process: its mode is its creator's
        os.chmod(folder, DIR_MODE)  # the umask may have removed owner bits
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 if it does not exist (its folder private too).

    An existing file of ours that others may read (a database created before files were
    made private, or under a loose umask) is set to 0600; another user's file is left.
    """
    path = Path(path)
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return make_private(path)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return path


def make_private(path: Path) -> Path:
    """Take group and other access away from an existing file of ours (another user's is
    left): files written before they were made private, or under a loose umask."""
    info = path.stat()
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        os.chmod(path, info.st_mode & 0o700)
    return path
