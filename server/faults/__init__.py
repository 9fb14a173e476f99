"""Faults: rules over telemetry and events classify what goes wrong with a unit as A, B, C or D.

`engine.FaultEngine` is what the server runs (hooks for ingest and the scheduler, callbacks for
the SLA and ticket engine); `rules` is its pure core; the rules themselves ship as data with the
profiles (`protocols.fault_rules`, `protocols/profiles/rules/*.toml`).
"""

from __future__ import annotations

from server.faults.engine import FaultCallback, FaultEngine

__all__ = ["FaultCallback", "FaultEngine"]
