"""A simulated unit without a network: values over time, faults, firmware state machine."""

from __future__ import annotations

import math

import pytest

from protocols.clock import ManualClock
from protocols.firmware import FirmwareImage, UpdateError, UpdateState
from protocols.profiles import load_profile
from simulators.errors import UnknownFaultError
from simulators.faults import FAULTS, combine, fault
from simulators.firmware import FirmwareSlot, UpdateBehaviour, WriteRejected
from simulators.unit import SimUnit

REQUIRED_FAULTS = {
    "over_temperature", "insulation_low", "grid_loss", "trip", "comm_loss", "derating",
    "intermittent_comms", "slow_response",
}


def test_required_faults_exist() -> None:
    assert set(FAULTS) >= REQUIRED_FAULTS


def test_unknown_fault_and_parameter_are_clear_errors() -> None:
    with pytest.raises(UnknownFaultError, match=r"known: .*over_temperature"):
        fault("melting")
    with pytest.raises(UnknownFaultError, match="no parameter speed"):
        fault("derating").with_params({"speed": 1})
    with pytest.raises(UnknownFaultError, match="rate must be"):
        fault("intermittent_comms").with_params({"rate": 2})


def test_effects_combine_worst_case() -> None:
    eff = combine([fault("derating").with_params({"limit_pct": 50}),
                   fault("derating").with_params({"limit_pct": 20}), fault("trip").effects])
    assert eff.derate_pct == 20
    assert eff.tripped
    assert {"DERATING", "TRIP"} <= eff.alarms


@pytest.mark.parametrize("series", ["EMU-BS", "EMU-PV"])
def test_values_move_plausibly_over_a_day(series: str) -> None:
    clock = ManualClock()
    unit = SimUnit(load_profile(series), 1, clock=clock)
    energy = []
    socs = []
    watts = []
    for _ in range(48):
        clock.advance(150)  # 48 x 150 s = one compressed simulated day
        v = unit.values()
        energy.append(float(v["inverter_three_phase.WH"] or 0))
        socs.append(v["storage_basic.ChaState"])
        watts.append(v["inverter_three_phase.W"])
        assert 220 < float(v["inverter_three_phase.PhVphA"] or 0) < 240
        assert float(v["emu.Riso"] or 0) > 1000
    assert energy == sorted(energy)  # counters never go back
    assert all(0 <= float(s or 0) <= 100 for s in socs)
    assert max(float(s or 0) for s in socs) - min(float(s or 0) for s in socs) > 20
    assert max(float(w or 0) for w in watts) > 0.3 * unit.physics.plate.rated_w


def test_registers_round_trip_through_the_profile() -> None:
    unit = SimUnit(load_profile("EMU-BS"), 5, clock=ManualClock())
    unit.simdevice()
    from protocols.registers import RegisterImage, Table, decode_image

    image = RegisterImage()
    for table in Table:
        image.put(table, unit.base[table], unit._blocks[table])
    decoded = decode_image(unit.profile.points, image)
    truth = unit.values()
    for name in ("battery.SoC", "inverter_three_phase.W", "emu.IntTmp", "bms.CellVMax",
                 "common.SN", "common.DA"):
        want, got = truth[name], decoded[name].value
        if isinstance(want, float):
            assert got is not None, name
            assert math.isclose(float(got), want, abs_tol=10.0), name
        else:
            assert got == want, name


def test_inject_and_clear_change_effects() -> None:
    unit = SimUnit(load_profile("EMU-PV"), 2, clock=ManualClock())
    unit.inject("grid_loss")
    assert unit.values()["inverter_three_phase.Hz"] == 0
    unit.inject("comm_loss")
    assert not unit.answering()
    unit.clear("comm_loss")
    assert unit.answering()
    with pytest.raises(UnknownFaultError, match="not active"):
        unit.clear("trip")
    unit.clear()
    assert unit.faults == {}
    assert float(unit.values()["inverter_three_phase.Hz"] or 0) > 49


def _slot(clock: ManualClock) -> FirmwareSlot:
    return FirmwareSlot("EMU-BS", "1.0.0", clock, reboot_s=5.0)


def _send(slot: FirmwareSlot, image: bytes, chunk: int = 200) -> None:
    import hashlib

    slot.announce(len(image), hashlib.sha256(image).digest())
    slot.begin()
    for off in range(0, len(image), chunk):
        slot.chunk(off, image[off : off + chunk])
    slot.commit()


def test_firmware_reboots_for_reboot_s_on_the_injected_clock() -> None:
    clock = ManualClock()
    slot = _slot(clock)
    _send(slot, FirmwareImage("EMU-BS", "1.2.0", b"x" * 999).to_bytes())
    assert slot.state is UpdateState.REBOOTING
    clock.advance(4.9)
    assert slot.rebooting()
    clock.advance(0.2)
    assert not slot.rebooting()
    assert slot.state.name == "DONE"  # the clock, not a call, ended the reboot
    assert slot.version == "1.2.0"
    assert slot.previous_version == "1.0.0"


def test_firmware_out_of_order_chunk_fails_the_transfer() -> None:
    slot = _slot(ManualClock())
    image = FirmwareImage("EMU-BS", "1.2.0", b"x" * 999).to_bytes()
    import hashlib

    slot.announce(len(image), hashlib.sha256(image).digest())
    slot.begin()
    with pytest.raises(WriteRejected):
        slot.chunk(200, image[200:400])
    assert slot.state is UpdateState.FAILED
    assert slot.error is UpdateError.PROTOCOL


def test_firmware_begin_without_announce_is_rejected() -> None:
    slot = _slot(ManualClock())
    with pytest.raises(WriteRejected):
        slot.begin()


def test_firmware_abort_returns_to_idle() -> None:
    slot = _slot(ManualClock())
    image = FirmwareImage("EMU-BS", "1.2.0").to_bytes()
    import hashlib

    slot.announce(len(image), hashlib.sha256(image).digest())
    slot.begin()
    slot.abort()
    assert slot.state is UpdateState.IDLE
    with pytest.raises(WriteRejected):
        slot.commit()


def test_update_behaviour_is_one_shot() -> None:
    clock = ManualClock()
    slot = _slot(clock)
    slot.set_behaviour(UpdateBehaviour.BROKEN)
    _send(slot, FirmwareImage("EMU-BS", "1.2.0").to_bytes())
    clock.advance(10)
    assert not slot.rebooting()
    assert slot.broken
    _send(slot, FirmwareImage("EMU-BS", "1.0.0").to_bytes())
    clock.advance(10)
    assert not slot.rebooting()
    assert not slot.broken
    with pytest.raises(ValueError, match="fail_at"):
        slot.set_behaviour(UpdateBehaviour.FAIL, fail_at=1.5)
