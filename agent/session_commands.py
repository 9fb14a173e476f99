"""The agent's handlers for `session.open`, `session.close` and `diagnostic` commands.

The dispatcher (agent/commands.py) has checked signature, site, expiry and replay; these
check the content: a grant that does not parse, or that the agent's own policy refuses, is
answered `rejected`. `session.open` runs as long as the session: its progress acks say
`awaiting_onsite_approval`, `approved` (with the technician) and `ready`; its final ack how
the session ended and the bytes forwarded per target.
"""

from __future__ import annotations

from typing import Any

from pydantic import JsonValue, ValidationError

from agent.commands import CommandDispatcher, CommandRejected, Progress
from agent.diagnostics import Diagnostics
from agent.sessions import AgentSessions, SessionRefused
from protocols.messages import Command, CommandKind
from protocols.sessions import Grant


def register(dispatcher: CommandDispatcher, sessions: AgentSessions,
             diagnostics: Diagnostics) -> None:
    """Handle the session command kinds on `dispatcher`."""

    async def on_open(cmd: Command, progress: Progress) -> dict[str, JsonValue]:
        try:
            grant = Grant.model_validate(cmd.args.get("grant"))
        except ValidationError as exc:
            raise CommandRejected(f"not a valid session grant: {exc.error_count()} error(s)") \
                from exc
        info = cmd.args.get("info")

        async def report(detail: dict[str, Any]) -> None:
            await progress(detail)

        try:
            result = await sessions.open(grant, report, dict(info) if isinstance(info, dict)
                                         else {})
        except SessionRefused as exc:
            raise CommandRejected(str(exc)) from exc
        return dict(result)

    async def on_close(cmd: Command, _progress: Progress) -> dict[str, JsonValue]:
        session = str(cmd.args.get("session", ""))
        closed = await sessions.close(session, str(cmd.args.get("reason", "closed")))
        return {"session": session, "closed": closed}

    async def on_diagnostic(cmd: Command, _progress: Progress) -> dict[str, JsonValue]:
        try:
            return dict(await diagnostics.run(dict(cmd.args)))
        except SessionRefused as exc:
            raise CommandRejected(str(exc)) from exc

    dispatcher.register(CommandKind.SESSION_OPEN, on_open)
    dispatcher.register(CommandKind.SESSION_CLOSE, on_close)
    dispatcher.register(CommandKind.DIAGNOSTIC, on_diagnostic)
