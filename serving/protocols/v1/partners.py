"""Consent between tenants (admin): which tenants may start training runs that include us.

A run spends every participant's privacy budget and, on a federation, trains on each
participant's own data, so ``POST /v1/runs`` names a tenant only if that tenant's admin
listed the caller here.
"""

from __future__ import annotations

from fastapi import APIRouter

from serving.protocols.v1.deps import AdminCaller, SessionDep
from serving.refusals import refusal_for
from serving.schemas import Partners
from tenancy.errors import InvalidInput
from tenancy.tenants import partner_names, set_partners

router = APIRouter(prefix="/v1/partners", tags=["partners"])


@router.get("", response_model=Partners)
def get_partners(caller: AdminCaller, session: SessionDep) -> Partners:
    """The tenants that may start runs including the caller's tenant."""
    return Partners(tenants=partner_names(session=session, tenant_id=caller.tenant.id))


@router.put("", response_model=Partners)
def put_partners(body: Partners, caller: AdminCaller, session: SessionDep) -> Partners:
    """Replace that list (an empty list withdraws every consent; runs already started go on)."""
    try:
        names = set_partners(session=session, tenant=caller.tenant, names=body.tenants)
    except InvalidInput as exc:
        raise refusal_for(exc) from None
    session.commit()
    return Partners(tenants=names)
