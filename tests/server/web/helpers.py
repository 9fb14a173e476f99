"""Dashboard test helpers: users with passwords, logging a client in, serving over a socket."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI
from sqlmodel import select

from server.core.db import Database
from server.core.passwords import set_password
from server.models import User
from tests.support.net import LOOPBACK
from tests.support.waiting import wait_for

PASSWORD = "correct horse battery"  # noqa: S105 - a test fixture's password


async def give_password(db: Database, name: str, password: str = PASSWORD) -> None:
    """Set `name`'s dashboard password."""
    async with db.session() as session:
        user = (await session.exec(select(User).where(User.name == name))).one()
        await set_password(session, user, password)


async def name_of(db: Database, user_id: int) -> str:
    """A user's log-in name."""
    async with db.session() as session:
        user = await session.get(User, user_id)
        assert user is not None
        return user.name


def csrf_of(html: str) -> str:
    """The CSRF token of the first form in `html`."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match[1]


async def log_in(client: httpx.AsyncClient, name: str, password: str = PASSWORD) -> None:
    """Log `client` in through the form (its cookie jar keeps the session)."""
    form = await client.get("/login")
    r = await client.post("/login", data={"username": name, "password": password,
                                          "csrf_token": csrf_of(form.text), "next": "/"})
    assert r.status_code == 303, r.text


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """`app` on a loopback port (real sockets, for event streams and the browser); its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=0, lifespan="on",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started or task.done(), 30, "uvicorn to start")
        if task.done():
            task.result()
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{LOOPBACK}:{port}"
    finally:
        app.state.live.close()
        server.should_exit = True
        await wait_for(task, 30, "uvicorn to stop")
