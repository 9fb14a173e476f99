"""Device profiles: the shipped ones load, and every broken one names its file and key."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from protocols.errors import ProfileError
from protocols.profiles import (
    PROFILE_DIR,
    load_profile,
    load_profile_file,
    parse_profile,
    profile_json_schema,
    shipped_profiles,
)
from protocols.registers import PointType, Table


def _shipped(series: str) -> dict[str, Any]:
    text = (PROFILE_DIR / f"{series.lower()}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


BASE = _shipped("EMU-BS")


def test_shipped_profiles_load() -> None:
    assert shipped_profiles() == ["EMU-BS", "EMU-PV"]
    bs, pv = load_profile("EMU-BS"), load_profile("EMU-PV")
    assert (bs.series, bs.kind) == ("EMU-BS", "battery_storage")
    assert (pv.series, pv.kind) == ("EMU-PV", "hybrid")
    assert [h.id for h in bs.headers] == [1, 103, 124, 802, 64901]
    assert bs.headers[0].address == bs.sunspec_base + 2
    assert bs.end_address == bs.headers[-1].address + 2 + bs.headers[-1].length
    assert load_profile("emu-pv") is not None


@pytest.mark.parametrize("series", ["EMU-BS", "EMU-PV"])
def test_profile_points(series: str) -> None:
    profile = load_profile(series)
    names = [p.name for p in profile.points]
    assert len(set(names)) == len(names)
    polled = profile.poll_points
    assert set(polled) <= set(profile.points)
    assert "common.ID" not in {p.name for p in polled}
    assert all(p.type is not PointType.PAD and p.access != "W" for p in polled)
    assert "emu.Status" in {p.name for p in polled}
    for key, (lo, hi) in _shipped(series)["ranges"].items():
        point = profile.point(key)
        assert (point.minimum, point.maximum) == (lo, hi)


def test_input_points_are_prefixed_and_in_the_input_table() -> None:
    profile = load_profile("EMU-BS")
    cell = profile.point("bms.CellTmpMax")
    assert cell.table is Table.INPUT
    assert cell.scale == pytest.approx(0.1)
    assert profile.point("bms.ChaWh").size == 2


def test_unknown_point_names_the_profile() -> None:
    with pytest.raises(KeyError, match="EMU-BS"):
        load_profile("EMU-BS").point("nope")


def _with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "key", "what"),
    [
        (_with(colour="red"), "colour", "Extra inputs"),
        (_with(models=[{"id": 1, "repat": 2}]), "models.0.repat", "Extra inputs"),
        (_with(models=[{"id": 1}, {"id": 999}]), "models", "999"),
        (_with(models=[{"id": 70000}]), "models.0.id", "less than or equal"),
        (_with(models=[{"id": 103}, {"id": 1}]), "models", "common model 1"),
        (_with(models=[{"id": 1}, {"id": 103}, {"id": 103}]), "models", "twice"),
        (_with(models=[{"id": 1, "repeats": 2}]), "models", "no repeating group"),
        (_with(models=[]), "models", "at least 1"),
        (_with(ranges={"battery.Nope": [0, 1]}), "ranges.battery.Nope", "no such point"),
        (_with(ranges={"battery.SoC": [10, 1]}), "ranges.battery.SoC", "above maximum"),
        (_with(max_gap="eight"), "max_gap", "integer"),
        (_with(series="emu-bs"), "series", "pattern"),
        (_with(kind="windmill"), "kind", "battery_storage"),
        (_with(sunspec_base=1234), "sunspec_base", "40000"),
        (_with(input_points=[{"name": "X", "address": 1, "type": "uint32", "size": 1}]),
         "input_points.0", "takes 2 registers"),
        (_with(input_points=[{"name": "X", "address": 65535, "type": "uint32"}]),
         "input_points.0", "outside"),
        (_with(input_points=[{"name": "X", "address": 1, "type": "string"}]),
         "input_points.0", "size"),
        (_with(input_points=[{"name": "X", "address": 1, "type": "float16"}]),
         "input_points.0.type", "float32"),
    ],
)
def test_bad_profiles_name_source_and_key(data: dict[str, Any], key: str, what: str) -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile(data, "site-a.toml")
    message = str(info.value)
    assert message.startswith("site-a.toml: ")
    assert key in message
    assert what in message


def test_missing_keys_are_named() -> None:
    data = copy.deepcopy(BASE)
    del data["series"], data["manufacturer"]
    with pytest.raises(ProfileError) as info:
        parse_profile(data, "x.toml")
    assert "x.toml: series: Field required" in str(info.value)
    assert "x.toml: manufacturer: Field required" in str(info.value)


def _inline(table: dict[str, Any]) -> str:
    """A TOML inline table, nested tables included."""
    return "{" + ", ".join(
        f"{json.dumps(k)} = " + (_inline(v) if isinstance(v, dict) else json.dumps(v))
        for k, v in table.items()
    ) + "}"


def _dump(data: dict[str, Any]) -> str:
    """A tiny TOML writer for the flat test profiles (values as JSON is valid TOML here)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            inline = ", ".join(
                "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in item.items()) + "}"
                for item in value
            )
            lines.append(f"{key} = [{inline}]")
        elif isinstance(value, dict):
            lines.append(f"{key} = {_inline(value)}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_profile_file_by_path(tmp_path: Path) -> None:
    path = tmp_path / "custom.toml"
    path.write_text(_dump(_with(series="EMU-XL")), encoding="utf-8")
    profile = load_profile_file(path)
    assert profile.series == "EMU-XL"
    assert profile.points == load_profile("EMU-BS").points
    assert load_profile(str(path)).series == "EMU-XL"


def test_bad_profile_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(_dump(_with(models=[{"id": 103}])), encoding="utf-8")
    pattern = re.escape(f"{path}: ") + ".*models: the chain must start"
    with pytest.raises(ProfileError, match=pattern):
        load_profile_file(path)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('series = "EMU-BS\nkind = 3\n', encoding="utf-8")
    with pytest.raises(ProfileError, match=re.escape(f"{path}: not valid TOML")):
        load_profile_file(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ProfileError, match=re.escape(f"{path}: no such profile file")):
        load_profile_file(path)
    with pytest.raises(ProfileError, match=r"absent\.toml"):
        load_profile(str(path))


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=re.escape(f"{tmp_path}: cannot read")):
        load_profile_file(tmp_path)  # a directory
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'description = "caf\xe9"\n')
    with pytest.raises(ProfileError, match=r"latin1\.toml: cannot read"):
        load_profile_file(path)


def test_unknown_shipped_profile_lists_the_shipped_ones() -> None:
    with pytest.raises(ProfileError, match="EMU-BS, EMU-PV"):
        load_profile("EMU-ZZ")


def test_profile_json_schema() -> None:
    schema = profile_json_schema()
    assert isinstance(schema, dict)
    assert schema["type"] == "object"
    assert {"series", "kind", "models", "ranges", "input_points"} <= set(schema["properties"])
    assert "series" in schema["required"]
    assert schema["additionalProperties"] is False
    json.dumps(schema)  # serialisable as-is
