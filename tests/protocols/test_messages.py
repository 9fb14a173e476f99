"""MQTT payload schemas: valid payloads parse, invalid ones give one clear MessageError."""

from __future__ import annotations

import base64
import gzip
import json
import re
import uuid
import zlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocols.errors import MessageError
from protocols.messages import (
    MAX_INFLATED_BYTES,
    AckResult,
    AgentState,
    Command,
    CommandAck,
    CommandKind,
    Event,
    EventBatch,
    EventKind,
    Health,
    Message,
    Quality,
    Severity,
    Status,
    TelemetryBatch,
    TelemetryPoint,
    canonical_bytes,
    decode_batch,
    encode_batch,
    parse_payload,
)
from protocols.topics import TopicKind

T0 = datetime(2026, 11, 25, 14, 0, 0, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
CMD_ID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def _point(**changes: Any) -> dict[str, Any]:
    point: dict[str, Any] = {
        "device": "unit-1", "point": "battery.SoC", "ts": "2026-11-25T14:00:00Z",
        "value": 55.5, "quality": "good",
    }
    point.update(changes)
    return point


def _batch(*points: dict[str, Any], **changes: Any) -> dict[str, Any]:
    batch: dict[str, Any] = {"agent": "gw-1", "seq": 7, "points": list(points or [_point()])}
    batch.update(changes)
    return batch


def _bytes(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _error(kind: TopicKind, payload: bytes) -> str:
    with pytest.raises(MessageError) as info:
        parse_payload(kind, payload)
    assert not isinstance(info.value.__cause__, MessageError)
    return str(info.value)


# --- telemetry ---------------------------------------------------------------------------


def test_telemetry_parses() -> None:
    batch = parse_payload(TopicKind.TELEMETRY, _bytes(_batch(
        _point(),
        _point(point="emu.FwVer", value="1.4.2"),
        _point(point="emu.Running", value=True, quality="stale"),
        _point(point="inverter.W", value=None, quality="comm_lost"),
        _point(point="bms.RackCount", value=12),
    )))
    assert isinstance(batch, TelemetryBatch)
    assert (batch.agent, batch.seq, batch.sent_at) == ("gw-1", 7, None)
    values = [p.value for p in batch.points]
    assert values == [55.5, "1.4.2", True, None, 12]
    assert [type(v) for v in values] == [float, str, bool, type(None), int]
    assert batch.points[2].quality is Quality.STALE
    assert batch.points[0].ts == T0


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-25T14:00:00Z",
        "2026-11-25T14:00:00+00:00",
        "2026-11-25T22:00:00+08:00",
        "2026-11-25T09:00:00-05:00",
        "2026-11-25T14:00:00.000Z",
        T0_MS,
    ],
)
def test_iso_and_epoch_ms_timestamps_normalise_to_utc(ts: str | int) -> None:
    batch = TelemetryBatch.from_bytes(_bytes(_batch(_point(ts=ts))))
    ts_out = batch.points[0].ts
    assert ts_out == T0
    assert ts_out.tzinfo is UTC


def test_epoch_ms_keeps_milliseconds() -> None:
    batch = TelemetryBatch.from_bytes(_bytes(_batch(_point(ts=T0_MS + 123))))
    assert batch.points[0].ts == T0 + timedelta(milliseconds=123)
    assert b'"ts":"2026-11-25T14:00:00.123000Z"' in batch.to_bytes()


def test_aware_datetimes_in_python_normalise_too() -> None:
    shanghai = timezone(timedelta(hours=8))
    point = TelemetryPoint(
        device="u", point="p", ts=T0.astimezone(shanghai), value=1, quality=Quality.GOOD
    )
    assert point.ts == T0
    assert point.ts.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("ts", "match"),
    [
        ("2026-11-25T14:00:00", "points\\[0\\]\\.ts: timestamp .* has no time zone"),
        ("2026-11-25", "has no time zone"),
        ("yesterday", "'yesterday' is not an ISO-8601 timestamp"),
        (1_764_079_200, "before 2000-01-01; was it sent in seconds"),
        (10**20, "out of range"),
        (True, "ISO-8601 string or epoch milliseconds"),
        (1.7e12, "ISO-8601 string or epoch milliseconds"),
        (None, "ISO-8601 string or epoch milliseconds"),
    ],
)
def test_bad_timestamps_raise(ts: object, match: str) -> None:
    message = _error(TopicKind.TELEMETRY, _bytes(_batch(_point(ts=ts))))
    assert message.startswith("invalid telemetry payload: ")
    assert re.search(match, message), message


