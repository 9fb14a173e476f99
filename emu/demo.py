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
from datetime import UTC, datetime, timedelta
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
from protocols.firmware import FirmwareImage
from protocols.packages import Fixes, build_full, sign_package
from protocols.signing import Ed25519PrivateKey, generate_private_key, public_key_text
from server.core.config import HttpSettings, MqttSettings, ServerSettings, UpgradeSettings
from server.core.db import Database, migrate
from server.core.passwords import set_password
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
    latitude: float | None = None
    longitude: float | None = None


SITES = (
    DemoSite("site-sunrise", "Sunrise Farms battery park", "Sunrise Farms", "Asia/Shanghai",
             31.23, 121.47),
    DemoSite("site-harbour", "Harbour Logistics rooftop PV", "Harbour Logistics", "Europe/Berlin",
             53.54, 9.98),
)
RELEASE_MANAGER = "release"
"""The demo's release manager: an engineer-role user (the API has no separate role)."""


@dataclass
class DemoLogins:
    """Tokens (API) and passwords (dashboard) printed for the demo users."""

    tokens: dict[str, str] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoRun:
    """A running demo, for tests that drive it (inject faults into `sim`)."""

    url: str
    logins: DemoLogins
    sim: Simulator


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
                           timezone=site.timezone, policy={}, latitude=site.latitude,
                           longitude=site.longitude))
        users = [("admin", "admin", vendor.id), ("engineer", "engineer", vendor.id),
                 (RELEASE_MANAGER, "engineer", vendor.id)] + [
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
            password = secrets.token_urlsafe(9)  # 12 characters, fresh at every start
            await set_password(s, user, password)
            logins.passwords[name] = password
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
    started: Callable[[DemoRun], None] | None = None, scenario: bool = True,
) -> None:
    """Run everything until `stop` is set; `scenario` plays the scripted tour (see `tour`)."""
    from server.core.security import hash_token

    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    mqtt_port = free_port()
    db_url = f"sqlite+aiosqlite:///{data_dir / 'emu-demo.db'}"
    release_key = generate_private_key()  # fresh per run: the demo's release manager signs
    settings = ServerSettings(
        upgrades=UpgradeSettings(release_keys=(public_key_text(release_key),)),
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
            url = f"http://{LOOPBACK}:{proc.api_port}"
            injector = asyncio.create_task(inject_faults(sim, fault_every_s, stop))
            tour_task = (asyncio.create_task(tour(url, logins, sim, stop, release_key))
                         if scenario else None)
            if ready is not None:
                ready(url, logins)
            if started is not None:
                started(DemoRun(url, logins, sim))
            await stop.wait()
            await injector
            if tour_task is not None:
                await tour_task
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


async def tour(url: str, logins: DemoLogins, sim: Simulator, stop: asyncio.Event,
               release_key: Ed25519PrivateKey | None = None) -> None:
    """The scripted scenario, through the API as its users would: a phone ticket, a fault at
    once (which opens a ticket), then a remote-session request on that ticket for the
    customer to approve, then (with `release_key`) a signed release and an issued upgrade
    plan for the customer to confirm and sign. Failures are logged, never fatal: the demo
    goes on without them."""
    try:
        await _tour(url, logins, sim, stop)
        if release_key is not None and not stop.is_set():
            await _upgrade_plan(url, logins, sim, release_key)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("demo: the scripted tour stopped early")


async def _upgrade_plan(url: str, logins: DemoLogins, sim: Simulator,
                        key: Ed25519PrivateKey) -> None:
    """The release manager uploads a signed release for the first site's units and issues a
    written upgrade plan with a window tomorrow (site time) for its customer to confirm."""
    import httpx

    unit = sim.unit(1)  # the first site's first unit: its series is the release's
    series = unit.profile.series
    image = FirmwareImage(series, "1.1.0", bytes(range(256)) * 16).to_bytes()
    pkg = sign_package(build_full(
        image, created_at=datetime.now(UTC), notes="Smoother derating near the thermal limit",
        fixes=Fixes(fault_codes=("derating",))), key)
    manager = {"Authorization": f"Bearer {logins.tokens[RELEASE_MANAGER]}"}
    async with httpx.AsyncClient(base_url=url + "/api/v1", headers=manager,
                                 timeout=30) as api:
        r = await api.post("/releases", content=pkg.to_bytes())
        r.raise_for_status()
        sites = {s["code"]: s["id"] for s in (await api.get("/sites")).json()["data"]}
        day = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
        r = await api.post("/plans", json={
            "title": f"{series} 1.1.0 for {SITES[0].name}", "release_id": r.json()["id"],
            "site_ids": [sites[SITES[0].code]],
            "windows": [{"start": f"{day}T10:00", "end": f"{day}T16:00"}],
            "impact": "each unit stops for about two minutes while it restarts",
            "personnel_required": "one electrician on site"})
        r.raise_for_status()
        plan_id = r.json()["id"]
        r = await api.post(f"/plans/{plan_id}/issue")
        r.raise_for_status()
        log.warning("demo: release manager issued upgrade plan %s", plan_id)


async def _tour(url: str, logins: DemoLogins, sim: Simulator, stop: asyncio.Event) -> None:
    import httpx

    engineer = {"Authorization": f"Bearer {logins.tokens['engineer']}"}
    async with httpx.AsyncClient(base_url=url, headers=engineer, timeout=10) as api:
        sites = {s["code"]: s["id"] for s in (await api.get("/api/v1/sites")).json()["data"]}
        r = await api.post("/api/v1/tickets", json={
            "site_id": sites["site-harbour"], "source": "phone", "fault_class": "C",
            "title": "Customer reports lower PV yield since Monday",
            "description": "Called in by the facility manager; no alarm on site."})
        r.raise_for_status()
        first = sim.units[0]
        first.inject("trip")
        log.warning("demo: injected trip on %s (the tour's first fault)", first.serial)
        ticket = None
        for _ in range(120):  # the fault engine opens an A ticket within a few polls
            found = (await api.get("/api/v1/tickets", params={"source": "fault"})).json()
            if found["data"]:
                ticket = found["data"][-1]
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
                return
        if ticket is None:
            log.warning("demo: no fault ticket appeared; no session request")
            return
        units = (await api.get("/api/v1/units", params={"site_id": ticket["site_id"]})).json()
        r = await api.post("/api/v1/sessions", json={
            "ticket_id": ticket["id"], "reason": "Read the tripped unit's fault log",
            "scope": {"shell": True, "units": [u["device"] for u in units["data"][:1]]},
            "max_duration_s": 3600})
        r.raise_for_status()
        log.warning("demo: engineer asked for remote session %s", r.json().get("id"))
