"""SLA terms: the service terms' targets per fault class, overridable per contract.

The defaults are the table of DESIGN.md ("Fault classes and SLA"), i.e. clause 3 of the
service terms: every class must be responded to "immediately" (5 min), processed within
15 / 30 / 45 / 120 minutes (A / B / C / D), and A and B resolved within 1 h (major) and 2 h
(general) on a 7x24 calendar; C and D are solved by a later release (no resolution clock) and
run in business hours. An upgrade request (clause 2.3) carries a 30-day delivery clock.

Terms are layered: these defaults, then the server settings' `[sla]` overrides, then the
organisation's contract (`SlaContract.terms`), then the site's `policy["sla"]` (calendar:
country, hours); `resolve_terms` merges and validates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.sla.errors import SlaConfigError

CLOCK_KINDS = ("response", "processing", "resolution", "delivery")
UNCLASSIFIED = "unclassified"
UPGRADE = "upgrade_request"


class ClassTerms(BaseModel):
    """Targets of one class in seconds (None: no such clock) and its calendar."""

    model_config = ConfigDict(extra="forbid")

    response: float | None = Field(default=300.0, gt=0)
    processing: float | None = Field(default=None, gt=0)
    resolution: float | None = Field(default=None, gt=0)
    delivery: float | None = Field(default=None, gt=0)
    calendar: Literal["24x7", "business"] = "24x7"

    def targets(self) -> dict[str, float]:
        """The clocks this class starts, with their targets."""
        return {k: v for k in CLOCK_KINDS if (v := getattr(self, k)) is not None}


class Hours(BaseModel):
    """Business hours of the C/D calendar (site-local)."""

    model_config = ConfigDict(extra="forbid")

    days: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    start: str = "08:00"
    end: str = "18:00"
    country: str | None = None
    subdiv: str | None = None
    extra_holidays: list[str] = Field(default_factory=list)


class Contact(BaseModel):
    """One person of the escalation chain, reachable by email and/or webhook."""

    model_config = ConfigDict(extra="forbid")

    level: Literal["engineer", "lead", "manager"]
    name: str = ""
    email: str | None = None
    webhook: str | None = None


def _default_classes() -> dict[str, ClassTerms]:
    return {
        "A": ClassTerms(processing=900, resolution=3600),
        "B": ClassTerms(processing=1800, resolution=7200),
        "C": ClassTerms(processing=2700, calendar="business"),
        "D": ClassTerms(processing=7200, calendar="business"),
        UNCLASSIFIED: ClassTerms(),
        UPGRADE: ClassTerms(response=None, delivery=30 * 86400.0),
    }


class SlaTerms(BaseModel):
    """Everything the clocks of one ticket follow."""

    model_config = ConfigDict(extra="forbid")

    classes: dict[str, ClassTerms] = Field(default_factory=_default_classes)
    warn_at: float = Field(default=0.75, gt=0, lt=1)
    escalate_at: float | None = Field(
        default=1.5, gt=1, description="fraction of a target at which the manager is told"
    )
    hours: Hours = Field(default_factory=Hours)
    chain: list[Contact] = Field(default_factory=list)

    def for_class(self, key: str) -> ClassTerms:
        """The terms of class `key` (A-D, `unclassified`, `upgrade_request`)."""
        try:
            return self.classes[key]
        except KeyError:
            raise SlaConfigError(f"no SLA terms for class {key!r}") from None

    def calendar_spec(self, kind: str, tz: str) -> dict[str, Any]:
        """What a clock stores about its calendar (so a later change of terms keeps it)."""
        if kind == "24x7":
            return {"kind": "24x7"}
        return {"kind": "business", "tz": tz, **self.hours.model_dump()}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, recursing into dicts (lists are replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_terms(*layers: Mapping[str, Any] | None) -> SlaTerms:
    """Defaults with each layer merged on top, validated (SlaConfigError names the key)."""
    merged: dict[str, Any] = SlaTerms().model_dump()
    for layer in layers:
        if layer:
            merged = deep_merge(merged, layer)
    try:
        return SlaTerms.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SlaConfigError(f"SLA terms: {where}: {err['msg']}") from exc
