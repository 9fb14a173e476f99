"""The upgrade tests' world: keys, firmware images, packages, an API server on a real port,
simulated units with the agent-side executor, and users with tokens.

Everything real: packages signed with Ed25519, uploaded over HTTP, downloaded with Range,
installed over Modbus TCP into simulated units. Time that rules depend on (windows, expiry)
comes from one `ManualClock` shared by the server and the executors.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from agent.config import DeviceSettings
from agent.coordinator import ModbusCoordinator
from agent.devices.modbus import ModbusLink
from agent.upgrades import UpgradeExecutor, UpgradeOptions
from protocols.clock import ManualClock
from protocols.firmware import FirmwareImage
from protocols.packages import Fixes, Package, build_delta, build_full, sign_package
from protocols.profiles import load_profile
from protocols.signing import Ed25519PrivateKey, public_key_text
from server.app import create_app
from server.core.config import HttpSettings, ServerSettings, UpgradeSettings
from server.core.db import Database
from server.core.security import hash_token
from server.models import ApiToken, Organisation, Site, Unit, User
from simulators.server import SimConfig, Simulator
from tests.support.sinks import RecordingSink
from tests.support.waiting import wait_for

START = datetime(2031, 6, 1, 12, 0, tzinfo=UTC)
IMAGE_BYTES = 6 * 1024
FAST = UpgradeOptions(window_poll_s=0.02, state_poll_s=0.05, install_timeout_s=20.0,
                      settle_poll_s=0.05, download_backoff_s=0.05)


def firmware(version: str, series: str = "EMU-BS", size: int = IMAGE_BYTES,
             change: int = 0) -> bytes:
    """A deterministic image of `size` payload bytes; versions differ in `change` bytes."""
    payload = bytearray(random.Random(f"{series}").randbytes(size))
    for i in range(change):
        payload[size // 3 + i] ^= 0xA5
    return FirmwareImage(series, version, bytes(payload)).to_bytes()


def signed(image: bytes, key: Ed25519PrivateKey, **kw: Any) -> Package:
    """A signed full package of `image`."""
    return sign_package(build_full(image, created_at=START, **kw), key)


def signed_delta(base: bytes, image: bytes, key: Ed25519PrivateKey, **kw: Any) -> Package:
    """A signed delta package."""
    return sign_package(build_delta(base, image, created_at=START, **kw), key)


@dataclass
class Api:
    """The API on a real port, its settings and clock, and tokens by role."""

    url: str
    settings: ServerSettings
    db: Database
    clock: ManualClock
    tokens: dict[str, str] = field(default_factory=dict)
    org_id: int = 0

    def client(self, who: str = "admin") -> httpx.AsyncClient:
        """An API client authenticated as `who`."""
        return httpx.AsyncClient(base_url=self.url + "/api/v1", timeout=30,
                                 headers={"Authorization": f"Bearer {self.tokens[who]}"})


@asynccontextmanager
async def api_server(db_url: str, data_dir: Path, key: Ed25519PrivateKey,
                     clock: ManualClock) -> AsyncIterator[Api]:
    """`create_app` served by uvicorn on a free port, with the release key trusted."""
    settings = ServerSettings(
        database_url=db_url, secret_key=secrets.token_urlsafe(24), data_dir=data_dir,
        http=HttpSettings(port=0), upgrades=UpgradeSettings(release_keys=(public_key_text(key),)),
    )
    db = Database(db_url)
    app = create_app(settings, db, clock=clock.now)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started, 20, "uvicorn to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Api(f"http://127.0.0.1:{port}", settings, db, clock)
    finally:
        server.should_exit = True
        await asyncio.wait({task}, timeout=10)
        await db.close()


async def add_user(db: Database, role: str, org_id: int | None = None) -> tuple[int, str]:
    """A user with a token: (user id, token)."""
    token = secrets.token_urlsafe(24)
    async with db.session() as s:
        user = User(name=f"{role}-{secrets.token_hex(4)}", role=role, org_id=org_id)
        s.add(user)
        await s.flush()
        assert user.id is not None
        s.add(ApiToken(user_id=user.id, token_hash=hash_token(token), name="t"))
        return user.id, token


@dataclass
class SiteRig:
    """One site: its row, its simulated units, and its gateway's executor."""

    code: str
    site_id: int
    sim: Simulator
    coordinators: dict[str, ModbusCoordinator]
    executor: UpgradeExecutor
    sink: RecordingSink
    unit_ids: dict[str, int] = field(default_factory=dict)

    def unit(self, device: str) -> Any:
        """The simulated unit behind a device name."""
        return self.sim.unit(int(device.rsplit("-", 1)[1]))

    async def close(self) -> None:
        """Close links and stop the simulator."""
        for c in self.coordinators.values():
            c.link.close()
        await self.sim.stop()


