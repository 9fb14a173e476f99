"""Service calendars: when an SLA clock runs (pure; no I/O).

Class A and B run 7x24 (`TwentyFourSeven`); C and D run in business hours in the site's time
zone, without weekends and the public holidays of the site's country (`BusinessHours`, with
the `holidays` library). Both answer the two questions an SLA clock asks: "when have `s`
seconds of service time passed after `start`?" (`add`) and "how much service time lies
between two instants?" (`between`). All instants in and out are aware UTC.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from server.sla.errors import SlaConfigError

MAX_DAYS = 3660
"""No business calendar looks further than ten years for working time."""


class Calendar(Protocol):
    """Service time on a calendar."""

    def add(self, start: datetime, seconds: float) -> datetime:
        """The instant when `seconds` of service time have passed after `start`."""
        ...

    def between(self, start: datetime, end: datetime) -> float:
        """Service seconds between `start` and `end` (0 if end <= start)."""
        ...


class TwentyFourSeven:
    """7x24 service: every second counts (clause 3 (1), classes A and B)."""

    def add(self, start: datetime, seconds: float) -> datetime:
        """`start + seconds`."""
        return start + timedelta(seconds=max(seconds, 0.0))

    def between(self, start: datetime, end: datetime) -> float:
        """Wall seconds."""
        return max((end - start).total_seconds(), 0.0)


@dataclass(frozen=True)
class BusinessHours:
    """Working hours on working days in one zone, public holidays of one country off."""

    tz: str = "UTC"
    days: tuple[int, ...] = (0, 1, 2, 3, 4)
    start: time = time(8, 0)
    end: time = time(18, 0)
    country: str | None = None
    subdiv: str | None = None
    extra_holidays: tuple[date, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise SlaConfigError(f"business hours end {self.end} is not after start {self.start}")
        if not self.days:
            raise SlaConfigError("business hours need at least one working day")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise SlaConfigError(f"unknown time zone {self.tz!r}") from exc
        if self.country is not None:
            try:
                holidays.country_holidays(self.country, subdiv=self.subdiv)
            except NotImplementedError as exc:
                raise SlaConfigError(
                    f"no public holidays known for {self.country!r}/{self.subdiv!r}"
                ) from exc

    @cached_property
    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    @cached_property
    def _holidays(self) -> holidays.HolidayBase | None:
        if self.country is None:
            return None
        return holidays.country_holidays(self.country, subdiv=self.subdiv)

    def is_working_day(self, day: date) -> bool:
        """A working weekday that is no public holiday."""
        if day.weekday() not in self.days or day in self.extra_holidays:
            return False
        return self._holidays is None or day not in self._holidays

    def _intervals(self, start: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Working intervals (UTC) from the local day of `start` on, in order."""
        day = start.astimezone(self._zone).date()
        for _ in range(MAX_DAYS):
            if self.is_working_day(day):
                lo = datetime.combine(day, self.start, self._zone).astimezone(UTC)
                hi = datetime.combine(day, self.end, self._zone).astimezone(UTC)
                yield lo, hi
            day += timedelta(days=1)

    def add(self, start: datetime, seconds: float) -> datetime:
        """Walk the working intervals until `seconds` are used up."""
        left = max(seconds, 0.0)
        for lo, hi in self._intervals(start):
            if hi <= start:
                continue
            lo = max(lo, start)
            span = (hi - lo).total_seconds()
            if left <= span:
                return lo + timedelta(seconds=left)
            left -= span
        raise SlaConfigError(f"no working time within {MAX_DAYS} days of {start}")

    def between(self, start: datetime, end: datetime) -> float:
        """Sum of working time in [start, end)."""
        total = 0.0
        if end <= start:
            return total
        for lo, hi in self._intervals(start):
            if lo >= end:
                break
            lo, hi = max(lo, start), min(hi, end)
            if hi > lo:
                total += (hi - lo).total_seconds()
        return total


def calendar_from_spec(spec: Mapping[str, Any]) -> Calendar:
    """The calendar a clock stored (`{"kind": "24x7"}` or `{"kind": "business", ...}`)."""
    kind = spec.get("kind", "24x7")
    if kind == "24x7":
        return TwentyFourSeven()
    if kind != "business":
        raise SlaConfigError(f"unknown calendar kind {kind!r}")
    return BusinessHours(
        tz=spec.get("tz", "UTC"),
        days=tuple(spec.get("days", (0, 1, 2, 3, 4))),
        start=time.fromisoformat(spec.get("start", "08:00")),
        end=time.fromisoformat(spec.get("end", "18:00")),
        country=spec.get("country"),
        subdiv=spec.get("subdiv"),
        extra_holidays=tuple(date.fromisoformat(d) for d in spec.get("extra_holidays", ())),
    )
