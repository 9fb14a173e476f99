"""The agent process: coordinators, batcher, spool and uplink wired together, plus health.

Health (points/s, spool depth and age, reconnects, errors per device) is published with the
retained `online` status and written to `<state_dir>/agent-health.json`, which
`emu agent status` reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from agent import __version__, session_commands
from agent.batcher import Batcher
from agent.commands import CommandDispatcher
from agent.commissioning import CommissioningRunner
from agent.config import AgentSettings, DeviceSettings
from agent.coordinator import ModbusCoordinator
from agent.devices.modbus import ModbusLink
from agent.diagnostics import Diagnostics, RecentLog
from agent.sessions import AgentSessions
from agent.spool import Spool
from agent.upgrades import UpgradeExecutor
from agent.uplink import Uplink
from protocols.clock import Clock, SystemClock
from protocols.messages import CommandKind, EventKind, Health
from protocols.profiles import Profile, load_profile
from protocols.signing import load_public_keys

log = logging.getLogger(__name__)
HEALTH_FILE = "agent-health.json"


class Agent:
    """Everything one gateway runs."""

    def __init__(self, settings: AgentSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        up = settings.uplink
        self.spool = Spool(settings.spool_path, int(settings.spool.max_mb * 1024 * 1024))
        self.batcher = Batcher(self.spool, settings.agent, max_points=up.batch_max_points,
                               max_age_s=up.batch_max_age_s, compress=up.compress,
                               clock=self.clock)
        self.uplink = Uplink(settings, self.spool, self.clock)
        self.batcher.on_batch = self.uplink.notify
        self.commands = CommandDispatcher(settings.site, settings.agent,
                                          settings.commands.trusted, self.spool,
                                          self.uplink.notify, self.clock)
        self.uplink.on_command = self.commands.submit
        self.sessions = AgentSessions(settings, self.clock)
        """Remote sessions: outbound tunnels to the SSH gateway (agent/sessions.py)."""
        self.recent_log = RecentLog()
        self.diagnostics = Diagnostics(settings, self.sessions, self.recent_log)
        session_commands.register(self.commands, self.sessions, self.diagnostics)
        self.commissioning = CommissioningRunner(self.clock, devices=settings.devices)
        self.commands.register(CommandKind.COMMISSIONING_CHECK, self.commissioning.handler)
        self.coordinators: list[ModbusCoordinator] = []
        self.sources: list[Any] = []
        self.upgrades: UpgradeExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()
        self._last_points = 0
        self._last_t = time.monotonic()

    def _profile(self, dev: DeviceSettings) -> Profile | None:
        return None if dev.profile == "sunspec" else load_profile(dev.profile)

    async def start(self) -> None:
        """Open the spool and start every loop."""
        await self.spool.open()
        logging.getLogger().addHandler(self.recent_log)
        self.batcher.add_event(self.clock.now(), EventKind.AGENT_STARTED, None, None,
                               detail={"version": __version__,
                                       "devices": [d.name for d in self.settings.devices]})
        for dev in self.settings.devices:
            if dev.protocol == "mqtt":
                from agent.devices.mqtt import MqttSource

                source = MqttSource(dev, self._required(dev), self.settings.local_mqtt,
                                    self.batcher, self.clock)
                self.sources.append(source)
                self._spawn(source.run(), f"mqtt:{dev.name}")
                continue
            profile = self._profile(dev)
            link = ModbusLink(dev)
            if profile is None:
                from agent.devices.discovery import DiscoveringCoordinator

                coord: ModbusCoordinator = DiscoveringCoordinator(dev, link, self.batcher,
                                                                  self.clock)
            else:
                coord = ModbusCoordinator(dev, profile, link, self.batcher, self.clock)
            self.coordinators.append(coord)
        self.upgrades = UpgradeExecutor(
            self.settings.state_dir,
            load_public_keys(self.settings.upgrades.release_keys, "upgrades.release_keys"),
            {c.name: c for c in self.coordinators}, self.batcher, self.clock)
        self.commands.register(CommandKind.UPGRADE_JOB, self.upgrades.handle)
        n = len(self.coordinators)
        for i, coord in enumerate(self.coordinators):  # spread the units over the interval
            self._spawn(coord.run(i / n * coord.device.poll_interval_s), f"poll:{coord.name}")
        self._spawn(self.batcher.run(), "batcher")
        self._spawn(self.uplink.run(), "uplink")
        self._spawn(self._health_loop(), "health")

    def _required(self, dev: DeviceSettings) -> Profile:
        profile = self._profile(dev)
        if profile is None:  # settings refuse sunspec for mqtt devices
            raise ValueError(f"{dev.name}: an MQTT device needs a profile")
        return profile

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_report_end)
        self._tasks.append(task)

    async def stop(self) -> None:
        """Stop polling, flush what is buffered to the spool, say offline, close."""
        for coord in self.coordinators:
            coord.stopping = True
        await _cancel_all([t for t in self._tasks if t.get_name() != "uplink"])
        await self.sessions.close_all()
        await self.commands.stop()
        logging.getLogger().removeHandler(self.recent_log)
        await self.batcher.flush(force=True)
        await self.uplink.offline()
        await _cancel_all(self._tasks)
        for coord in self.coordinators:
            coord.link.close()
        await self.spool.close()

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set (SIGTERM/SIGINT in the CLI)."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def health(self) -> dict[str, Any]:
        """The agent's own health, as published and as written for `emu agent status`."""
        now = time.monotonic()
        points = self.batcher.points_in
        rate = (points - self._last_points) / max(now - self._last_t, 1e-6)
        self._last_points, self._last_t = points, now
        batches, spooled, oldest = await self.spool.depth()
        age = max(0.0, time.time() - oldest) if oldest else 0.0
        devices = {c.name: {**c.stats.as_dict(), "comm_lost": c.comm_lost}
                   for c in self.coordinators}
        for s in self.sources:
            devices[s.name] = s.health()
        return {
            "agent": self.settings.agent, "site": self.settings.site, "version": __version__,
            "ts": self.clock.now().isoformat(), "uptime_s": round(now - self._started, 1),
            "points_per_s": round(rate, 1), "points_total": points,
            "spool": {"batches": batches, "points": spooled, "age_s": round(age, 1),
                      "dropped_points": self.batcher.dropped_points},
            "uplink": dict(self.uplink.stats.__dict__),
            "commands": {"running": len(self.commands.running), **self.commands.counts},
            "devices": devices,
        }

    async def _health_loop(self) -> None:
        interval = self.settings.uplink.health_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                h = await self.health()
                self.uplink.publish_status(Health(
                    points_per_s=h["points_per_s"], spool_depth=h["spool"]["batches"],
                    spool_age_s=h["spool"]["age_s"], reconnects=h["uplink"]["reconnects"],
                    errors={name: int(d.get("errors", 0)) + int(d.get("timeouts", 0))
                            + int(d.get("exceptions", 0)) + int(d.get("malformed", 0))
                            for name, d in h["devices"].items()},
                ))
                await asyncio.to_thread(write_health, self.settings.state_dir, h)
            except Exception:
                log.exception("health report failed")


async def _cancel_all(tasks: list[asyncio.Task[None]], deadline_s: float = 10.0) -> None:
    """Cancel until every task has ended.

    On Python 3.11 `asyncio.wait_for` can swallow a cancellation when the awaited reply
    lands in the same loop turn (CPython #86296), and pymodbus awaits every reply that way:
    one `cancel()` is not always enough for a coordinator polling flat out.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < end:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in pending:
        log.error("task %s did not stop within %.0f s", task.get_name(), deadline_s)


def _report_end(task: asyncio.Task[None]) -> None:
    """Log a loop that ended by itself: every agent loop is meant to run until stop()."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s ended: %s", task.get_name(), exc, exc_info=exc)


def write_health(state_dir: Path, health: dict[str, Any]) -> None:
    """Atomically replace the health file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (HEALTH_FILE + ".tmp")
    tmp.write_text(json.dumps(health, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, state_dir / HEALTH_FILE)


def read_health(state_dir: Path) -> dict[str, Any]:
    """The last health file an agent wrote in `state_dir`."""
    data: dict[str, Any] = json.loads((state_dir / HEALTH_FILE).read_text(encoding="utf-8"))
    return data
