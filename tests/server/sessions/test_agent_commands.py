"""The agent's side of the command channel: a signed `session.open` through the real
CommandDispatcher dials the gateway; `session.close` ends it; a grant outside the agent's own
configuration is rejected."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent import session_commands
from agent.commands import CommandDispatcher
from agent.diagnostics import Diagnostics
from agent.spool import Spool
from protocols.commands import sign_command
from protocols.messages import AckResult, Command, CommandKind
from protocols.sessions import Grant, Scope
from protocols.signing import generate_private_key, public_key_text
from server.sessions import service
from tests.server.sessions.harness import Rig
from tests.support.waiting import wait_for


class Recorder(CommandDispatcher):
    """The real dispatcher, with its acks kept in memory instead of the uplink spool."""

    acks: list[tuple[str, AckResult, dict[str, Any]]]

    async def ack(self, cmd: Command, result: AckResult, detail: dict[str, Any]) -> None:
        self.acks.append((cmd.kind.value, result, detail))


@pytest.fixture
async def dispatcher(rig: Rig, tmp_path: Path) -> AsyncIterator[tuple[Recorder, Any]]:
    key = generate_private_key()
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    await spool.open()
    d = Recorder(rig.site_code, rig.site_code, (public_key_text(key),), spool, lambda: None,
                 rig.clock)
    d.acks = []
    session_commands.register(d, rig.agent, Diagnostics(rig.agent.settings, rig.agent))
    yield d, key
    await rig.agent.close_all()
    await d.stop()
    await spool.close()


def signed(rig: Rig, key: Any, kind: CommandKind, args: dict[str, Any]) -> bytes:
    now = rig.clock.now()
    cmd = Command(id=uuid.uuid4(), site=rig.site_code, kind=kind, issued_at=now,
                  expires_at=now + timedelta(minutes=5), args=args)
    return sign_command(cmd, key).to_bytes()


async def test_signed_open_dials_and_close_ends(rig: Rig, dispatcher: Any) -> None:
    d, key = dispatcher
    session = await rig.request(gateway_shell=True, units=("unit1",))
    async with rig.db.session() as s:
        grant = service.grant_of(await service.approve(s, session, rig.customer,
                                                       now=rig.clock.now()), approved=True)
    d.submit(signed(rig, key, CommandKind.SESSION_OPEN,
                    {"grant": grant.model_dump(mode="json"), "info": {"reason": "x"}}))
    assert await rig.gateway.wait_ready(session, 15.0)
    await wait_for(lambda: any(a[2].get("state") == "ready" for a in d.acks), 5.0,
                   "the ready progress ack")
    rc, out, _ = await rig.ssh(session, "echo", "ok")
    assert (rc, out) == (0, "ok\n")

    d.submit(signed(rig, key, CommandKind.SESSION_CLOSE, {"session": session}))
    final = await wait_for(lambda: [a for a in d.acks if a[0] == "session.open"
                                    and a[1] is AckResult.OK], 10.0, "session.open to end")
    assert final[0][2]["ended"] == "closed"


async def test_grant_outside_the_agents_config_is_rejected(rig: Rig, dispatcher: Any) -> None:
    d, key = dispatcher
    grant = Grant(session="s" + "ab" * 6, scope=Scope(units=("unit9",)),
                  claim_by=rig.clock.now() + timedelta(minutes=5), max_duration_s=600)
    d.submit(signed(rig, key, CommandKind.SESSION_OPEN, {"grant": grant.model_dump(mode="json")}))
    rejected = await wait_for(lambda: [a for a in d.acks if a[1] is AckResult.REJECTED], 5.0,
                              "the rejection")
    assert "unit9" in rejected[0][2]["error"]
    forged = Grant(session="s" + "cd" * 6, scope=Scope.model_validate({"shell": True}),
                   claim_by=rig.clock.now() + timedelta(minutes=5), max_duration_s=600)
    d.submit(signed(rig, generate_private_key(), CommandKind.SESSION_OPEN,
                    {"grant": forged.model_dump(mode="json")}))
    await wait_for(lambda: len([a for a in d.acks if a[1] is AckResult.REJECTED]) == 2, 5.0,
                   "the forged command to be refused")
    assert "s" + "cd" * 6 not in rig.agent.tunnels
