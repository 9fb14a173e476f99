"""Predefined diagnostics an engineer runs within an approved session (no shell needed).

Each action is checked against the agent's own copy of the session's grant (open here, in
time, unit in scope) before it touches anything. Register reads go through the Modbus adapter;
the recent log comes from an in-memory ring buffer with secrets redacted (`TO_REDACT`).
"""

from __future__ import annotations

import collections
import logging
import re
import time
from typing import Any

from agent.config import AgentSettings
from agent.devices.modbus import ModbusLink
from agent.errors import AgentError, DeviceError
from agent.sessions import AgentSessions, SessionRefused
from protocols.errors import SunSpecError
from protocols.registers import Table
from protocols.sunspec import ModelChainWalker

MAX_LOG_LINES = 500
TO_REDACT = re.compile(
    r"(?i)(password|passwd|secret|token|api[_-]?key|authorization|bearer)(\s*[=:]\s*|\s+)"
    r"(\"[^\"]*\"|'[^']*'|\S+)")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                         re.S)


def redact(line: str) -> str:
    """`line` with passwords, tokens and private keys replaced by `***`."""
    line = PRIVATE_KEY.sub("***private key***", line)
    return TO_REDACT.sub(lambda m: f"{m[1]}{m[2]}***", line)


class RecentLog(logging.Handler):
    """Keeps the last lines of the agent's log in memory, for the `agent_log` diagnostic."""

    def __init__(self, size: int = 2000) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        """Remember a formatted record."""
        try:
            self.lines.append(self.format(record))
        except Exception:  # a logging handler must never raise
            self.handleError(record)

    def tail(self, n: int) -> list[str]:
        """The last `n` lines, redacted."""
        return [redact(line) for line in list(self.lines)[-n:]]


class Diagnostics:
    """Runs `diagnostic` commands for open sessions."""

    def __init__(self, settings: AgentSettings, sessions: AgentSessions,
                 log: RecentLog | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.log = log
        self.devices = {d.name: d for d in settings.devices if d.protocol != "mqtt"}

    def _check(self, args: dict[str, Any]) -> None:
        tunnel = self.sessions.tunnels.get(str(args.get("session", "")))
        if tunnel is None or not tunnel.usable():
            raise SessionRefused("no such session is open on this agent")
        unit = args.get("unit")
        if unit is not None and unit not in tunnel.grant.scope.units:
            raise SessionRefused(f"unit {unit} is outside the approved scope")
        if unit is not None and unit not in self.devices:
            raise SessionRefused(f"unit {unit} is not a Modbus unit of this agent")

    async def run(self, args: dict[str, Any]) -> dict[str, Any]:
        """Carry out one action; SessionRefused if outside the session, AgentError if it fails."""
        self._check(args)
        action = args.get("action")
        if action == "agent_log":
            lines = min(int(args.get("lines", 100)), MAX_LOG_LINES)
            return {"lines": self.log.tail(lines) if self.log is not None else []}
        if action not in ("read_registers", "sunspec_scan", "ping"):
            raise SessionRefused(f"unknown diagnostic {action!r}")
        dev = self.devices[str(args["unit"])]
        link = ModbusLink(dev)
        started = time.monotonic()
        try:
            await link.connect()
            if action == "ping":
                await link.read(Table.HOLDING, 40000, 1)
                return {"reachable": True, "rtt_ms": round((time.monotonic() - started) * 1e3, 2),
                        "where": link.where}
            if action == "read_registers":
                address, count = int(args["address"]), int(args["count"])
                regs = await link.read(Table.HOLDING, address, count)
                return {"address": address, "registers": regs}
            return await _scan(link)
        except DeviceError as exc:
            if action == "ping":
                return {"reachable": False, "error": str(exc), "where": link.where}
            raise
        finally:
            link.close()


async def _scan(link: ModbusLink) -> dict[str, Any]:
    walker = ModelChainWalker()
    try:
        while (req := walker.next_read()) is not None:
            address, count = req
            try:
                regs: list[int] | None = await link.read(Table.HOLDING, address, count)
            except DeviceError:
                regs = None
            walker.feed(regs)
    except SunSpecError as exc:
        raise AgentError(f"SunSpec scan failed: {exc}") from exc
    return {"base": walker.base,
            "models": [{"id": m.id, "length": m.length, "address": m.address}
                       for m in walker.models]}
