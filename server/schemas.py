"""What the HTTP API accepts and returns, per resource: `Base`, `Create`, `Update`, `Public`.

The tables live in `server/models.py`; these models are the API's contract, so a column can
be added without leaking it (agents' credential hashes, tokens' hashes never appear here).
Every string the API accepts is bounded to its column and free of NUL characters, and every
id is a positive 32-bit integer: bad input is refused here, as a 422, before any query runs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from protocols.errors import TopicError
from protocols.topics import validate_site

MAX_ID = 2**31 - 1
"""Ids are 32-bit integer columns; larger numbers cannot name anything."""

T = TypeVar("T")

# --- shared field types --------------------------------------------------------------------


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _json_without_nul(value: Any) -> Any:
    if isinstance(value, str):
        _no_nul(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(str(key))
            _json_without_nul(item)
    elif isinstance(value, list):
        for item in value:
            _json_without_nul(item)
    return value


def _site_code(value: str) -> str:
    try:
        return validate_site(value)
    except TopicError as exc:
        raise ValueError(str(exc)) from exc


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown IANA time zone {value!r} (e.g. 'Europe/Berlin')") from exc
    return value


def as_utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already (the API speaks UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_no_nul),
]
UserName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(_no_nul),
]
TokenName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(_no_nul),
]
Email = Annotated[
    str, StringConstraints(min_length=3, max_length=200, pattern=r"^[^@\s]+@[^@\s]+$")
]
SiteCode = Annotated[str, AfterValidator(_site_code)]
TimeZone = Annotated[str, StringConstraints(max_length=64), AfterValidator(_timezone)]
Policy = Annotated[dict[str, Any], AfterValidator(_json_without_nul)]
Latitude = Annotated[float, PydanticField(ge=-90, le=90, description="WGS 84 (map)")]
Longitude = Annotated[float, PydanticField(ge=-180, le=180, description="WGS 84 (map)")]
Plain = Annotated[str, AfterValidator(_no_nul)]
"""Any text without NUL characters (PostgreSQL refuses them)."""
Id = Annotated[int, PydanticField(ge=1, le=MAX_ID)]
UTCTime = Annotated[datetime, AfterValidator(as_utc)]

OrgKind = Literal["customer", "vendor", "partner"]
RoleName = Literal["admin", "engineer", "customer"]
FaultClass = Literal["A", "B", "C", "D"]
FaultState = Literal["open", "cleared"]
RollupName = Literal["raw", "1m", "1h"]

_STRICT = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    """One page of a list: `data`, the total `count` matching, and where the page starts."""

    data: list[T]
    count: int
    limit: int
    offset: int


class Message(BaseModel):
    """A plain answer (and the shape of every error: `{"detail": ...}`)."""

    detail: str


# --- organisations -------------------------------------------------------------------------


class OrganisationBase(SQLModel):
    """A customer (or the vendor itself)."""

    name: Name
    kind: OrgKind = "customer"


class OrganisationCreate(OrganisationBase):
    """Admin creates an organisation."""

    model_config = _STRICT  # type: ignore[assignment]


class OrganisationUpdate(SQLModel):
    """Admin renames or re-kinds an organisation."""

    model_config = _STRICT  # type: ignore[assignment]

    name: Name | None = None
    kind: OrgKind | None = None


class OrganisationPublic(OrganisationBase):
    """An organisation as the API shows it."""

    id: int


# --- sites ---------------------------------------------------------------------------------


class SiteBase(SQLModel):
    """A customer site; `code` is its id in MQTT topics, `timezone` an IANA zone."""

    code: SiteCode
    name: Name
    org_id: Id
    timezone: TimeZone = "UTC"
    policy: Policy = Field(default_factory=dict)
    latitude: Latitude | None = None
    longitude: Longitude | None = None


class SiteCreate(SiteBase):
    """Admin registers a site."""

    model_config = _STRICT  # type: ignore[assignment]


class SiteUpdate(SQLModel):
    """Admin changes a site (the code is fixed: agents publish under it)."""

    model_config = _STRICT  # type: ignore[assignment]

    name: Name | None = None
    org_id: Id | None = None
    timezone: TimeZone | None = None
    policy: Policy | None = None
    latitude: Latitude | None = None
    longitude: Longitude | None = None


class SitePublic(SiteBase):
    """A site as the API shows it."""

    id: int
    created_at: datetime


# --- agents and units ----------------------------------------------------------------------


class AgentPublic(SQLModel):
    """A site gateway's agent (its credentials never leave the server)."""

    id: int
    agent_id: str
    site_id: int
    online: bool
    version: str | None
    enrolled_at: datetime | None
    last_seen: datetime | None
    health: dict[str, Any]