def test_naive_datetime_in_python_is_refused() -> None:
    with pytest.raises(ValidationError, match="no time zone"):
        TelemetryPoint(device="u", point="p", ts=datetime(2026, 1, 1), value=1,  # noqa: DTZ001
                       quality=Quality.GOOD)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON: Expecting property name"),
        (b'{"agent": "gw-1",}', "not JSON"),
        (b"\xff\xfe\x00", "not"),
        (b"[1, 2]", "expected a JSON object, got \\[1, 2\\]"),
        (b'"text"', "expected a JSON object"),
        (b'{"agent":"a","seq":1,"points":[{"value":NaN}]}', "NaN is not valid JSON"),
        (b'{"agent":"a","seq":1,"points":[],"x":Infinity}', "Infinity is not valid JSON"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_malformed_json_raises(payload: bytes, match: str) -> None:
    assert re.search(match, _error(TopicKind.TELEMETRY, payload))


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (_batch(seq=None), "seq: Input should be a valid integer"),
        ({"agent": "gw-1", "points": []}, "seq: Field required"),
        ({"seq": 1, "points": []}, "agent: Field required"),
        (_batch(seq=-1), "seq: Input should be greater than or equal to 0 (got -1)"),
        (_batch(seq=2**63), "seq: Input should be less than or equal to"),
        (_batch(seq="seven"), "seq: Input should be a valid integer"),
        (_batch(agent=""), "agent: String should have at least 1 character"),
        (_batch(extra=1), "extra: Extra inputs are not permitted"),
        (_batch(_point(quality="bad")),
         "points[0].quality: Input should be 'good', 'stale', 'comm_lost' or 'out_of_range' "
         "(got 'bad')"),
        (_batch(_point(), _point(value=[1])),
         "points[1].value: value must be a number, string, boolean or null, not an array"),
        (_batch(_point(value={"a": 1})), "not an object"),
        (_batch(_point(device=None)), "points[0].device: Input should be a valid string"),
        (_batch({"device": "u"}), "points[0].point: Field required"),
        (_batch(_point(unit="V")), "points[0].unit: Extra inputs are not permitted"),
        (_batch(points="none"), "points: Input should be a valid"),
    ],
)
def test_schema_errors_name_the_field(batch: dict[str, Any], expected: str) -> None:
    assert expected in _error(TopicKind.TELEMETRY, _bytes(batch))


def test_many_errors_are_summarised() -> None:
    batch = _batch(*[_point(quality="bad") for _ in range(9)])
    message = _error(TopicKind.TELEMETRY, _bytes(batch))
    assert message.count("quality") == 5
    assert message.endswith("and 4 more")


def test_huge_inputs_are_shortened_in_messages() -> None:
    message = _error(TopicKind.TELEMETRY, _bytes(_batch(_point(quality="x" * 1000))))
    assert len(message) < 300


def test_non_finite_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="finite"):
        TelemetryPoint(device="u", point="p", ts=T0, value=float("inf"), quality=Quality.GOOD)


def test_telemetry_round_trip_and_compact_json() -> None:
    batch = TelemetryBatch(
        agent="gw-1", seq=0, sent_at=T0_MS,
        points=[TelemetryPoint(device="u", point="p", ts=T0, value=-1.5, quality="out_of_range")],
    )
    raw = batch.to_bytes()
    assert b" " not in raw
    assert b'"sent_at":"2026-11-25T14:00:00Z"' in raw
    assert TelemetryBatch.from_bytes(raw) == batch
    assert decode_batch(raw) == batch


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(_VALUES, st.sampled_from(list(Quality)),
                       st.integers(946_684_800_000, T0_MS + 10**12)), max_size=30),
    st.integers(0, 2**63 - 1),
    st.booleans(),
)
def test_batches_round_trip_plain_and_compressed(
    rows: list[tuple[Any, Quality, int]], seq: int, compress: bool
) -> None:
    batch = TelemetryBatch(
        agent="gw", seq=seq,
        points=[TelemetryPoint(device="u", point=f"p{i}", ts=ts, value=v, quality=q)
                for i, (v, q, ts) in enumerate(rows)],
    )
    back = decode_batch(encode_batch(batch, compress))
    assert back == batch
    assert [type(p.value) for p in back.points] == [type(v) for v, _, _ in rows]


