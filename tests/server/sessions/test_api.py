"""The session API end to end: HTTP requests, the signed command channel to the agent (its
publisher replaced by an in-process hand-over), the real gateway and the real `ssh`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlmodel import select

from agent.diagnostics import Diagnostics
from protocols.commands import check_command
from protocols.messages import AckResult, Command, CommandAck, CommandKind
from protocols.sessions import Grant
from protocols.signing import generate_private_key
from server.app import create_app
from server.commands.service import CommandService
from server.core.security import hash_token, new_token
from server.models import ApiToken, Site, User
from server.tickets.models import TicketEvent
from tests.server.sessions.harness import Rig
from tests.server.test_api_common import settings_for
from tests.support.waiting import wait_for


async def token_for(rig: Rig, user: User) -> str:
    token = new_token()
    async with rig.db.session() as s:
        assert user.id is not None
        s.add(ApiToken(user_id=user.id, token_hash=hash_token(token)))
    return token


class AgentEnd:
    """What the agent does with a published command: verify it, run it, answer with acks."""

    def __init__(self, rig: Rig, commands: CommandService) -> None:
        self.rig, self.commands = rig, commands
        self.diagnostics = Diagnostics(rig.agent.settings, rig.agent)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.kinds: list[str] = []

    async def publish(self, _topic: str, payload: bytes) -> None:
        cmd = Command.from_bytes(payload)
        check_command(cmd, [self.commands.key.public_key()], self.rig.site_code,
                      self.rig.clock.now())
        self.kinds.append(cmd.kind.value)
        task = asyncio.create_task(self.run(cmd))
        self.tasks.add(task)

    async def ack(self, cmd: Command, result: AckResult, detail: dict[str, Any]) -> None:
        async with self.rig.db.session() as s:
            site = (await s.exec(select(Site).where(Site.code == self.rig.site_code))).one()
            await self.commands.handle_ack(s, site, CommandAck(
                command_id=cmd.id, agent=self.rig.site_code, ts=self.rig.clock.now(),
                result=result, detail=detail))

    async def run(self, cmd: Command) -> None:
        if cmd.kind is CommandKind.SESSION_OPEN:
            async def progress(detail: dict[str, Any]) -> None:
                await self.ack(cmd, AckResult.PROGRESS, detail)

            grant = Grant.model_validate(cmd.args["grant"])
            info = cmd.args["info"]
            assert isinstance(info, dict)
            result = await self.rig.agent.open(grant, progress, info)
            await self.ack(cmd, AckResult.OK, result)
        elif cmd.kind is CommandKind.SESSION_CLOSE:
            await self.rig.agent.close(str(cmd.args["session"]))
            await self.ack(cmd, AckResult.OK, {})
        elif cmd.kind is CommandKind.DIAGNOSTIC:
            await self.ack(cmd, AckResult.OK, await self.diagnostics.run(dict(cmd.args)))


@pytest.fixture
async def channel(rig: Rig) -> AsyncIterator[tuple[AgentEnd, Any]]:
    settings = settings_for(rig.db)
    holder: dict[str, AgentEnd] = {}

    async def publish(topic: str, payload: bytes) -> None:
        await holder["end"].publish(topic, payload)

    commands = CommandService(settings, rig.db, publish=publish, clock=rig.clock,
                              key=generate_private_key())
    holder["end"] = AgentEnd(rig, commands)
    app = create_app(settings, rig.db, clock=rig.clock.now, command_service=commands)
    yield holder["end"], app
    await rig.agent.close_all()
    await asyncio.gather(*holder["end"].tasks, return_exceptions=True)
    await commands.close()


def client(app: Any, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                             headers={"Authorization": f"Bearer {token}"})


async def test_api_lifecycle_through_the_command_channel(rig: Rig, channel: Any) -> None:
    end, app = channel
    eng = await token_for(rig, rig.engineer)
    cust = await token_for(rig, rig.customer)
    other = await token_for(rig, rig.other_customer)
    async with client(app, eng) as e, client(app, cust) as c, client(app, other) as o:
        r = await e.post("/api/v1/sessions", json={
            "ticket_id": rig.ticket_id, "reason": "check the inverter",
            "scope": {"shell": True, "units": ["unit1"]}, "max_duration_s": 900})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert (await o.get(f"/api/v1/sessions/{sid}")).status_code == 404
        assert (await o.post(f"/api/v1/sessions/{sid}/approve")).status_code == 404
        assert (await o.get("/api/v1/sessions")).json()["count"] == 0
        assert (await e.post(f"/api/v1/sessions/{sid}/approve")).status_code == 403
        assert (await c.get(f"/api/v1/sessions/{sid}")).json()["state"] == "requested"

        r = await c.post(f"/api/v1/sessions/{sid}/approve")
        assert r.status_code == 200, r.text
        assert await rig.gateway.wait_ready(sid, 15.0)
        rc, out, _ = await rig.ssh(sid, "echo", "ok")
        assert (rc, out) == (0, "ok\n")

        r = await e.post(f"/api/v1/sessions/{sid}/diagnostics",
                         json={"action": "read_registers", "unit": "unit1", "address": 40000,
                               "count": 2})
        assert r.status_code == 202, r.text
        r = await e.post(f"/api/v1/sessions/{sid}/diagnostics",
                         json={"action": "ping", "unit": "unit2"})
        assert r.status_code == 422  # outside the scope

        async def diagnostic_result() -> TicketEvent | None:
            async with rig.db.session() as s:
                return (await s.exec(select(TicketEvent).where(
                    TicketEvent.ticket_id == rig.ticket_id,
                    TicketEvent.kind == "diagnostic_result"))).first()

        event = await wait_for(diagnostic_result, 10.0, "the diagnostic result on the ticket")
        assert event is not None
        assert event.detail["result"]["registers"] == [0x5375, 0x6E53]

        connect = (await e.get(f"/api/v1/sessions/{sid}/connect")).json()
        assert connect["shell"].endswith(f"{sid}@127.0.0.1")
        assert "-L 15020:unit1:502" in connect["units"]["unit1"]

        async def recorded() -> list[Any]:
            return list((await c.get(f"/api/v1/sessions/{sid}/recordings")).json())

        recs = await wait_for(recorded, 10.0, "the recording")
        cast = (await c.get(f"/api/v1/sessions/{sid}/recordings/{recs[0]['id']}")).text
        assert '"version":2' in cast.splitlines()[0]
        assert (await o.get(f"/api/v1/sessions/{sid}/audit")).status_code == 404

        r = await c.post(f"/api/v1/sessions/{sid}/revoke", json={"note": "enough"})
        assert r.json()["state"] == "revoked"
        await wait_for(lambda: "session.close" in end.kinds, 5.0, "session.close to be sent")
        audit = (await e.get(f"/api/v1/sessions/{sid}/audit")).json()
        assert audit["verified"] is True
        kinds = [x["kind"] for x in audit["entries"]]
        assert {"requested", "approved", "agent.ready", "active", "revoked"} <= set(kinds)

    async with rig.db.session() as s:
        timeline = [ev.kind for ev in (await s.exec(select(TicketEvent).where(
            TicketEvent.ticket_id == rig.ticket_id))).all()]
    assert "clocks_paused" in timeline
    assert "clocks_resumed" in timeline
    assert timeline.index("session_requested") < timeline.index("session_approved")
