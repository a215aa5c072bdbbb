"""Ledger export for auditors: JSON Lines or CSV, one line per entry, every hashed field.

Values are written so that the canonical JSON of ``privacy.canonical.canonical_digest``
can be rebuilt from the file alone: times in UTC ISO 8601 with ``+00:00``, floats in
their shortest round-trip form. docs/AUDIT.md shows how to recheck the hashes and
recompute epsilon from such a file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from privacy.canonical import canonical_time
from privacy.ledger import PrivacyEvent
from privacy.schemas import LedgerEntryBase

# Every field of an entry (``LedgerEntryBase``, in its order: the hashed fields, then
# ``purpose`` and ``applied_json``, hashed only when not "train" / "{}" as docs/AUDIT.md's
# recipe does, then ``entry_hash``), and ``signature`` (not hashed): the platform's Ed25519
# signature of the entry, checkable offline with the pinned public keys (docs/AUDIT.md,
# "Authorship").
EXPORT_FIELDS: tuple[str, ...] = (*LedgerEntryBase.model_fields, "signature")
ExportFormat = Literal["jsonl", "csv"]


def export_row(ev: PrivacyEvent) -> dict[str, Any]:
    """One entry as plain JSON-able values, in ``EXPORT_FIELDS`` order."""
    row = {name: getattr(ev, name) for name in EXPORT_FIELDS}
    row["created_at"] = canonical_time(ev.created_at)
    return row


def iter_jsonl(events: Iterable[PrivacyEvent]) -> Iterator[str]:
    for ev in events:
        yield json.dumps(export_row(ev), separators=(",", ":")) + "\n"


def iter_csv(events: Iterable[PrivacyEvent]) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for ev in events:
        row = export_row(ev)
        # repr: the shortest string that reads back as the same float.
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    if buf.getvalue():
        yield buf.getvalue()


def export_text(events: Iterable[PrivacyEvent], fmt: ExportFormat) -> str:
    """The whole export as one string."""
    if fmt == "jsonl":
        return "".join(iter_jsonl(events))
    if fmt == "csv":
        return "".join(iter_csv(events))
    raise ValueError(f"Unknown export format {fmt!r}; known: jsonl, csv.")