def _general_path(payload: bytes) -> TelemetryBatch | str:
    """What `from_bytes` did before its fast path: json.loads, then validate the objects."""
    try:
        general: TelemetryBatch = Message.from_bytes.__func__(  # type: ignore[attr-defined]
            TelemetryBatch, payload)
        return general
    except MessageError as exc:
        return str(exc)


_JSON_ODDITIES = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e400", "-0.0", "1.0", "1", "true", "null", "[]", "{}",
    '"\\ud800"', '"2026-11-25T14:00:00Z"', "0.1000000000000000055511151231257827",
    "18446744073709551616", "946684799999", "946684800000", '"2026-11-25T14:00:00"',
    '"2026-11-25T22:00:00+08:00"', '"20261125T140000Z"', '"2026-11-25 14:00:00Z"', '"1.5"',
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["device", "point", "ts", "value", "quality", "x"]),
                          st.one_of(_JSON_ODDITIES, _VALUES.map(json.dumps))),
                max_size=4),
       st.sampled_from(["", ',"seq":2', ',"sent_at":1764079200000', ',"x":1']))
def test_fast_path_accepts_what_the_general_path_accepts_and_nothing_else(
    changes: list[tuple[str, str]], tail: str
) -> None:
    fields = {"device": '"u"', "point": '"p"', "ts": '"2026-11-25T14:00:00Z"',
              "value": "1.5", "quality": '"good"'}
    fields.update(changes)
    point = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    payload = ('{"agent":"gw","seq":1,"points":[' + point + "]" + tail + "}").encode()
    expected = _general_path(payload)
    try:
        got: TelemetryBatch | str = TelemetryBatch.from_bytes(payload)
    except MessageError as exc:
        got = str(exc)
    if isinstance(expected, TelemetryBatch):
        assert isinstance(got, TelemetryBatch)
        assert got == expected
        assert [type(p.value) for p in got.points] == [type(p.value) for p in expected.points]
        assert all(p.ts.tzinfo is UTC for p in got.points)
    else:
        assert got == expected  # the same words


def test_compressed_envelope() -> None:
    batch = TelemetryBatch.from_bytes(_bytes(_batch(*[_point(point=f"p{i}") for i in range(50)])))
    wire = encode_batch(batch, compress=True)
    envelope = json.loads(wire)
    assert set(envelope) == {"encoding", "body"}
    assert envelope["encoding"] == "zlib+json"
    assert zlib.decompress(base64.b64decode(envelope["body"])) == batch.to_bytes()
    assert len(wire) < len(batch.to_bytes())
    assert parse_payload(TopicKind.TELEMETRY, wire) == batch
    assert encode_batch(batch) == batch.to_bytes()


@pytest.mark.parametrize(
    ("encoding", "pack"),
    [("gzip+json", gzip.compress), ("zlib+json", zlib.compress), ("json", lambda b: b)],
)
def test_envelope_encodings(encoding: str, pack: Any) -> None:
    raw = _bytes(_batch())
    wire = _bytes({"encoding": encoding, "body": base64.b64encode(pack(raw)).decode()})
    assert decode_batch(wire) == TelemetryBatch.from_bytes(raw)


