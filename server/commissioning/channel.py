"""The server side of `commissioning.check`: send it, and turn the agent's answer into a report.

`send_check` signs and stores the command in the caller's transaction (it is published when
that commits) and remembers its id on the run. `subscribe` hooks the plan's runs to the
command service: a progress answer is noted on the run, the final `ok` answer's detail (a
`CheckOutcome`) is recorded and a new report version stored, an error, refusal or expiry
marks the run failed. The answer arrives in ingest's transaction, so the report is stored
atomically with the command's state.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.commissioning import CheckOutcome, CheckRequest
from protocols.messages import AckResult, CommandAck, CommandKind
from server.commands.models import CommandRecord
from server.commands.service import CommandService
from server.commissioning import service
from server.commissioning.models import CommissioningRun

log = logging.getLogger(__name__)

KIND = CommandKind.COMMISSIONING_CHECK
TTL_S = 600.0
"""A check of a large site takes minutes; an agent away longer gets a fresh run instead."""


async def send_check(commands: CommandService, session: AsyncSession, site_code: str,
                     run: CommissioningRun, check: CheckRequest, *,
                     user_id: int | None = None) -> None:
    """Send the check to the site's agent and remember the command on the run."""
    cmd = await commands.send(session, site_code, KIND, check.model_dump(mode="json"),
                              TTL_S, user_id=user_id)
    run.command_id = str(cmd.id)
    session.add(run)
    await session.flush()


async def _run_of(session: AsyncSession, command_id: str) -> CommissioningRun | None:
    return (await session.exec(select(CommissioningRun).where(
        CommissioningRun.command_id == command_id).with_for_update())).first()


async def on_answer(commands: CommandService, session: AsyncSession, row: CommandRecord,
                    ack: CommandAck) -> None:
    """Progress, outcome or failure of a run (see the module docstring)."""
    run = await _run_of(session, row.id)
    if run is None or run.state in ("done", "failed"):
        return
    now = commands.clock.now()
    if ack.result is AckResult.PROGRESS:
        run.state = "running"
        run.progress = dict(ack.detail)
        session.add(run)
        return
    if ack.result is not AckResult.OK:
        why = str(ack.detail.get("error") or ack.result.value)
        await service.record_outcome(session, run.id or 0, None, error=why, now=now)
        return
    try:
        outcome = CheckOutcome.model_validate(ack.detail)
    except ValidationError as exc:
        log.warning("commissioning: run %s: the agent's answer is not an outcome: %s",
                    run.id, exc)
        await service.record_outcome(session, run.id or 0, None,
                                     error=f"unreadable answer: {exc}", now=now)
        return
    await service.record_outcome(session, run.id or 0, outcome, now=now)


async def on_expired(commands: CommandService, session: AsyncSession,
                     row: CommandRecord) -> None:
    """The agent never answered in time."""
    run = await _run_of(session, row.id)
    if run is not None and run.state not in ("done", "failed"):
        await service.record_outcome(session, run.id or 0, None,
                                     error="the agent did not answer in time",
                                     now=commands.clock.now())


def subscribe(commands: CommandService) -> None:
    """Follow the answers to `commissioning.check` (the server process calls this once)."""

    async def answered(session: AsyncSession, row: CommandRecord, ack: CommandAck) -> None:
        await on_answer(commands, session, row, ack)

    async def expired(session: AsyncSession, row: CommandRecord) -> None:
        await on_expired(commands, session, row)

    commands.on_ack(KIND, answered)
    commands.on_expired(KIND, expired)
