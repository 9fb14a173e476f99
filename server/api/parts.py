"""`/api/v1/parts`: the spare-parts catalogue per series and stock per depot."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from sqlmodel import col, select

from server.api.deps import AdminUser, SessionDep, StaffUser
from server.schemas import Plain
from server.tickets import parts
from server.tickets.models import Part, PartStock
from server.tickets.schemas import PART_NO, PartCreate, PartPublic, StockSet
from server.tickets.service import require_id

router = APIRouter(prefix="/parts", tags=["parts"])

PartNo = Annotated[str, Path(pattern=PART_NO)]


async def _public(session: SessionDep, rows: list[Part]) -> list[PartPublic]:
    ids = [p.id for p in rows]
    stock: dict[int, dict[str, int]] = defaultdict(dict)
    if ids:
        for s in (await session.exec(select(PartStock).where(col(PartStock.part_id).in_(ids))
                                     .order_by(col(PartStock.depot)))).all():
            stock[s.part_id][s.depot] = s.quantity
    return [PartPublic(id=require_id(p.id), part_no=p.part_no, series=p.series,
                       name=p.name, stock=stock[require_id(p.id)]) for p in rows]


@router.get("", response_model=list[PartPublic])
async def list_parts(session: SessionDep, _user: StaffUser,
                     series: Annotated[Plain | None, Query(max_length=32)] = None
                     ) -> list[PartPublic]:
    """The catalogue (of one series) with stock per depot."""
    stmt = select(Part).order_by(col(Part.series), col(Part.part_no))
    if series is not None:
        stmt = stmt.where(Part.series == series)
    return await _public(session, list((await session.exec(stmt)).all()))


@router.post("", response_model=PartPublic, status_code=201)
async def create_part(session: SessionDep, _admin: AdminUser, body: PartCreate) -> PartPublic:
    """Add a part to a series' catalogue (admin)."""
    part = await parts.add_part(session, part_no=body.part_no, series=body.series,
                                name=body.name)
    await session.commit()
    return (await _public(session, [part]))[0]


async def existing_part(session: SessionDep, part_no: PartNo) -> Part:
    """The part of the path (404 before any body is read)."""
    return await parts.get_part(session, part_no)


@router.put("/{part_no}/stock", response_model=PartPublic)
async def set_stock(session: SessionDep, _admin: AdminUser,
                    part: Annotated[Part, Depends(existing_part)], body: StockSet) -> PartPublic:
    """Record a stock count at a depot (admin); a new depot starts with this count."""
    await parts.set_stock(session, part_no=part.part_no, depot=body.depot,
                          quantity=body.quantity)
    await session.commit()
    return (await _public(session, [part]))[0]
