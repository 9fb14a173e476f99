"""Compiled decoder: exactly the `Reading`s of `decode_image`, on shipped profiles and random plans.

`decode_image` over a `RegisterImage` is the reference. Every property below feeds the same
responses to both and requires the same keys in the same order, readings equal down to the
type and the bits of each value, the same `errors`, and the same `CodecError` when the
reference raises one.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import decoder
from protocols.decoder import CompiledDecoder
from protocols.errors import CodecError, PlanError
from protocols.planner import ReadRequest, plan_reads
from protocols.profiles import Profile, all_profiles
from protocols.registers import (
    ByteOrder,
    PointDef,
    PointType,
    Reading,
    RegisterImage,
    Table,
    WordOrder,
    decode_image,
    encode,
    register_count,
)

T = PointType
PROFILES = list(all_profiles())
Responses = list[list[int] | None]

# registers that hit the interesting cases often: sentinels, small scale factors, ASCII text
_ASCII = st.tuples(st.integers(0x20, 0x7E), st.integers(0x20, 0x7E)).map(lambda t: t[0] << 8 | t[1])
REGISTER = st.one_of(
    st.integers(0, 0xFFFF),
    st.integers(-12, 12).map(lambda v: v & 0xFFFF),
    st.sampled_from([0, 0x7FFF, 0x8000, 0xFFFF, 0x7FC0, 0xFFC0, 0x7FF8]),
    st.sampled_from([10, 11, -10 & 0xFFFF, -11 & 0xFFFF]),  # the edges of a scale factor
    _ASCII,
)


def _key(value: object) -> tuple[str, object]:
    """A value with its type, floats by their bits: so that 1 != 1.0, -0.0 != 0.0, nan == nan."""
    if isinstance(value, float):
        return "float", struct.pack(">d", value)
    return type(value).__name__, value


def _keys(readings: Mapping[str, Reading]) -> list[tuple[object, ...]]:
    return [
        (name, _key(r.value), _key(r.raw), type(r.out_of_range), r.out_of_range)
        for name, r in readings.items()
    ]


def _image(plan: Sequence[ReadRequest], responses: Responses) -> RegisterImage:
    image = RegisterImage()
    for req, regs in zip(plan, responses, strict=True):
        if regs is not None:
            image.put(req.table, req.address, regs)
    return image


def _refuse(*args: object, **kwargs: object) -> dict[str, Reading]:
    raise AssertionError("the compiled decoder fell back to decode_image")


def assert_same(
    points: Sequence[PointDef],
    plan: Sequence[ReadRequest],
    responses: Responses,
    *,
    fallback: bool = False,
) -> dict[str, Reading]:
    """Compiled and reference decoding agree on readings, order, errors and exceptions.

    Only responses that are not what the plan asked for (`fallback`) may be handed on to
    `decode_image`; well-formed ones must take the compiled way.
    """
    with mock.patch.object(decoder, "decode_image", decode_image if fallback else _refuse):
        return _assert_same(CompiledDecoder.for_plan(points, plan), points, plan, responses)


def _assert_same(
    compiled: CompiledDecoder,
    points: Sequence[PointDef],
    plan: Sequence[ReadRequest],
    responses: Responses,
) -> dict[str, Reading]:
    want_errors: list[str] = []
    reference_raised: str | None = None
    try:
        want = decode_image(points, _image(plan, responses), want_errors)
    except CodecError as exc:  # an SF point wider than one register, once it is read
        reference_raised = str(exc)
    if reference_raised is not None:
        with pytest.raises(CodecError, match=f"^{re.escape(reference_raised)}$"):
            compiled.decode(responses, [])
        return {}
    got_errors: list[str] = []
    got = compiled.decode(responses, got_errors)
    assert _keys(got) == _keys(want)
    assert got_errors == want_errors
    # the other form of responses, and no `errors` at all, change nothing
    by_index = {i: regs for i, regs in enumerate(responses) if regs is not None}
    assert _keys(compiled.decode(by_index)) == _keys(want)
    return got


@st.composite
def profile_responses(draw: st.DrawFn, profile: Profile) -> Responses:
    plan = plan_reads(profile.poll_points, max_gap=profile.max_gap)
    out: Responses = []
    for req in plan:
        failed = draw(st.integers(0, 9)) == 0
        uniform = draw(st.sampled_from([None, None, None, 0, 0xFFFF, 0x8000]))
        if failed:
            out.append(None)
        elif uniform is not None:
            out.append([uniform] * req.count)
        else:
            out.append(draw(st.lists(REGISTER, min_size=req.count, max_size=req.count)))
    return out


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.series)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(data=st.data())
def test_shipped_profiles_decode_as_decode_image(profile: Profile, data: st.DataObject) -> None:
    points = profile.poll_points
    responses = data.draw(profile_responses(profile))
    assert_same(points, plan_reads(points, max_gap=profile.max_gap), responses)


def _plausible(p: PointDef, n: int) -> tuple[int, ...]:
    """Registers of a value a unit could report: small numbers, sane scale factors, text."""
    if p.type is T.SUNSSF:
        return encode(p.type, n % 5 - 3)
    if p.type is T.STRING:
        return encode(p.type, f"EMU {n}"[: 2 * p.size], size=p.size)
    if p.type in (T.HEX, T.EUI48, T.IPV6ADDR):
        return encode(p.type, bytes(range(n, n + 2 * p.size)).hex(), size=p.size)
    if p.type in (T.FLOAT32, T.FLOAT64):
        return encode(p.type, n / 8)
    return encode(p.type, n % 7 if n % 3 else None, word_order=p.word_order,
                  byte_order=p.byte_order)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.series)
def test_shipped_profiles_with_plausible_values_decode_as_decode_image(profile: Profile) -> None:
    points = profile.poll_points
    plan = plan_reads(points, max_gap=profile.max_gap)
    responses: Responses = [[0] * r.count for r in plan]
    where = {(r.table, a): (i, a - r.address) for i, r in enumerate(plan)
             for a in range(r.address, r.end)}
    for n, p in enumerate(points):
        for a, reg in enumerate(_plausible(p, n), start=p.address):
            i, offset = where[p.table, a]
            regs = responses[i]
            assert regs is not None
            regs[offset] = reg
    got = assert_same(points, plan, responses)
    assert len(got) == len(points)
    assert sum(r.value is not None for r in got.values()) > len(points) // 2
    assert any(isinstance(r.value, float) for r in got.values())
    assert any(isinstance(r.value, str) for r in got.values())


# --- random point sets and plans ----------------------------------------------------------

NAMES = [f"p{i}" for i in range(10)]
SF_NAMES = ["sf0", "sf1", "sf2"]
TABLES = st.sampled_from([Table.HOLDING, Table.HOLDING, Table.HOLDING, Table.INPUT])
ADDRESSES = st.integers(0, 24)
SCALES = st.one_of(st.none(), st.sampled_from([0.1, 0.01, 0.001, 10.0, -0.5, 2.5, 1e-9]))
BOUND = st.one_of(st.none(), st.integers(-70000, 70000), st.floats(-1e6, 1e6))


@st.composite
def random_point(draw: st.DrawFn, names: Sequence[str]) -> PointDef:
    point_type = draw(st.sampled_from(list(PointType)))
    if point_type in (T.STRING, T.HEX):
        size = draw(st.integers(1, 6))
    else:
        size = register_count(point_type)
    return PointDef(
        name=draw(st.sampled_from(names)),
        address=draw(ADDRESSES),
        type=point_type,
        size=size,
        table=draw(TABLES),
        scale=draw(SCALES),
        sf=draw(st.sampled_from([None, None, *SF_NAMES, *SF_NAMES, "p0", "nowhere", ""])),
        word_order=draw(st.sampled_from(list(WordOrder))),
        byte_order=draw(st.sampled_from(list(ByteOrder))),
        sentinel=draw(st.booleans()),
        minimum=draw(BOUND),
        maximum=draw(BOUND),
    )


@st.composite
def sf_point(draw: st.DrawFn) -> PointDef:
    return PointDef(
        name=draw(st.sampled_from(SF_NAMES)),
        address=draw(ADDRESSES),
        type=T.SUNSSF,
        table=draw(TABLES),
        sentinel=draw(st.booleans()),
        word_order=draw(st.sampled_from(list(WordOrder))),
        byte_order=draw(st.sampled_from(list(ByteOrder))),
    )


@st.composite
def point_sets(draw: st.DrawFn) -> list[PointDef]:
    """Points with shared names at times, SF points, overlaps: whatever a PointDef allows."""
    unique = draw(st.booleans())
    data = draw(st.lists(random_point(NAMES), min_size=1, max_size=12))
    if unique:
        data = list({p.name: p for p in data}.values())
    by_name = (lambda p: p.name) if unique else None
    sfs = draw(st.lists(sf_point(), min_size=1, max_size=3, unique_by=by_name))
    return draw(st.permutations(data + sfs))


@st.composite
def planned(draw: st.DrawFn, points: Sequence[PointDef]) -> list[ReadRequest]:
    """A plan from the planner over some of the points (others, SF points too, may be left out)."""
    chosen = [p for p in points if draw(st.integers(0, 4)) > 0]
    max_gap = draw(st.integers(0, 10))
    try:
        return plan_reads(chosen, max_gap=max_gap, max_count=draw(st.integers(8, 20)))
    except PlanError:  # overlapping points wider than the request: no limit but Modbus's
        return plan_reads(chosen, max_gap=max_gap)


@st.composite
def arbitrary_plan(draw: st.DrawFn) -> list[ReadRequest]:
    """Requests anywhere, overlapping or abutting: points may straddle requests."""
    requests = st.builds(
        ReadRequest,
        table=TABLES,
        address=st.integers(0, 28),
        count=st.integers(1, 16),
        points=st.just(()),
    )
    return draw(st.lists(requests, min_size=1, max_size=6))


@st.composite
def responses_for(draw: st.DrawFn, plan: Sequence[ReadRequest]) -> Responses:
    """Registers for each request; one in eight fails."""
    return [
        None if draw(st.integers(0, 7)) == 0
        else draw(st.lists(REGISTER, min_size=r.count, max_size=r.count))
        for r in plan
    ]


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_random_points_from_the_planner_decode_as_decode_image(data: st.DataObject) -> None:
    points = data.draw(point_sets())
    plan = data.draw(planned(points))
    assert_same(points, plan, data.draw(responses_for(plan)))


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_random_points_from_arbitrary_plans_decode_as_decode_image(data: st.DataObject) -> None:
    points = data.draw(point_sets())
    plan = data.draw(arbitrary_plan())
    assert_same(points, plan, data.draw(responses_for(plan)))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_responses_the_plan_did_not_ask_for_decode_as_decode_image(
    data: st.DataObject,
) -> None:
    """A wrong register count or a value beyond 16 bits: the image's answer, whatever it is."""
    points = data.draw(point_sets())
    plan = data.draw(arbitrary_plan())
    responses = data.draw(responses_for(plan))
    i = data.draw(st.integers(0, len(plan) - 1))
    regs = responses[i] or []
    fault = data.draw(st.sampled_from(["short", "long", "beyond"]))
    if fault == "short":
        regs = regs[: data.draw(st.integers(0, max(0, len(regs) - 1)))]
    elif fault == "long":
        regs = regs + data.draw(st.lists(REGISTER, min_size=1, max_size=3))
    else:
        regs = [*regs, 0]
        regs[data.draw(st.integers(0, len(regs) - 1))] = data.draw(st.sampled_from([-1, 0x10000]))
    responses[i] = regs
    assert_same(points, plan, responses, fallback=True)


