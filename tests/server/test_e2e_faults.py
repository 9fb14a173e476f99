"""End to end: simulator -> agent -> MQTT broker -> server -> API, per fault class.

The issue's acceptance: `trip` gives a class A fault, `over_temperature` class B, `derating`
class C, `intermittent_comms` class D, `comm_loss` class A; clearing the injection clears the
fault after the hold time. Everything is real: Modbus over TCP, the broker (Mosquitto in CI),
the database (PostgreSQL in CI), the API over HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import (
    AgentSettings,
    BrokerSettings,
    DeviceSettings,
    SpoolSettings,
    UplinkSettings,
)
from agent.service import Agent
from server.core.config import HttpSettings, MqttSettings, ServerSettings
from server.core.db import Database
from server.core.security import hash_token
from server.main import ServerProcess
from server.models import ApiToken, Organisation, Site, User
from simulators.server import SimConfig, Simulator
from tests.support.broker import BrokerInfo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SCENARIOS = {  # device -> (fault injected, class expected, fault code)
    "u1": ("trip", "A", "trip"),
    "u2": ("over_temperature", "B", "over_temperature"),
    "u3": ("derating", "C", "derating"),
    "u4": ("intermittent_comms", "D", "intermittent_comms"),
    "u5": ("comm_loss", "A", "comm_loss"),
}
POLICY = {
    "fault_rules": {
        "defaults": {"clear_hold_s": 2.0},
        "rules": {"intermittent_comms": {"window_s": 20.0}, "comm_loss": {"for_s": 1.0}},
    }
}


@dataclass
class Stack:
    """The running system and an API client with an admin token."""

    api: httpx.AsyncClient
    sim: Simulator
    site: str


@pytest.fixture
async def stack(
    mqtt_broker: BrokerInfo, server_db_url: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    site_code = f"e2e-{secrets.token_hex(3)}"
    db = Database(server_db_url)
    async with db.session() as s:
        org = Organisation(name=f"E2E {site_code}")
        s.add(org)
        await s.flush()
        assert org.id is not None
        s.add(
            Site(code=site_code, name="e2e", org_id=org.id, timezone="Asia/Shanghai", policy=POLICY)
        )
        # an engineer of our own: the session's database may already have its bootstrap admin
        user = User(name=f"eng-{site_code}", role="engineer")
        s.add(user)
        await s.flush()
        assert user.id is not None
        admin = secrets.token_urlsafe(24)
        s.add(ApiToken(user_id=user.id, token_hash=hash_token(admin), name="e2e"))
    await db.close()
    protocol = "3.1.1" if mqtt_broker.embedded else "auto"
    settings = ServerSettings(
        database_url=server_db_url,
        secret_key=secrets.token_urlsafe(24),
        mqtt=MqttSettings(
            url=mqtt_broker.url,
            protocol=protocol,
            shared_group=f"e2e-{site_code}" if mqtt_broker.shared_subscriptions else None,
        ),
        http=HttpSettings(port=0),
        scheduler_tick_s=0.5,
    )
    async with Simulator(SimConfig(units=5, port=0, profiles=["EMU-BS"])) as sim:
        devices = []
        for n, name in enumerate(SCENARIOS, start=1):
            host, port, unit_id = sim.where(n)
            devices.append(
                DeviceSettings(
                    name=name,
                    protocol="modbus-tcp",
                    host=host,
                    port=port,
                    unit_id=unit_id,
                    profile="EMU-BS",
                    poll_interval_s=0.5,
                    timeout_s=0.3,
                    retries=0,
                    comm_loss_after=2,
                )
            )
        agent = Agent(
            AgentSettings(
                site=site_code,
                state_dir=tmp_path,
                broker=BrokerSettings(url=mqtt_broker.url, protocol=protocol),
                uplink=UplinkSettings(batch_max_age_s=0.2, health_interval_s=5.0),
                spool=SpoolSettings(path=Path("spool.db")),
                devices=tuple(devices),
            )
        )
        proc = ServerProcess(settings)
        stop = asyncio.Event()
        runner = asyncio.create_task(proc.run(stop))
        try:
            await wait_for(proc.started.wait(), 30, "the server to start")
            await agent.start()
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{proc.api_port}",
                headers={"Authorization": f"Bearer {admin}"},
                timeout=10,
            ) as api:
                yield Stack(api, sim, site_code)
        finally:
            await agent.stop()
            stop.set()
            await runner


async def _open_faults(stack: Stack) -> dict[str, set[tuple[str, str]]]:
    units = (await stack.api.get("/api/v1/units", params={"site": stack.site})).json()["data"]
    device_of = {u["id"]: u["device"] for u in units}
    resp = await stack.api.get(
        "/api/v1/faults", params={"site": stack.site, "state": "open", "limit": 1000}
    )
    assert resp.status_code == 200, resp.text
    out: dict[str, set[tuple[str, str]]] = {}
    for f in resp.json()["data"]:
        out.setdefault(device_of.get(f["unit_id"], "?"), set()).add((f["code"], f["fault_class"]))
    return out


async def test_each_simulated_fault_gets_its_class_and_clears(stack: Stack) -> None:
    async def units_known() -> Any:
        r = await stack.api.get("/api/v1/units", params={"site": stack.site})
        return r.status_code == 200 and len(r.json()["data"]) == len(SCENARIOS)

    await wait_for(units_known, 60, "every unit registered from its telemetry")
    assert await _open_faults(stack) == {}  # healthy units have no faults

    for n, (fault, _cls, _code) in enumerate(SCENARIOS.values(), start=1):
        stack.sim.unit(n).inject(fault, {"rate": 0.5} if fault == "intermittent_comms" else None)

    async def all_classified() -> dict[str, set[tuple[str, str]]] | None:
        faults = await _open_faults(stack)
        ok = all(
            (code, cls) in faults.get(dev, set()) for dev, (_f, cls, code) in SCENARIOS.items()
        )
        return faults if ok else None

    faults = await wait_for(all_classified, 90, "a fault of the expected class on every unit")
    assert faults is not None
    for dev, (_f, cls, code) in SCENARIOS.items():
        assert (code, cls) in faults[dev], (dev, faults)

    for n in range(1, len(SCENARIOS) + 1):
        stack.sim.unit(n).clear()

    async def all_cleared() -> bool:
        faults = await _open_faults(stack)
        return not any(
            code in {c for c, _ in faults.get(dev, set())}
            for dev, (_f, _cls, code) in SCENARIOS.items()
        )

    await wait_for(all_cleared, 120, "every fault cleared after its hold time")
