"""The server's tables (SQLModel). Schema changes go through Alembic (`server/alembic/`).

Fleet: organisations own sites; a site has agents and units. Telemetry is stored per
*series* (one unit's one point) so that the big table is narrow: (series, ts, value, text,
quality), keyed by (series_id, ts), which is also the index for time-range queries.
Rollups hold min/max/sum/count per series and bucket. `IngestedBatch` makes ingest
idempotent: a batch's (agent, stream, seq) is inserted first and a duplicate is skipped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores them naive, in UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """Store UTC; refuse naive datetimes (they are a bug upstream)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        """Always hand back aware UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """Default for created/updated columns."""
    return datetime.now(UTC)


class Organisation(SQLModel, table=True):
    """A customer (or the vendor itself)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=200)
    kind: str = Field(default="customer", max_length=20)


class Site(SQLModel, table=True):
    """A customer site; `code` is the site id in MQTT topics."""

    id: int | None = Field(default=None, primary_key=True)
    code: str = Field(index=True, unique=True, max_length=64)
    name: str = Field(max_length=200)
    org_id: int = Field(foreign_key="organisation.id", index=True)
    timezone: str = Field(default="UTC", max_length=64)
    policy: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))
    latitude: float | None = None
    longitude: float | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Agent(SQLModel, table=True):
    """A site gateway's agent: its broker identity and last reported state."""

    id: int | None = Field(default=None, primary_key=True)
    agent_id: str = Field(index=True, unique=True, max_length=64)
    site_id: int = Field(foreign_key="site.id", index=True)
    mqtt_username: str | None = Field(default=None, unique=True, max_length=64)
    mqtt_password_hash: str | None = Field(default=None, max_length=200)
    enrolment_token_hash: str | None = Field(default=None, max_length=128)
    enrolment_expires: datetime | None = Field(default=None, sa_type=UTCDateTime)
    enrolled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    online: bool = False
    version: str | None = Field(default=None, max_length=64)
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)
    health: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))


class Unit(SQLModel, table=True):
    """An EMU unit as its agent names it (`device`), with what it says about itself."""

    __table_args__ = (sa.UniqueConstraint("site_id", "device"),)

    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    device: str = Field(max_length=64)
    series: str | None = Field(default=None, max_length=32)
    model: str | None = Field(default=None, max_length=64)
    serial: str | None = Field(default=None, max_length=64)
    firmware: str | None = Field(default=None, max_length=32)
    comm_lost: bool = False
    first_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Series(SQLModel, table=True):
    """One point of one unit: the key of its telemetry rows."""

    __table_args__ = (sa.UniqueConstraint("unit_id", "point"),)

    id: int | None = Field(default=None, primary_key=True)
    unit_id: int = Field(foreign_key="unit.id", index=True)
    point: str = Field(max_length=96)


class Telemetry(SQLModel, table=True):
    """One reading. Narrow on purpose: this is the big table."""

    series_id: int = Field(primary_key=True)
    ts: datetime = Field(sa_column=sa.Column(UTCDateTime(), primary_key=True))
    value: float | None = None
    text: str | None = Field(default=None, max_length=200)
    quality: int = Field(default=0, sa_type=sa.SmallInteger)


class Rollup(SQLModel, table=True):
    """Aggregates of one series per bucket; `width_s` 60 (1 min) or 3600 (1 h)."""

    series_id: int = Field(primary_key=True)
    width_s: int = Field(primary_key=True)
    bucket: datetime = Field(sa_column=sa.Column(UTCDateTime(), primary_key=True))
    min: float
    max: float
    sum: float
    count: int


class IngestedBatch(SQLModel, table=True):
    """A batch already stored: (agent, stream, seq) seen once."""

    agent: str = Field(primary_key=True, max_length=64)
    stream: str = Field(primary_key=True, max_length=16)
    seq: int = Field(primary_key=True, sa_type=sa.BigInteger)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    points: int = 0


class Event(SQLModel, table=True):
    """An event an agent reported (alarm edges, comm loss, jobs)."""

    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    unit_id: int | None = Field(default=None, foreign_key="unit.id", index=True)
    ts: datetime = Field(sa_type=UTCDateTime)
    kind: str = Field(max_length=32)
    code: str | None = Field(default=None, max_length=64)
    severity: str = Field(default="info", max_length=16)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))


class Fault(SQLModel, table=True):
    """A classified fault of one unit; at most one open per (unit, code)."""

    __table_args__ = (
        sa.Index(
            "ux_fault_open", "unit_id", "code", unique=True,
            sqlite_where=sa.text("state = 'open'"), postgresql_where=sa.text("state = 'open'"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    unit_id: int = Field(foreign_key="unit.id", index=True)
    code: str = Field(max_length=64)
    fault_class: str = Field(max_length=1, index=True)
    title: str = Field(max_length=200)
    state: str = Field(default="open", max_length=16, index=True)
    opened_at: datetime = Field(sa_type=UTCDateTime)
    last_seen_at: datetime = Field(sa_type=UTCDateTime)
    clearing_since: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cleared_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    escalated_from: str | None = Field(default=None, max_length=1)
    evidence: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONType))


class User(SQLModel, table=True):
    """A person or a program using the API; customers belong to an organisation."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=100)
    role: str = Field(max_length=16)
    org_id: int | None = Field(default=None, foreign_key="organisation.id", index=True)
    email: str | None = Field(default=None, max_length=200)
    password_hash: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ApiToken(SQLModel, table=True):
    """A bearer token; only its SHA-256 is stored."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    token_hash: str = Field(index=True, unique=True, max_length=64)
    name: str = Field(default="token", max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used: datetime | None = Field(default=None, sa_type=UTCDateTime)
