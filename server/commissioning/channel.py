"""The server side of `commissioning.check`: send it, and turn the agent's answer into a report.

Placeholder until the command channel lands: `send_check` needs the CommandService.
"""

from __future__ import annotations

from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.commissioning import CheckRequest
from server.commissioning.errors import NoAgentChannel
from server.commissioning.models import CommissioningRun


async def send_check(commands: Any, session: AsyncSession, site_code: str,
                     run: CommissioningRun, check: CheckRequest) -> None:
    """Send the check to the site's agent and remember the command on the run."""
    raise NoAgentChannel("the command channel is not available in this build")
