"""What an auditor is told about signed rows (``tenancy.signing``): what a status other than
"ok" means, and which rows of a hash chain are not accepted."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tenancy.signing import Status, check, row_message

_DESCRIBE = {
    "unsigned": "unsigned: written before signatures (v0006) or by someone without the "
    "platform's signing key (if it is old and the chains check out, the operator signs it "
    "once with `fedtext audit sign-existing`)",
    "unknown-key": "signed by a key that is not in the trusted signing history",
    "bad": "its signature does not verify: the row was changed after it was signed",
}


def describe(status: Status) -> str:
    """What a status other than "ok" means, for an auditor."""
    return _DESCRIBE[status]


def chain_signature_problems(
    table: str, rows: Iterable[Any], trusted: Mapping[str, bytes]
) -> list[tuple[Any, Status]]:
    """The rows of one tenant's chain (in order) whose signature is not accepted.

    An unsigned entry followed by a validly signed one is accepted: that signature binds
    the later entry's ``prev_hash``, hence every entry before it (the chain check itself
    is ``privacy.ledger.verify_chain``'s). An unsigned entry with no signed one after it
    (an append made around the platform, or an old chain never signed) is not.
    """
    rows = list(rows)
    statuses = [check(r.signature, row_message(table, r), trusted) for r in rows]
    last_ok = max((i for i, s in enumerate(statuses) if s == "ok"), default=-1)
    return [
        (row, status)
        for i, (row, status) in enumerate(zip(rows, statuses, strict=True))
        if status != "ok" and not (status == "unsigned" and i < last_ok)
    ]
