"""Commands end to end: server signs and publishes, the real agent obeys over the broker, the
answer comes back through ingest; an agent that was away gets its command when it returns."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import JsonValue

from agent.commands import CommandRejected, Progress
from agent.config import AgentSettings, BrokerSettings, CommandSettings, SpoolSettings
from agent.service import Agent
from protocols.messages import Command, CommandKind
from server.commands.models import CommandRecord
from server.core.config import HttpSettings, MqttSettings, ServerSettings
from server.core.db import Database
from server.main import ServerProcess
from server.models import Organisation, Site
from tests.support.broker import BrokerInfo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    proc: ServerProcess
    site: str
    broker: BrokerInfo
    tmp: Path

    def agent(self) -> Agent:
        return Agent(AgentSettings(
            site=self.site, state_dir=self.tmp,
            broker=BrokerSettings(url=self.broker.url,
                                  protocol="3.1.1" if self.broker.embedded else "auto"),
            spool=SpoolSettings(path=Path("spool.db")),
            commands=CommandSettings(server_key=self.proc.commands.public_key),
        ))

    async def state(self, command_id: str) -> CommandRecord | None:
        async with self.proc.db.session() as s:
            return await s.get(CommandRecord, command_id)

    async def settled(self, command_id: str, state: str, within_s: float = 20) -> CommandRecord:
        async def check() -> CommandRecord | None:
            row = await self.state(command_id)
            return row if row is not None and row.state == state else None

        row = await wait_for(check, within_s, f"command {command_id} to be {state}")
        assert row is not None
        return row


@pytest.fixture
async def stack(mqtt_broker: BrokerInfo, server_db_url: str,
                tmp_path: Path) -> AsyncIterator[Stack]:
    code = f"cmd-{secrets.token_hex(4)}"
    db = Database(server_db_url)
    async with db.session() as s:
        org = Organisation(name=f"Commands {code}")
        s.add(org)
        await s.flush()
        assert org.id is not None
        s.add(Site(code=code, name="commands", org_id=org.id))
    await db.close()
    settings = ServerSettings(
        database_url=server_db_url, secret_key=secrets.token_urlsafe(24), data_dir=tmp_path / "srv",
        mqtt=MqttSettings(url=mqtt_broker.url,
                          protocol="3.1.1" if mqtt_broker.embedded else "auto",
                          shared_group=f"c-{code}" if mqtt_broker.shared_subscriptions else None),
        http=HttpSettings(port=0), scheduler_tick_s=0.2,
        commands={"redeliver_s": 1.0},
    )
    proc = ServerProcess(settings)
    stop = asyncio.Event()
    runner = asyncio.create_task(proc.run(stop))
    try:
        await wait_for(proc.started.wait(), 30, "the server to start")
        await wait_for(lambda: proc.ingest is not None and proc.ingest.ready.is_set(), 30,
                       "ingest to subscribe")
        yield Stack(proc, code, mqtt_broker, tmp_path)
    finally:
        stop.set()
        await runner


async def send(stack: Stack, kind: CommandKind, ttl_s: float = 60, **args: JsonValue) -> str:
    async with stack.proc.db.session() as s:
        cmd = await stack.proc.commands.send(s, stack.site, kind, dict(args), ttl_s)
    return str(cmd.id)


async def test_command_round_trip(stack: Stack) -> None:
    agent = stack.agent()
    seen: list[Command] = []

    async def diagnose(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        seen.append(cmd)
        await progress({"step": "pinging"})
        return {"reachable": True, "target": cmd.args["target"]}

    async def refuse(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        raise CommandRejected("no session is approved here")

    agent.commands.register(CommandKind.DIAGNOSTIC, diagnose)
    agent.commands.register(CommandKind.SESSION_OPEN, refuse)
    await agent.start()
    try:
        await wait_for(lambda: agent.uplink.stats.connected, 20, "the agent to connect")
        ok_id = await send(stack, CommandKind.DIAGNOSTIC, target="unit-1")
        row = await stack.settled(ok_id, "ok")
        assert row.result == {"reachable": True, "target": "unit-1"}
        assert row.sends >= 1
        assert len(seen) == 1
        no_id = await send(stack, CommandKind.SESSION_OPEN)
        row = await stack.settled(no_id, "rejected")
        assert "no session is approved" in row.result["error"]
    finally:
        await agent.stop()


async def test_an_absent_agent_gets_its_command_when_back(stack: Stack) -> None:
    command_id = await send(stack, CommandKind.DIAGNOSTIC, target="unit-2")
    await wait_for(lambda: stack.state(command_id), 10, "the command row")
    agent = stack.agent()
    done = asyncio.Event()

    async def diagnose(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        done.set()
        return {}

    agent.commands.register(CommandKind.DIAGNOSTIC, diagnose)
    await agent.start()
    try:
        await wait_for(done.wait(), 20, "the returning agent to get the command")
        await stack.settled(command_id, "ok")
    finally:
        await agent.stop()


async def test_unanswered_commands_expire(stack: Stack) -> None:
    command_id = await send(stack, CommandKind.DIAGNOSTIC, ttl_s=0.5)
    row = await stack.settled(command_id, "expired")
    assert row.result == {}


async def test_commands_api_is_staff_only_and_shows_outcomes(stack: Stack) -> None:
    import httpx

    from server.core.security import hash_token
    from server.models import ApiToken, User

    token = secrets.token_urlsafe(24)
    async with stack.proc.db.session() as s:
        user = User(name=f"eng-{stack.site}", role="engineer")
        s.add(user)
        await s.flush()
        assert user.id is not None
        s.add(ApiToken(user_id=user.id, token_hash=hash_token(token)))
    command_id = await send(stack, CommandKind.DIAGNOSTIC, ttl_s=0.5)
    await stack.settled(command_id, "expired")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.proc.api_port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        one = (await api.get(f"/api/v1/commands/{command_id}")).json()
        assert one["state"] == "expired"
        assert "payload" not in one
        listed = (await api.get("/api/v1/commands", params={"site": stack.site})).json()
        assert [c["id"] for c in listed["data"]] == [command_id]
        assert (await api.get("/api/v1/commands/nope")).status_code == 422


async def test_agents_back_online_get_their_open_commands_in_one_go(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a broker restart many agents say `online` at once: one query serves them all."""
    command_id = await send(stack, CommandKind.DIAGNOSTIC, target="unit-1")
    row = await wait_for(lambda: stack.state(command_id), 10, "the command row")
    assert row is not None
    delivered: list[str] = []

    async def deliver(cid: str) -> None:
        delivered.append(cid)

    skipped = asyncio.Event()

    async def no_timer(now: object = None) -> tuple[int, int]:
        skipped.set()  # the scheduler's own redelivery would deliver the command too
        return 0, 0

    monkeypatch.setattr(stack.proc.commands, "tick", no_timer)
    # once the scheduler has called the stub, no tick of its own is still under way
    await wait_for(skipped.wait(), 10, "the scheduler to pass its redelivery")
    monkeypatch.setattr(stack.proc.commands, "_deliver", deliver)
    await stack.proc.commands.redeliver_sites([])
    await stack.proc.commands.redeliver_sites([row.site_id + 10_000])  # no such site
    await stack.proc.commands.redeliver_sites([row.site_id + 10_000, row.site_id])
    await wait_for(lambda: delivered == [command_id], 10, "the site's open command resent")
