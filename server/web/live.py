"""Live pages: one server-sent-events stream per open page says which regions changed.

The stream does not push data. Every `web.live_interval_s` it computes a cheap fingerprint
(counts, newest ids and times) of each topic the page shows, in the caller's scope, and sends
`change` with the topic's name when a fingerprint moved; the page's script then re-fetches
that region (`?fragment=`), rendered by the same template as the whole page. Reading the
database rather than an in-process bus keeps server processes stateless: a fault classified by
another process behind the load balancer shows up too.

Features that land later register their own topics with `@topic("name")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.core.security import visible_sites
from server.errors import InvalidInput
from server.models import Agent, Fault, Unit, User
from server.web.auth import WebUser

log = logging.getLogger(__name__)

Fingerprint = Callable[[AsyncSession, User], Awaitable[tuple[Any, ...]]]
TOPICS: dict[str, Fingerprint] = {}
PING_S = 15


def topic(name: str) -> Callable[[Fingerprint], Fingerprint]:
    """Register the fingerprint of a live topic."""

    def register(fn: Fingerprint) -> Fingerprint:
        TOPICS[name] = fn
        return fn

    return register


@topic("faults")
async def _faults(session: AsyncSession, user: User) -> tuple[Any, ...]:
    row = (await session.exec(
        select(func.count(), func.max(Fault.id), func.max(Fault.cleared_at),
               func.count(col(Fault.escalated_from)))
        .where(Fault.state == "open", visible_sites(user, col(Fault.site_id)))
    )).one()
    cleared = (await session.exec(
        select(func.max(Fault.cleared_at)).where(visible_sites(user, col(Fault.site_id)))
    )).one()
    return (*tuple(row), cleared)


@topic("units")
async def _units(session: AsyncSession, user: User) -> tuple[Any, ...]:
    units = (await session.exec(
        select(func.max(Unit.last_seen), func.sum(sa.cast(col(Unit.comm_lost), sa.Integer)),
               func.count())
        .where(visible_sites(user, col(Unit.site_id)))
    )).one()
    agents = (await session.exec(
        select(func.sum(sa.cast(col(Agent.online), sa.Integer)), func.count())
        .where(visible_sites(user, col(Agent.site_id)))
    )).one()
    return (*tuple(units), *tuple(agents))


class LiveHub:
    """Per application: tells open streams to end when the server shuts down."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.streams = 0

    def close(self) -> None:
        """End every stream (uvicorn waits for open responses before it stops)."""
        self.closing.set()


router = APIRouter()


@router.get("/events", include_in_schema=False)
async def events(
    request: Request, user: WebUser, topics: list[str] = Query(alias="topic")  # noqa: B008
) -> EventSourceResponse:
    """`text/event-stream` of `change` events naming the topics (of `?topic=`) that changed."""
    unknown = sorted(set(topics) - set(TOPICS))
    if unknown:
        raise InvalidInput(f"unknown live topic(s): {', '.join(unknown)}")
    app = request.app
    hub: LiveHub = app.state.live
    interval: float = app.state.settings.web.live_interval_s
    login_at = float(request.session.get("iat", 0))
    max_age = app.state.settings.web.session_max_age_s
    wanted = sorted(set(topics))

    async def stream() -> AsyncIterator[ServerSentEvent]:
        last: dict[str, tuple[Any, ...]] = {}
        hub.streams += 1
        try:
            async with app.state.db.session() as session:  # before `hello`: nothing is missed
                for name in wanted:
                    last[name] = await TOPICS[name](session, user)
            yield ServerSentEvent(data=json.dumps({"topics": wanted}), event="hello",
                                  retry=int(interval * 1000) + 1000)
            while not hub.closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hub.closing.wait(), interval)
                now: datetime = app.state.clock()
                if now.timestamp() - login_at > max_age:
                    yield ServerSentEvent(data="expired", event="logout")
                    return
                async with app.state.db.session() as session:
                    for name in wanted:
                        fp = await TOPICS[name](session, user)
                        if last[name] != fp:
                            yield ServerSentEvent(data=name, event="change")
                        last[name] = fp
        finally:
            hub.streams -= 1

    return EventSourceResponse(stream(), ping=PING_S, headers={"Cache-Control": "no-store"})
