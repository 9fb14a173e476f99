"""The HTTP application: `/api/v1/...`, `/healthz`, `/metrics`, `/openapi.json`.

`create_app` wires routers, error mapping and state; it starts nothing else (ingest and the
scheduler are separate roles that `emu server` runs). Its lifespan only makes sure the
bootstrap admin exists when `admin_token` is configured.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api import (
    agents,
    commands,
    enrolment,
    events,
    faults,
    organisations,
    parts,
    sessions,
    sites,
    sla,
    telemetry,
    tickets,
    units,
    users,
)
from server.api.errors import install_error_handlers
from server.broker_auth import SERVER_USERNAME
from server.commands.service import CommandService
from server.commissioning import api as commissioning
from server.core.config import ServerSettings
from server.core.db import Database
from server.core.security import ensure_admin
from server.enrolment import EnrolmentOptions
from server.models import utcnow
from server.sessions.ops import SessionOps
from server.sessions.service import Windows
from server.sla import clocks as sla_clocks
from server.upgrades import api as upgrades_api
from server.web import create_web_app

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
HEALTH_TIMEOUT_S = 3.0


def api_router() -> APIRouter:
    """Every resource's router under `/api/v1`."""
    router = APIRouter(prefix=API_PREFIX)
    modules = (organisations, sites, agents, enrolment, units, telemetry, faults, events, users,
               commissioning, commands, tickets, parts, sla, sessions)
    for module in modules:
        router.include_router(module.router)
    for upgrade_router in upgrades_api.routers:
        router.include_router(upgrade_router)
    return router


def enrolment_options(settings: ServerSettings) -> EnrolmentOptions:
    """What enrolled agents are told about the broker, from the `enrolment` settings."""
    ca = settings.enrolment.ca_file
    return EnrolmentOptions(
        broker_url=settings.enrolment.broker_url,
        ca_pem=ca.read_text(encoding="utf-8") if ca is not None else None,
        reserved_usernames=frozenset({settings.mqtt.username or SERVER_USERNAME}),
    )


def session_ops(settings: ServerSettings, commands: CommandService) -> SessionOps:
    """Session lifecycle whose orders to agents go through the command channel."""
    from server.sessions.link import CommandLink, attach_acks

    attach_acks(commands, commands.clock)
    return SessionOps(CommandLink(commands),
                      Windows(claim_s=settings.gateway.claim_s,
                              onsite_s=settings.gateway.onsite_window_s))


def gateway_public_key(settings: ServerSettings) -> str | None:
    """The gateway's host key (public half) if it exists yet, for known_hosts lines."""
    from server.sessions.gateway import key_text

    path = settings.gateway_host_key_file
    try:
        import asyncssh

        return key_text(asyncssh.read_private_key(path)) if path.exists() else None
    except (OSError, ValueError, asyncssh.KeyImportError):
        return None


def create_app(
    settings: ServerSettings, db: Database, *, clock: Callable[[], datetime] = utcnow,
    command_service: CommandService | None = None,
) -> FastAPI:
    """The API application over `db`; `clock` is injectable for expiry and default ranges.

    `command_service` is the process's command service (`ServerProcess` passes its own); without
    one the app makes its own, which publishes on the configured broker.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.admin_token:
            await ensure_admin(db, settings.admin_token)
        yield

    app = FastAPI(
        title="EMU Remote Service",
        version=__version__,
        description="Fleet, telemetry and faults of EMU units. Bearer tokens; roles admin, "
        "engineer, customer (a customer sees its own organisation's sites only).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    sla_clocks.configure(settings.sla.terms)
    app.state.db = db
    app.state.clock = clock
    app.state.enrolment = enrolment_options(settings)
    app.state.commands = command_service or CommandService(settings, db)
    app.state.sessions = session_ops(settings, app.state.commands)
    app.state.gateway_host_key = gateway_public_key(settings)
    install_error_handlers(app)
    app.include_router(api_router())

    @app.get("/healthz", tags=["operations"])
    async def healthz(request: Request) -> JSONResponse:
        """200 when the database answers, 503 otherwise (for load balancers and systemd)."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S), db.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # any failure to reach the database means "unavailable"
            log.warning("health check failed: %s", exc)
            return JSONResponse({"status": "unavailable", "detail": "database unreachable"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        """Prometheus metrics of this process (default registry)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    web = create_web_app(settings, db, clock)
    app.state.live = web.state.live
    web.state.parent = app  # the pages use the API's services (e.g. app.state.sessions)
    app.router.default = web  # the dashboard's pages get whatever no API route matched
    return app
