"""Commissioning tables: plans, their written documents, remote runs and on-site results.

A `CommissioningPlan` moves draft -> issued -> scheduled -> in_progress -> completed (see
states.py); each issue stores a new `CommissioningDocument` (kind `plan`, version n) and each
change of results a new report document (kind `report`), so what the customer was shown is
kept. `CommissioningRun` is one `commissioning.check` sent to the site's agent and its answer;
`OnsiteResult` is one check a technician recorded for one unit (by serial).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from server.models import JSONType, UTCDateTime, utcnow


class CommissioningPlan(SQLModel, table=True):
    """What will be commissioned where, when, by whom, and against which checklist."""

    __tablename__ = "commissioning_plan"

    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    title: str = Field(max_length=200)
    mode: str = Field(max_length=10)
    state: str = Field(default="draft", max_length=16, index=True)
    version: int = 0
    visits: int = 1
    starts_on: date | None = None
    ends_on: date | None = None
    technicians: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    equipment: list[dict[str, Any]] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    targets: list[dict[str, Any]] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    checklist: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    notes: str = Field(default="", sa_type=sa.Text)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    created_by: str | None = Field(default=None, max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    issued_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    issued_by: str | None = Field(default=None, max_length=100)
    acknowledged_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    acknowledged_by: str | None = Field(default=None, max_length=100)
    completed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class CommissioningDocument(SQLModel, table=True):
    """A written plan or report as it was issued: HTML, PDF and (reports) the JSON."""

    __tablename__ = "commissioning_document"
    __table_args__ = (sa.UniqueConstraint("plan_id", "kind", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="commissioning_plan.id", index=True)
    kind: str = Field(max_length=10)
    version: int
    title: str = Field(max_length=200)
    html: str = Field(sa_type=sa.Text)
    pdf: bytes = Field(sa_type=sa.LargeBinary)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CommissioningRun(SQLModel, table=True):
    """One remote check of a plan's site through its agent, and the agent's answer."""

    __tablename__ = "commissioning_run"

    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="commissioning_plan.id", index=True)
    state: str = Field(default="sent", max_length=12)
    command_id: str | None = Field(default=None, max_length=64, index=True)
    requested_by: str | None = Field(default=None, max_length=100)
    requested_at: datetime = Field(sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    progress: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    outcome: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(JSONType))
    error: str | None = Field(default=None, sa_type=sa.Text)


class OnsiteResult(SQLModel, table=True):
    """One check of one unit (by serial) recorded by a technician on site; latest wins."""

    __tablename__ = "commissioning_onsite_result"

    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="commissioning_plan.id", index=True)
    serial: str = Field(max_length=64)
    series: str | None = Field(default=None, max_length=32)
    check: str = Field(max_length=64)
    passed: bool
    detail: str = Field(default="", sa_type=sa.Text)
    evidence: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    technician: str = Field(max_length=100)
    recorded_at: datetime = Field(sa_type=UTCDateTime)