def _envelope(body: bytes | str, encoding: str = "zlib+json") -> bytes:
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode()
    return _bytes({"encoding": encoding, "body": body})


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_envelope("not base64!"), "body: not base64"),
        (_envelope(b"plain bytes"), "body: not zlib\\+json data"),
        (_envelope(gzip.compress(b"{}", mtime=0)), "not zlib\\+json data"),
        (_envelope(zlib.compress(_bytes(_batch()))[:-6]), "truncated"),
        (_envelope(zlib.compress(_bytes(_batch())) + b"junk"), "trailing"),
        (_envelope(zlib.compress(b"[1]")), "inside envelope.*expected a JSON object"),
        (_envelope(zlib.compress(b"{bad")), "inside envelope.*not JSON"),
        (_envelope(zlib.compress(_bytes({"agent": "a", "points": []}))), "seq: Field required"),
        (_envelope(zlib.compress(_bytes({"encoding": "json", "body": ""}))),
         "encoding: Extra inputs"),
        (_envelope(b"", encoding="brotli+json"), "encoding: Input should be"),
        (_bytes({"encoding": "zlib+json"}), "body: Field required"),
        (_bytes({"encoding": "zlib+json", "body": "", "agent": "x"}), "agent: Extra inputs"),
        (_envelope(zlib.compress(b" " * (MAX_INFLATED_BYTES + 10))), "inflates past"),
    ],
)
def test_bad_envelopes_raise(payload: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode_batch(payload)


# --- events, status, acks ----------------------------------------------------------------


def test_events_parse() -> None:
    payload = _bytes({
        "agent": "gw-1", "seq": 3, "sent_at": T0_MS,
        "events": [
            {"ts": T0_MS, "kind": "alarm_raised", "device": "unit-1", "code": "OVER_TEMPERATURE",
             "severity": "alarm", "detail": {"IntTmp": 92.5, "bits": [0, 3], "ok": False}},
            {"ts": "2026-11-25T14:00:01Z", "kind": "spool_dropped",
             "detail": {"dropped": 120, "oldest": None}},
            {"ts": T0_MS, "kind": "job_progress", "detail": {"job": "upg-1", "percent": 40}},
        ],
    })
    batch = parse_payload(TopicKind.EVENTS, payload)
    assert isinstance(batch, EventBatch)
    first, second, third = batch.events
    assert first.kind is EventKind.ALARM_RAISED
    assert first.severity is Severity.ALARM
    assert first.detail["bits"] == [0, 3]
    assert (second.device, second.code, second.severity) == (None, None, Severity.INFO)
    assert third.detail == {"job": "upg-1", "percent": 40}
    assert EventBatch.from_bytes(batch.to_bytes()) == batch


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"ts": T0_MS, "kind": "exploded"}, "events[0].kind: Input should be"),
        ({"kind": "comm_lost"}, "events[0].ts: Field required"),
        ({"ts": T0_MS, "kind": "comm_lost", "severity": "meh"}, "events[0].severity"),
        ({"ts": T0_MS, "kind": "comm_lost", "detail": [1]}, "events[0].detail: Input should be"),
        ({"ts": T0_MS, "kind": "comm_lost", "why": "x"}, "events[0].why: Extra inputs"),
    ],
)
def test_bad_events_raise(event: dict[str, Any], expected: str) -> None:
    payload = _bytes({"agent": "gw-1", "seq": 1, "events": [event]})
    message = _error(TopicKind.EVENTS, payload)
    assert message.startswith("invalid events payload: ")
    assert expected in message


def test_status() -> None:
    status = Status(
        state=AgentState.ONLINE, agent="gw-1", version="0.1.0", ts=T0,
        health=Health(points_per_s=410.5, spool_depth=12, spool_age_s=3.5, reconnects=1,
                      errors={"unit-2": 4}),
    )
    raw = status.to_bytes()
    assert parse_payload(TopicKind.STATUS, raw) == status
    will = Status.from_bytes(b'{"state":"offline","agent":"gw-1","version":"0.1.0","ts":'
                             + str(T0_MS).encode() + b"}")
    assert will.state is AgentState.OFFLINE
    assert will.health is None


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        ({"spool_depth": -1}, "health.spool_depth: Input should be greater than or equal to 0"),
        ({"errors": {"unit-1": -2}}, "health.errors.unit-1: Input should be greater"),
        ({"cpu": 3}, "health.cpu: Extra inputs"),
    ],
)
def test_bad_health_raises(health: dict[str, Any], expected: str) -> None:
    payload = _bytes({"state": "online", "agent": "a", "version": "1", "ts": T0_MS,
                      "health": health})
    assert expected in _error(TopicKind.STATUS, payload)


def test_status_state_must_be_online_or_offline() -> None:
    payload = _bytes({"state": "sleeping", "agent": "a", "version": "1", "ts": T0_MS})
    assert "state: Input should be 'online' or 'offline'" in _error(TopicKind.STATUS, payload)


def test_command_ack() -> None:
    ack = parse_payload(TopicKind.CMD_ACK, _bytes({
        "command_id": CMD_ID, "agent": "gw-1", "ts": T0_MS, "result": "progress",
        "detail": {"percent": 30},
    }))
    assert isinstance(ack, CommandAck)
    assert ack.command_id == uuid.UUID(CMD_ID)
    assert ack.result is AckResult.PROGRESS
    assert CommandAck.from_bytes(ack.to_bytes()) == ack
    bad = _bytes({"command_id": "42", "agent": "gw-1", "ts": T0_MS, "result": "ok"})
    assert "command_id: Input should be a valid UUID" in _error(TopicKind.CMD_ACK, bad)


# --- commands ----------------------------------------------------------------------------


