"""Injectable clocks: every rule that depends on time (SLA, windows, expiry, simulation) takes one.

`SystemClock` reads the real clocks; `ManualClock` only moves when a test tells it to.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Wall time (UTC, for timestamps) and a monotonic time (for intervals)."""

    def now(self) -> datetime:
        """Aware UTC wall time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The real clocks."""

    def now(self) -> datetime:
        """Aware UTC wall time."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """`time.monotonic()`."""
        return time.monotonic()


class ManualClock:
    """A clock for tests: starts at `start` and moves only through `advance`."""

    def __init__(self, start: datetime | None = None) -> None:
        self._wall = start or datetime(2026, 1, 1, tzinfo=UTC)
        if self._wall.tzinfo is None:
            raise ValueError("ManualClock needs an aware start time")
        self._mono = 1000.0

    def now(self) -> datetime:
        """The current manual wall time."""
        return self._wall

    def monotonic(self) -> float:
        """The current manual monotonic time."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._wall += timedelta(seconds=seconds)
        self._mono += seconds