async def make_org(db: Database) -> int:
    """A customer organisation."""
    async with db.session() as s:
        org = Organisation(name=f"Customer {secrets.token_hex(4)}")
        s.add(org)
        await s.flush()
        assert org.id is not None
        return org.id


async def make_site(db: Database, org_id: int, units: int, state_dir: Path,
                    key: Ed25519PrivateKey, clock: ManualClock, *, tz: str = "UTC",
                    version: str = "1.0.0", timeout_s: float = 0.5) -> SiteRig:
    """A site row with unit rows, simulated units, and an executor for them."""
    code = f"up-{secrets.token_hex(3)}"
    async with db.session() as s:
        site = Site(code=code, name=code, org_id=org_id, timezone=tz)
        s.add(site)
        await s.flush()
        assert site.id is not None
        site_id = site.id
    sim = Simulator(SimConfig(units=units, port=0, profiles=["EMU-BS"], reboot_s=0.2,
                              firmware_version=version, refresh_s=0.0))
    await sim.start()
    sink = RecordingSink()
    coords: dict[str, ModbusCoordinator] = {}
    profile = load_profile("EMU-BS")
    for n in range(1, units + 1):
        host, port, uid = sim.where(n)
        dev = DeviceSettings(name=f"bs-{n}", protocol="modbus-tcp", host=host, port=port,
                             unit_id=uid, profile="EMU-BS", timeout_s=timeout_s, retries=0)
        coords[dev.name] = ModbusCoordinator(dev, profile, ModbusLink(dev), sink, clock)
    executor = UpgradeExecutor(state_dir / code, [key.public_key()], coords, sink, clock,
                               FAST)
    rig = SiteRig(code, site_id, sim, coords, executor, sink)
    async with db.session() as s:
        for name in coords:
            row = Unit(site_id=site_id, device=name, series="EMU-BS", model="EMU-BS100",
                       firmware=version)
            s.add(row)
            await s.flush()
            assert row.id is not None
            rig.unit_ids[name] = row.id
    return rig


async def upload(api: Api, pkg: Package, who: str = "admin") -> httpx.Response:
    """POST a package bundle to /releases."""
    async with api.client(who) as c:
        return await c.post("/releases", content=pkg.to_bytes(),
                            headers={"Content-Type": "application/octet-stream"})


def fixes(*codes: str, tickets: tuple[int, ...] = ()) -> Fixes:
    """A release's fixes."""
    return Fixes(fault_codes=codes, tickets=tickets)


class Loopback:
    """Stands in for the command channel: the engine's jobs go straight to the site's
    executor, and its answers straight back to `engine.on_result`, each in a transaction."""

    def __init__(self, db: Database, rigs: dict[int, SiteRig]) -> None:
        self.db = db
        self.rigs = rigs
        self.engine: Any = None
        self.outbox: list[tuple[str, int, dict[str, Any]]] = []
        self.sent: list[tuple[str, int, dict[str, Any]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def send(self, _session: Any, site: Site, args: dict[str, Any], _ttl: float) -> str:
        """The engine's JobSender: queue the job until the engine's transaction commits."""
        cmd_id = secrets.token_hex(8)
        assert site.id is not None
        self.outbox.append((cmd_id, site.id, args))
        return cmd_id

    def pump(self) -> None:
        """Start the queued jobs (call after `engine.tick()` has committed)."""
        for item in self.outbox:
            self.sent.append(item)
            task = asyncio.create_task(self._run(*item))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.outbox.clear()

    async def _run(self, cmd_id: str, site_id: int, args: dict[str, Any]) -> None:
        from agent.errors import UpgradeError, UpgradeRefused

        async def progress(detail: dict[str, Any]) -> None:
            await self._answer(cmd_id, "progress", detail)

        try:
            detail = await self.rigs[site_id].executor.run(args, progress)
        except UpgradeRefused as exc:
            await self._answer(cmd_id, "rejected", {"error": str(exc)})
        except UpgradeError as exc:
            await self._answer(cmd_id, "error", {"error": str(exc)})
        else:
            await self._answer(cmd_id, "ok", detail)

    async def _answer(self, cmd_id: str, result: str, detail: dict[str, Any]) -> None:
        async with self.db.session() as s:
            await self.engine.on_result(s, cmd_id, result, detail)

    async def close(self) -> None:
        """Cancel what still runs."""
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
