"""Register codecs: round trips for every point type and layout, sentinels, known vectors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import CodecError
from protocols.registers import (
    NOT_IMPLEMENTED,
    ByteOrder,
    PointDef,
    PointType,
    RegisterImage,
    Table,
    WordOrder,
    decode,
    decode_image,
    decode_point,
    encode,
    register_count,
    scale_value,
    unscale_value,
)

T = PointType
# (bits, signed) of each integer type
INT_TYPES: dict[PointType, tuple[int, bool]] = {
    T.INT16: (16, True), T.UINT16: (16, False), T.COUNT: (16, False), T.ACC16: (16, False),
    T.ENUM16: (16, False), T.BITFIELD16: (16, False), T.SUNSSF: (16, True), T.PAD: (16, False),
    T.INT32: (32, True), T.UINT32: (32, False), T.ACC32: (32, False), T.ENUM32: (32, False),
    T.BITFIELD32: (32, False), T.IPADDR: (32, False),
    T.INT64: (64, True), T.UINT64: (64, False), T.ACC64: (64, False),
}
RAW_FIXED = {T.EUI48: 4, T.IPV6ADDR: 8}
ORDERS = st.sampled_from(list(WordOrder)), st.sampled_from(list(ByteOrder))


def test_every_point_type_is_covered_here() -> None:
    covered = set(INT_TYPES) | set(RAW_FIXED) | {T.FLOAT32, T.FLOAT64, T.STRING, T.HEX}
    assert covered == set(PointType)


def _int_range(point_type: PointType) -> tuple[int, int]:
    bits, signed = INT_TYPES[point_type]
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@st.composite
def int_cases(draw: st.DrawFn) -> tuple[PointType, int]:
    point_type = draw(st.sampled_from(list(INT_TYPES)))
    lo, hi = _int_range(point_type)
    value = draw(
        st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, -1 if lo < 0 else 2]))
        .filter(lambda v: v != NOT_IMPLEMENTED[point_type])
    )
    return point_type, value


def _check_registers(regs: tuple[int, ...], count: int) -> None:
    assert len(regs) == count
    assert all(0 <= r <= 0xFFFF for r in regs)


@settings(max_examples=300)
@given(int_cases(), *ORDERS)
def test_integers_round_trip(case: tuple[PointType, int], wo: WordOrder, bo: ByteOrder) -> None:
    point_type, value = case
    regs = encode(point_type, value, word_order=wo, byte_order=bo)
    _check_registers(regs, register_count(point_type))
    assert decode(point_type, regs, word_order=wo, byte_order=bo) == value


@settings(max_examples=200)
@given(st.floats(width=32, allow_nan=False), *ORDERS)
def test_float32_round_trips_including_infinities(
    value: float, wo: WordOrder, bo: ByteOrder
) -> None:
    regs = encode(T.FLOAT32, value, word_order=wo, byte_order=bo)
    _check_registers(regs, 2)
    out = decode(T.FLOAT32, regs, word_order=wo, byte_order=bo)
    assert isinstance(out, float)
    assert out == value
    assert math.copysign(1.0, out) == math.copysign(1.0, value)


@settings(max_examples=200)
@given(st.floats(allow_nan=False), *ORDERS)
def test_float64_round_trips_including_infinities(
    value: float, wo: WordOrder, bo: ByteOrder
) -> None:
    regs = encode(T.FLOAT64, value, word_order=wo, byte_order=bo)
    _check_registers(regs, 4)
    assert decode(T.FLOAT64, regs, word_order=wo, byte_order=bo) == value


@pytest.mark.parametrize("point_type", [T.FLOAT32, T.FLOAT64])
def test_nan_decodes_to_none(point_type: PointType) -> None:
    regs = encode(point_type, math.nan)
    assert decode(point_type, regs) is None
    assert encode(point_type, None) == regs
    raw = decode(point_type, regs, sentinel=False)
    assert isinstance(raw, float)
    assert math.isnan(raw)


# text that survives the string codec: no NUL, no trailing whitespace (SunSpec pads strings)
_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), min_size=1
).filter(lambda s: s == s.rstrip())


@st.composite
def string_cases(draw: st.DrawFn) -> tuple[int, str]:
    size = draw(st.integers(1, 16))
    text = draw(_TEXT.filter(lambda s: len(s.encode("utf-8")) <= 2 * size))
    return size, text


@settings(max_examples=200)
@given(string_cases(), *ORDERS)
def test_strings_round_trip(case: tuple[int, str], wo: WordOrder, bo: ByteOrder) -> None:
    size, text = case
    regs = encode(T.STRING, text, size=size, word_order=wo, byte_order=bo)
    _check_registers(regs, size)
    assert decode(T.STRING, regs, word_order=wo, byte_order=bo) == text


@st.composite
def raw_byte_cases(draw: st.DrawFn) -> tuple[PointType, int, bytes]:
    point_type = draw(st.sampled_from([T.HEX, T.EUI48, T.IPV6ADDR]))
    size = RAW_FIXED.get(point_type) or draw(st.integers(1, 32))
    data = draw(st.binary(min_size=2 * size, max_size=2 * size).filter(any))
    return point_type, size, data


@settings(max_examples=200)
@given(raw_byte_cases(), *ORDERS)
def test_hex_types_round_trip(
    case: tuple[PointType, int, bytes], wo: WordOrder, bo: ByteOrder
) -> None:
    point_type, size, data = case
    regs = encode(point_type, data.hex(), size=size, word_order=wo, byte_order=bo)
    _check_registers(regs, size)
    assert decode(point_type, regs, word_order=wo, byte_order=bo) == data.hex()


def test_short_hex_is_padded_with_zeros() -> None:
    assert encode(T.HEX, "ab", size=2) == (0xAB00, 0)
    assert decode(T.HEX, (0xAB00, 0)) == "ab000000"


@pytest.mark.parametrize("point_type", list(NOT_IMPLEMENTED))
def test_integer_sentinels_decode_to_none(point_type: PointType) -> None:
    sentinel = NOT_IMPLEMENTED[point_type]
    regs = encode(point_type, sentinel)
    assert encode(point_type, None) == regs
    assert decode(point_type, regs) is None
    assert decode(point_type, regs, sentinel=False) == sentinel


@pytest.mark.parametrize(
    ("point_type", "size"), [(T.STRING, 4), (T.HEX, 3), (T.EUI48, 4), (T.IPV6ADDR, 8)]
)
def test_all_zero_raw_bytes_decode_to_none(point_type: PointType, size: int) -> None:
    regs = encode(point_type, None, size=size)
    assert regs == (0,) * size
    assert decode(point_type, regs) is None


@pytest.mark.parametrize(
    ("point_type", "value", "wo", "bo", "regs"),
    [
        (T.FLOAT32, 1.0, WordOrder.BIG, ByteOrder.BIG, (0x3F80, 0x0000)),
        (T.FLOAT32, 1.0, WordOrder.LITTLE, ByteOrder.BIG, (0x0000, 0x3F80)),
        (T.FLOAT32, 1.0, WordOrder.BIG, ByteOrder.LITTLE, (0x803F, 0x0000)),
        (T.FLOAT32, 1.0, WordOrder.LITTLE, ByteOrder.LITTLE, (0x0000, 0x803F)),
        (T.FLOAT32, -2.5, WordOrder.BIG, ByteOrder.BIG, (0xC020, 0x0000)),
        (T.FLOAT64, 1.0, WordOrder.BIG, ByteOrder.BIG, (0x3FF0, 0, 0, 0)),
        (T.UINT32, 0x12345678, WordOrder.BIG, ByteOrder.BIG, (0x1234, 0x5678)),
        (T.UINT32, 0x12345678, WordOrder.LITTLE, ByteOrder.BIG, (0x5678, 0x1234)),
        (T.UINT32, 0x12345678, WordOrder.BIG, ByteOrder.LITTLE, (0x3412, 0x7856)),
        (T.UINT32, 0x12345678, WordOrder.LITTLE, ByteOrder.LITTLE, (0x7856, 0x3412)),
        (T.INT32, -2, WordOrder.BIG, ByteOrder.BIG, (0xFFFF, 0xFFFE)),
        (T.INT16, -1, WordOrder.BIG, ByteOrder.BIG, (0xFFFF,)),
        (T.UINT16, 0x1234, WordOrder.BIG, ByteOrder.LITTLE, (0x3412,)),
        (T.UINT64, 0x0102030405060708, WordOrder.BIG, ByteOrder.BIG,
         (0x0102, 0x0304, 0x0506, 0x0708)),
        (T.UINT64, 0x0102030405060708, WordOrder.LITTLE, ByteOrder.BIG,
         (0x0708, 0x0506, 0x0304, 0x0102)),
        (T.SUNSSF, -2, WordOrder.BIG, ByteOrder.BIG, (0xFFFE,)),
    ],
)
def test_known_vectors(
    point_type: PointType, value: float, wo: WordOrder, bo: ByteOrder, regs: tuple[int, ...]
) -> None:
    assert encode(point_type, value, word_order=wo, byte_order=bo) == regs
    assert decode(point_type, regs, word_order=wo, byte_order=bo) == value


def test_suns_marker_is_a_two_register_string() -> None:
    assert encode(T.STRING, "SunS", size=2) == (0x5375, 0x6E53)
    assert decode(T.STRING, (0x5375, 0x6E53)) == "SunS"
    assert encode(T.STRING, "SunS", size=2, byte_order=ByteOrder.LITTLE) == (0x7553, 0x536E)


@pytest.mark.parametrize(
    ("point_type", "regs"),
    [
        (T.INT16, ()),
        (T.INT16, (1, 2)),
        (T.UINT32, (1,)),
        (T.FLOAT32, (1, 2, 3)),
        (T.FLOAT64, (1, 2)),
        (T.UINT64, (1, 2, 3)),
        (T.EUI48, (1, 2, 3)),
        (T.IPV6ADDR, (1,) * 4),
    ],
)
def test_wrong_register_count_raises(point_type: PointType, regs: tuple[int, ...]) -> None:
    with pytest.raises(CodecError, match="registers"):
        decode(point_type, regs)


@pytest.mark.parametrize("reg", [-1, 0x10000])
def test_register_outside_16_bits_raises(reg: int) -> None:
    with pytest.raises(CodecError, match="16-bit"):
        decode(T.UINT16, (reg,))


@pytest.mark.parametrize(
    ("point_type", "value"),
    [
        (T.INT16, 0x8000),
        (T.INT16, -0x8001),
        (T.UINT16, -1),
        (T.UINT16, 0x10000),
        (T.UINT32, 2**32),
        (T.INT32, 2**31),
        (T.UINT64, 2**64),
        (T.INT64, -(2**63) - 1),
        (T.FLOAT32, 1e39),
        (T.INT16, 1.5),
        (T.UINT32, math.inf),
        (T.UINT16, "12"),
    ],
)
def test_out_of_range_values_raise(point_type: PointType, value: float | str) -> None:
    with pytest.raises(CodecError):
        encode(point_type, value)


def test_integral_floats_encode_as_integers() -> None:
    assert encode(T.INT16, -3.0) == encode(T.INT16, -3)


@pytest.mark.parametrize(
    ("point_type", "value", "size", "match"),
    [
        (T.STRING, "toolong", 3, "does not fit"),
        (T.STRING, 42, 3, "takes a string"),
        (T.HEX, "zz", 1, "not hex"),
        (T.HEX, "aabbcc", 1, "does not fit"),
        (T.EUI48, "00" * 9, None, "does not fit"),
    ],
)
def test_bad_raw_values_raise(
    point_type: PointType, value: str | int, size: int | None, match: str
) -> None:
    with pytest.raises(CodecError, match=match):
        encode(point_type, value, size=size)


def test_strings_must_be_utf8() -> None:
    with pytest.raises(CodecError, match="UTF-8"):
        decode(T.STRING, (0xFFFE,))


def test_string_needs_a_size() -> None:
    with pytest.raises(CodecError, match="size"):
        register_count(T.STRING)
    with pytest.raises(CodecError, match="size"):
        encode(T.STRING, "x", size=0)


def test_point_def_checks_address_and_size() -> None:
    with pytest.raises(CodecError, match="outside"):
        PointDef("p", 65535, T.UINT32, size=2)
    with pytest.raises(CodecError, match="outside"):
        PointDef("p", -1, T.UINT16)
    with pytest.raises(CodecError, match="takes 2 registers"):
        PointDef("p", 0, T.UINT32, size=1)
    assert PointDef("p", 65534, T.UINT32, size=2).end == 65536


# --- scaling -----------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.integers(-(2**31), 2**31 - 1), st.integers(-3, 3))
def test_sunspec_scale_factors_round_trip(raw: int, sf: int) -> None:
    point = PointDef("W", 0, T.INT32, size=2, sf="W_SF")
    value = scale_value(raw, point, sf)
    assert isinstance(value, int | float)
    assert value == pytest.approx(raw * 10.0**sf, rel=1e-12, abs=1e-9)
    assert unscale_value(value, point, sf) == raw


@settings(max_examples=200)
@given(st.integers(-(2**15), 2**15 - 1), st.sampled_from([0.1, 0.01, 0.001, 0.5, 2.0, 10.0]))
def test_fixed_scale_round_trips(raw: int, scale: float) -> None:
    point = PointDef("V", 0, T.INT16, scale=scale)
    value = scale_value(raw, point, None)
    assert isinstance(value, int | float)
    assert value == pytest.approx(raw * scale)
    assert unscale_value(value, point, None) == raw


@settings(max_examples=200)
@given(st.floats(-1e6, 1e6), st.integers(-3, 3))
def test_engineering_values_survive_unscale_within_half_a_step(value: float, sf: int) -> None:
    point = PointDef("W", 0, T.INT32, size=2, sf="W_SF")
    raw = unscale_value(value, point, sf)
    assert isinstance(raw, int)
    back = scale_value(raw, point, sf)
    assert isinstance(back, int | float)
    assert abs(back - value) <= 0.5 * 10.0**sf + 1e-9


def test_scaling_leaves_enums_bitfields_strings_and_missing_alone() -> None:
    assert scale_value(5, PointDef("S", 0, T.ENUM16, scale=10.0), None) == 5
    assert scale_value(5, PointDef("B", 0, T.BITFIELD32, size=2, sf="X"), 2) == 5
    assert scale_value("v1.2", PointDef("F", 0, T.STRING, size=2, scale=2.0), None) == "v1.2"
    assert scale_value(None, PointDef("W", 0, T.INT16, sf="W_SF"), 1) is None
    # a SunSpec-scaled point whose scale factor is missing has no value
    assert scale_value(12, PointDef("W", 0, T.INT16, sf="W_SF"), None) is None
    # floats are stored in engineering units
    assert unscale_value(1.25, PointDef("F", 0, T.FLOAT32, size=2, scale=0.1), None) == 1.25


def test_sf_and_fixed_scale_combine() -> None:
    point = PointDef("E", 0, T.UINT16, sf="E_SF", scale=0.001)
    assert scale_value(1234, point, 2) == pytest.approx(123.4)
    assert unscale_value(123.4, point, 2) == 1234


# --- decode_image ------------------------------------------------------------------------

IMAGE_POINTS = (
    PointDef("W", 100, T.INT16, sf="W_SF", minimum=-5000.0, maximum=5000.0),
    PointDef("W_SF", 101, T.SUNSSF),
    PointDef("Hz", 102, T.UINT16, scale=0.01, minimum=45.0, maximum=55.0),
    PointDef("Name", 103, T.STRING, size=2),
    PointDef("Wh", 105, T.ACC32, size=2, sf="Wh_SF"),
    PointDef("Wh_SF", 107, T.SUNSSF),
    PointDef("Tmp", 1, T.INT16, table=Table.INPUT, scale=0.1),
    PointDef("Unread", 200, T.UINT16),
)


def _image(w: int, w_sf: int | None, hz: int, wh_sf: int | None) -> RegisterImage:
    image = RegisterImage()
    image.put(Table.HOLDING, 100, encode(T.INT16, w) + encode(T.SUNSSF, w_sf))
    image.put(Table.HOLDING, 102, encode(T.UINT16, hz) + encode(T.STRING, "EMU", size=2))
    image.put(Table.HOLDING, 105, encode(T.ACC32, 123456) + encode(T.SUNSSF, wh_sf))
    image.put(Table.INPUT, 1, encode(T.INT16, -125))
    return image


def test_decode_image_resolves_scale_factors() -> None:
    out = decode_image(IMAGE_POINTS, _image(w=1234, w_sf=-1, hz=5001, wh_sf=3))
    assert out["W"].value == pytest.approx(123.4)
    assert out["W"].raw == 1234
    assert out["W_SF"].value == -1
    assert out["Hz"].value == pytest.approx(50.01)
    assert out["Name"].value == "EMU"
    assert out["Wh"].value == 123456000
    assert out["Tmp"].value == pytest.approx(-12.5)
    assert "Unread" not in out
    assert not any(r.out_of_range for r in out.values())


def test_decode_image_flags_out_of_range() -> None:
    out = decode_image(IMAGE_POINTS, _image(w=9000, w_sf=0, hz=6000, wh_sf=0))
    assert out["W"].out_of_range
    assert out["Hz"].out_of_range
    assert out["Hz"].value == pytest.approx(60.0)
    assert not out["Wh"].out_of_range


@pytest.mark.parametrize("bad_sf", [None, 11, -11])
def test_missing_or_absurd_scale_factor_gives_no_value(bad_sf: int | None) -> None:
    out = decode_image(IMAGE_POINTS, _image(w=10, w_sf=bad_sf, hz=5000, wh_sf=0))
    assert out["W"].value is None
    assert out["W"].raw == 10


def test_decode_image_without_the_sf_registers() -> None:
    image = RegisterImage()
    image.put(Table.HOLDING, 100, encode(T.INT16, 10))
    out = decode_image(IMAGE_POINTS, image)
    assert out["W"].value is None
    assert set(out) == {"W"}


def test_register_image_keeps_tables_apart() -> None:
    image = RegisterImage()
    image.put(Table.HOLDING, 10, (1, 2, 3))
    assert image.get(Table.HOLDING, 11, 2) == (2, 3)
    assert image.get(Table.HOLDING, 12, 2) is None
    assert image.get(Table.INPUT, 10, 1) is None


def test_decode_point_without_range_is_never_out_of_range() -> None:
    reading = decode_point(PointDef("X", 0, T.INT16), (0x7FFF,), None)
    assert reading.value == 0x7FFF
    assert not reading.out_of_range
