"""The simulator process: units served over real Modbus TCP, by pymodbus.

Units get numbers 1..N. By default they share one port with unit ids 1..N (up to 247, the
Modbus limit; a fleet beyond that spills onto the next ports); `one_port_per_unit` gives each
unit its own port with unit id 1. Port 0 picks free ports (tests).

With `serial_port` the same units are also served over Modbus RTU on that serial line (unit
ids 1..N on one bus; see `simulators.serial`), in addition to TCP.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from pymodbus.server import ModbusTcpServer

from protocols.clock import Clock
from protocols.profiles import load_profile, shipped_profiles
from simulators.errors import UnknownUnitError
from simulators.serial import DEFAULT_BAUDRATE, SerialLine
from simulators.unit import SimUnit

log = logging.getLogger(__name__)
MAX_UNIT_ID = 247


@dataclass(frozen=True)
class SimConfig:
    """How many units of which profiles, and where to serve them."""

    units: int = 3
    host: str = "127.0.0.1"
    port: int = 5020
    profiles: Sequence[str] = ()
    one_port_per_unit: bool = False
    units_per_port: int = MAX_UNIT_ID
    firmware_version: str = "1.0.0"
    refresh_s: float = 0.2
    reboot_s: float = 3.0
    serial_port: str | None = None
    baudrate: int = DEFAULT_BAUDRATE

    def __post_init__(self) -> None:
        if self.units < 1:
            raise ValueError("units must be at least 1")
        if not 1 <= self.units_per_port <= MAX_UNIT_ID:
            raise ValueError(f"units_per_port must be within 1..{MAX_UNIT_ID}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        if self.baudrate < 1:
            raise ValueError("baudrate must be positive")
        if self.serial_port is not None and (
            self.one_port_per_unit or self.units > self.units_per_port
        ):
            raise ValueError(
                "a serial line is one bus with unit ids 1..N: at most units_per_port "
                f"({self.units_per_port}) units and not one_port_per_unit"
            )


@dataclass
class Endpoint:
    """One listening port and the units behind it."""

    host: str
    port: int
    units: list[SimUnit] = field(default_factory=list)
    server: ModbusTcpServer | None = None


class Simulator:
    """A set of simulated units and the Modbus servers that serve them."""

    def __init__(self, config: SimConfig, clock: Clock | None = None) -> None:
        self.config = config
        names = list(config.profiles) or shipped_profiles()
        profiles = [load_profile(n) for n in names]
        per_port = 1 if config.one_port_per_unit else config.units_per_port
        self.endpoints: list[Endpoint] = []
        self.units: list[SimUnit] = []
        cycle = itertools.cycle(profiles)
        for n in range(config.units):
            if n % per_port == 0:
                port = 0 if config.port == 0 else config.port + len(self.endpoints)
                self.endpoints.append(Endpoint(config.host, port))
            profile = next(cycle)
            unit = SimUnit(
                profile,
                n % per_port + 1,
                serial=f"{profile.model}-{n + 1:06d}",
                firmware_version=config.firmware_version,
                clock=clock,
                refresh_s=config.refresh_s,
                reboot_s=config.reboot_s,
            )
            self.endpoints[-1].units.append(unit)
            self.units.append(unit)
        self.serial: SerialLine | None = None
        if config.serial_port is not None:
            self.serial = SerialLine(config.serial_port, config.baudrate, list(self.units))

    def unit(self, number: int) -> SimUnit:
        """Unit by its number (1..N); on a single port this is its Modbus unit id."""
        if not 1 <= number <= len(self.units):
            raise UnknownUnitError(f"no unit {number}; this simulator has 1..{len(self.units)}")
        return self.units[number - 1]

    def where(self, number: int) -> tuple[str, int, int]:
        """(host, port, unit id) at which a unit answers."""
        unit = self.unit(number)
        for ep in self.endpoints:
            if unit in ep.units:
                return ep.host, ep.port, unit.unit_id
        raise UnknownUnitError(f"unit {number} is not served")  # pragma: no cover

    async def start(self) -> None:
        """Listen on every endpoint and the serial line (must run inside the event loop)."""
        await self._start_tcp()
        if self.serial is not None:
            try:
                await self.serial.start()
            except BaseException:
                await self.stop()
                raise

    async def _start_tcp(self) -> None:
        for ep in self.endpoints:
            server = ModbusTcpServer(
                [u.simdevice() for u in ep.units],
                address=(ep.host, ep.port),
                ignore_missing_devices=True,
            )
            await server.serve_forever(background=True)
            ep.server = server
            sockets = getattr(server.transport, "sockets", None)
            if sockets:
                ep.port = sockets[0].getsockname()[1]
            log.info("serving %d unit(s) on %s:%d", len(ep.units), ep.host, ep.port)

    async def stop(self) -> None:
        """Stop listening, drop connections and close the serial line."""
        if self.serial is not None:
            await self.serial.stop()
        for ep in self.endpoints:
            if ep.server is not None:
                await ep.server.shutdown()  # type: ignore[no-untyped-call]
                ep.server = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
