"""What a signed row's signature binds (``tenancy.signing`` signs and checks it): the
tables whose rows are signed and, for each, the exact bytes signed.

A ledger row binds its tenant, sequence number and entry hash (hence the chain before it);
any other row a digest over every field that decides what it allows.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

ROW_FORMAT = b"fedtext-signed-row/1"
LEDGER_TABLES = ("privacy_event", "privacy_budget_change")
KEY_TABLE = "api_key"
NODE_TABLE = "node_key"  # a federation node key enrolled for a tenant (tenancy.nodes)
PARTNER_TABLE = "federation_partner"  # consent: a tenant lets a partner include it in runs
POLICY_TABLE = "tenant_policy"  # a tenant's deploy policy and floor (tenancy.governance)
VERSION_TABLE = "model_version"  # a model version, whether it is the deployed one included
GOVERNANCE_TABLES = (PARTNER_TABLE, POLICY_TABLE, VERSION_TABLE)
SIGNED_TABLES = (*LEDGER_TABLES, KEY_TABLE, NODE_TABLE, *GOVERNANCE_TABLES)
# Rows that change after they are written (revoked, enrolled again, policy changed, deployed
# or rolled back, re-encrypted): signed again on update. Consent rows are only inserted and
# deleted.
MUTABLE_TABLES = (KEY_TABLE, NODE_TABLE, POLICY_TABLE, VERSION_TABLE)


def _time(value: datetime | None) -> str | None:
    if value is None:
        return None
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.replace(microsecond=0).isoformat()  # what every database returns unchanged


def key_row_digest(row: Any) -> str:
    """SHA-256 hex over every field of an API key row that decides what it may do."""
    data = {
        "id": row.id,
        "tenant_id": row.tenant_id,
        "name": row.name,
        "prefix": row.prefix,
        "key_hash": row.key_hash,
        "scopes": row.scopes,
        "created_at": _time(row.created_at),
        "expires_at": _time(row.expires_at),
        "revoked_at": _time(row.revoked_at),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def node_row_digest(row: Any) -> str:
    """SHA-256 hex over every field of a node key enrollment: which key, for which tenant,
    by whom, since when and whether revoked."""
    data = {
        "fingerprint": row.fingerprint,
        "tenant_id": row.tenant_id,
        "public_key": row.public_key,
        "enrolled_by": row.enrolled_by,
        "created_at": _time(row.created_at),
        "revoked_at": _time(row.revoked_at),
    }
    if getattr(row, "proven", False):  # absent before v0010: older signatures unchanged
        data["proven"] = True
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _text_digest(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def partner_row_digest(row: Any) -> str:
    """Consent: which tenant lets which partner include it, since when."""
    return _digest(
        {"tenant_id": row.tenant_id, "partner_id": row.partner_id, "at": _time(row.created_at)}
    )


def policy_row_digest(row: Any) -> str:
    """Every field of a tenant's policy (what its runs may do to it) and who set it when."""
    return _digest(
        {
            "tenant_id": row.tenant_id,
            "deploy": row.deploy,
            "require_secure_mode": bool(row.require_secure_mode),
            "max_epsilon": None if row.max_epsilon is None else float(row.max_epsilon),
            "families": row.families,
            "dataset": row.dataset,
            "updated_at": _time(row.updated_at),
            "updated_by": row.updated_by,
        }
    )


def version_row_digest(row: Any) -> str:
    """A model version: whose, which, its blob (key and SHA-256), how it is served and
    whether it is the deployed one."""
    return _digest(
        {
            "id": row.id,
            "tenant_id": row.tenant_id,
            "name": row.name,
            "version": row.version,
            "spec": _text_digest(row.spec_json),
            "sha256": row.sha256,
            "blob_key": row.blob_key,
            "size_bytes": row.size_bytes,
            "run_id": row.run_id,
            "metrics": _text_digest(row.metrics_json),
            "deployed": bool(row.deployed),
            "quantize": row.quantize,
            "created_at": _time(row.created_at),
        }
    )


_DIGESTS = {
    KEY_TABLE: key_row_digest,
    NODE_TABLE: node_row_digest,
    PARTNER_TABLE: partner_row_digest,
    POLICY_TABLE: policy_row_digest,
    VERSION_TABLE: version_row_digest,
}


def row_message(table: str, row: Any) -> bytes:
    """The bytes signed for a row of one of ``SIGNED_TABLES``.

    A ledger row: its tenant, sequence number and entry hash (the hash covers every hashed
    field and the previous entry's hash, so the signature binds content and position, and
    through ``prev_hash`` the whole chain before it). Any other row: its table's digest
    (``_DIGESTS``) over every field that decides what it allows.
    """
    if table in LEDGER_TABLES:
        body = f"{row.tenant_id}\n{row.seq}\n{row.entry_hash}"
    elif table in _DIGESTS:
        body = _DIGESTS[table](row)
    else:
        raise ValueError(f"Rows of {table!r} are not signed.")
    return b"\n".join((ROW_FORMAT, table.encode(), body.encode()))