class UnitPublic(SQLModel):
    """An EMU unit and what it says about itself."""

    id: int
    site_id: int
    device: str
    series: str | None
    model: str | None
    serial: str | None
    firmware: str | None
    comm_lost: bool
    first_seen: datetime
    last_seen: datetime | None


# --- telemetry -----------------------------------------------------------------------------


class PointLatest(SQLModel):
    """The latest reading of one point of a unit (`ts` is None if never read)."""

    point: str
    ts: datetime | None
    value: float | None
    text: str | None
    quality: str | None


class Sample(SQLModel):
    """One row of a time series: a raw reading, or a rollup bucket (`value` = its mean)."""

    ts: datetime
    value: float | None
    quality: str | None = None
    text: str | None = None
    min: float | None = None
    max: float | None = None
    count: int | None = None


class TimeSeries(SQLModel):
    """Readings of one point of one unit over [start, end); the latest `limit` rows."""

    unit_id: int
    point: str
    rollup: RollupName
    start: datetime
    end: datetime
    truncated: bool
    samples: list[Sample]


# --- events and faults ---------------------------------------------------------------------


class EventPublic(SQLModel):
    """Something an agent reported about a site or unit."""

    id: int
    site_id: int
    unit_id: int | None
    ts: datetime
    kind: str
    code: str | None
    severity: str
    detail: dict[str, Any]


class FaultPublic(SQLModel):
    """A classified fault of one unit (class A-D per the service terms)."""

    id: int
    site_id: int
    unit_id: int
    code: str
    fault_class: str
    title: str
    state: str
    opened_at: datetime
    last_seen_at: datetime
    clearing_since: datetime | None
    cleared_at: datetime | None
    escalated_from: str | None
    evidence: dict[str, Any]


# --- users and tokens ----------------------------------------------------------------------


class UserBase(SQLModel):
    """A person or program using the API; customers belong to an organisation."""

    name: UserName
    role: RoleName
    org_id: Id | None = None
    email: Email | None = None


class UserCreate(UserBase):
    """Admin creates a user (a customer needs `org_id`)."""

    model_config = _STRICT  # type: ignore[assignment]


class UserUpdate(SQLModel):
    """Admin changes a user's role, organisation or e-mail."""

    model_config = _STRICT  # type: ignore[assignment]

    role: RoleName | None = None
    org_id: Id | None = None
    email: Email | None = None


class UserPublic(UserBase):
    """A user as the API shows it."""

    id: int
    created_at: datetime


class PasswordSet(SQLModel):
    """Admin sets a user's dashboard password (argon2-hashed; never returned)."""

    model_config = _STRICT  # type: ignore[assignment]

    password: str = PydanticField(min_length=10, max_length=200)


class PasswordChange(SQLModel):
    """A user changes its own dashboard password (the current one, if it has one)."""

    model_config = _STRICT  # type: ignore[assignment]

    current_password: str | None = PydanticField(default=None, max_length=200)
    new_password: str = PydanticField(min_length=10, max_length=200)


class TokenCreate(SQLModel):
    """Ask for a new token; `expires_in_days` null means it never expires."""

    model_config = _STRICT  # type: ignore[assignment]

    name: TokenName = "token"
    expires_in_days: float | None = Field(default=90.0, gt=0, le=3650)


class TokenPublic(SQLModel):
    """A token's metadata (the secret itself is shown only once, at creation)."""

    id: int
    user_id: int
    name: str
    created_at: datetime
    expires_at: datetime | None
    last_used: datetime | None


class TokenCreated(TokenPublic):
    """A token just created: `token` is the bearer secret, shown this once."""

    token: str
