"""`/api/v1/sla`: the monthly SLA report (JSON or CSV) and organisations' contract terms."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse
from sqlmodel import select

from server.api.deps import (
    AdminUser,
    CurrentUser,
    IdPath,
    IdQuery,
    NowDep,
    SessionDep,
    StaffUser,
)
from server.core.security import STAFF
from server.errors import NotFound
from server.models import Organisation
from server.sla.clocks import server_terms
from server.sla.models import SlaContract
from server.sla.policy import resolve_terms
from server.sla.report import report_csv, sla_report
from server.tickets.schemas import ContractTerms

router = APIRouter(prefix="/sla", tags=["sla"])

Month = Annotated[str, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$", description="YYYY-MM")]


@router.get("/report", response_model=None)
async def report(session: SessionDep, user: CurrentUser, month: Month,
                 org_id: IdQuery = None,
                 format: Literal["json", "csv"] = "json",
                 ) -> dict[str, Any] | PlainTextResponse:
    """Compliance per class and customer, MTTA, MTTR and breaches of `month` (customers:
    their own organisation only)."""
    if user.role not in STAFF:
        org_id = user.org_id if user.org_id is not None else -1
    result = await sla_report(session, month, org_id=org_id)
    if format == "csv":
        return PlainTextResponse(report_csv(result), media_type="text/csv")
    return result.as_dict()


async def existing_org(session: SessionDep, org_id: IdPath) -> int:
    """The organisation of the path (404 before any body is read)."""
    if await session.get(Organisation, org_id) is None:
        raise NotFound(f"organisation {org_id} not found")
    return org_id


OrgDep = Annotated[int, Depends(existing_org)]


@router.get("/contracts/{org_id}", response_model=ContractTerms)
async def get_contract(session: SessionDep, _user: StaffUser, org_id: OrgDep) -> ContractTerms:
    """The organisation's own terms (empty: the defaults apply)."""
    row = (await session.exec(select(SlaContract).where(SlaContract.org_id == org_id))).first()
    return ContractTerms(terms=row.terms if row else {})


@router.put("/contracts/{org_id}", response_model=ContractTerms)
async def put_contract(session: SessionDep, _admin: AdminUser, now: NowDep, org_id: OrgDep,
                       body: ContractTerms) -> ContractTerms:
    """Set the organisation's terms (validated; new clocks follow them, running ones keep
    the terms they started with)."""
    resolve_terms(server_terms(), body.terms)
    row = (await session.exec(select(SlaContract).where(SlaContract.org_id == org_id))).first()
    if row is None:
        row = SlaContract(org_id=org_id, terms=body.terms, updated_at=now)
    else:
        row.terms, row.updated_at = body.terms, now
    session.add(row)
    await session.commit()
    return ContractTerms(terms=row.terms)
