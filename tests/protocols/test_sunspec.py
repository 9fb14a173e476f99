"""SunSpec layouts against the published L values, and the sans-I/O model-chain walker."""

from __future__ import annotations

from typing import Any

import pytest

from protocols.errors import SunSpecError
from protocols.profiles import Profile, load_profile, vendor_model
from protocols.registers import PointType, RegisterImage, Table, decode_image, encode
from protocols.sunspec import (
    END_MODEL_ID,
    SUNS_MARKER,
    ModelChainWalker,
    ModelDef,
    ModelHeader,
    layout_chain,
    model_from_dict,
    repeats_from_length,
    standard_model,
    walk_chain,
)


@pytest.mark.parametrize(
    ("model_id", "name", "length"),
    [(1, "common", 66), (103, "inverter_three_phase", 50), (124, "storage_basic", 24),
     (802, "battery", 62)],
)
def test_standard_model_lengths(model_id: int, name: str, length: int) -> None:
    model = standard_model(model_id)
    assert (model.id, model.name, model.length()) == (model_id, name, length)
    assert model.group is None
    _check_layout(model, 40002, 0)


@pytest.mark.parametrize("repeats", [0, 1, 2, 5])
def test_mppt_model_160_repeats(repeats: int) -> None:
    model = standard_model(160)
    assert model.length(repeats) == 8 + 20 * repeats
    points = _check_layout(model, 40122, repeats)
    names = {p.name for p in points}
    for i in range(1, repeats + 1):
        assert f"mppt.module{i}.DCA" in names
    assert f"mppt.module{repeats + 1}.DCA" not in names


def test_vendor_model_64901() -> None:
    model = vendor_model(64901)
    assert model.vendor
    assert model.name == "emu"
    assert model.length() == 145
    points = {p.name: p for p in _check_layout(model, 40212, 0)}
    assert points["emu.FwVer"].type is PointType.STRING
    assert points["emu.FwVer"].size == 8
    assert points["emu.IntTmp"].sf == "emu.Tmp_SF"
    assert points["emu.FwChunk"].access == "W"


def _check_layout(model: ModelDef, base: int, repeats: int) -> list[Any]:
    """Points tile the model from its ID register to ID + 2 + L, with SF points present."""
    points = model.layout(base, repeats)
    assert points[0].name == f"{model.name}.ID"
    assert points[0].address == base
    assert points[1].name == f"{model.name}.L"
    assert points[1].address == base + 1
    addr = base
    for p in points:
        assert p.address == addr, p.name
        addr = p.end
    assert addr == base + 2 + model.length(repeats)
    names = {p.name for p in points}
    assert len(names) == len(points)
    assert all(p.sf in names for p in points if p.sf is not None)
    return points


def test_known_sunspec_offsets() -> None:
    common = {p.name: p for p in standard_model(1).layout(40002)}
    assert (common["common.Mn"].address, common["common.Mn"].size) == (40004, 16)
    assert common["common.SN"].address == 40052
    assert common["common.Pad"].type is PointType.PAD
    assert not common["common.Pad"].sentinel
    inverter = {p.name: p for p in standard_model(103).layout(40070)}
    assert inverter["inverter_three_phase.W"].address == 40070 + 14
    assert inverter["inverter_three_phase.W"].sf == "inverter_three_phase.W_SF"


def test_group_points_find_scale_factors_in_the_fixed_block() -> None:
    points = {p.name: p for p in standard_model(160).layout(0, 2, prefix="pv")}
    assert points["pv.module2.DCA"].sf == "pv.DCA_SF"
    assert points["pv.module1.ID"].address == 10
    assert points["pv.module2.ID"].address == 30


def test_repeats_on_a_model_without_group_raise() -> None:
    with pytest.raises(SunSpecError, match="no repeating group"):
        standard_model(103).layout(40000, 1)


def test_unknown_standard_model_raises() -> None:
    with pytest.raises(SunSpecError, match="9999"):
        standard_model(9999)


@pytest.mark.parametrize(
    ("model_id", "length", "repeats"),
    [(160, 8, 0), (160, 28, 1), (160, 48, 2), (160, 208, 10), (1, 66, 0), (103, 50, 0),
     (1, 70, 0)],
)
def test_repeats_from_length(model_id: int, length: int, repeats: int) -> None:
    assert repeats_from_length(standard_model(model_id), length) == repeats


@pytest.mark.parametrize(("model_id", "length"), [(160, 50), (160, 4), (1, 60), (124, 0)])
def test_repeats_from_bad_length_raise(model_id: int, length: int) -> None:
    with pytest.raises(SunSpecError, match=f"L={length}"):
        repeats_from_length(standard_model(model_id), length)


def _model_json(**changes: Any) -> dict[str, Any]:
    group: dict[str, Any] = {
        "name": "x",
        "points": [
            {"name": "ID", "type": "uint16", "size": 1},
            {"name": "L", "type": "uint16", "size": 1},
            {"name": "V", "type": "uint16", "size": 1},
        ],
    }
    group.update(changes)
    return {"id": 64999, "group": group}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"group": {}}, "lacks id"),
        (_model_json(points=[{"name": "V", "type": "uint16"}]), "ID and L"),
        (_model_json(groups=[{"name": "a", "points": []}, {"name": "b", "points": []}]),
         "more than one"),
        (_model_json(groups=[{"name": "a", "points": [], "groups": [{"name": "b"}]}]),
         "nested"),
        (_model_json(points=[{"name": "ID", "type": "uint17"}]), "bad point 'ID'"),
    ],
)
def test_bad_model_definitions_raise(data: dict[str, Any], match: str) -> None:
    with pytest.raises(SunSpecError, match=match):
        model_from_dict(data)


