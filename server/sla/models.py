"""SLA tables: clocks per ticket, their due timers, the notification outbox, contracts.

Everything the SLA engine needs to survive a restart lives here, not in memory: a `SlaClock`
knows how much of its target it has used and since when it runs; each of its `SlaTimer` rows
(warning, breach, escalation) holds the UTC instant it falls due and whether it has fired;
a fired timer writes `SlaNotification` rows (one per recipient and channel) in the same
transaction, and a sender claims those. Rows are claimed with `FOR UPDATE SKIP LOCKED` on
PostgreSQL, so with several server processes each fires and each is sent once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from server.models import JSONType, UTCDateTime, utcnow


class SlaClock(SQLModel, table=True):
    """One clock of one ticket (response, processing, resolution or delivery).

    `consumed_s` is calendar time used before `running_since`; a running clock has
    `running_since` set, a paused one has `paused_for` reasons, a stopped one `stopped_at`.
    """

    __tablename__ = "sla_clock"

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    kind: str = Field(max_length=16)
    target_s: float
    warn_fraction: float = 0.75
    escalate_fraction: float | None = None
    calendar: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    started_at: datetime = Field(sa_type=UTCDateTime)
    consumed_s: float = 0.0
    running_since: datetime | None = Field(default=None, sa_type=UTCDateTime)
    paused_for: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    due_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    stopped_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    outcome: str | None = Field(default=None, max_length=16)
    warned_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    breached_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SlaTimer(SQLModel, table=True):
    """A due row: `kind` (warning, breach, escalation) of one clock fires once at `due_at`."""

    __tablename__ = "sla_timer"
    __table_args__ = (
        sa.UniqueConstraint("clock_id", "kind"),
        sa.Index("ix_sla_timer_due", "fired_at", "due_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    clock_id: int = Field(foreign_key="sla_clock.id", index=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    kind: str = Field(max_length=16)
    due_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    fired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SlaNotification(SQLModel, table=True):
    """The outbox: one message to one recipient on one channel (webhook or email)."""

    __tablename__ = "sla_notification"
    __table_args__ = (sa.Index("ix_sla_notification_pending", "sent_at", "next_try_at"),)

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    timer_id: int | None = Field(default=None, foreign_key="sla_timer.id", index=True)
    channel: str = Field(max_length=10)
    recipient: str = Field(max_length=300)
    level: str = Field(max_length=20)
    subject: str = Field(max_length=300)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    next_try_at: datetime = Field(sa_type=UTCDateTime)
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    attempts: int = 0
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, max_length=500)


class SlaContract(SQLModel, table=True):
    """An organisation's contract terms over the defaults (targets, calendar, chain)."""

    __tablename__ = "sla_contract"

    id: int | None = Field(default=None, primary_key=True)
    org_id: int = Field(foreign_key="organisation.id", unique=True)
    terms: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
