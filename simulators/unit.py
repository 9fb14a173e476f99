"""One simulated EMU unit: its register map, its values over time, its faults and firmware.

The registers are pymodbus simulator blocks (`SimDevice`); pymodbus calls `action` on every
access. Reads refresh the registers from `UnitPhysics` (at most every `refresh_s`), so nothing
runs between reads; writes go to the vendor block's update registers; faults decide whether
and how the unit answers.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.simulator import DataType, SimData, SimDevice

from protocols.clock import Clock, SystemClock
from protocols.errors import CodecError
from protocols.firmware import VENDOR_BLOCK, UpdateCommand, UpdateMap
from protocols.profiles import Profile
from protocols.registers import (
    PointDef,
    Table,
    Value,
    decode,
    encode,
    unscale_value,
)
from protocols.sunspec import END_MODEL_ID, SUNS_MARKER
from simulators.errors import UnknownFaultError
from simulators.faults import Effects, combine, fault
from simulators.firmware import FirmwareSlot, UpdateBehaviour, WriteRejected
from simulators.physics import UnitPhysics, unit_seed

INPUT_FC = 4


@dataclass
class UnitStats:
    """Counters for the simulator's status output."""

    reads: int = 0
    writes: int = 0
    dropped: int = 0
    exceptions: int = 0


