"""What one epsilon protects, as people read it (the console says the same words)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def unit_label(privacy_unit: str, applied_json: str = "{}") -> str:
    """ "per user (k = 8)" for a privacy-unit user entry (k: each user's row bound, from its
    applied settings), "per example" otherwise."""
    if privacy_unit != "user":
        return "per example"
    try:
        k = json.loads(applied_json or "{}").get("max_examples_per_user")
    except (ValueError, AttributeError):
        k = None
    return f"per user (k = {k})" if isinstance(k, int) else "per user"


def run_unit(entries: Iterable[Any], run_id: str) -> str | None:
    """The unit of one run from ledger entries (``LedgerEntryPublic``): one label, or the
    labels joined when its entries differ; None when nothing of the run was charged."""
    labels: list[str] = []
    for e in entries:
        if e.run_id == run_id:
            label = unit_label(e.privacy_unit, e.applied_json)
            if label not in labels:
                labels.append(label)
    return ", ".join(labels) if labels else None