# --- examples that say what the properties mean ----------------------------------------------

EXAMPLE = (
    PointDef("W", 100, T.INT16, sf="W_SF", minimum=-5000.0, maximum=5000.0),
    PointDef("W_SF", 101, T.SUNSSF),
    PointDef("Wh", 102, T.ACC32, size=2, sf="W_SF", word_order=WordOrder.LITTLE),
    PointDef("Name", 104, T.STRING, size=2),
    PointDef("Tmp", 1, T.INT16, table=Table.INPUT, scale=0.1),
)


def test_an_example_cycle() -> None:
    plan = plan_reads(EXAMPLE)
    regs = (encode(T.INT16, 1234) + encode(T.SUNSSF, -1)
            + encode(T.ACC32, 70000, word_order=WordOrder.LITTLE) + encode(T.STRING, "EMU", size=2))
    out = CompiledDecoder.for_plan(EXAMPLE, plan).decode([list(regs), None])
    assert out == {
        "W": Reading(123.4, 1234),
        "W_SF": Reading(-1, -1),
        "Wh": Reading(7000.0, 70000),
        "Name": Reading("EMU", "EMU"),
    }


def test_a_failed_request_leaves_its_points_out_and_its_scale_factor_missing() -> None:
    points = (*EXAMPLE, PointDef("In", 2, T.UINT16, table=Table.INPUT, sf="W_SF"))
    plan = plan_reads(points)
    out = CompiledDecoder.for_plan(points, plan).decode({1: [5, 6]})
    assert out == {"Tmp": Reading(0.5, 5), "In": Reading(None, 6)}