# --- the chain walker --------------------------------------------------------------------


def device_map(profile: Profile, base: int) -> dict[int, int]:
    """An in-memory register map: SunS marker, each model's ID and L, the end marker."""
    regs: dict[int, int] = {base: SUNS_MARKER[0], base + 1: SUNS_MARKER[1]}
    _, headers, end = layout_chain(profile.chain, base)
    for h in headers:
        regs[h.address] = h.id
        regs[h.address + 1] = h.length
    regs[end] = END_MODEL_ID
    regs[end + 1] = 0
    return regs


@pytest.mark.parametrize("series", ["EMU-BS", "EMU-PV"])
@pytest.mark.parametrize("base", [40000, 0, 50000])
def test_walker_finds_the_chain_at_each_base(series: str, base: int) -> None:
    profile = load_profile(series)
    walker = walk_chain(device_map(profile, base))
    assert walker.done
    assert walker.base == base
    _, headers, _ = layout_chain(profile.chain, base)
    assert walker.models == headers
    assert [m.id for m in walker.models] == [m.id for m in profile.models]
    for model, header in zip(profile.chain, walker.models, strict=True):
        assert repeats_from_length(model[0], header.length) == model[1]


def test_walker_matches_profile_headers() -> None:
    profile = load_profile("EMU-BS")
    walker = walk_chain(device_map(profile, profile.sunspec_base))
    assert tuple(walker.models) == profile.headers


def test_walker_step_by_step_with_failed_bases() -> None:
    regs = {50000: 0x5375, 50001: 0x6E53, 50002: 1, 50003: 66, 50070: 0xFFFF, 50071: 0}
    walker = ModelChainWalker()
    assert walker.next_read() == (40000, 2)
    walker.feed(None)  # illegal address at 40000
    assert walker.next_read() == (0, 2)
    walker.feed([0, 0])  # something else lives at 0
    assert walker.next_read() == (50000, 2)
    walker.feed([regs[50000], regs[50001]])
    assert walker.base == 50000
    assert walker.next_read() == (50002, 2)
    walker.feed([1, 66])
    assert walker.next_read() == (50070, 2)
    walker.feed([0xFFFF, 0])
    assert walker.done
    assert walker.next_read() is None
    assert walker.models == [ModelHeader(1, 66, 50002)]
    with pytest.raises(SunSpecError, match="already complete"):
        walker.feed([1, 2])


def test_no_marker_anywhere_raises() -> None:
    with pytest.raises(SunSpecError, match="no SunS marker"):
        walk_chain({40000: 1, 40001: 2, 0: 0x5375, 1: 0})


def test_custom_bases() -> None:
    regs = {100: 0x5375, 101: 0x6E53, 102: 0xFFFF, 103: 0}
    walker = walk_chain(regs, bases=(100,))
    assert walker.base == 100
    assert walker.models == []


def test_chain_running_past_65535_raises() -> None:
    regs = {50000: 0x5375, 50001: 0x6E53, 50002: 1, 50003: 20000}
    with pytest.raises(SunSpecError, match="runs past"):
        walk_chain(regs)


def test_chain_whose_end_marker_would_straddle_65535_raises() -> None:
    # the model ends at 65534, so the end marker would need registers 65535 and 65536
    regs = {50000: 0x5375, 50001: 0x6E53, 50002: 64999, 50003: 65535 - 50004}
    with pytest.raises(SunSpecError, match="runs past"):
        walk_chain(regs)


def test_chain_ending_at_the_last_two_registers_is_fine() -> None:
    length = 65534 - 50004
    regs = {50000: 0x5375, 50001: 0x6E53, 50002: 64999, 50003: length, 65534: 0xFFFF, 65535: 0}
    walker = walk_chain(regs)
    assert walker.done
    assert walker.models == [ModelHeader(64999, length, 50002)]


def test_endless_chain_raises() -> None:
    regs = {40000: 0x5375, 40001: 0x6E53}
    for i in range(300):
        regs[40002 + 2 * i] = 1
        regs[40003 + 2 * i] = 0
    with pytest.raises(SunSpecError, match="does not end"):
        walk_chain(regs)
    with pytest.raises(SunSpecError, match="more than 10 models"):
        walk_chain(regs, max_models=10)


def test_unreadable_header_raises() -> None:
    regs = {40000: 0x5375, 40001: 0x6E53, 40002: 1, 40003: 66}
    with pytest.raises(SunSpecError, match="40070 could not be read"):
        walk_chain(regs)


def test_profile_image_decodes_group_points_with_fixed_block_scale_factors() -> None:
    profile = load_profile("EMU-PV")
    pts = {p.name: p for p in profile.points}
    image = RegisterImage()

    def put(name: str, value: int | str) -> None:
        p = pts[name]
        image.put(p.table, p.address, encode(p.type, value, size=p.size))

    put("mppt.DCA_SF", -2)
    put("mppt.module1.DCA", 1234)
    put("mppt.module2.DCA", 567)
    put("inverter_three_phase.Hz", 6000)
    put("inverter_three_phase.Hz_SF", -2)
    put("emu.FwVer", "1.4.2")
    put("grid.ExportW", -1500)
    out = decode_image(profile.points, image)
    assert out["mppt.module1.DCA"].value == pytest.approx(12.34)
    assert out["mppt.module2.DCA"].value == pytest.approx(5.67)
    assert out["inverter_three_phase.Hz"].value == pytest.approx(60.0)
    assert out["inverter_three_phase.Hz"].out_of_range
    assert out["emu.FwVer"].value == "1.4.2"
    assert out["grid.ExportW"].value == -1500
    assert pts["grid.ExportW"].table is Table.INPUT
