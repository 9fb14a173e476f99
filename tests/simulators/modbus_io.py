"""Small Modbus helpers the simulator tests share: read points, push a firmware image."""

from __future__ import annotations

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from protocols.firmware import UpdateMap, UpdateState, transfer_writes
from protocols.planner import plan_reads
from protocols.profiles import Profile
from protocols.registers import Reading, RegisterImage, Table, decode_image
from tests.support.waiting import wait_for


async def read_points(
    client: AsyncModbusTcpClient, profile: Profile, unit_id: int
) -> dict[str, Reading]:
    """Read and decode every poll point of a unit through the planner's requests."""
    image = RegisterImage()
    for req in plan_reads(profile.poll_points, max_gap=profile.max_gap):
        read = (
            client.read_holding_registers
            if req.table is Table.HOLDING
            else client.read_input_registers
        )
        rr = await read(req.address, count=req.count, device_id=unit_id)
        assert not rr.isError(), f"{req} -> {rr}"
        image.put(req.table, req.address, rr.registers)
    return decode_image(profile.points, image)


async def push_image(
    client: AsyncModbusTcpClient, profile: Profile, unit_id: int, image: bytes
) -> str | None:
    """Send an image with the update protocol; the purpose of a refused write, or None."""
    for write in transfer_writes(profile, image):
        rr = await client.write_registers(write.address, list(write.registers), device_id=unit_id)
        if rr.isError():
            return write.purpose
    return None


async def update_state(
    client: AsyncModbusTcpClient, profile: Profile, unit_id: int, deadline_s: float = 5.0
) -> UpdateState:
    """Wait until FwUpdSt is final, riding through the unit's reboot (no answers meanwhile)."""
    state = UpdateMap.of(profile).state

    async def final() -> UpdateState | None:
        try:
            rr = await client.read_holding_registers(state.address, count=1, device_id=unit_id)
        except ModbusException:
            return None  # rebooting
        if rr.isError():
            return None
        st = UpdateState(rr.registers[0])
        return st if st.final else None

    result = await wait_for(final, deadline_s, "a final firmware update state")
    assert result is not None
    return result
