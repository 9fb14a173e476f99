"""What `/api/v1/commissioning` accepts and returns."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from protocols.commissioning import Target
from server.schemas import Id, Name, Policy, UserName
from server.schemas import _no_nul as no_nul

Mode = Literal["remote", "onsite"]
Series = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9-]{1,31}$")]
Serial = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
                   AfterValidator(no_nul)]


ShortText = Annotated[str, StringConstraints(max_length=100), AfterValidator(no_nul)]
LineText = Annotated[str, StringConstraints(max_length=2000), AfterValidator(no_nul)]
LongText = Annotated[str, StringConstraints(max_length=10000), AfterValidator(no_nul)]


State = Literal["draft", "issued", "scheduled", "in_progress", "completed", "cancelled"]
CheckName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
_STRICT = ConfigDict(extra="forbid")


class EquipmentItem(BaseModel):
    """Units of one series to commission; `serials` (optional) name them, `firmware`
    overrides the series' required version."""

    model_config = _STRICT

    series: Series
    type: ShortText | None = None
    count: int = Field(ge=1, le=1000)
    serials: list[Serial] = Field(default_factory=list, max_length=1000)
    firmware: ShortText | None = None


class ChecklistItem(BaseModel):
    """One item of a series' checklist."""

    model_config = _STRICT

    name: CheckName
    where: Literal["remote", "onsite"]
    requirement: LineText


class _PlanFields(BaseModel):
    model_config = _STRICT

    title: Name | None = None
    mode: Mode | None = None
    visits: int | None = Field(default=None, ge=1, le=100)
    starts_on: date | None = None
    ends_on: date | None = None
    technicians: list[UserName] | None = Field(default=None, max_length=50)
    equipment: list[EquipmentItem] | None = Field(default=None, min_length=1, max_length=50)
    targets: list[Target] | None = Field(default=None, max_length=64)
    checklist: dict[Series, list[ChecklistItem]] | None = None
    notes: LongText | None = None
    ticket_id: Id | None = None

    def fields(self) -> dict[str, Any]:
        """The fields that were given, as plain JSON-able values (dates stay dates)."""
        data = self.model_dump(exclude_unset=True, mode="json")
        for key in ("starts_on", "ends_on"):
            if key in data and data[key] is not None:
                data[key] = getattr(self, key)
        return data


class PlanCreate(_PlanFields):
    """A new (draft) plan."""

    site_id: Id
    title: Name
    mode: Mode
    equipment: list[EquipmentItem] = Field(min_length=1, max_length=50)
    visits: int = Field(default=1, ge=1, le=100)
    technicians: list[UserName] = Field(default_factory=list, max_length=50)


class PlanUpdate(_PlanFields):
    """Changes to a plan (an issued or scheduled plan returns to draft)."""


class PlanPublic(BaseModel):
    """A plan as the API shows it."""

    id: int
    number: str
    site_id: int
    title: str
    mode: str
    state: str
    version: int
    visits: int
    starts_on: date | None
    ends_on: date | None
    technicians: list[str]
    equipment: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    checklist: dict[str, Any]
    notes: str
    ticket_id: int | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    issued_at: datetime | None
    issued_by: str | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    completed_at: datetime | None

    @model_validator(mode="before")
    @classmethod
    def _number(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            data = {k: getattr(data, k) for k in cls.model_fields if hasattr(data, k)}
        data.setdefault("number", f"CP-{data['id']:04d}")
        return data


class DocumentPublic(BaseModel):
    """A stored document version (download it with `format=html|pdf`)."""

    id: int
    plan_id: int
    kind: str
    version: int
    title: str
    created_at: datetime


class RunPublic(BaseModel):
    """A remote run."""

    id: int
    plan_id: int
    state: str
    command_id: str | None
    requested_by: str | None
    requested_at: datetime
    finished_at: datetime | None
    progress: dict[str, Any]
    error: str | None


class OnsiteIn(BaseModel):
    """One check a technician did on site."""

    model_config = _STRICT

    serial: Serial
    series: Series | None = None
    check: CheckName
    passed: bool
    detail: LineText = ""
    evidence: Policy = Field(default_factory=dict)


class OnsiteBatch(BaseModel):
    """Results recorded together."""

    model_config = _STRICT

    results: list[OnsiteIn] = Field(min_length=1, max_length=500)


class OnsitePublic(OnsiteIn):
    """A recorded on-site result."""

    model_config = ConfigDict(extra="ignore")

    id: int
    plan_id: int
    technician: str
    recorded_at: datetime

