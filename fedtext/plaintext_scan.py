"""Check that no plaintext weights lie under a directory."""

from __future__ import annotations

import struct
from pathlib import Path

_PLAINTEXT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


def looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file starts with a little-endian u64 header length and then '{'."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length < 100_000_000 and head[8:9] == b"{"


def find_plaintext_weights(root: Path) -> list[Path]:
    """Files under ``root`` that are, or are named like, unencrypted model weights."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        with path.open("rb") as fh:
            head = fh.read(16)
        pickle_magic = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        zip_magic = head[:4] == b"PK\x03\x04"  # torch.save's archive format
        if (
            path.suffix.lower() in _PLAINTEXT_SUFFIXES
            or looks_like_safetensors(head)
            or pickle_magic
            or zip_magic
        ):
            found.append(path)
    return found