class SimUnit:
    """A unit of one profile at one Modbus unit id."""

    def __init__(
        self,
        profile: Profile,
        unit_id: int,
        *,
        serial: str | None = None,
        firmware_version: str = "1.0.0",
        clock: Clock | None = None,
        refresh_s: float = 0.2,
        reboot_s: float = 3.0,
    ) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"Modbus unit ids are 1..247, not {unit_id}")
        self.profile = profile
        self.unit_id = unit_id
        self.serial = serial or f"{profile.model}-{unit_id:05d}"
        self.clock = clock or SystemClock()
        self.refresh_s = refresh_s
        self.started = self.clock.monotonic()
        self.physics = UnitPhysics(
            profile, unit_id, self.serial, unit_seed(profile.series, unit_id)
        )
        self.firmware = FirmwareSlot(
            profile.series, firmware_version, self.clock, reboot_s=reboot_s
        )
        self.update_map = UpdateMap.of(profile)
        self.faults: dict[str, Effects] = {}
        self.effects = Effects()
        self.stats = UnitStats()
        self._rng = random.Random(unit_seed(profile.series, unit_id))  # noqa: S311 - simulation
        self._last_refresh: float | None = None
        self._by_table: dict[Table, list[PointDef]] = {
            t: [p for p in profile.points if p.table is t] for t in Table
        }
        self._writable = {
            a for p in profile.points if p.access in ("RW", "W") for a in range(p.address, p.end)
        }
        self.base = {Table.HOLDING: profile.sunspec_base, Table.INPUT: self._input_base()}
        self._static = self.physics.static_values(firmware_version)
        self._points = {p.name: p for p in profile.points}
        self._blocks = {t: [0] * self._block_size(t) for t in Table}
        self._render_static()
        self.refresh(force=True)

    # -- register map ---------------------------------------------------------------------
    def _input_base(self) -> int:
        inputs = self._by_table[Table.INPUT]
        return min((p.address for p in inputs), default=0)

    def _block_size(self, table: Table) -> int:
        if table is Table.HOLDING:
            return self.profile.end_address + 2 - self.profile.sunspec_base
        inputs = self._by_table[Table.INPUT]
        return max((p.end for p in inputs), default=1) - self.base[Table.INPUT]

    def simdevice(self) -> SimDevice:
        """The pymodbus device for this unit: holding and input registers kept apart."""
        blocks = [
            [SimData(self.base[t], values=list(self._blocks[t]), datatype=DataType.REGISTERS)]
            for t in (Table.HOLDING, Table.INPUT)
        ]
        dummy = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
        return SimDevice(
            self.unit_id,
            simdata=(dummy, list(dummy), blocks[0], blocks[1]),
            action=self.action,
        )

    def _put(self, point: PointDef, registers: tuple[int, ...]) -> None:
        regs = self._blocks[point.table]
        off = point.address - self.base[point.table]
        regs[off : off + len(registers)] = registers

    def _encode(self, point: PointDef, value: Value | None) -> tuple[int, ...]:
        sf = self._static.get(point.sf) if point.sf else None
        try:
            raw = unscale_value(value, point, sf if isinstance(sf, int) else None)
            return encode(
                point.type,
                raw,
                size=point.size,
                word_order=point.word_order,
                byte_order=point.byte_order,
            )
        except CodecError:
            return encode(point.type, None, size=point.size)

    def _render_static(self) -> None:
        hold = self._blocks[Table.HOLDING]
        hold[0:2] = SUNS_MARKER
        for h in self.profile.headers:
            off = h.address - self.base[Table.HOLDING]
            hold[off : off + 2] = (h.id, h.length)
        end = self.profile.end_address - self.base[Table.HOLDING]
        hold[end : end + 2] = (END_MODEL_ID, 0)
        skip = {
            self.update_map.sha256.name,
            self.update_map.chunk.name,
            self.update_map.size.name,
            self.update_map.chunk_offset.name,
            self.update_map.chunk_length.name,
            self.update_map.ctl.name,
        }
        for p in self.profile.points:
            if p.name.endswith((".ID", ".L")) and p.name.count(".") == 1:
                continue
            if p.name in skip:
                continue
            self._put(p, self._encode(p, self._static.get(p.name)))

    def values(self) -> dict[str, Value | None]:
        """Engineering values now (what a correct client should decode)."""
        t = self.clock.monotonic() - self.started
        return {**self._static, **self.physics.sample(t, self.effects, broken=self.firmware.broken)}

    def refresh(self, *, force: bool = False) -> None:
        """Write current values into the registers, at most every `refresh_s`."""
        now = self.clock.monotonic()
        if (
            not force
            and self._last_refresh is not None
            and (now - self._last_refresh < self.refresh_s)
        ):
            return
        self._last_refresh = now
        t = now - self.started
        dynamic = self.physics.sample(t, self.effects, broken=self.firmware.broken)
        fw = self.firmware
        if fw.version != self._static.get("common.Vr"):
            self._static = self.physics.static_values(fw.version)
            self._render_static()
        dynamic[f"{VENDOR_BLOCK}.FwUpdSt"] = int(fw.state)
        dynamic[f"{VENDOR_BLOCK}.FwUpdProg"] = fw.progress
        dynamic[f"{VENDOR_BLOCK}.FwUpdErr"] = int(fw.error)
        if fw.state.name in ("RECEIVING", "VERIFYING"):
            dynamic[f"{VENDOR_BLOCK}.Status"] = 5
        for name, value in dynamic.items():
            p = self._points.get(name)
            if p is not None:
                self._put(p, self._encode(p, value))

    # -- faults ---------------------------------------------------------------------------
    def inject(self, name: str, params: Mapping[str, float] | None = None) -> None:
        """Start a fault by name (again, with new parameters, if already active)."""
        self.faults[name] = fault(name).with_params(params or {})
        self.effects = combine(self.faults.values())
        self.refresh(force=True)

    def clear(self, name: str | None = None) -> None:
        """End one fault, or all of them."""
        if name is None:
            self.faults.clear()
        elif name in self.faults:
            del self.faults[name]
        else:
            fault(name)  # unknown names raise
            raise UnknownFaultError(f"fault {name} is not active on unit {self.unit_id}")
        self.effects = combine(self.faults.values())
        self.refresh(force=True)

    def set_update_behaviour(self, behaviour: str, fail_at: float = 0.5) -> None:
        """Make the next firmware update refuse, fail mid-way or come back broken."""
        try:
            mode = UpdateBehaviour(behaviour)
        except ValueError:
            raise UnknownFaultError(
                f"unknown update behaviour {behaviour!r}; "
                f"known: {', '.join(b.value for b in UpdateBehaviour)}"
            ) from None
        self.firmware.set_behaviour(mode, fail_at)

    def misses(self) -> bool:
        """Whether intermittent comms eat this exchange (rolls the unit's own dice)."""
        rate = self.effects.error_rate
        return bool(rate) and self._rng.random() < rate

    def answering(self) -> bool:
        """Whether the unit answers at all right now (not silenced, not rebooting)."""
        return not (self.effects.silent or self.firmware.rebooting())

    def status(self) -> dict[str, Any]:
        """A summary for `emu sim status`."""
        return {
            "unit": self.unit_id,
            "series": self.profile.series,
            "serial": self.serial,
            "firmware": self.firmware.version,
            "update": self.firmware.state.name,
            "broken": self.firmware.broken,
            "faults": sorted(self.faults),
            "answering": self.answering(),
            "reads": self.stats.reads,
            "writes": self.stats.writes,
            "dropped": self.stats.dropped,
            "exceptions": self.stats.exceptions,
        }

    # -- Modbus access --------------------------------------------------------------------
    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus hook: decide whether to answer, refresh values, apply writes.

        `registers` is pymodbus's live block for the table the request addresses.
        """
        eff = self.effects
        if not self.answering():
            self.stats.dropped += 1
            raise NoSuchIdException(f"unit {self.unit_id} is not answering")
        if self.misses():
            if self._rng.random() < 0.5:
                self.stats.dropped += 1
                raise NoSuchIdException(f"unit {self.unit_id} dropped a request")
            self.stats.exceptions += 1
            return ExcCodes.DEVICE_BUSY
        if eff.delay_s:
            await asyncio.sleep(eff.delay_s)
        table = Table.INPUT if function_code == INPUT_FC else Table.HOLDING
        if self._blocks[table] is not registers:
            # pymodbus built its own copy of our block: adopt it and render into it from now on
            self._blocks[table] = registers
            self._render_static()
            self.refresh(force=True)
        if set_values is None:
            self.stats.reads += 1
            self.refresh()
            return None
        self.stats.writes += 1
        if function_code == INPUT_FC or any(
            a not in self._writable for a in range(address, address + len(set_values))
        ):
            self.stats.exceptions += 1
            return ExcCodes.ILLEGAL_ADDRESS
        off = address - start_address
        registers[off : off + len(set_values)] = [int(v) for v in set_values]
        try:
            self._apply_write(address, len(set_values))
        except WriteRejected:
            self.stats.exceptions += 1
            self.refresh(force=True)
            return ExcCodes.DEVICE_FAILURE
        self.refresh(force=True)
        ctl = self.update_map.ctl
        if address <= ctl.address < address + len(set_values):
            cast(list[int], set_values)[ctl.address - address] = int(UpdateCommand.IDLE)
            registers[ctl.address - start_address] = int(UpdateCommand.IDLE)
        return None

    def _read_point(self, point: PointDef) -> Value | None:
        regs = self._blocks[Table.HOLDING]
        off = point.address - self.base[Table.HOLDING]
        return decode(point.type, regs[off : off + point.size], sentinel=False)

    def _apply_write(self, address: int, count: int) -> None:
        m = self.update_map
        touched = range(address, address + count)
        fw = self.firmware
        if m.sha256.address in touched or m.size.address in touched:
            size = self._read_point(m.size)
            sha = self._read_point(m.sha256)
            fw.announce(int(size or 0), bytes.fromhex(str(sha or "")))
        if m.chunk.address in touched:
            off = int(self._read_point(m.chunk_offset) or 0)
            length = int(self._read_point(m.chunk_length) or 0)
            if not 0 < length <= m.chunk_bytes:
                raise WriteRejected(f"chunk length {length} is outside 1..{m.chunk_bytes}")
            data = bytes.fromhex(str(self._read_point(m.chunk)))[:length]
            fw.chunk(off, data)
        if m.ctl.address in touched:
            cmd = int(self._read_point(m.ctl) or 0)
            if cmd == UpdateCommand.BEGIN:
                fw.begin()
            elif cmd == UpdateCommand.COMMIT:
                fw.commit()
            elif cmd == UpdateCommand.ABORT:
                fw.abort()
