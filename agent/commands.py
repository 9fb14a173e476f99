"""Orders from the server (`emu/v1/{site}/cmd`): checked, done once, answered on `cmd/ack`.

    uplink (paho thread) --payload--> CommandDispatcher.submit --task--> handler
        handler --progress()--> spool "ack" stream --uplink--> emu/v1/{site}/cmd/ack

A command is obeyed only if a trusted server key signed it, it names this site, it has not
expired on the agent's own clock, and its id was never taken before (remembered in the spool
file, so a restart or a redelivery does not run it twice). Everything else is answered
`rejected` with the reason, so the server sees why. Acks go through the spool like telemetry:
an ack written while the broker is away is delivered when it is back.

Features register a handler per `CommandKind`; a handler returns the final `ok` detail, or
raises `CommandRejected` (refused, nothing done) or another `AgentError` (failed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import JsonValue

from agent.errors import AgentError
from agent.spool import Spool
from protocols.clock import Clock, SystemClock
from protocols.commands import check_command
from protocols.errors import MessageError, SignatureError
from protocols.messages import AckResult, Command, CommandAck, CommandKind
from protocols.signing import Ed25519PublicKey, load_public_keys

log = logging.getLogger(__name__)

ACK_STREAM = "ack"
Progress = Callable[[dict[str, JsonValue]], Awaitable[None]]
Handler = Callable[[Command, Progress], Awaitable[dict[str, JsonValue]]]


class CommandRejected(AgentError):
    """The agent will not carry out this command (outside policy, scope, or its state)."""


class CommandDispatcher:
    """Verifies each command and runs its handler in a task of its own."""

    def __init__(self, site: str, agent: str, trusted_keys: tuple[str, ...], spool: Spool,
                 notify: Callable[[], None], clock: Clock | None = None) -> None:
        self.site = site
        self.agent = agent
        self.keys: list[Ed25519PublicKey] = load_public_keys(trusted_keys, "commands.server_key")
        self.spool = spool
        self.notify = notify
        self.clock = clock or SystemClock()
        self.handlers: dict[CommandKind, Handler] = {}
        self.running: dict[str, asyncio.Task[None]] = {}
        self.counts: dict[str, int] = {}

    def register(self, kind: CommandKind, handler: Handler) -> None:
        """Handle commands of `kind` with `handler` (one per kind)."""
        self.handlers[kind] = handler

    def submit(self, payload: bytes) -> None:
        """Take a raw `cmd` payload (on the event loop) and deal with it in a task."""
        task = asyncio.create_task(self.handle(payload), name="command")
        key = str(id(task))
        self.running[key] = task
        task.add_done_callback(lambda _t: self.running.pop(key, None))

    async def handle(self, payload: bytes) -> None:
        """Check, deduplicate, run, answer. Never raises: every outcome becomes an ack or a log."""
        try:
            cmd = Command.from_bytes(payload)
        except MessageError as exc:
            self._count("invalid")
            log.warning("commands: ignored a malformed command: %s", exc)
            return
        try:
            check_command(cmd, self.keys, self.site, self.clock.now())
        except SignatureError as exc:
            self._count("refused")
            log.warning("commands: refused %s", exc)
            await self.ack(cmd, AckResult.REJECTED, {"error": str(exc)})
            return
        now = self.clock.now().timestamp()
        if not await self.spool.remember_command(str(cmd.id), cmd.expires_at.timestamp(), now):
            self._count("replayed")
            log.info("commands: %s %s was already taken; ignored", cmd.kind, cmd.id)
            return
        handler = self.handlers.get(cmd.kind)
        if handler is None:
            self._count("unsupported")
            await self.ack(cmd, AckResult.REJECTED,
                           {"error": f"this agent does not carry out {cmd.kind} commands"})
            return
        await self._run(cmd, handler)

    async def _run(self, cmd: Command, handler: Handler) -> None:
        async def progress(detail: dict[str, JsonValue]) -> None:
            await self.ack(cmd, AckResult.PROGRESS, detail)

        log.info("commands: %s %s", cmd.kind, cmd.id)
        try:
            detail = await handler(cmd, progress)
        except CommandRejected as exc:
            self._count("rejected")
            await self.ack(cmd, AckResult.REJECTED, {"error": str(exc)})
        except AgentError as exc:
            self._count("failed")
            log.warning("commands: %s %s failed: %s", cmd.kind, cmd.id, exc)
            await self.ack(cmd, AckResult.ERROR, {"error": str(exc)})
        except asyncio.CancelledError:
            await asyncio.shield(self.ack(cmd, AckResult.ERROR,
                                          {"error": "the agent stopped while carrying it out"}))
            raise
        except Exception as exc:
            self._count("failed")
            log.exception("commands: %s %s crashed", cmd.kind, cmd.id)
            await self.ack(cmd, AckResult.ERROR, {"error": f"{type(exc).__name__}: {exc}"})
        else:
            self._count("ok")
            await self.ack(cmd, AckResult.OK, detail)

    async def ack(self, cmd: Command, result: AckResult, detail: dict[str, Any]) -> None:
        """Spool an answer to `cmd` (delivered at least once, like telemetry)."""
        ack = CommandAck(command_id=cmd.id, agent=self.agent, ts=self.clock.now(),
                         result=result, detail=detail)
        payload = ack.to_bytes()
        await self.spool.append(ACK_STREAM, lambda _seq: payload, 0)
        self.notify()

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    async def stop(self) -> None:
        """Cancel what is still running (each answers `error`)."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
