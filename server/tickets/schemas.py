"""API shapes of tickets, their timeline, links, clocks, spare parts and SLA reports."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.schemas import FaultClass, Id, Plain, Policy

Source = Literal["phone", "portal", "upgrade_request"]
State = Literal["new", "acknowledged", "in_progress", "waiting_on_customer", "awaiting_release",
                "resolved", "closed"]
LinkKind = Literal["fault", "session", "release", "part", "plan", "commissioning"]
PauseReason = Literal["consent", "window", "personnel"]
Outcome = Literal["solved", "needs_remote_support", "follow_up"]
ClockKind = Literal["response", "processing", "resolution", "delivery"]

Text = Field(default="", max_length=20000)
_STRICT = ConfigDict(extra="forbid")
PART_NO = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A part number: letters, digits, dot, dash, underscore; 64 at most."""


class TicketPublic(BaseModel):
    """A ticket as lists show it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    site_id: int
    org_id: int
    source: str
    fault_class: str | None
    title: str
    description: str
    state: str
    assignee: str | None
    diagnosis: str | None
    proposed_solution: str | None
    unit_ids: list[int]
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    closed_at: datetime | None


class EventPublic(BaseModel):
    """One timeline entry."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    ts: datetime
    kind: str
    text: str
    actor: str | None
    detail: dict[str, Any]


class LinkPublic(BaseModel):
    """A link to a fault, session, release, part, plan or commissioning."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    ref: str
    state: str | None
    created_at: datetime


class ClockPublic(BaseModel):
    """An SLA clock: target, due time (None while paused or stopped), outcome."""

    model_config = ConfigDict(from_attributes=True)

    kind: str
    target_s: float
    calendar: dict[str, Any]
    started_at: datetime
    consumed_s: float
    paused_for: list[str]
    due_at: datetime | None
    stopped_at: datetime | None
    outcome: str | None
    warned_at: datetime | None
    breached_at: datetime | None


class ReservationPublic(BaseModel):
    """Parts reserved (or back-ordered) for a ticket."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    part_id: int
    depot: str | None
    quantity: int
    state: str
    created_at: datetime


class TicketDetail(TicketPublic):
    """A ticket with its timeline, links, clocks and parts."""

    events: list[EventPublic]
    links: list[LinkPublic]
    clocks: list[ClockPublic]
    parts: list[ReservationPublic]


class TicketCreate(BaseModel):
    """A service request by phone (engineer) or through the customer portal."""

    model_config = _STRICT

    site_id: Id
    title: Plain = Field(min_length=1, max_length=200)
    description: Plain = Text
    source: Source = "portal"
    fault_class: FaultClass | None = None
    unit_ids: list[Id] = Field(default_factory=list, max_length=100)


class CommentCreate(BaseModel):
    """A comment on the timeline."""

    model_config = _STRICT

    text: Plain = Field(default="", max_length=20000)


class TransitionRequest(BaseModel):
    """Move the ticket's state."""

    model_config = _STRICT

    state: State
    note: Plain = Text


class AssignRequest(BaseModel):
    """Give the ticket to an engineer (None: unassign)."""

    model_config = _STRICT

    assignee: Plain | None = Field(default=None, max_length=100)


class ClassRequest(BaseModel):
    """Set or change the fault class."""

    model_config = _STRICT

    fault_class: FaultClass


class DiagnosisRequest(BaseModel):
    """Clause 1: the remote diagnosis and the proposed solution."""

    model_config = _STRICT

    diagnosis: Plain = Field(min_length=1, max_length=20000)
    proposed_solution: Plain = Field(min_length=1, max_length=20000)


class PhoneRequest(BaseModel):
    """A telephone-support call and its outcome."""

    model_config = _STRICT

    notes: Plain = Field(min_length=1, max_length=20000)
    outcome: Outcome


class LinkCreate(BaseModel):
    """Tie the ticket to something by reference."""

    model_config = _STRICT

    kind: LinkKind
    ref: Plain = Field(min_length=1, max_length=128)
    state: Plain | None = Field(default=None, max_length=20)


class PauseRequest(BaseModel):
    """Why the clocks stop (or may run again)."""

    model_config = _STRICT

    reason: PauseReason


class BreachCause(BaseModel):
    """The engineer's account of why a clock ran out (shown in the report)."""

    model_config = _STRICT

    clock: ClockKind
    cause: Plain = Field(min_length=1, max_length=2000)


class PartCreate(BaseModel):
    """A catalogue entry."""

    model_config = _STRICT

    part_no: str = Field(pattern=PART_NO)
    series: Plain = Field(min_length=1, max_length=32)
    name: Plain = Field(min_length=1, max_length=200)


class StockSet(BaseModel):
    """A stock count at one depot."""

    model_config = _STRICT

    depot: Plain = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=0, le=1_000_000)


class ReserveRequest(BaseModel):
    """Parts a ticket needs."""

    model_config = _STRICT

    part_no: Plain = Field(min_length=1, max_length=64)
    quantity: int = Field(default=1, ge=1, le=10000)
    depot: Plain | None = Field(default=None, max_length=64)


class PartPublic(BaseModel):
    """A part with its stock per depot."""

    id: int
    part_no: str
    series: str
    name: str
    stock: dict[str, int]


class ContractTerms(BaseModel):
    """An organisation's SLA terms over the defaults (see SlaTerms)."""

    model_config = _STRICT

    terms: Policy