def test_an_empty_sf_name_never_scales() -> None:
    """`decode_image` looks the factor up only for a non-empty name: "" stays missing."""
    points = [PointDef("", 0, T.SUNSSF), PointDef("X", 1, T.UINT16, sf=""),
              PointDef("Y", 2, T.UINT16, sf="Y_SF"), PointDef("Y_SF", 3, T.SUNSSF)]
    out = CompiledDecoder.for_plan(points, plan_reads(points)).decode([[1, 7, 7, 1]])
    assert out["X"] == Reading(None, 7)
    assert out["Y"] == Reading(70, 7)


def test_an_undecodable_point_is_named_and_the_rest_decode() -> None:
    plan = plan_reads(EXAMPLE)
    regs = [1, 0, 0, 0, 0xFFFE, 0xFFFF]  # not UTF-8
    errors: list[str] = []
    out = CompiledDecoder.for_plan(EXAMPLE, plan).decode([regs, [3]], errors)
    assert errors == ["Name"]
    assert set(out) == {"W", "W_SF", "Wh", "Tmp"}


def test_a_point_across_two_requests_is_put_together() -> None:
    point = PointDef("F", 10, T.FLOAT32, size=2, byte_order=ByteOrder.LITTLE)
    regs = encode(T.FLOAT32, 1.5, byte_order=ByteOrder.LITTLE)
    plan = [ReadRequest(Table.HOLDING, 9, 2, ()), ReadRequest(Table.HOLDING, 11, 1, ())]
    decode = CompiledDecoder.for_plan([point], plan).decode
    assert decode([[0, regs[0]], [regs[1]]]) == {"F": Reading(1.5, 1.5)}
    assert decode([[0, regs[0]], None]) == {}


