"""The only module that talks to pymodbus's client: one connection to one unit, TCP or RTU.

pymodbus's own reconnect loop is switched off (`reconnect_delay=0`): the coordinator decides
when to reconnect, with a capped, jittered backoff, so a dead unit costs one failed connect
per attempt and never blocks other units. pymodbus errors become `CommError` (no answer) or
`ReplyError` (an exception response or a reply of the wrong size).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from agent.config import DeviceSettings
from agent.errors import CommError, ReplyError
from protocols.registers import Table

log = logging.getLogger(__name__)


@dataclass
class _SerialBus:
    """One RS-485 line: pymodbus opens a serial port exclusively, so its units share a client."""

    client: AsyncModbusSerialClient
    line: tuple[int, str, int, int]
    first_device: str
    users: set[int] = field(default_factory=set)


_BUSES: dict[str, _SerialBus] = {}


def _bus(dev: DeviceSettings, port: str) -> _SerialBus:
    line = (dev.baudrate, dev.parity, dev.stopbits, dev.bytesize)
    bus = _BUSES.get(port)
    if bus is None:
        client = AsyncModbusSerialClient(
            port, baudrate=dev.baudrate, parity=dev.parity, stopbits=dev.stopbits,
            bytesize=dev.bytesize, timeout=dev.timeout_s, retries=dev.retries,
            reconnect_delay=0,
        )
        bus = _BUSES[port] = _SerialBus(client, line, dev.name)
    elif bus.line != line:
        raise ValueError(
            f"devices {bus.first_device} and {dev.name} share {port} with different line "
            f"settings (baudrate, parity, stopbits, bytesize): {bus.line} vs {line}"
        )
    return bus


class ModbusLink:
    """A connection to one unit; one request at a time (pymodbus allows no more).

    TCP units get a connection each, so a silent unit never delays another; units on one
    serial line share that line's client (pymodbus serialises their requests).
    """

    def __init__(self, device: DeviceSettings) -> None:
        self.device = device
        self.unit_id = device.unit_id
        self._bus: _SerialBus | None = None
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient = self._make_client()

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        dev = self.device
        if dev.protocol == "modbus-rtu" and dev.serial_port:
            self._bus = _bus(dev, dev.serial_port)
            return self._bus.client
        if dev.protocol != "modbus-tcp" or not dev.host:
            raise ValueError(f"{dev.name} is not a Modbus device with an address")
        return AsyncModbusTcpClient(
            dev.host, port=dev.port, timeout=dev.timeout_s, retries=dev.retries,
            reconnect_delay=0,
        )

    @property
    def connected(self) -> bool:
        """Whether the transport is up (and, on a shared line, this unit is using it)."""
        if self._bus is not None and id(self) not in self._bus.users:
            return False
        return bool(self._client.connected)

    @property
    def where(self) -> str:
        """Where the unit is, for messages."""
        dev = self.device
        place = dev.serial_port if dev.protocol == "modbus-rtu" else f"{dev.host}:{dev.port}"
        return f"{place} unit {dev.unit_id}"

    async def connect(self) -> None:
        """Open the connection; CommError if the unit cannot be reached."""
        if self._bus is not None:
            self._bus.users.add(id(self))
            if self._client.connected:
                return
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            raise CommError(f"cannot connect to {self.where}: {exc}") from exc
        if not ok:
            raise CommError(f"cannot connect to {self.where}")

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        """Read registers; CommError when nothing came back, ReplyError for a bad answer."""
        read = (
            self._client.read_input_registers
            if table is Table.INPUT
            else self._client.read_holding_registers
        )
        try:
            rr = await read(address, count=count, device_id=self.unit_id)
        except (ConnectionException, ModbusIOException) as exc:
            raise CommError(f"{self.where}: no answer reading {address}+{count}: {exc}") from exc
        except ModbusException as exc:
            raise ReplyError(f"{self.where}: bad reply reading {address}+{count}: {exc}") from exc
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            raise ReplyError(f"{self.where}: exception {code} reading {address}+{count}", code)
        regs = list(rr.registers)
        if len(regs) != count:
            raise ReplyError(f"{self.where}: asked {count} registers at {address}, got {len(regs)}")
        return regs

    async def write(self, address: int, registers: Sequence[int]) -> None:
        """Write holding registers (upgrade transfers, commissioning checks)."""
        try:
            rr = await self._client.write_registers(
                address, list(registers), device_id=self.unit_id
            )
        except (ConnectionException, ModbusIOException) as exc:
            raise CommError(f"{self.where}: no answer writing {address}: {exc}") from exc
        except ModbusException as exc:
            raise ReplyError(f"{self.where}: bad reply writing {address}: {exc}") from exc
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            raise ReplyError(f"{self.where}: exception {code} writing {address}", code)

    def close(self) -> None:
        """Drop the connection (a later `connect` opens a new one); a shared line stays open
        while other units use it."""
        if self._bus is not None:
            self._bus.users.discard(id(self))
            if self._bus.users:
                return
        self._client.close()
