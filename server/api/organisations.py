"""`/api/v1/organisations`: customers (and the vendor). Admins manage them; others read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlmodel import col, func, select

from server.api.deps import AdminUser, CurrentUser, IdPath, PageDep, SessionDep, paginate
from server.core.security import visible_orgs
from server.errors import Conflict, NotFound
from server.models import Organisation, Site, User
from server.schemas import (
    Name,
    OrganisationCreate,
    OrganisationPublic,
    OrganisationUpdate,
    OrgKind,
    Page,
)

router = APIRouter(prefix="/organisations", tags=["organisations"])


async def _get(session: SessionDep, user: CurrentUser, org_id: int) -> Organisation:
    org = (
        await session.exec(
            select(Organisation)
            .where(col(Organisation.id) == org_id)
            .where(visible_orgs(user, col(Organisation.id)))
        )
    ).first()
    if org is None:
        raise NotFound(f"organisation {org_id} not found")
    return org


async def _name_free(session: SessionDep, name: str, org_id: int | None = None) -> None:
    other = (await session.exec(select(Organisation).where(Organisation.name == name))).first()
    if other is not None and other.id != org_id:
        raise Conflict(f"an organisation named {name!r} exists already")


@router.get("", response_model=Page[OrganisationPublic])
async def list_organisations(
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    kind: OrgKind | None = None,
    name: Annotated[Name | None, Query(description="exact name")] = None,
) -> Page[Organisation]:
    """Organisations the caller may see (a customer: its own)."""
    stmt = select(Organisation).where(visible_orgs(user, col(Organisation.id)))
    if kind is not None:
        stmt = stmt.where(Organisation.kind == kind)
    if name is not None:
        stmt = stmt.where(Organisation.name == name)
    rows, total = await paginate(session, stmt, page, col(Organisation.id))
    return Page(data=rows, count=total, limit=page.limit, offset=page.offset)


@router.get("/{org_id}", response_model=OrganisationPublic)
async def get_organisation(session: SessionDep, user: CurrentUser, org_id: IdPath) -> Organisation:
    """One organisation (404 if it is not the caller's to see)."""
    return await _get(session, user, org_id)


@router.post("", response_model=OrganisationPublic, status_code=201)
async def create_organisation(
    session: SessionDep, _admin: AdminUser, body: OrganisationCreate
) -> Organisation:
    """Create an organisation (admin)."""
    await _name_free(session, body.name)
    org = Organisation.model_validate(body)
    session.add(org)
    await session.commit()
    return org


@router.patch("/{org_id}", response_model=OrganisationPublic)
async def update_organisation(
    session: SessionDep, admin: AdminUser, org_id: IdPath, body: OrganisationUpdate
) -> Organisation:
    """Rename or re-kind an organisation (admin)."""
    org = await _get(session, admin, org_id)
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if "name" in changes:
        await _name_free(session, changes["name"], org_id)
    org.sqlmodel_update(changes)
    session.add(org)
    await session.commit()
    return org


@router.delete("/{org_id}", status_code=204)
async def delete_organisation(session: SessionDep, admin: AdminUser, org_id: IdPath) -> Response:
    """Delete an organisation that has no sites and no users any more (admin)."""
    org = await _get(session, admin, org_id)
    sites = (await session.exec(
        select(func.count()).select_from(Site).where(Site.org_id == org_id))).one()
    users = (await session.exec(
        select(func.count()).select_from(User).where(User.org_id == org_id))).one()
    if sites or users:
        raise Conflict(f"organisation {org_id} still has {sites} site(s) and {users} user(s)")
    await session.delete(org)
    await session.commit()
    return Response(status_code=204)