def test_overlapping_requests_take_the_later_answer_when_there_is_one() -> None:
    point = PointDef("X", 5, T.UINT16)
    plan = [ReadRequest(Table.HOLDING, 0, 10, ()), ReadRequest(Table.HOLDING, 5, 1, ())]
    decode = CompiledDecoder.for_plan([point], plan).decode
    assert decode([[1] * 10, [2]])["X"].raw == 2
    assert decode([[1] * 10, None])["X"].raw == 1


@pytest.mark.parametrize(("sf", "value"), [(10, 5 * 10**14), (11, None), (-10, 5e-6), (-11, None)])
def test_a_scale_factor_read_twice_is_taken_from_the_later_request(
    sf: int, value: float | None
) -> None:
    points = [PointDef("X", 0, T.UINT16, sf="X_SF"), PointDef("X_SF", 1, T.SUNSSF)]
    plan = [ReadRequest(Table.HOLDING, 0, 2, ()), ReadRequest(Table.HOLDING, 1, 1, ())]
    decode = CompiledDecoder.for_plan(points, plan).decode
    assert decode([[50000, 0], [sf & 0xFFFF]])["X"] == Reading(value, 50000)
    assert decode([[50000, sf & 0xFFFF], None])["X"] == Reading(value, 50000)


def test_floats_keep_their_nan_sentinel() -> None:
    points = [PointDef("F", 0, T.FLOAT32, size=2), PointDef("G", 2, T.FLOAT32, size=2,
                                                           sentinel=False)]
    nan = list(encode(T.FLOAT32, math.nan))
    out = CompiledDecoder.for_plan(points, plan_reads(points)).decode([nan + nan])
    assert out["F"] == Reading(None, None)
    assert isinstance(out["G"].raw, float)
    assert math.isnan(out["G"].raw)


def test_responses_must_match_the_plan() -> None:
    compiled = CompiledDecoder.for_plan(EXAMPLE, plan_reads(EXAMPLE))
    assert len(compiled.plan) == 2
    with pytest.raises(ValueError, match="1 responses for a plan of 2"):
        compiled.decode([None])
    with pytest.raises(ValueError, match=r"requests \[2\]"):
        compiled.decode({2: [0]})
