"""A run's privacy unit from ledger entries (the words: ``privacy.units``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from privacy.units import unit_label


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
