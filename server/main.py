"""One server process: the roles it runs (API, ingest, scheduler) around one database.

By default a process runs all three; `roles` in the settings splits them for scale-out
(e.g. several API + ingest processes and one scheduler). Each role is a task; a failing role
is logged and restarted with a capped backoff, and the process stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from protocols.clock import Clock, SystemClock
from server.core.config import ServerSettings
from server.core.db import Database, migrate

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 5.0


class ServerProcess:
    """Runs the configured roles until `stop` is set."""

    def __init__(self, settings: ServerSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.db = Database(settings.database_url)
        self.api_port: int | None = None
        self.started = asyncio.Event()
        self._uvicorn: Any = None
        self.ingest: Any = None
        self.faults: Any = None
        self.sla: Any = None
        self.gateway: Any = None
        self.rollouts: Any = None
        from server.commands.service import CommandService

        self.commands = CommandService(settings, self.db, clock=self.clock)
        """Signed orders to agents; features subscribe to answers with `commands.on_ack`."""
        from server.commissioning.channel import subscribe as follow_commissioning

        follow_commissioning(self.commands)

    async def prepare(self) -> None:
        """Migrate (if configured); the API's lifespan creates the bootstrap admin."""
        if self.settings.migrate_on_start:
            await migrate(self.settings.database_url)
        await self.commands.load_key()

    async def run(self, stop: asyncio.Event) -> None:
        """Prepare, start every role, wait for `stop`, shut down."""
        from server.faults.engine import FaultEngine

        await self.prepare()
        self.faults = FaultEngine(self.clock)
        self._tickets()
        self._upgrades()
        tasks: list[asyncio.Task[None]] = []
        roles = self.settings.roles
        if "ingest" in roles:
            tasks.append(asyncio.create_task(self._supervise("ingest", self._ingest)))
        if "scheduler" in roles:
            tasks.append(asyncio.create_task(self._supervise("scheduler", self._scheduler)))
        if "gateway" in roles:
            tasks.append(asyncio.create_task(self._supervise("gateway", self._gateway)))
        if "api" in roles:
            tasks.append(asyncio.create_task(self._api(), name="api"))
        else:
            self.started.set()
        try:
            await stop.wait()
        finally:
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True  # uvicorn closes its sockets itself
                self._uvicorn.config.app.state.live.close()  # end the dashboard's streams
            if self.ingest is not None:
                await self.ingest.stop()
            api = [t for t in tasks if t.get_name() == "api"]
            if api:  # let uvicorn finish its shutdown (and close its sockets)
                await asyncio.wait(api, timeout=SHUTDOWN_GRACE_S)
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.sla is not None:
                await self.sla.close()
            await self.commands.close()
            await self.db.close()

    def _tickets(self) -> None:
        """Faults open tickets; the SLA engine (scheduler role) fires their clocks."""
        from server.sla import clocks
        from server.sla.engine import SlaEngine
        from server.tickets.faults import FaultTickets

        clocks.configure(self.settings.sla.terms)
        FaultTickets(self.settings.sla, self.clock).attach(self.faults)
        self.sla = SlaEngine(self.db, self.settings.sla, self.clock)

    def _upgrades(self) -> None:
        """Rollouts send `upgrade.job` commands (scheduler) and follow their answers (ingest)."""
        from server.upgrades.rollout import RolloutEngine, attach, command_sender

        def base_url() -> str:
            http = self.settings.http
            return self.settings.upgrades.public_url or \
                f"http://{http.host}:{self.api_port or http.port}"

        self.rollouts = RolloutEngine(self.settings, self.db, command_sender(self.commands),
                                      clock=self.clock, base_url=base_url)
        attach(self.rollouts, self.commands)

    async def _supervise(self, name: str, role: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        while True:
            try:
                await role()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("role %s failed; restarting in %.0f s", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _gateway(self) -> None:
        """The remote-session SSH gateway (server/sessions/gateway.py)."""
        from server.sessions.authority import DbAuthority
        from server.sessions.gateway import Gateway, load_host_key

        cfg = self.settings.gateway
        key = await asyncio.to_thread(load_host_key, self.settings.gateway_host_key_file)
        self.gateway = Gateway(DbAuthority(self.db, self.clock), key, host=cfg.host,
                               port=cfg.port, poll_s=cfg.poll_s, clock=self.clock)
        await self.gateway.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.gateway.close()

    async def _ingest(self) -> None:
        from server.ingest.worker import IngestWorker

        self.ingest = IngestWorker(self.settings, self.db, on_telemetry=self.faults.on_telemetry,
                                   on_event=self.faults.on_event,
                                   on_ack=self.commands.handle_ack,
                                   on_online=self.commands.redeliver_sites)
        await self.ingest.run()

    async def _scheduler(self) -> None:
        from server import scheduler_jobs

        storage = self.settings.storage
        retention = scheduler_jobs.RetentionMemo()
        loop = asyncio.get_running_loop()
        next_rollup = loop.time()
        while True:
            try:
                await self.sla.tick()
            except Exception:
                log.exception("SLA tick failed")
            try:
                async with self.db.session() as session:
                    await self.faults.tick(session, self.clock.now())
                await self.commands.tick(self.clock.now())
                await self.rollouts.tick()
                if loop.time() >= next_rollup:
                    await scheduler_jobs.run_rollups(self.db, self.clock.now())
                    await scheduler_jobs.run_retention(self.db, self.clock.now(), storage,
                                                     retention)
                    next_rollup = loop.time() + storage.rollup_interval_s
            except Exception:
                log.exception("scheduler tick failed")
            await asyncio.sleep(self.settings.scheduler_tick_s)

    async def _api(self) -> None:
        import uvicorn

        from server.app import create_app

        app = create_app(self.settings, self.db, clock=self.clock.now,
                         command_service=self.commands)
        http = self.settings.http
        config = uvicorn.Config(app, host=http.host, port=http.port, log_level="warning",
                                lifespan="on", forwarded_allow_ips=http.forwarded_allow_ips,
                                ssl_certfile=http.tls_cert_file, ssl_keyfile=http.tls_key_file)
        process = self

        class _Server(uvicorn.Server):
            async def startup(self, sockets: list[Any] | None = None) -> None:
                await super().startup(sockets)
                for srv in getattr(self, "servers", []):
                    for sock in srv.sockets:
                        process.api_port = sock.getsockname()[1]
                process.started.set()

        server = _Server(config)
        self._uvicorn = server
        try:
            await server.serve()
        finally:
            self.started.set()  # a failed start must not leave waiters hanging
