"""Tables of the upgrade service: release packages, written plans, their documents, rollouts.

    ReleasePackage   one uploaded, verified package (full image or delta), file on disk
    UpgradePlan      release + targets + impact/risk/rollback + windows + personnel + state
    PlanDocument     each issued version of the written plan (HTML and PDF), kept
    RolloutTarget    one unit of a plan: its wave and what became of it (unique per unit)
    SiteCheckin      the customer's on-site personnel reporting present before a site starts
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from server.models import JSONType, UTCDateTime, utcnow


class ReleasePackage(SQLModel, table=True):
    """A package the server accepted: signature and hash checked, payload stored on disk."""

    __tablename__ = "release_package"
    __table_args__ = (sa.UniqueConstraint("series", "version", "kind", "base_version"),)

    id: int | None = Field(default=None, primary_key=True)
    series: str = Field(max_length=16, index=True)
    version: str = Field(max_length=16)
    kind: str = Field(default="full", max_length=8)
    base_version: str = Field(default="", max_length=16, description="delta only; '' for full")
    sha256: str = Field(max_length=64)
    size: int = Field(sa_type=sa.BigInteger)
    image_sha256: str = Field(max_length=64)
    minimum_version: str | None = Field(default=None, max_length=16)
    manifest: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    signature: str = Field(max_length=128, description="base64 Ed25519 over the manifest")
    notes: str = Field(default="", sa_type=sa.Text)
    path: str = Field(max_length=500, description="payload file, relative to the releases dir")
    uploaded_by: str | None = Field(default=None, max_length=100)
    uploaded_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class UpgradePlan(SQLModel, table=True):
    """A written upgrade plan and the state of its rollout."""

    __tablename__ = "upgrade_plan"

    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(max_length=200)
    org_id: int = Field(foreign_key="organisation.id", index=True)
    release_id: int = Field(foreign_key="release_package.id", index=True)
    rollback: bool = False
    state: str = Field(default="draft", max_length=16, index=True)
    series: str = Field(max_length=16)
    from_versions: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    site_ids: list[int] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    impact: str = Field(default="", sa_type=sa.Text)
    risk: str = Field(default="low", max_length=16)
    risk_notes: str = Field(default="", sa_type=sa.Text)
    rollback_plan: str = Field(default="", sa_type=sa.Text)
    windows: list[dict[str, str]] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    personnel_required: str = Field(default="", sa_type=sa.Text)
    canary: int = 1
    wave_percentages: list[int] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    success_threshold: float = 1.0
    failure_threshold: int = 1
    concurrency_per_site: int = 1
    concurrency_total: int = 10
    checkin_required: bool = False
    settle_s: float = 30.0
    limits: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    requested_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ticket_id: int | None = None
    document_version: int = 0
    confirmed_window: dict[str, str] | None = Field(default=None, sa_column=sa.Column(JSONType))
    confirmed_personnel: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONType))
    confirmed_by: str | None = Field(default=None, max_length=200)
    confirmed_user_id: int | None = Field(default=None, foreign_key="user.id")
    confirmed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    scheduled_by: str | None = Field(default=None, max_length=100)
    scheduled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    paused: bool = False
    halted_reason: str | None = Field(default=None, sa_type=sa.Text)
    created_by: str | None = Field(default=None, max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class PlanDocument(SQLModel, table=True):
    """One issued version of a written plan: what the customer read and confirmed."""

    __tablename__ = "plan_document"
    __table_args__ = (sa.UniqueConstraint("plan_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="upgrade_plan.id", index=True)
    version: int
    title: str = Field(default="", max_length=300)
    html: str = Field(sa_type=sa.Text)
    pdf: bytes = Field(sa_type=sa.LargeBinary)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RolloutTarget(SQLModel, table=True):
    """One unit of a plan; the unique (plan, unit) row is what keeps an install single."""

    __tablename__ = "rollout_target"
    __table_args__ = (sa.UniqueConstraint("plan_id", "unit_id"),)

    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="upgrade_plan.id", index=True)
    unit_id: int = Field(foreign_key="unit.id", index=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    device: str = Field(max_length=64)
    wave: int = 0
    state: str = Field(default="pending", max_length=16, index=True)
    from_version: str | None = Field(default=None, max_length=16)
    to_version: str = Field(max_length=16)
    command_id: str | None = Field(default=None, max_length=36, index=True)
    stage: str | None = Field(default=None, max_length=32)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    dispatched_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SiteCheckin(SQLModel, table=True):
    """The customer's personnel are on site for this plan (recorded before the site starts)."""

    __tablename__ = "site_checkin"
    __table_args__ = (sa.UniqueConstraint("plan_id", "site_id"),)

    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="upgrade_plan.id", index=True)
    site_id: int = Field(foreign_key="site.id")
    name: str = Field(max_length=200)
    user_id: int | None = Field(default=None, foreign_key="user.id")
    at: datetime = Field(sa_type=UTCDateTime)
