"""`/api/v1/sites`: customer sites. Admins register and change them; everyone reads, scoped."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import col, select

from server.api.deps import (
    AdminUser,
    CurrentUser,
    IdPath,
    IdQuery,
    PageDep,
    SessionDep,
    get_visible,
    paginate,
)
from server.core.security import visible_sites
from server.errors import Conflict, InvalidInput
from server.models import Organisation, Site
from server.schemas import Page, SiteCode, SiteCreate, SitePublic, SiteUpdate

router = APIRouter(prefix="/sites", tags=["sites"])


async def _org_exists(session: SessionDep, org_id: int) -> None:
    if await session.get(Organisation, org_id) is None:
        raise InvalidInput(f"organisation {org_id} does not exist")


@router.get("", response_model=Page[SitePublic])
async def list_sites(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    org_id: IdQuery = None,
    code: Annotated[SiteCode | None, Query(description="exact site code")] = None,
) -> Page[Site]:
    """Sites the caller may see, by id."""
    stmt = select(Site).where(visible_sites(user, col(Site.id)))
    if org_id is not None:
        stmt = stmt.where(Site.org_id == org_id)
    if code is not None:
        stmt = stmt.where(Site.code == code)
    rows, total = await paginate(session, stmt, page, col(Site.id))
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/{site_id}", response_model=SitePublic)
async def get_site(session: SessionDep, user: CurrentUser, site_id: IdPath) -> Site:
    """One site (404 if it is not the caller's to see)."""
    return await get_visible(session, user, Site, site_id, col(Site.id))


@router.post("", response_model=SitePublic, status_code=201)
async def create_site(session: SessionDep, _admin: AdminUser, body: SiteCreate) -> Site:
    """Register a site (admin); its code is the id its agent publishes under."""
    await _org_exists(session, body.org_id)
    if (await session.exec(select(Site).where(Site.code == body.code))).first() is not None:
        raise Conflict(f"a site with code {body.code!r} exists already")
    site = Site.model_validate(body)
    session.add(site)
    await session.commit()
    return site


@router.patch("/{site_id}", response_model=SitePublic)
async def update_site(
    session: SessionDep, admin: AdminUser, site_id: IdPath, body: SiteUpdate
) -> Site:
    """Change a site's name, owner, time zone or policy (admin)."""
    site = await get_visible(session, admin, Site, site_id, col(Site.id))
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if "org_id" in changes:
        await _org_exists(session, changes["org_id"])
    site.sqlmodel_update(changes)
    session.add(site)
    await session.commit()
    return site
