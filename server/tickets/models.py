"""Ticket tables: a service request, its timeline and what it links to.

A `Ticket` is the service request of clause 1 (from a fault, a phone call, the customer portal
or an upgrade request); `TicketEvent` is its timeline (every state change, comment, call,
diagnosis, SLA warning and breach); `TicketLink` ties it to faults, remote sessions, releases,
spare parts, upgrade plans and commissioning, each link with a small `state` of its own (a
release link becomes `installed`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from server.models import JSONType, UTCDateTime, utcnow


class Ticket(SQLModel, table=True):
    """A service request; `fault_class` A-D drives its SLA clocks (None: not yet classed)."""

    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    org_id: int = Field(foreign_key="organisation.id", index=True)
    source: str = Field(max_length=20)
    fault_class: str | None = Field(default=None, max_length=1, index=True)
    title: str = Field(max_length=200)
    description: str = Field(default="", sa_type=sa.Text)
    state: str = Field(default="new", max_length=24, index=True)
    assignee: str | None = Field(default=None, max_length=100)
    diagnosis: str | None = Field(default=None, sa_type=sa.Text)
    proposed_solution: str | None = Field(default=None, sa_type=sa.Text)
    unit_ids: list[int] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    created_by: str | None = Field(default=None, max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    acknowledged_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    resolved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    closed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class TicketEvent(SQLModel, table=True):
    """One entry of a ticket's timeline."""

    __tablename__ = "ticket_event"

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    ts: datetime = Field(sa_type=UTCDateTime)
    kind: str = Field(max_length=32)
    text: str = Field(default="", sa_type=sa.Text)
    actor: str | None = Field(default=None, max_length=100)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))


class TicketLink(SQLModel, table=True):
    """A ticket's tie to a fault, session, release, part, plan or commissioning (by `ref`)."""

    __tablename__ = "ticket_link"
    __table_args__ = (sa.UniqueConstraint("ticket_id", "kind", "ref"),)

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    kind: str = Field(max_length=20, index=True)
    ref: str = Field(max_length=128, index=True)
    state: str | None = Field(default=None, max_length=20)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Part(SQLModel, table=True):
    """A spare part of the catalogue, per product series (clause 3.1 spare-parts guarantee)."""

    id: int | None = Field(default=None, primary_key=True)
    part_no: str = Field(max_length=64, unique=True)
    series: str = Field(max_length=32, index=True)
    name: str = Field(max_length=200)


class PartStock(SQLModel, table=True):
    """How many of a part one depot holds (reservations already taken off)."""

    __tablename__ = "part_stock"
    __table_args__ = (sa.UniqueConstraint("part_id", "depot"),)

    id: int | None = Field(default=None, primary_key=True)
    part_id: int = Field(foreign_key="part.id", index=True)
    depot: str = Field(max_length=64)
    quantity: int = 0


class PartReservation(SQLModel, table=True):
    """Parts set aside for a ticket; `depot` None means needed but none was in stock."""

    __tablename__ = "part_reservation"

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    part_id: int = Field(foreign_key="part.id", index=True)
    depot: str | None = Field(default=None, max_length=64)
    quantity: int = 1
    state: str = Field(default="reserved", max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
