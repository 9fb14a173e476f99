"""An agent's session tunnel in a process of its own (as on a real gateway), for the benchmark.

`python -m tests.bench.session_agent SETTINGS_JSON GRANT_JSON`: opens the grant and keeps the
tunnel until its standard input closes.
"""

from __future__ import annotations

import asyncio
import json
import sys

from agent.config import AgentSettings
from agent.sessions import AgentSessions
from protocols.sessions import Grant


async def main() -> None:
    """Open the grant; close when stdin closes."""
    settings = AgentSettings(**json.loads(sys.argv[1]))
    grant = Grant.model_validate_json(sys.argv[2])
    sessions = AgentSessions(settings)
    task = asyncio.create_task(sessions.open(grant))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await sessions.close_all()
    await task


if __name__ == "__main__":
    asyncio.run(main())
