"""Canonical forms that entry hashes are computed over, so an auditor can recompute them
from an export alone (docs/AUDIT.md)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any


def utc_seconds(moment: datetime) -> datetime:
    """Aware UTC to the second: what SQLite and PostgreSQL both store and return unchanged."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.replace(microsecond=0)


def canonical_time(moment: datetime) -> str:
    """ISO 8601 in UTC with ``+00:00``; a naive value is UTC (never local time)."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.isoformat()


def canonical_digest(data: dict[str, Any]) -> str:
    """SHA-256 hex of ``data`` as canonical JSON (sorted keys, no spaces).

    Floats are hashed as ``repr`` strings (shortest round-trip form) and datetimes as
    ``canonical_time``, so an auditor recomputes the same bytes from an export.
    """
    norm: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, datetime):
            value = canonical_time(value)
        elif isinstance(value, float):
            value = repr(value)
        norm[name] = value
    canonical = json.dumps(norm, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
