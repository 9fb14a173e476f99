"""The agent's command dispatcher: only signed, own-site, live, first-time commands run."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import JsonValue

from agent.commands import ACK_STREAM, CommandDispatcher, CommandRejected, Progress
from agent.errors import AgentError
from agent.spool import Spool
from protocols.clock import ManualClock
from protocols.commands import sign_command
from protocols.messages import AckResult, Command, CommandAck, CommandKind
from protocols.signing import generate_private_key, public_key_text

START = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool.db", 10_000_000)
    await s.open()
    yield s
    await s.close()


class Rig:
    def __init__(self, spool: Spool) -> None:
        self.key = generate_private_key()
        self.clock = ManualClock(START)
        self.notified = 0
        self.spool = spool
        self.dispatcher = CommandDispatcher("site-a", "agent-a", (public_key_text(self.key),),
                                            spool, self._notify, self.clock)

    def _notify(self) -> None:
        self.notified += 1

    def command(self, kind: CommandKind = CommandKind.DIAGNOSTIC, site: str = "site-a",
                ttl_s: float = 60, **args: JsonValue) -> bytes:
        now = self.clock.now()
        cmd = Command(id=uuid.uuid4(), site=site, kind=kind, issued_at=now,
                      expires_at=now + timedelta(seconds=ttl_s), args=args)
        return sign_command(cmd, self.key).to_bytes()

    async def acks(self) -> list[CommandAck]:
        rows = await self.spool.peek(0, 1000)
        return [CommandAck.from_bytes(r.payload) for r in rows if r.stream == ACK_STREAM]


@pytest.fixture
def rig(spool: Spool) -> Rig:
    return Rig(spool)


async def test_a_handler_runs_once_with_progress(rig: Rig) -> None:
    calls: list[Command] = []

    async def handler(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        calls.append(cmd)
        await progress({"step": "half"})
        return {"answer": 42}

    rig.dispatcher.register(CommandKind.DIAGNOSTIC, handler)
    payload = rig.command(action="ping")
    await rig.dispatcher.handle(payload)
    await rig.dispatcher.handle(payload)  # a redelivery: not run again
    acks = await rig.acks()
    assert [a.result for a in acks] == [AckResult.PROGRESS, AckResult.OK]
    assert acks[1].detail == {"answer": 42}
    assert len(calls) == 1
    assert calls[0].args == {"action": "ping"}
    assert rig.notified == 2
    assert rig.dispatcher.counts == {"ok": 1, "replayed": 1}


async def test_replays_are_remembered_across_a_restart(rig: Rig, tmp_path: Path) -> None:
    async def handler(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        return {}

    rig.dispatcher.register(CommandKind.DIAGNOSTIC, handler)
    payload = rig.command()
    await rig.dispatcher.handle(payload)
    await rig.spool.close()
    reopened = Spool(tmp_path / "spool.db", 10_000_000)
    await reopened.open()
    try:
        again = CommandDispatcher("site-a", "agent-a", (public_key_text(rig.key),), reopened,
                                  lambda: None, rig.clock)
        again.register(CommandKind.DIAGNOSTIC, handler)
        await again.handle(payload)
        assert again.counts == {"replayed": 1}
    finally:
        await reopened.close()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda r: r.command(site="site-b"), "addressed to site"),
        (lambda r: r.command(ttl_s=0.5), "expired"),
        (lambda r: Command.from_bytes(r.command()).model_copy(update={"signature": None})
         .to_bytes(), "unsigned"),
        (lambda r: r.command(kind=CommandKind.SESSION_OPEN), "does not carry out"),
    ],
    ids=["foreign-site", "expired", "unsigned", "no-handler"],
)
async def test_refusals_are_answered_with_the_reason(rig: Rig, make: object, reason: str) -> None:
    async def handler(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        raise AssertionError("must not run")

    rig.dispatcher.register(CommandKind.DIAGNOSTIC, handler)
    payload = make(rig)  # type: ignore[operator]
    rig.clock.advance(1)
    await rig.dispatcher.handle(payload)
    (ack,) = await rig.acks()
    assert ack.result is AckResult.REJECTED
    assert reason in str(ack.detail["error"])


async def test_garbage_is_ignored(rig: Rig) -> None:
    await rig.dispatcher.handle(b"{not json")
    assert await rig.acks() == []
    assert rig.dispatcher.counts == {"invalid": 1}


@pytest.mark.parametrize(
    ("error", "result"),
    [(CommandRejected("outside the window"), AckResult.REJECTED),
     (AgentError("unit did not answer"), AckResult.ERROR),
     (RuntimeError("bug"), AckResult.ERROR)],
)
async def test_handler_failures_become_answers(rig: Rig, error: Exception,
                                               result: AckResult) -> None:
    async def handler(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        raise error

    rig.dispatcher.register(CommandKind.DIAGNOSTIC, handler)
    await rig.dispatcher.handle(rig.command())
    (ack,) = await rig.acks()
    assert ack.result is result
    assert str(error) in str(ack.detail["error"])


async def test_stop_cancels_running_commands_and_says_so(rig: Rig) -> None:
    started = asyncio.Event()

    async def handler(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        started.set()
        await asyncio.Event().wait()
        return {}

    rig.dispatcher.register(CommandKind.DIAGNOSTIC, handler)
    rig.dispatcher.submit(rig.command())
    await asyncio.wait_for(started.wait(), 5)
    await rig.dispatcher.stop()
    (ack,) = await rig.acks()
    assert ack.result is AckResult.ERROR
    assert "stopped" in str(ack.detail["error"])
