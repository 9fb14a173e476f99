"""Sites and telemetry batches for the server's storage and ingest tests and benchmarks.

Readings look like an agent's: one cycle per device shares a timestamp, devices follow each
other, values are numbers with a few strings (serial, model, firmware) among them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from protocols.messages import TelemetryBatch
from server.core.db import Database
from server.models import Organisation, Site

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
"""Start of the synthetic readings (a fixed instant: tests compute buckets by hand)."""
MODEL = "EMU-BS100"
SERIES = "EMU-BS"


def unique_code(prefix: str = "site") -> str:
    """A site code no other test or run uses."""
    return f"{prefix}-{secrets.token_hex(4)}"


async def make_site(db: Database, code: str | None = None, timezone: str = "UTC") -> Site:
    """A customer organisation and one site of it (unique names), committed."""
    code = code or unique_code()
    async with db.session() as session:
        org = Organisation(name=f"org-{code}")
        session.add(org)
        await session.flush()
        assert org.id is not None
        site = Site(code=code, name=f"Site {code}", org_id=org.id, timezone=timezone)
        session.add(site)
    return site


def iso(ts: datetime) -> str:
    """Wire format of a timestamp (what the agent's batcher writes)."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def points_doc(
    devices: Sequence[str], n_points: int, start: datetime, cycles: int = 1,
    step_s: float = 1.0, with_meta: bool = False,
) -> list[dict[str, object]]:
    """Readings of `n_points` numeric points per device per cycle (and meta strings)."""
    out: list[dict[str, object]] = []
    for cycle in range(cycles):
        stamp = iso(start + timedelta(seconds=cycle * step_s))
        for d, device in enumerate(devices):
            if with_meta:
                for point, value in (("common.SN", f"SN-{device}"), ("common.Md", MODEL),
                                     ("common.Vr", "1.2.0"), ("emu.FwVer", "1.2.3")):
                    out.append({"device": device, "point": point, "ts": stamp, "value": value,
                                "quality": "good"})
            for i in range(n_points):
                out.append({"device": device, "point": f"m.P{i}", "ts": stamp,
                            "value": round(d * 1000 + i + cycle * 0.5, 3), "quality": "good"})
    return out


def batch_bytes(agent: str, seq: int, points: Sequence[Mapping[str, object]]) -> bytes:
    """A telemetry batch as the agent publishes it."""
    return json.dumps({"agent": agent, "seq": seq, "sent_at": iso(T0), "points": list(points)},
                      separators=(",", ":")).encode()


def batch(agent: str, seq: int, points: Sequence[Mapping[str, object]]) -> TelemetryBatch:
    """The same batch, validated."""
    return TelemetryBatch.from_bytes(batch_bytes(agent, seq, points))
