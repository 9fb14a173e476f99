"""End to end: 20 simulated units on 4 sites, real agents, broker, server, API.

Release uploaded and signed, a written plan issued, confirmed by the customer and scheduled;
the confirmed window (site-local, four time zones) opens during the test on the manual
clock; the engine sends `upgrade.job` commands over the broker; each agent downloads,
verifies, installs over Modbus and answers; the canary, then the waves; every unit ends on
the new version and the linked class C ticket closes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import (
    AgentSettings,
    AgentUpgradeSettings,
    BrokerSettings,
    CommandSettings,
    DeviceSettings,
    SpoolSettings,
    UplinkSettings,
)
from agent.service import Agent
from protocols.clock import ManualClock
from protocols.signing import Ed25519PrivateKey, public_key_text
from server.core.config import HttpSettings, MqttSettings, ServerSettings, UpgradeSettings
from server.main import ServerProcess
from server.models import Fault, Organisation, Site
from server.tickets.models import Ticket
from server.tickets.service import link, open_ticket
from simulators.server import SimConfig, Simulator
from tests.support.broker import BrokerInfo
from tests.support.waiting import wait_for
from tests.upgrades.world import START, add_user, firmware, fixes, signed

pytestmark = pytest.mark.integration

ZONES = ["Asia/Kolkata", "Europe/Berlin", "Europe/London", "UTC"]
DAY = "2031-06-02"
OPEN_AT = datetime.fromisoformat(f"{DAY}T11:00:00+00:00")
"""10:00-18:00 local is 04:30-12:30 UTC in Kolkata, 08-16 Berlin, 09-17 London, 10-18 UTC."""
UNITS = 5


class HybridClock:
    """Wall time from the test's manual clock (windows, expiry); real monotonic time (batching,
    reconnects), which the processes need to keep running."""

    def __init__(self, manual: ManualClock) -> None:
        self.manual = manual

    def now(self) -> datetime:
        """The manual wall time."""
        return self.manual.now()

    def monotonic(self) -> float:
        """The real monotonic time."""
        return time.monotonic()


@dataclass
class Stack:
    """The server, four sites of simulated units with their agents, API clients."""

    proc: ServerProcess
    clock: ManualClock
    sites: list[tuple[int, str, Simulator, Agent]]
    admin: httpx.AsyncClient
    customer: httpx.AsyncClient


@pytest.fixture
async def stack(mqtt_broker: BrokerInfo, upgrades_db_url: str, tmp_path: Path,
                server_data_dir: Path, release_key: Ed25519PrivateKey) -> AsyncIterator[Stack]:
    manual = ManualClock(START)
    clock = HybridClock(manual)
    protocol = "3.1.1" if mqtt_broker.embedded else "auto"
    tag = secrets.token_hex(3)
    settings = ServerSettings(
        database_url=upgrades_db_url, secret_key=secrets.token_urlsafe(24),
        data_dir=server_data_dir, http=HttpSettings(port=0), scheduler_tick_s=0.2,
        mqtt=MqttSettings(url=mqtt_broker.url, protocol=protocol,
                          shared_group=f"up-{tag}" if mqtt_broker.shared_subscriptions else None),
        upgrades=UpgradeSettings(release_keys=(public_key_text(release_key),)),
    )
    proc = ServerProcess(settings, clock=clock)
    stop = asyncio.Event()
    runner = asyncio.create_task(proc.run(stop))
    sims: list[Simulator] = []
    agents: list[Agent] = []
    try:
        await wait_for(proc.started.wait(), 30, "the server to start")
        await wait_for(lambda: proc.ingest is not None and proc.ingest.ready.is_set(), 30,
                       "ingest to subscribe")
        async with proc.db.session() as s:
            org = Organisation(name=f"E2E upgrades {tag}")
            s.add(org)
            await s.flush()
            assert org.id is not None
            org_id = org.id
        sites = []
        for i, tz in enumerate(ZONES):
            code = f"e2eup-{tag}-{i}"
            async with proc.db.session() as s:
                site = Site(code=code, name=f"{tz} site", org_id=org_id, timezone=tz)
                s.add(site)
                await s.flush()
                assert site.id is not None
                site_id = site.id
            sim = Simulator(SimConfig(units=UNITS, port=0, profiles=["EMU-BS"], reboot_s=0.2))
            await sim.start()
            sims.append(sim)
            devices = []
            for n in range(1, UNITS + 1):
                host, port, uid = sim.where(n)
                devices.append(DeviceSettings(
                    name=f"bs-{n}", protocol="modbus-tcp", host=host, port=port, unit_id=uid,
                    profile="EMU-BS", poll_interval_s=1.0, timeout_s=2.0, retries=1))
            agent = Agent(AgentSettings(
                site=code, state_dir=tmp_path / code,
                broker=BrokerSettings(url=mqtt_broker.url, protocol=protocol),
                uplink=UplinkSettings(batch_max_age_s=0.2, health_interval_s=30.0),
                spool=SpoolSettings(path=Path("spool.db")),
                commands=CommandSettings(server_key=proc.commands.public_key),
                upgrades=AgentUpgradeSettings(release_keys=(public_key_text(release_key),)),
                devices=tuple(devices),
            ), clock=clock)
            await agent.start()
            agents.append(agent)
            sites.append((site_id, code, sim, agent))
        _, admin_token = await add_user(proc.db, "admin")
        _, customer_token = await add_user(proc.db, "customer", org_id)
        base = f"http://127.0.0.1:{proc.api_port}/api/v1"
        async with httpx.AsyncClient(base_url=base, timeout=30, headers={
                "Authorization": f"Bearer {admin_token}"}) as admin, \
                httpx.AsyncClient(base_url=base, timeout=30, headers={
                    "Authorization": f"Bearer {customer_token}"}) as customer:
            yield Stack(proc, manual, sites, admin, customer)
    finally:
        for agent in agents:
            await agent.stop()
        for sim in sims:
            await sim.stop()
        stop.set()
        await runner


async def test_staged_rollout_end_to_end(stack: Stack, release_key: Ed25519PrivateKey) -> None:
    admin, clock = stack.admin, stack.clock
    site_ids = [s[0] for s in stack.sites]

    async def units_known() -> bool:
        r = await admin.get("/units", params={"limit": 1000})
        mine = [u for u in r.json()["data"] if u["site_id"] in site_ids and u["series"]]
        return len(mine) == len(site_ids) * UNITS

    await wait_for(units_known, 60, "every unit registered from its telemetry")
    ids = {}
    for version, image in (("1.0.0", firmware("1.0.0")),
                           ("1.1.0", firmware("1.1.0", change=40))):
        pkg = signed(image, release_key, fixes=fixes("derating") if version == "1.1.0"
                     else fixes())
        r = await admin.post("/releases", content=pkg.to_bytes())
        assert r.status_code == 201, r.text
        ids[version] = r.json()["id"]
    first_site = site_ids[0]
    async with stack.proc.db.session() as s:  # a class C ticket the release fixes
        units = (await admin.get("/units", params={"site_id": first_site})).json()["data"]
        unit_id = units[0]["id"]
        fault = Fault(site_id=first_site, unit_id=unit_id, code="derating", fault_class="C",
                      title="derating", opened_at=clock.now(), last_seen_at=clock.now())
        s.add(fault)
        await s.flush()
        ticket = await open_ticket(s, site_id=first_site, source="fault", title="derating",
                                   fault_class="C", unit_ids=[unit_id], now=clock.now())
        assert ticket.id is not None
        assert fault.id is not None
        await link(s, ticket.id, "fault", fault.id, now=clock.now())
        ticket_id = ticket.id

    r = await admin.post("/plans", json={
        "title": "EMU-BS 1.1.0", "release_id": ids["1.1.0"], "site_ids": site_ids,
        "windows": [{"start": f"{DAY}T10:00", "end": f"{DAY}T18:00"}],
        "canary": 1, "wave_percentages": [50, 100], "concurrency_per_site": 2,
        "concurrency_total": 8, "settle_s": 0.3, "impact": "each unit stops briefly",
        "personnel_required": "one electrician per site",
    })
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert (await admin.post(f"/plans/{pid}/issue")).status_code == 200
    doc = await admin.get(f"/plans/{pid}/documents/1.pdf")
    assert doc.content.startswith(b"%PDF")
    r = await stack.customer.post(f"/plans/{pid}/confirm", json={
        "window": 0, "personnel": ["Asha Rao", "Jonas Weber"], "signature": "Priya Nair"})
    assert r.status_code == 200, r.text
    html = (await admin.get(f"/plans/{pid}/documents/2.html")).text
    assert "Priya Nair" in html
    assert (await admin.post(f"/plans/{pid}/schedule")).json()["state"] == "scheduled"

    async def targets() -> list[dict[str, Any]]:
        return list((await admin.get(f"/rollouts/{pid}")).json())

    await asyncio.sleep(1.0)  # several scheduler ticks before the window: nothing may start
    assert {t["state"] for t in await targets()} == {"pending"}
    clock.advance((OPEN_AT - clock.now()).total_seconds())  # the window opens everywhere

    canary_done = False
    seen_order_ok = True

    async def finished() -> bool:
        nonlocal canary_done, seen_order_ok
        ts = await targets()
        canary = [t for t in ts if t["wave"] == 0]
        later = [t for t in ts if t["wave"] > 0 and t["state"] != "pending"]
        if later and not all(t["state"] == "succeeded" for t in canary):
            seen_order_ok = False
        canary_done = canary_done or all(t["state"] == "succeeded" for t in canary)
        plan = (await admin.get(f"/plans/{pid}")).json()
        return plan["state"] in ("completed", "halted", "rolled_back")

    await wait_for(finished, 180, "the rollout to finish")
    plan = (await admin.get(f"/plans/{pid}")).json()
    assert plan["state"] == "completed", (plan, await targets())
    assert plan["counts"] == {"succeeded": 20}
    assert seen_order_ok, "a later wave started before the canary succeeded"
    assert {t["wave"] for t in await targets()} == {0, 1, 2}
    for _, _, sim, _ in stack.sites:
        assert [u.firmware.version for u in sim.units] == ["1.1.0"] * UNITS
    async with stack.proc.db.session() as s:
        closed = await s.get(Ticket, ticket_id)
        assert closed is not None
        assert closed.state in ("resolved", "closed")
