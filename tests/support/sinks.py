"""A recording sink: what a coordinator or MQTT source hands on, kept for assertions."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from agent.coordinator import Sample
from protocols.messages import EventKind, Quality, Severity
from protocols.registers import Value


class RecordingSink:
    """Implements the agent's `Sink` protocol and keeps everything, in order."""

    def __init__(self) -> None:
        self.cycles: list[tuple[str, datetime, list[Sample]]] = []
        self.events: list[tuple[EventKind, str | None, str | None, Severity, dict[str, Any]]] = []

    def add_samples(self, device: str, ts: datetime, samples: Iterable[Sample]) -> None:
        """Keep one cycle."""
        self.cycles.append((device, ts, list(samples)))

    def add_event(
        self, ts: datetime, kind: EventKind, device: str | None, code: str | None = None,
        severity: Severity = Severity.INFO, detail: dict[str, Any] | None = None,
    ) -> None:
        """Keep one event."""
        self.events.append((kind, device, code, severity, detail or {}))

    def kinds(self) -> list[EventKind]:
        """The kinds of the events so far."""
        return [e[0] for e in self.events]

    def values(self) -> dict[str, Value | None]:
        """The latest value of every point with good or out-of-range quality."""
        out: dict[str, Value | None] = {}
        for _, _, samples in self.cycles:
            out.update((n, v) for n, v, q in samples if q in (Quality.GOOD, Quality.OUT_OF_RANGE))
        return out

    def latest(self) -> dict[str, tuple[Value | None, Quality]]:
        """The latest value and quality of every point ever seen."""
        out: dict[str, tuple[Value | None, Quality]] = {}
        for _, _, samples in self.cycles:
            out.update((n, (v, q)) for n, v, q in samples)
        return out

    def last(self) -> dict[str, tuple[Value | None, Quality]]:
        """The samples of the latest cycle only."""
        _, _, samples = self.cycles[-1]
        return {name: (value, quality) for name, value, quality in samples}
