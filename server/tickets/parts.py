"""Spare parts for class A and B faults (clause 3 (1): the spare-parts guarantee).

A catalogue per product series (`Part`), stock per depot (`PartStock`), and reservations
against a ticket (`PartReservation`). Reserving takes the part from a depot that holds
enough (the stock row is locked, so two engineers cannot both take the last one); when no
depot does, the reservation is a `backorder`, and for an A/B ticket that is a warning on the
timeline and to the escalation chain's lead.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.errors import Conflict, NotFound
from server.sla.outbox import notify_chain
from server.tickets import service
from server.tickets.errors import TicketInputError
from server.tickets.models import Part, PartReservation, PartStock


async def add_part(session: AsyncSession, *, part_no: str, series: str, name: str) -> Part:
    """Add a part to the catalogue of `series`."""
    if (await session.exec(select(Part).where(Part.part_no == part_no))).first() is not None:
        raise Conflict(f"part {part_no!r} exists already")
    part = Part(part_no=part_no, series=series, name=name)
    session.add(part)
    await session.flush()
    return part


async def get_part(session: AsyncSession, part_no: str) -> Part:
    """A part of the catalogue, or NotFound."""
    part = (await session.exec(select(Part).where(Part.part_no == part_no))).first()
    if part is None:
        raise NotFound(f"no part {part_no!r}")
    return part


async def set_stock(session: AsyncSession, *, part_no: str, depot: str,
                    quantity: int) -> PartStock:
    """Set how many of a part a depot holds (a stock count)."""
    if quantity < 0:
        raise TicketInputError("quantity must not be negative")
    part = await get_part(session, part_no)
    row = (await session.exec(select(PartStock).where(
        PartStock.part_id == part.id, PartStock.depot == depot).with_for_update())).first()
    if row is None:
        row = PartStock(part_id=service.require_id(part.id), depot=depot, quantity=quantity)
        session.add(row)
    else:
        row.quantity = quantity
    await session.flush()
    return row


async def reserve(session: AsyncSession, ticket_id: int, *, part_no: str, quantity: int = 1,
                  depot: str | None = None, actor: str | None = None,
                  now: datetime) -> PartReservation:
    """Reserve parts for a ticket from `depot` (or the depot holding most); else backorder."""
    if quantity < 1:
        raise TicketInputError("quantity must be at least 1")
    ticket = await service.get_ticket(session, ticket_id, lock=True)
    part = await get_part(session, part_no)
    part_id = service.require_id(part.id)
    query = (select(PartStock).where(PartStock.part_id == part_id,
                                     PartStock.quantity >= quantity)
             .order_by(col(PartStock.quantity).desc(), col(PartStock.depot)).with_for_update())
    if depot is not None:
        query = query.where(PartStock.depot == depot)
    stock = (await session.exec(query)).first()
    if stock is not None:
        stock.quantity -= quantity
        row = PartReservation(ticket_id=ticket_id, part_id=part_id, depot=stock.depot,
                              quantity=quantity, state="reserved", created_at=now)
        text = f"{quantity} x {part_no} reserved at {stock.depot}"
    else:
        row = PartReservation(ticket_id=ticket_id, part_id=part_id, depot=None,
                              quantity=quantity, state="backorder", created_at=now)
        text = f"{quantity} x {part_no} needed, out of stock" + (f" at {depot}" if depot else "")
    session.add(row)
    await session.flush()
    await service.link(session, ticket_id, "part", part_no, now=now, actor=actor)
    await service.record(session, ticket_id, "part_reserved" if stock else "part_out_of_stock",
                         text, actor=actor, detail={"part": part_no, "quantity": quantity,
                                                    "depot": row.depot,
                                                    "reservation": row.id}, now=now)
    if stock is None and ticket.fault_class in ("A", "B"):
        await notify_chain(session, ticket, level="lead", event="part_out_of_stock",
                           text=f"class {ticket.fault_class} ticket {ticket_id}: {text}",
                           now=now, extra={"part": part_no})
    return row


async def release(session: AsyncSession, reservation_id: int, *, used: bool,
                  actor: str | None = None, now: datetime) -> PartReservation:
    """Close a reservation: `used` (fitted) or returned to its depot's stock."""
    row = (await session.exec(select(PartReservation).where(
        PartReservation.id == reservation_id).with_for_update())).first()
    if row is None:
        raise NotFound(f"no reservation {reservation_id}")
    if row.state not in ("reserved", "backorder"):
        raise Conflict(f"reservation {reservation_id} is {row.state} already")
    if not used and row.depot is not None:
        stock = (await session.exec(select(PartStock).where(
            PartStock.part_id == row.part_id, PartStock.depot == row.depot).with_for_update())
        ).first()
        if stock is not None:
            stock.quantity += row.quantity
    row.state = "used" if used else "released"
    await service.record(session, row.ticket_id, f"part_{row.state}", actor=actor,
                         detail={"reservation": row.id}, now=now)
    return row
