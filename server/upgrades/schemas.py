"""Request and response bodies of `/releases`, `/plans` and `/rollouts`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.schemas import MAX_ID, Plain

Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Text = Annotated[Plain, Field(max_length=20_000)]
Name = Annotated[Plain, Field(min_length=1, max_length=200)]
Version = Annotated[str, Field(pattern=r"^\d+(\.\d+){0,3}$", max_length=16)]


class Window(BaseModel):
    """A site-local window: ISO-8601 wall times without an offset (`2026-05-02T01:00`)."""

    model_config = ConfigDict(extra="forbid")

    start: Annotated[Plain, Field(max_length=32)]
    end: Annotated[Plain, Field(max_length=32)]


class Limits(BaseModel):
    """Pre-check limits (defaults: SOC 20-95 %, |P| <= 90 kW)."""

    model_config = ConfigDict(extra="forbid")

    soc_min: Annotated[float, Field(ge=0, le=100)] = 20.0
    soc_max: Annotated[float, Field(ge=0, le=100)] = 95.0
    max_power_w: Annotated[float, Field(gt=0)] = 90_000.0


class PlanFields(BaseModel):
    """What a release manager may write or change in a draft plan."""

    model_config = ConfigDict(extra="forbid")

    title: Name
    release_id: Id
    site_ids: Annotated[list[Id], Field(min_length=1, max_length=1000)]
    from_versions: Annotated[list[Version], Field(max_length=50)] = []
    rollback: bool = False
    impact: Text = ""
    risk: Literal["low", "medium", "high"] = "low"
    risk_notes: Text = ""
    rollback_plan: Text = ""
    windows: Annotated[list[Window], Field(max_length=20)] = []
    personnel_required: Text = ""
    canary: Annotated[int, Field(ge=0, le=100)] = 1
    wave_percentages: Annotated[list[Annotated[int, Field(ge=1, le=100)]],
                                Field(min_length=1, max_length=20)] = [50, 100]
    success_threshold: Annotated[float, Field(ge=0, le=1)] = 1.0
    failure_threshold: Annotated[int, Field(ge=1, le=100_000)] = 1
    concurrency_per_site: Annotated[int, Field(ge=1, le=1000)] = 1
    concurrency_total: Annotated[int, Field(ge=1, le=100_000)] = 10
    checkin_required: bool = False
    settle_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    limits: Limits = Limits()
    requested_at: datetime | None = Field(default=None, description="the upgrade request "
                                          "(30-day clock); default now")
    ticket_id: Id | None = None


class Confirmation(BaseModel):
    """The customer's confirmation: one of the proposed windows, personnel, signature."""

    model_config = ConfigDict(extra="forbid")

    window: Annotated[int, Field(ge=0, le=19, description="index into the plan's windows")]
    personnel: Annotated[list[Name], Field(min_length=1, max_length=20)]
    signature: Annotated[Name, Field(description="the signer's full name")]


class Checkin(BaseModel):
    """The customer's personnel are on site."""

    model_config = ConfigDict(extra="forbid")

    site_id: Id
    name: Name


class Reason(BaseModel):
    """Why (for abort)."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[Plain, Field(max_length=2000)] = ""


class ReleasePublic(BaseModel):
    """An accepted package."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    series: str
    version: str
    kind: str
    base_version: str
    sha256: str
    size: int
    minimum_version: str | None
    notes: str
    manifest: dict[str, Any]
    uploaded_by: str | None
    uploaded_at: datetime


class TargetPublic(BaseModel):
    """One unit of a rollout, live."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    unit_id: int
    site_id: int
    device: str
    wave: int
    state: str
    stage: str | None
    from_version: str | None
    to_version: str
    detail: dict[str, Any]
    dispatched_at: datetime | None
    finished_at: datetime | None


class PlanPublic(BaseModel):
    """A plan with its state, delivery clock and rollout counts."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    org_id: int
    release_id: int
    rollback: bool
    state: str
    series: str
    from_versions: list[str]
    site_ids: list[int]
    impact: str
    risk: str
    risk_notes: str
    rollback_plan: str
    windows: list[dict[str, str]]
    personnel_required: str
    canary: int
    wave_percentages: list[int]
    success_threshold: float
    failure_threshold: int
    concurrency_per_site: int
    concurrency_total: int
    checkin_required: bool
    settle_s: float
    limits: dict[str, Any]
    requested_at: datetime
    ticket_id: int | None
    document_version: int
    confirmed_window: dict[str, str] | None
    confirmed_personnel: list[str]
    confirmed_by: str | None
    confirmed_at: datetime | None
    scheduled_by: str | None
    scheduled_at: datetime | None
    paused: bool
    halted_reason: str | None
    created_by: str | None
    created_at: datetime
    finished_at: datetime | None
    delivery: dict[str, Any] = {}
    counts: dict[str, int] = {}


class DocumentPublic(BaseModel):
    """One issued version of the written plan (the HTML and PDF are separate downloads)."""

    model_config = ConfigDict(from_attributes=True)

    plan_id: int
    version: int
    title: str
    created_at: datetime
