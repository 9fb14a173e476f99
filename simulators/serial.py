"""Units on a serial line: Modbus RTU, served by pymodbus's `ModbusSerialServer`.

A serial line is one RTU bus: every unit on it answers at its own unit id, and a unit that is
silent (comm_loss, rebooting) simply does not answer, so the master times out as on RS-485.
The line serves the same `SimUnit`s as the TCP endpoints, like a unit with both an Ethernet
and an RS-485 port. pymodbus keeps a register block per server; a unit renders its values into
the block of whichever server asked last (see `SimUnit.action`).

`port` is a device path (`/dev/ttyUSB0`, one end of a socat pty pair) or a pyserial URL.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer

from simulators.errors import SimulatorError
from simulators.unit import SimUnit

log = logging.getLogger(__name__)

DEFAULT_BAUDRATE = 9600


@dataclass
class SerialLine:
    """One serial port (8 data bits, no parity, 1 stop bit) and the units on its RTU bus."""

    port: str
    baudrate: int = DEFAULT_BAUDRATE
    units: list[SimUnit] = field(default_factory=list)
    server: ModbusSerialServer | None = None

    def __post_init__(self) -> None:
        ids = [u.unit_id for u in self.units]
        if len(set(ids)) != len(ids):
            raise ValueError(f"units on serial line {self.port} need distinct unit ids")

    async def start(self) -> None:
        """Open the port and answer requests (must run inside the event loop)."""
        if "://" not in self.port and not await asyncio.to_thread(Path(self.port).exists):
            raise SimulatorError(f"serial port {self.port}: no such device")
        server = ModbusSerialServer(
            [u.simdevice() for u in self.units],
            framer=FramerType.RTU,
            port=self.port,
            baudrate=self.baudrate,
            ignore_missing_devices=True,
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:  # pymodbus's word for "could not open the port"
            raise SimulatorError(f"cannot open serial port {self.port}: {exc}") from exc
        self.server = server
        # pymodbus starts reading the port from loop callbacks (call_soon, twice): let them run,
        # so that a stop right after start finds the port fully set up.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        log.info(
            "serving %d unit(s) over Modbus RTU on %s at %d baud",
            len(self.units), self.port, self.baudrate,
        )

    async def stop(self) -> None:
        """Close the port."""
        if self.server is not None:
            await self.server.shutdown()  # type: ignore[no-untyped-call]
            self.server = None
