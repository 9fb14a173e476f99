"""Plans and the rollout engine over the real API, with the executors in-process.

The engine's jobs reach each site's executor through `Loopback` (the command channel's
stand-in here; tests/upgrades/test_e2e.py goes through the broker). Sites are in different
time zones; the confirmed window is site-local; the clock is manual.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from protocols.clock import ManualClock
from protocols.signing import Ed25519PrivateKey, generate_private_key
from server.models import Fault
from server.tickets.models import Ticket
from server.tickets.service import link, open_ticket
from server.upgrades.models import RolloutTarget
from server.upgrades.plans import window_utc
from server.upgrades.rollout import RolloutEngine
from tests.support.waiting import wait_for
from tests.upgrades.world import (
    Api,
    Loopback,
    SiteRig,
    firmware,
    fixes,
    make_site,
    signed,
    upload,
)

V100, V110 = firmware("1.0.0"), firmware("1.1.0", change=40)
DAY = "2031-06-02"  # the day after the clock's start: every window lies ahead


@dataclass
class Fleet:
    """Sites with units, releases 1.0.0 and 1.1.0, an engine with a loopback channel."""

    api: Api
    rigs: list[SiteRig]
    releases: dict[str, int]
    engine: RolloutEngine
    loop: Loopback
    clock: ManualClock

    async def step(self) -> None:
        """One scheduler tick, then deliver what it sent."""
        await self.engine.tick()
        self.loop.pump()

    async def run_until(self, done: Callable[[], Any], what: str, limit_s: float = 120) -> Any:
        """Tick until `done()` (awaitable) is truthy."""

        async def check() -> Any:
            await self.step()
            return await done()

        return await wait_for(check, limit_s, what)

    async def plan(self, **kw: Any) -> dict[str, Any]:
        """Create, issue, confirm (customer) and schedule a plan; its JSON."""
        body: dict[str, Any] = {
            "title": "EMU-BS 1.1.0", "release_id": self.releases["1.1.0"],
            "site_ids": [r.site_id for r in self.rigs],
            "windows": [{"start": f"{DAY}T10:00", "end": f"{DAY}T18:00"}],
            "canary": 1, "wave_percentages": [50, 100], "concurrency_per_site": 2,
            "concurrency_total": 6, "settle_s": 0.2,
            "personnel_required": "one electrician per site",
        }
        body.update(kw)
        async with self.api.client() as admin, self.api.client("customer") as customer:
            r = await admin.post("/plans", json=body)
            assert r.status_code == 201, r.text
            pid = r.json()["id"]
            r = await admin.post(f"/plans/{pid}/issue")
            assert r.status_code == 200, r.text
            r = await customer.post(f"/plans/{pid}/confirm", json={
                "window": 0, "personnel": ["Li Wei"], "signature": "Zhang San"})
            assert r.status_code == 200, r.text
            r = await admin.post(f"/plans/{pid}/schedule")
            assert r.status_code == 200, r.text
            return dict(r.json())

    async def state(self, pid: int) -> dict[str, Any]:
        """The plan as the API shows it."""
        async with self.api.client() as admin:
            return dict((await admin.get(f"/plans/{pid}")).json())

    async def targets(self, pid: int) -> list[dict[str, Any]]:
        """The plan's units, live."""
        async with self.api.client() as admin:
            return list((await admin.get(f"/rollouts/{pid}")).json())


async def _fleet(api: Api, tmp_path: Path, key: Ed25519PrivateKey, clock: ManualClock,
                 zones: list[str], units: int) -> AsyncIterator[Fleet]:
    ids = {}
    for name, pkg in (("1.0.0", signed(V100, key)),
                      ("1.1.0", signed(V110, key, fixes=fixes("derating")))):
        resp = await upload(api, pkg)
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]
    rigs = [await make_site(api.db, api.org_id, units, tmp_path / f"gw{i}", key, clock, tz=tz)
            for i, tz in enumerate(zones)]
    loop = Loopback(api.db, {r.site_id: r for r in rigs})
    engine = RolloutEngine(api.settings, api.db, loop.send, clock=clock,
                           base_url=lambda: api.url)
    loop.engine = engine
    try:
        yield Fleet(api, rigs, ids, engine, loop, clock)
    finally:
        await loop.close()
        for r in rigs:
            await r.close()


