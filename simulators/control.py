"""Control channel of a running simulator: JSON lines over a loopback TCP port.

`emu sim inject/clear/status/update-mode` talk to it from another shell. One request per
line, one answer per line: `{"op": "inject", "unit": 2, "fault": "over_temperature"}` →
`{"ok": true, ...}` or `{"ok": false, "error": "..."}`. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from simulators.errors import ControlError, SimulatorError
from simulators.faults import FAULTS
from simulators.server import Simulator

log = logging.getLogger(__name__)
DEFAULT_CONTROL_PORT = 5599
MAX_LINE = 64 * 1024
UNIT_OPS = frozenset({"inject", "clear", "update-mode", "values"})


def handle(sim: Simulator, request: dict[str, Any]) -> dict[str, Any]:
    """Carry out one control request against the simulator (also usable in-process)."""
    op = request.get("op")
    try:
        if op == "faults":
            return {
                "ok": True,
                "faults": {
                    f.name: {"description": f.description, "params": dict(f.params)}
                    for f in FAULTS.values()
                },
            }
        if op == "status":
            units = [
                {**u.status(), "number": n, "port": sim.where(n)[1]}
                for n, u in enumerate(sim.units, start=1)
            ]
            return {"ok": True, "units": units}
        if op not in UNIT_OPS:
            return {"ok": False, "error": f"unknown op {op!r}; known: faults, status, "
                    f"{', '.join(sorted(UNIT_OPS))}"}
        unit = sim.unit(int(request.get("unit", 0)))
        if op == "inject":
            unit.inject(str(request["fault"]), request.get("params") or {})
        elif op == "clear":
            unit.clear(request.get("fault"))
        elif op == "update-mode":
            unit.set_update_behaviour(str(request["mode"]), float(request.get("fail_at", 0.5)))
        elif op == "values":
            return {"ok": True, "values": unit.values()}
        return {"ok": True, "unit": unit.status()}
    except (SimulatorError, KeyError, ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc) or type(exc).__name__}


class ControlServer:
    """Serves `handle` on 127.0.0.1:`port`."""

    def __init__(self, sim: Simulator, port: int = DEFAULT_CONTROL_PORT) -> None:
        self.sim = sim
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Start listening; port 0 picks a free one."""
        self._server = await asyncio.start_server(
            self._client, "127.0.0.1", self.port, limit=MAX_LINE
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise TypeError("a request is a JSON object")
                    answer = handle(self.sim, request)
                except (ValueError, TypeError) as exc:
                    answer = {"ok": False, "error": f"bad request: {exc}"}
                writer.write(json.dumps(answer, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("control client dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def request(port: int, payload: dict[str, Any], wait_s: float = 5.0) -> dict[str, Any]:
    """Send one request to a running simulator and return its answer."""
    try:
        async with asyncio.timeout(wait_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(json.dumps(payload).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            writer.close()
            await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        raise ControlError(
            f"no simulator control channel on 127.0.0.1:{port} ({exc}); is `emu sim` running?"
        ) from exc
    answer: dict[str, Any] = json.loads(line)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "request refused")))
    return answer
