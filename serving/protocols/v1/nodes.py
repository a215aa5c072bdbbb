"""A tenant's federation node keys (admin): the keys whose nodes train for this tenant.

The coordinator takes a federation node's tenant from the tenant its authenticated key is
enrolled for (``server.discovery``), never from the node's own reply. The tenant here is
always the caller's (from its credential); a key enrolled for any other tenant is refused
without naming that tenant, and another tenant's keys are neither listed nor revocable.
An enrollment request signed by the node's key (``serving.node_enrollment``) proves the key
is the node's: it wins over another tenant's enrollment of that key that proved nothing.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, Field

from privacy.node_proof import ProofError, fingerprint, load_public_key, openssh_text
from serving.node_enrollment import EnrollmentError, check_request
from serving.protocols.v1.deps import AdminCaller, SessionDep
from serving.refusals import refusal_for
from tenancy.errors import Conflict, InvalidInput, NotFound
from tenancy.nodes import NodeKey, enroll_node_key, list_node_keys, revoke_node_key

router = APIRouter(prefix="/v1/federation/nodes", tags=["federation"])


class NodeKeyIn(BaseModel):
    enrollment_request: dict[str, str] | None = Field(
        default=None,
        description="A request signed by the node's key for this tenant (`fedtext federation "
        "enrollment-request` at the node's site): proves the key is the node's, and takes it "
        "over from another tenant's enrollment that proved nothing.",
    )
    public_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Without a request (as before): the node's public key, its node.pub "
        "line (OpenSSH) or a PEM public key. Such an enrollment yields to a proven one.",
    )


class NodeKeyOut(BaseModel):
    fingerprint: str = Field(description="SHA-256 of the key's DER SubjectPublicKeyInfo, hex.")
    public_key: str
    enrolled_by: str
    created_at: datetime
    proven: bool = Field(description="The key's holder signed the request that enrolled it.")


class NodeKeys(BaseModel):
    keys: list[NodeKeyOut]


def _out(row: NodeKey) -> NodeKeyOut:
    return NodeKeyOut(
        fingerprint=row.fingerprint,
        public_key=row.public_key,
        enrolled_by=row.enrolled_by,
        created_at=row.created_at,
        proven=row.proven,
    )


@router.get("", response_model=NodeKeys)
def get_node_keys(caller: AdminCaller, session: SessionDep) -> NodeKeys:
    """The caller's tenant's live node keys."""
    return NodeKeys(keys=[_out(r) for r in list_node_keys(session, caller.tenant.id)])


@router.post("", response_model=NodeKeyOut, status_code=status.HTTP_201_CREATED)
def post_node_key(
    body: NodeKeyIn, caller: AdminCaller, session: SessionDep, response: Response
) -> NodeKeyOut:
    """Enroll a node key for the caller's tenant (201; 200 when it already was).

    With ``enrollment_request`` the key's holder proves it (and takes the key over from
    another tenant's unproven enrollment); a bare ``public_key`` enrolls as before.
    """
    if (body.enrollment_request is None) == (body.public_key is None):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "Give enrollment_request (signed by the node's key) or public_key, not both.",
        )
    try:
        if body.enrollment_request is not None:
            proven = check_request(body.enrollment_request, tenant=caller.tenant.name)
            fp, text = proven.fingerprint, proven.public_key
        else:
            key = load_public_key(body.public_key or "")
            fp, text = fingerprint(key), openssh_text(key)
    except (ProofError, EnrollmentError) as exc:
        raise refusal_for(exc) from None
    try:
        row, created = enroll_node_key(
            session,
            tenant_id=caller.tenant.id,
            fingerprint=fp,
            public_key=text,
            enrolled_by=f"api-key:{caller.key.id}",
            proven=body.enrollment_request is not None,
        )
    except Conflict as exc:
        session.rollback()
        raise refusal_for(exc) from None
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
        raise refusal_for(exc) from None
    except NotFound as exc:
        raise refusal_for(exc) from None
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