@pytest.fixture
async def fleet(api: Api, tmp_path: Path, release_key: Ed25519PrivateKey,
                clock: ManualClock) -> AsyncIterator[Fleet]:
    """4 sites x 5 units, from UTC+3 to UTC (the window opens first in the east)."""
    async for f in _fleet(api, tmp_path, release_key, clock,
                          ["Europe/Moscow", "Europe/Berlin", "Europe/London", "UTC"], 5):
        yield f


def _at(clock: ManualClock, when: datetime) -> None:
    clock.advance((when - clock.now()).total_seconds())


def _open_everywhere(fleet: Fleet) -> None:
    """12:00 UTC on DAY: inside 10:00-18:00 local at every site of the fleet."""
    _at(fleet.clock, datetime.fromisoformat(f"{DAY}T12:00:00+00:00"))


async def test_rollout_in_site_local_windows_closes_the_c_ticket(fleet: Fleet) -> None:
    api, clock = fleet.api, fleet.clock
    first = fleet.rigs[0]
    async with api.db.session() as s:  # a class C fault and its ticket at the first site
        unit_id = first.unit_ids["bs-1"]
        fault = Fault(site_id=first.site_id, unit_id=unit_id, code="derating", fault_class="C",
                      title="derating", opened_at=clock.now(), last_seen_at=clock.now())
        s.add(fault)
        await s.flush()
        ticket = await open_ticket(s, site_id=first.site_id, source="fault", title="derating",
                                   fault_class="C", unit_ids=[unit_id], now=clock.now())
        assert ticket.id is not None
        assert fault.id is not None
        await link(s, ticket.id, "fault", fault.id, now=clock.now())
        ticket_id = ticket.id
    plan = await fleet.plan()
    pid = plan["id"]
    assert plan["state"] == "scheduled"
    assert plan["delivery"]["days_left"] == 30.0
    # the window is 10:00-18:00 local: 07-15 UTC in Moscow, 08-16 Berlin, 09-17 London,
    # 10-18 UTC; at 06:30 UTC no window is open anywhere
    _at(clock, datetime.fromisoformat(f"{DAY}T06:30:00+00:00"))
    for _ in range(3):
        await fleet.step()
    assert fleet.loop.sent == []  # no window open anywhere: nothing sent
    _at(clock, datetime.fromisoformat(f"{DAY}T07:30:00+00:00"))  # Moscow opens

    async def canary_done() -> bool:
        return any(t["state"] == "succeeded" for t in await fleet.targets(pid))

    await fleet.run_until(canary_done, "the canary to succeed")
    targets = await fleet.targets(pid)
    assert [t["device"] for t in targets if t["state"] == "succeeded"] == ["bs-1"]
    assert targets[0]["wave"] == 0
    assert targets[0]["site_id"] == first.site_id

    async def only_moscow_started() -> bool:
        ts = await fleet.targets(pid)
        return all(t["state"] == "succeeded" for t in ts if t["site_id"] == first.site_id)

    await fleet.run_until(only_moscow_started, "the Moscow site to finish its units")
    for t in await fleet.targets(pid):
        if t["site_id"] != first.site_id:
            assert t["state"] == "pending", t  # their windows have not opened yet
    _at(clock, datetime.fromisoformat(f"{DAY}T10:30:00+00:00"))  # every window is open

    async def finished() -> bool:
        return (await fleet.state(pid))["state"] in {"completed", "halted", "rolled_back"}

    await fleet.run_until(finished, "the rollout to finish", limit_s=120)
    final = await fleet.state(pid)
    assert final["state"] == "completed", final
    assert final["counts"] == {"succeeded": 20}
    for rig in fleet.rigs:
        assert {u.firmware.version for u in rig.sim.units} == {"1.1.0"}
    waves = {t["wave"] for t in await fleet.targets(pid)}
    assert waves == {0, 1, 2}
    async with api.db.session() as s:  # every dispatch lay inside its site's window
        rows = (await s.exec(select(RolloutTarget).where(RolloutTarget.plan_id == pid))).all()
        for row in rows:
            site = next(r for r in fleet.rigs if r.site_id == row.site_id)
            from server.models import Site

            site_row = await s.get(Site, site.site_id)
            assert site_row is not None
            start, end = window_utc(final["confirmed_window"], site_row)
            assert row.dispatched_at is not None
            assert start <= row.dispatched_at < end
        closed = await s.get(Ticket, ticket_id)
        assert closed is not None
        assert closed.state in ("resolved", "closed"), closed


