"""A tenant's federation node keys (admin): the keys whose nodes train for this tenant.

The coordinator takes a federation node's tenant from the tenant its authenticated key is
enrolled for (``server.discovery``), never from the node's own reply. The tenant here is
always the caller's (from its credential); a key enrolled for any other tenant is refused
without naming that tenant, and another tenant's keys are neither listed nor revocable.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, Field

from privacy.node_proof import ProofError, fingerprint, load_public_key, openssh_text
from serving.deps import AdminCaller, SessionDep
from tenancy.errors import Conflict, InvalidInput, NotFound
from tenancy.nodes import NodeKey, enroll_node_key, list_node_keys, revoke_node_key

router = APIRouter(prefix="/v1/federation/nodes", tags=["federation"])


class NodeKeyIn(BaseModel):
    public_key: str = Field(
        min_length=1,
        max_length=4096,
        description="The node's public key: its node.pub line (OpenSSH) or a PEM public key.",
    )


class NodeKeyOut(BaseModel):
    fingerprint: str = Field(description="SHA-256 of the key's DER SubjectPublicKeyInfo, hex.")
    public_key: str
    enrolled_by: str
    created_at: datetime


class NodeKeys(BaseModel):
    keys: list[NodeKeyOut]


def _out(row: NodeKey) -> NodeKeyOut:
    return NodeKeyOut(
        fingerprint=row.fingerprint,
        public_key=row.public_key,
        enrolled_by=row.enrolled_by,
        created_at=row.created_at,
    )


@router.get("", response_model=NodeKeys)
def get_node_keys(caller: AdminCaller, session: SessionDep) -> NodeKeys:
    """The caller's tenant's live node keys."""
    return NodeKeys(keys=[_out(r) for r in list_node_keys(session, caller.tenant.id)])


@router.post("", response_model=NodeKeyOut, status_code=status.HTTP_201_CREATED)
def post_node_key(
    body: NodeKeyIn, caller: AdminCaller, session: SessionDep, response: Response
) -> NodeKeyOut:
    """Enroll a node key for the caller's tenant (201; 200 when it already was)."""
    try:
        key = load_public_key(body.public_key)
    except ProofError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    try:
        row, created = enroll_node_key(
            session,
            tenant_id=caller.tenant.id,
            fingerprint=fingerprint(key),
            public_key=openssh_text(key),
            enrolled_by=f"api-key:{caller.key.id}",
        )
    except Conflict as exc:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return _out(row)


@router.delete("/{fingerprint}", status_code=status.HTTP_204_NO_CONTENT)
def delete_node_key(fingerprint: str, caller: AdminCaller, session: SessionDep) -> Response:
    """Revoke one of the caller's tenant's node keys: its node no longer trains for it."""
    try:
        revoke_node_key(session, tenant_id=caller.tenant.id, fingerprint=fingerprint.lower())
    except InvalidInput as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
