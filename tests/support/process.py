"""Helpers for tests that run `emu` as a real process."""

from __future__ import annotations

import asyncio

from tests.support.waiting import wait_for


async def read_until(
    stream: asyncio.StreamReader, marker: str, line_wait_s: float, what: str
) -> str:
    """Read lines until one contains `marker`; fail clearly if the process ends or stalls."""
    text = ""
    while marker not in text:
        line = await wait_for(stream.readline(), line_wait_s, what)
        assert line, f"the process exited before {what}: {text}"
        text += line.decode()
    return text