async def test_a_failing_unit_is_rolled_back_and_halts_the_rollout(fleet: Fleet) -> None:
    bad = fleet.rigs[0].unit("bs-2")  # in wave 1, after the canary bs-1
    bad.set_update_behaviour("fail")
    _open_everywhere(fleet)
    plan = await fleet.plan(concurrency_per_site=1, concurrency_total=1, failure_threshold=1)
    pid = plan["id"]

    async def halted() -> dict[str, Any] | None:
        p = await fleet.state(pid)
        return p if p["state"] in ("halted", "rolled_back", "completed") else None

    final = await fleet.run_until(halted, "the failure threshold to halt the rollout")
    assert final["state"] == "halted", final
    assert "1 unit(s) failed" in final["halted_reason"]
    targets = {(t["site_id"], t["device"]): t for t in await fleet.targets(pid)}
    first = fleet.rigs[0]
    assert targets[(first.site_id, "bs-1")]["state"] == "succeeded"
    assert targets[(first.site_id, "bs-2")]["state"] == "rolled_back"
    assert bad.firmware.version == "1.0.0"
    untouched = [t for t in targets.values() if t["state"] == "skipped"]
    assert len(untouched) == 18
    await asyncio.gather(*fleet.loop.tasks)
    for rig in fleet.rigs:
        for n, unit in enumerate(rig.sim.units, start=1):
            if (rig.site_id, f"bs-{n}") != (first.site_id, "bs-1"):
                assert unit.firmware.version == "1.0.0"
    assert len(fleet.loop.sent) == 2  # only the canary and the failing unit got a job


async def test_window_edges_on_the_server(fleet: Fleet) -> None:
    plan = await fleet.plan(site_ids=[fleet.rigs[3].site_id])  # the UTC site: 10:00-18:00
    pid = plan["id"]
    _at(fleet.clock, datetime.fromisoformat(f"{DAY}T09:59:59+00:00"))
    await fleet.step()
    assert fleet.loop.sent == []
    fleet.clock.advance(1)  # 10:00:00, the window's first second
    await fleet.step()
    assert len(fleet.loop.sent) == 1
    await asyncio.gather(*fleet.loop.tasks)
    _at(fleet.clock, datetime.fromisoformat(f"{DAY}T18:00:00+00:00"))  # the end: exclusive
    await fleet.step()
    assert len(fleet.loop.sent) == 1
    final = await fleet.state(pid)
    assert final["state"] == "halted"
    assert "window ended" in final["halted_reason"]
    assert final["counts"] == {"succeeded": 1, "skipped": 4}


async def test_pause_resume_abort(fleet: Fleet) -> None:
    _open_everywhere(fleet)
    plan = await fleet.plan(site_ids=[fleet.rigs[3].site_id])
    pid = plan["id"]
    async with fleet.api.client() as admin:
        assert (await admin.post(f"/plans/{pid}/pause")).json()["paused"] is True
        await fleet.step()
        assert fleet.loop.sent == []
        assert (await admin.post(f"/plans/{pid}/resume")).json()["paused"] is False
        await fleet.step()
        assert len(fleet.loop.sent) == 1
        r = await admin.post(f"/plans/{pid}/abort", json={"reason": "customer asked"})
        assert r.json()["state"] == "halted", r.text
    await asyncio.gather(*fleet.loop.tasks)
    await fleet.step()
    assert len(fleet.loop.sent) == 1