def _command(**changes: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {
        "id": CMD_ID, "site": "sh-01", "kind": "session.open",
        "issued_at": "2026-11-25T14:00:00Z", "expires_at": "2026-11-25T14:10:00Z",
        "args": {"session": "s-1", "scope": {"shell": True, "units": ["unit-1"]},
                 "max_duration_s": 3600},
    }
    cmd.update(changes)
    return cmd


def test_command_parses() -> None:
    cmd = parse_payload(TopicKind.CMD, _bytes(_command()))
    assert isinstance(cmd, Command)
    assert cmd.kind is CommandKind.SESSION_OPEN
    assert cmd.signature is None
    assert not cmd.expired(T0 + timedelta(minutes=9))
    assert cmd.expired(T0 + timedelta(minutes=10))
    assert Command.from_bytes(cmd.to_bytes()) == cmd


@pytest.mark.parametrize("kind", list(CommandKind))
def test_every_command_kind(kind: CommandKind) -> None:
    assert Command.from_bytes(_bytes(_command(kind=kind.value))).kind is kind


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"kind": "reboot"}, "kind: Input should be 'session.open'"),
        ({"id": "not-a-uuid"}, "id: Input should be a valid UUID"),
        ({"site": "a/b"}, "site: site id 'a/b' must start with a letter or digit"),
        ({"expires_at": "2026-11-25T13:00:00Z"}, "expires_at must be after issued_at"),
        ({"issued_at": "2026-11-25T14:00:00"}, "issued_at: timestamp"),
        ({"signature": "%%%"}, "signature: signature must be base64"),
        ({"signature": base64.b64encode(b"x" * 10).decode()}, "64 bytes (Ed25519), not 10"),
    ],
)
def test_bad_commands_raise(changes: dict[str, Any], expected: str) -> None:
    assert expected in _error(TopicKind.CMD, _bytes(_command(**changes)))


def _reordered(obj: Any, rng: Any) -> Any:
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _reordered(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_reordered(v, rng) for v in obj]
    return obj


@settings(max_examples=50)
@given(st.randoms(use_true_random=False))
def test_canonical_bytes_ignore_key_order_and_spacing(rng: Any) -> None:
    reference = canonical_bytes(Command.from_bytes(_bytes(_command())))
    shuffled = _reordered(_command(), rng)
    payload = json.dumps(shuffled, indent=rng.choice([None, 1, 4])).encode()
    assert canonical_bytes(Command.from_bytes(payload)) == reference


def test_canonical_form() -> None:
    cmd = Command.from_bytes(_bytes(_command(
        issued_at="2026-11-25T22:00:00+08:00",
        args={"b": 1, "a": {"z": "\u00e9", "y": [2, 1]}},
    )))
    assert canonical_bytes(cmd) == (
        '{"args":{"a":{"y":[2,1],"z":"\u00e9"},"b":1},'
        '"expires_at":"2026-11-25T14:10:00Z",'
        f'"id":"{CMD_ID}",'
        '"issued_at":"2026-11-25T14:00:00Z",'
        '"kind":"session.open","site":"sh-01"}'
    ).encode()


def test_signature_is_not_part_of_the_canonical_form() -> None:
    cmd = Command.from_bytes(_bytes(_command()))
    signed = cmd.signed(b"\x01" * 64)
    assert signed.signature == base64.b64encode(b"\x01" * 64).decode()
    assert canonical_bytes(signed) == canonical_bytes(cmd)
    assert Command.from_bytes(signed.to_bytes()) == signed
    # any change to what is signed changes the bytes
    other = Command.from_bytes(_bytes(_command(site="sh-02")))
    assert canonical_bytes(other) != canonical_bytes(cmd)


def test_uppercase_uuid_normalises() -> None:
    cmd = Command.from_bytes(_bytes(_command(id=CMD_ID.upper())))
    assert canonical_bytes(cmd) == canonical_bytes(Command.from_bytes(_bytes(_command())))


# --- dispatch ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "model"),
    [(TopicKind.TELEMETRY, TelemetryBatch), (TopicKind.EVENTS, EventBatch),
     (TopicKind.STATUS, Status), (TopicKind.CMD, Command), (TopicKind.CMD_ACK, CommandAck)],
)
def test_parse_payload_picks_the_model(kind: TopicKind, model: type[Message]) -> None:
    assert model.KIND is kind
    message = _error(kind, b"{}")
    assert message.startswith(f"invalid {kind.value} payload: ")
    assert "Field required" in message


def test_event_model_defaults() -> None:
    event = Event(ts=T0, kind=EventKind.COMM_LOST)
    assert event.detail == {}
    assert event.severity is Severity.INFO
    with pytest.raises(ValidationError):
        event.kind = EventKind.COMM_RESTORED  # type: ignore[misc]
