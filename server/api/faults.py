"""`/api/v1/faults`: classified faults (A-D), filtered by class, state, site, unit and time."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import col, select

from server.api.deps import CurrentUser, IdPath, IdQuery, PageDep, SessionDep, get_visible, paginate
from server.core.security import visible_sites
from server.errors import InvalidInput
from server.models import Fault, Site
from server.schemas import FaultClass, FaultPublic, FaultState, Page, SiteCode, UTCTime

router = APIRouter(prefix="/faults", tags=["faults"])


@router.get("", response_model=Page[FaultPublic])
async def list_faults(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    fault_class: Annotated[list[FaultClass] | None, Query(alias="class")] = None,
    state: FaultState | None = None,
    site_id: IdQuery = None,
    site: Annotated[SiteCode | None, Query(description="site code")] = None,
    unit_id: IdQuery = None,
    since: Annotated[UTCTime | None, Query(description="opened at or after (ISO-8601)")] = None,
    until: Annotated[UTCTime | None, Query(description="opened before (ISO-8601)")] = None,
) -> Page[Fault]:
    """Faults of the sites the caller may see, newest first. `class` may be repeated."""
    if since is not None and until is not None and since >= until:
        raise InvalidInput("since must be before until")
    stmt = select(Fault).where(visible_sites(user, col(Fault.site_id)))
    if fault_class:
        stmt = stmt.where(col(Fault.fault_class).in_(fault_class))
    if state is not None:
        stmt = stmt.where(Fault.state == state)
    if site_id is not None:
        stmt = stmt.where(Fault.site_id == site_id)
    if site is not None:
        stmt = stmt.join(Site, col(Site.id) == col(Fault.site_id)).where(Site.code == site)
    if unit_id is not None:
        stmt = stmt.where(Fault.unit_id == unit_id)
    if since is not None:
        stmt = stmt.where(col(Fault.opened_at) >= since)
    if until is not None:
        stmt = stmt.where(col(Fault.opened_at) < until)
    rows, total = await paginate(
        session, stmt, page, col(Fault.opened_at).desc(), col(Fault.id).desc()
    )
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/{fault_id}", response_model=FaultPublic)
async def get_fault(session: SessionDep, user: CurrentUser, fault_id: IdPath) -> Fault:
    """One fault with its evidence (404 if not the caller's to see)."""
    return await get_visible(session, user, Fault, fault_id, col(Fault.site_id))