async def test_checkin_required_before_a_site_starts(fleet: Fleet) -> None:
    site = fleet.rigs[3]
    _open_everywhere(fleet)
    plan = await fleet.plan(site_ids=[site.site_id], checkin_required=True)
    pid = plan["id"]
    await fleet.step()
    assert fleet.loop.sent == []
    async with fleet.api.client("customer") as customer:
        r = await customer.post(f"/plans/{pid}/checkin",
                                json={"site_id": site.site_id, "name": "Li Wei"})
        assert r.status_code == 200, r.text
    await fleet.step()
    assert len(fleet.loop.sent) == 1


async def test_engine_survives_a_restart_and_never_sends_twice(fleet: Fleet) -> None:
    _open_everywhere(fleet)
    plan = await fleet.plan(site_ids=[fleet.rigs[3].site_id], concurrency_per_site=5)
    pid = plan["id"]
    await fleet.step()
    assert len(fleet.loop.sent) == 1  # the canary
    # a new engine (a restarted server) over the same database, before the canary answered
    fleet.engine = RolloutEngine(fleet.api.settings, fleet.api.db, fleet.loop.send,
                                 clock=fleet.clock, base_url=lambda: fleet.api.url)
    fleet.loop.engine = fleet.engine
    await fleet.step()
    assert len(fleet.loop.sent) == 1

    async def done() -> bool:
        return bool((await fleet.state(pid))["state"] == "completed")

    await fleet.run_until(done, "the rollout to complete after the restart", limit_s=180)
    devices = [args["device"] for _, _, args in fleet.loop.sent]
    assert sorted(devices) == [f"bs-{n}" for n in range(1, 6)]  # each unit exactly once


async def test_server_refuses_bad_packages_and_downgrades(
    fleet: Fleet, release_key: Ed25519PrivateKey,
) -> None:
    api = fleet.api
    good = signed(firmware("1.3.0", change=3), release_key)
    data = bytearray(good.to_bytes())
    data[-5] ^= 1
    async with api.client() as admin:
        r = await admin.post("/releases", content=bytes(data))
        assert r.status_code == 422, r.text
        assert "SHA-256 does not match" in r.json()["detail"]
        other = signed(firmware("1.3.0", change=3), generate_private_key())
        r = await admin.post("/releases", content=other.to_bytes())
        assert r.status_code == 422, r.text
        assert "does not verify" in r.json()["detail"]
        r = await admin.post("/releases", content=b"not a package")
        assert r.status_code == 422, r.text
        assert "bad magic" in r.json()["detail"]
    async with api.client("customer") as customer:
        r = await customer.post("/releases", content=good.to_bytes())
        assert r.status_code == 403
    async with api.db.session() as s:  # the units of one site already run 1.2.0
        for unit_id in fleet.rigs[1].unit_ids.values():
            from server.models import Unit

            unit = await s.get(Unit, unit_id)
            assert unit is not None
            unit.firmware = "1.2.0"
    async with api.client() as admin:
        body = {"title": "down", "release_id": fleet.releases["1.1.0"],
                "site_ids": [fleet.rigs[1].site_id],
                "windows": [{"start": f"{DAY}T10:00", "end": f"{DAY}T18:00"}]}
        r = await admin.post("/plans", json=body)
        assert r.status_code == 422, r.text
        assert "downgrade refused" in r.json()["detail"]
        r = await admin.post("/plans", json={**body, "rollback": True,
                                             "release_id": fleet.releases["1.0.0"]})
        assert r.status_code == 201, r.text
