"""Commissioning core: unit-id ranges, profile sections, and the verdicts of single checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from protocols.commissioning import (
    Requirements,
    check_clock,
    check_firmware,
    check_insulation,
    check_ranges,
    parse_unit_ids,
)
from protocols.errors import ProfileError
from protocols.profiles import load_profile, parse_profile


def test_unit_id_ranges() -> None:
    assert parse_unit_ids("1-3, 7,2") == [1, 2, 3, 7]
    for bad in ("", "0-3", "5-2", "1-300", "a"):
        with pytest.raises(ValueError, match="unit ids"):
            parse_unit_ids(bad)


def test_shipped_profiles_carry_commissioning_requirements() -> None:
    for series in ("EMU-BS", "EMU-PV"):
        reqs = Requirements.of(load_profile(series))
        assert reqs.series == series
        assert reqs.firmware == "1.0.0"
        assert reqs.insulation_min_kohm > 0
        assert reqs.ranges
    assert Requirements.of(load_profile("EMU-BS"), firmware="2.0.0").firmware == "2.0.0"


def test_commissioning_section_naming_an_unknown_point_is_refused() -> None:
    data = load_profile("EMU-PV").model_dump(mode="json")
    data["commissioning"]["ranges"] = {"nope.X": [0, 1]}
    with pytest.raises(ProfileError, match=r"commissioning: no such point nope\.X"):
        parse_profile(data, "test.toml")


def test_single_checks() -> None:
    assert check_firmware({"emu.FwVer": "1.0.0"}, "1.0.0").passed
    assert not check_firmware({"emu.FwVer": "0.9.0"}, "1.0.0").passed
    assert check_insulation({"emu.Riso": 500}, "emu.Riso", 500).passed
    assert not check_insulation({}, "emu.Riso", 500).passed
    ranges = check_ranges({"a": 5.0, "b": 11.0}, {"a": (0, 10), "b": (0, 10), "c": (0, 1)})
    assert not ranges.passed
    assert "b=11.0 outside 0..10" in ranges.detail
    assert "c=not read" in ranges.detail
    now = datetime(2031, 1, 1, tzinfo=UTC)
    assert check_clock(now + timedelta(seconds=4), now, 5).passed
    late = check_clock(now - timedelta(seconds=9), now, 5)
    assert not late.passed
    assert late.evidence["skew_s"] == -9.0
