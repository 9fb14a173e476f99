"""`/api/v1/units`: EMU units as their agents report them; read-only, scoped by site."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import col, select

from server.api.deps import CurrentUser, IdPath, IdQuery, PageDep, SessionDep, get_visible, paginate
from server.core.security import visible_sites
from server.models import Site, Unit
from server.schemas import Page, SiteCode, UnitPublic

router = APIRouter(prefix="/units", tags=["units"])


@router.get("", response_model=Page[UnitPublic])
async def list_units(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    site_id: IdQuery = None,
    site: Annotated[SiteCode | None, Query(description="site code")] = None,
    comm_lost: bool | None = None,
) -> Page[Unit]:
    """Units of the sites the caller may see, optionally of one site."""
    stmt = select(Unit).where(visible_sites(user, col(Unit.site_id)))
    if site_id is not None:
        stmt = stmt.where(Unit.site_id == site_id)
    if site is not None:
        stmt = stmt.join(Site, col(Site.id) == col(Unit.site_id)).where(Site.code == site)
    if comm_lost is not None:
        stmt = stmt.where(Unit.comm_lost == comm_lost)
    rows, total = await paginate(session, stmt, page, col(Unit.id))
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/{unit_id}", response_model=UnitPublic)
async def get_unit(session: SessionDep, user: CurrentUser, unit_id: IdPath) -> Unit:
    """One unit (404 if not the caller's to see)."""
    return await get_visible(session, user, Unit, unit_id, col(Unit.site_id))
