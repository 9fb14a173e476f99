"""`emu demo`: the whole product on one machine, with nothing else running and no settings.

An embedded MQTT broker (amqtt) on a free loopback port, SQLite in a data directory, the
simulator with units on two customer sites, one agent per site, and the server (API, ingest,
scheduler). It seeds organisations, sites and users, prints the URL and the log-ins, injects a
fault now and then so there is something to see, and stops cleanly on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from agent.config import (
    AgentSettings,
    BrokerSettings,
    CommandSettings,
    DeviceSettings,
    SpoolSettings,
    UplinkSettings,
)
from agent.service import Agent
from emu.broker import embedded_broker
from server.core.config import HttpSettings, MqttSettings, ServerSettings
from server.core.db import Database, migrate
from server.main import ServerProcess
from server.models import ApiToken, Organisation, Site, User
from simulators.server import SimConfig, Simulator

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
DEMO_FAULTS = ("trip", "over_temperature", "derating", "intermittent_comms", "insulation_low")


@dataclass(frozen=True)
class DemoSite:
    """A customer site of the demo."""

    code: str
    name: str
    org: str
    timezone: str


SITES = (
    DemoSite("site-sunrise", "Sunrise Farms battery park", "Sunrise Farms", "Asia/Shanghai"),
    DemoSite("site-harbour", "Harbour Logistics rooftop PV", "Harbour Logistics", "Europe/Berlin"),
)


@dataclass
class DemoLogins:
    """Tokens printed for the demo users."""

    tokens: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


async def seed(db: Database, hash_token: Callable[[str], str]) -> DemoLogins:
    """Organisations, sites and users with fresh tokens (idempotent across demo restarts)."""
    logins = DemoLogins()
    async with db.session() as s:
        vendor = await _org(s, "Shanghai Energy", "vendor")
        orgs = {site.org: await _org(s, site.org, "customer") for site in SITES}
        for site in SITES:
            found = (await s.exec(select(Site).where(Site.code == site.code))).first()
            if found is None:
                s.add(Site(code=site.code, name=site.name, org_id=_id(orgs[site.org].id),
                           timezone=site.timezone, policy={}))
        users = [("admin", "admin", vendor.id), ("engineer", "engineer", vendor.id)] + [
            (site.code.removeprefix("site-"), "customer", orgs[site.org].id) for site in SITES
        ]
        for name, role, org_id in users:
            user = (await s.exec(select(User).where(User.name == name))).first()
            if user is None:
                user = User(name=name, role=role, org_id=None if role != "customer" else org_id)
                s.add(user)
                await s.flush()
            token = secrets.token_urlsafe(24)
            s.add(ApiToken(user_id=_id(user.id), token_hash=hash_token(token), name="emu demo"))
            logins.tokens[name] = token
    return logins


def _id(value: int | None) -> int:
    if value is None:
        raise RuntimeError("the database assigned no id")
    return value


async def _org(session: AsyncSession, name: str, kind: str) -> Organisation:
    org = (await session.exec(select(Organisation).where(Organisation.name == name))).first()
    if org is None:
        org = Organisation(name=name, kind=kind)
        session.add(org)
        await session.flush()
    return org


async def inject_faults(sim: Simulator, every_s: float, stop: asyncio.Event) -> None:
    """Now and then, a fault on a random unit for a while, then cleared."""
    rng = random.Random()  # noqa: S311 - a demo's dice
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
            return
        unit = rng.choice(sim.units)
        name = rng.choice(DEMO_FAULTS)
        unit.inject(name)
        log.warning("demo: injected %s on %s", name, unit.serial)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s * 0.6)
        unit.clear()
        log.warning("demo: cleared %s on %s", name, unit.serial)


async def run_demo(
    port: int, data_dir: Path, stop: asyncio.Event, *, units_per_site: int = 2,
    fault_every_s: float = 45.0, poll_interval_s: float = 2.0,
    ready: Callable[[str, DemoLogins], None] | None = None,
) -> None:
    """Run everything until `stop` is set."""
    from server.core.security import hash_token

    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    mqtt_port = free_port()
    db_url = f"sqlite+aiosqlite:///{data_dir / 'emu-demo.db'}"
    settings = ServerSettings(
        demo=True, database_url=db_url, secret_key=secrets.token_urlsafe(32),
        data_dir=data_dir / "server",
        mqtt=MqttSettings(url=f"mqtt://{LOOPBACK}:{mqtt_port}", shared_group=None,
                          protocol="3.1.1"),
        http=HttpSettings(host=LOOPBACK, port=port),
    )
    await migrate(db_url)
    db = Database(db_url)
    try:
        logins = await seed(db, hash_token)
    finally:
        await db.close()
    async with embedded_broker(LOOPBACK, mqtt_port), Simulator(
        SimConfig(units=units_per_site * len(SITES), port=0)
    ) as sim:
        proc = ServerProcess(settings)
        await proc.commands.load_key()
        server_stop = asyncio.Event()
        server = asyncio.create_task(proc.run(server_stop))
        agents = [_agent(site, sim, i, units_per_site, mqtt_port, data_dir, poll_interval_s,
                         proc.commands.public_key)
                  for i, site in enumerate(SITES)]
        try:
            await proc.started.wait()
            for agent in agents:
                await agent.start()
            injector = asyncio.create_task(inject_faults(sim, fault_every_s, stop))
            if ready is not None:
                ready(f"http://{LOOPBACK}:{proc.api_port}", logins)
            await stop.wait()
            await injector
        finally:
            for agent in agents:
                with contextlib.suppress(Exception):
                    await agent.stop()
            server_stop.set()
            await server


def _agent(site: DemoSite, sim: Simulator, index: int, per_site: int, mqtt_port: int,
           data_dir: Path, poll_interval_s: float, command_key: str) -> Agent:
    devices = []
    for n in range(index * per_site + 1, (index + 1) * per_site + 1):
        host, port, unit_id = sim.where(n)
        unit = sim.unit(n)
        devices.append(DeviceSettings(
            name=f"{unit.profile.series.lower()}-{n}", protocol="modbus-tcp", host=host,
            port=port, unit_id=unit_id, profile=unit.profile.series,
            poll_interval_s=poll_interval_s, timeout_s=0.5, retries=0,
        ))
    settings = AgentSettings(
        site=site.code, state_dir=data_dir / site.code,
        broker=BrokerSettings(url=f"mqtt://{LOOPBACK}:{mqtt_port}", protocol="3.1.1"),
        uplink=UplinkSettings(health_interval_s=10.0),
        spool=SpoolSettings(path=Path("spool.db")),
        commands=CommandSettings(server_key=command_key),
        devices=tuple(devices),
    )
    return Agent(settings)
