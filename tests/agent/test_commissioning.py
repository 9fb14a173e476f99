"""The agent's commissioning runner against real simulated units over Modbus TCP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.commissioning import CommissioningRunner
from agent.config import DeviceSettings
from protocols.clock import ManualClock
from protocols.commissioning import CheckOutcome, CheckRequest, Requirements, UnitFinding
from protocols.profiles import load_profile
from simulators.server import Simulator
from tests.support.commissioning_site import (
    INSULATION_LOW_UNIT,
    WRONG_FIRMWARE,
    WRONG_FIRMWARE_UNIT,
    site,
    targets,
)

T0 = datetime(2031, 5, 4, 9, 30, tzinfo=UTC)


def request(sim: Simulator, **over: Any) -> CheckRequest:
    reqs = {s: Requirements.of(load_profile(s)) for s in ("EMU-BS", "EMU-PV")}
    args: dict[str, Any] = {"plan_id": 1, "targets": targets(sim), "requirements": reqs,
                            "timeout_s": 0.3}
    args.update(over)
    return CheckRequest.model_validate(args)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with site() as s:
        yield s


@pytest.fixture
async def outcome(sim: Simulator) -> CheckOutcome:
    runner = CommissioningRunner(clock=ManualClock(T0))
    return await runner.run(request(sim))


def by_unit(outcome: CheckOutcome) -> dict[int, UnitFinding]:
    return {u.unit_id: u for u in outcome.units}


def failed(unit: UnitFinding) -> set[str]:
    return {c.check for c in unit.checks if not c.passed}


async def test_finds_every_unit_with_its_nameplate(sim: Simulator, outcome: CheckOutcome) -> None:
    units = by_unit(outcome)
    assert sorted(units) == [1, 2, 3, 4, 5, 6]
    assert outcome.probed == 8
    assert outcome.agent_time == T0
    for number, unit in units.items():
        sim_unit = sim.unit(number)
        assert unit.series == sim_unit.profile.series
        assert unit.serial == sim_unit.serial
        assert unit.model == sim_unit.profile.model
        assert unit.chain == tuple(m.id for m in sim_unit.profile.models)
    assert units[WRONG_FIRMWARE_UNIT].firmware == WRONG_FIRMWARE
    assert units[1].firmware == "1.0.0"


async def test_healthy_units_pass_every_check(outcome: CheckOutcome) -> None:
    units = by_unit(outcome)
    for number in (1, 4, 5, 6):
        assert units[number].passed, [c for c in units[number].checks if not c.passed]
        assert {c.check for c in units[number].checks} == {
            "communication", "nameplate", "values_in_range", "no_active_alarms", "firmware",
            "insulation"}


async def test_wrong_firmware_fails_with_evidence(outcome: CheckOutcome) -> None:
    unit = by_unit(outcome)[WRONG_FIRMWARE_UNIT]
    assert failed(unit) == {"firmware"}
    check = next(c for c in unit.checks if c.check == "firmware")
    assert check.evidence == {"running": WRONG_FIRMWARE, "required": "1.0.0"}


async def test_insulation_low_fails_with_evidence(outcome: CheckOutcome) -> None:
    unit = by_unit(outcome)[INSULATION_LOW_UNIT]
    assert failed(unit) == {"insulation", "no_active_alarms"}
    insulation = next(c for c in unit.checks if c.check == "insulation")
    assert insulation.evidence["kohm"] == pytest.approx(40.0)
    assert insulation.evidence["minimum_kohm"] == 500.0
    alarms = next(c for c in unit.checks if c.check == "no_active_alarms")
    assert alarms.evidence["active"] == ["INSULATION_LOW"]


async def test_plan_firmware_overrides_the_profile(sim: Simulator) -> None:
    reqs = {"EMU-PV": Requirements.of(load_profile("EMU-PV"), firmware=WRONG_FIRMWARE)}
    runner = CommissioningRunner(clock=ManualClock(T0))
    outcome = await runner.run(request(sim, requirements=reqs))
    units = by_unit(outcome)
    assert "firmware" not in failed(units[WRONG_FIRMWARE_UNIT])
    assert "firmware" in failed(units[4])  # EMU-PV at 1.0.0 now
    assert "firmware" not in failed(units[1])  # EMU-BS: the profile's requirement


async def test_silent_unit_is_not_found_and_progress_is_reported(sim: Simulator) -> None:
    sim.unit(5).inject("comm_loss")
    seen: list[dict[str, Any]] = []

    async def progress(detail: dict[str, Any]) -> None:
        seen.append(detail)

    outcome = await CommissioningRunner().run(request(sim), progress)
    assert sorted(by_unit(outcome)) == [1, 2, 3, 4, 6]
    assert seen[-1] == {"probed": 8, "of": 8}


async def test_units_carry_the_agents_device_names(sim: Simulator) -> None:
    host, port, _ = sim.where(1)
    named = DeviceSettings(name="bs-north", protocol="modbus-tcp", profile="EMU-BS", host=host,
                           port=port, unit_id=1)
    outcome = await CommissioningRunner(devices=[named]).run(request(sim))
    units = by_unit(outcome)
    assert units[1].device == "bs-north"
    assert units[2].device is None


async def test_handle_takes_and_returns_json(sim: Simulator) -> None:
    args = request(sim).model_dump(mode="json")
    result = await CommissioningRunner().handle(args)
    assert result["plan_id"] == 1
    assert len(result["units"]) == 6
    assert CheckOutcome.model_validate(result).units[0].checks
