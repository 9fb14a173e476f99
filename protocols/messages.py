"""MQTT payload schemas: what agent and server say to each other on `emu/v1/{site}/...`.

Every payload is a frozen pydantic model with `to_bytes()` (compact JSON) and
`from_bytes()`; `parse_payload(kind, payload)` picks the model by topic kind. Whatever is
wrong with a payload (not JSON, a missing field, a naive timestamp) comes out as one
`MessageError` naming the field, never as a raw pydantic or json error, so ingest can log
it and move on. Unknown fields are refused: a v1 peer that sends more is a bug to see.

Timestamps are aware UTC datetimes. On the wire they are ISO-8601 with `Z` (written) and
either that or epoch milliseconds (read); naive times are refused, since a gateway in
`Asia/Shanghai` and a server in UTC would read them eight hours apart.

Telemetry batches may travel compressed in an envelope
`{"encoding": "zlib+json", "body": <base64>}` (`encode_batch`/`decode_batch`).
Commands are signed with Ed25519 over `canonical_bytes(cmd)`: the command without its
signature as JSON with sorted keys, no whitespace, UTF-8 and UTC timestamps, so signer and
verifier agree byte for byte whatever order the fields arrived in.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self, overload
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from protocols.errors import MessageError, TopicError
from protocols.topics import TopicKind, validate_site

MAX_SEQ = 2**63 - 1  # a BIGINT column on the server
MAX_INFLATED_BYTES = 16 * 1024 * 1024  # a compressed batch may not expand beyond this
ED25519_SIGNATURE_BYTES = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_EPOCH_MS = 946_684_800_000  # 2000-01-01: anything smaller was probably sent in seconds
_MAX_ERRORS = 5
_TS_MEMO_SIZE = 4096

# --- field types -------------------------------------------------------------------------

_ts_memo: dict[str, datetime] = {}


def _to_utc(value: object) -> datetime:
    """Accept an aware datetime, an ISO-8601 string with offset, or epoch milliseconds.

    Timestamp strings repeat: every reading of a poll cycle (~70 per unit) carries the same
    one, so the ones that parsed are remembered (a bounded memo; datetimes are immutable).
    """
    if type(value) is str:
        dt = _ts_memo.get(value)
        if dt is None:
            dt = _parse_utc(value)
            if len(_ts_memo) >= _TS_MEMO_SIZE:
                _ts_memo.clear()
            _ts_memo[value] = dt
        return dt
    return _parse_utc(value)


def _parse_utc(value: object) -> datetime:
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, bool):
        raise ValueError("a timestamp must be an ISO-8601 string or epoch milliseconds")
    elif isinstance(value, int):
        if value < _MIN_EPOCH_MS:
            raise ValueError(
                f"epoch milliseconds {value} is before 2000-01-01; was it sent in seconds?"
            )
        try:
            return _EPOCH + timedelta(milliseconds=value)
        except OverflowError as exc:
            raise ValueError(f"epoch milliseconds {value} is out of range") from exc
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{value[:40]!r} is not an ISO-8601 timestamp") from exc
    else:
        raise ValueError("a timestamp must be an ISO-8601 string or epoch milliseconds")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(
            f"timestamp {dt.isoformat()} has no time zone; send UTC ISO-8601 ending in 'Z' "
            "(or with an offset) or epoch milliseconds"
        )
    return dt.astimezone(UTC)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcDatetime = Annotated[
    datetime,
    PlainValidator(_to_utc),
    PlainSerializer(_iso, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "integer", "minimum": _MIN_EPOCH_MS, "description": "epoch ms"},
            ]
        }
    ),
]
"""An aware UTC datetime; reads ISO-8601 (with offset) or epoch ms, writes ISO-8601 `Z`."""

_JSON_NAMES = {"dict": "an object", "list": "an array", "tuple": "an array"}

PointValue = float | int | str | bool | None


def _check_value(value: object) -> PointValue:
    if type(value) is float and math.isfinite(value):  # most readings: one cheap test
        return value
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                "value must be finite (JSON cannot carry NaN or infinity); "
                "send null with quality out_of_range"
            )
        return value
    name = type(value).__name__
    raise ValueError(
        f"value must be a number, string, boolean or null, not {_JSON_NAMES.get(name, name)}"
    )


TelemetryValue = Annotated[
    PointValue,
    PlainValidator(_check_value),
    WithJsonSchema({"type": ["number", "integer", "string", "boolean", "null"]}),
]
"""A point's engineering value: number, string (firmware version), boolean or null."""

Name = Annotated[str, Field(min_length=1, max_length=128)]
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]
Detail = dict[str, JsonValue]

# --- enums -------------------------------------------------------------------------------


class Quality(StrEnum):
    """How far a telemetry value can be trusted."""

    GOOD = "good"
    STALE = "stale"  # repeated from the last good read
    COMM_LOST = "comm_lost"  # the unit did not answer
    OUT_OF_RANGE = "out_of_range"  # read fine, but outside the profile's valid range


class EventKind(StrEnum):
    """What an event reports."""

    ALARM_RAISED = "alarm_raised"
    ALARM_CLEARED = "alarm_cleared"
    STATE_CHANGED = "state_changed"
    COMM_LOST = "comm_lost"
    COMM_RESTORED = "comm_restored"
    SPOOL_DROPPED = "spool_dropped"
    JOB_PROGRESS = "job_progress"
    SESSION_CHANGED = "session_changed"
    AGENT_STARTED = "agent_started"


class Severity(StrEnum):
    """The device's or agent's own rating; the server classifies faults A-D itself."""

    INFO = "info"
    WARNING = "warning"
    ALARM = "alarm"
    CRITICAL = "critical"


class AgentState(StrEnum):
    """Retained agent presence; `offline` is also the MQTT last will."""

    ONLINE = "online"
    OFFLINE = "offline"


class CommandKind(StrEnum):
    """What the server may ask an agent to do."""

    SESSION_OPEN = "session.open"
    SESSION_CLOSE = "session.close"
    UPGRADE_JOB = "upgrade.job"
    DIAGNOSTIC = "diagnostic"
    COMMISSIONING_CHECK = "commissioning.check"


class AckResult(StrEnum):
    """Outcome of a command; `progress` may come several times before the final one."""

    OK = "ok"
    ERROR = "error"
    REJECTED = "rejected"
    PROGRESS = "progress"


class Encoding(StrEnum):
    """How a telemetry envelope's body is packed."""

    JSON = "json"
    ZLIB_JSON = "zlib+json"
    GZIP_JSON = "gzip+json"


# --- error mapping -----------------------------------------------------------------------


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(payload)"


def _describe(what: str, exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = []
    for err in errors[:_MAX_ERRORS]:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "value_error", "extra_forbidden"):
            got = repr(err["input"])
            msg += f" (got {got[:40]}{'...' if len(got) > 40 else ''})"
        parts.append(f"{_where(tuple(err['loc']))}: {msg}")
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS} more")
    return f"invalid {what} payload: " + "; ".join(parts)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise MessageError(f"invalid {what} payload: not UTF-8 ({exc.reason})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, NaN, nesting too deep
        raise MessageError(f"invalid {what} payload: not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MessageError(f"invalid {what} payload: expected a JSON object, got {obj!r:.40}")
    return obj


# --- messages ----------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Message(_Frozen):
    """Base of every payload: frozen, strangers refused, bytes in and out."""

    KIND: ClassVar[TopicKind]

    def to_bytes(self) -> bytes:
        """Compact JSON, timestamps as ISO-8601 UTC."""
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, payload: bytes) -> Self:
        """Parse and validate a payload; MessageError says which field is wrong and how."""
        what = cls.KIND.value
        return cls._validate(cls._unwrap(_load_json(payload, what)), what)

    @classmethod
    def _unwrap(cls, obj: dict[str, Any]) -> dict[str, Any]:
        return obj

    @classmethod
    def _validate(cls, obj: Mapping[str, Any], what: str) -> Self:
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise MessageError(_describe(what, exc)) from exc


class TelemetryPoint(_Frozen):
    """One reading of one point of one unit."""

    device: Name
    point: Name
    ts: UtcDatetime
    value: TelemetryValue
    quality: Quality


class TelemetryBatch(Message):
    """`emu/v1/{site}/telemetry`: readings; (`agent`, `seq`) makes replays idempotent.

    `seq` rises with every telemetry batch of this agent and survives restarts (it is
    spooled with the batch), so the server can drop a batch it has already stored. Gaps are
    allowed: a spool that overflows drops batches and says so in a `spool_dropped` event.
    """

    KIND: ClassVar[TopicKind] = TopicKind.TELEMETRY

    agent: Name
    seq: Seq
    sent_at: UtcDatetime | None = None
    points: tuple[TelemetryPoint, ...]

    @classmethod
    def from_bytes(cls, payload: bytes) -> Self:
        """Parse and validate a batch; MessageError says which field is wrong and how.

        The common case, a valid plain batch, is parsed by pydantic-core straight from the
        bytes (no Python dict per reading). Anything it refuses (an envelope, NaN, a broken
        batch) takes the general path, which accepts the same and words the errors.
        """
        try:
            return cls.model_validate_json(payload)
        except ValidationError:
            return super().from_bytes(payload)

    @classmethod
    def _unwrap(cls, obj: dict[str, Any]) -> dict[str, Any]:
        if "encoding" not in obj:
            return obj
        env = BatchEnvelope._validate(obj, "telemetry envelope")
        return _load_json(_unpack(env), "telemetry (inside envelope)")


class BatchEnvelope(Message):
    """A telemetry batch packed for the wire: `body` is base64 of the (compressed) JSON."""

    KIND: ClassVar[TopicKind] = TopicKind.TELEMETRY

    encoding: Encoding
    body: str


def _unpack(env: BatchEnvelope) -> bytes:
    try:
        data = base64.b64decode(env.body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageError(f"invalid telemetry envelope payload: body: not base64: {exc}") from exc
    if env.encoding is Encoding.JSON:
        return data
    inflater = zlib.decompressobj(31 if env.encoding is Encoding.GZIP_JSON else 15)
    try:
        out = inflater.decompress(data, MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise MessageError(
            f"invalid telemetry envelope payload: body: not {env.encoding} data: {exc}"
        ) from exc
    if inflater.unconsumed_tail:
        raise MessageError(
            f"invalid telemetry envelope payload: body inflates past {MAX_INFLATED_BYTES} bytes"
        )
    if not inflater.eof or inflater.unused_data:
        raise MessageError("invalid telemetry envelope payload: body: truncated or trailing data")
    return out


def encode_batch(batch: TelemetryBatch, compress: bool = False) -> bytes:
    """Wire bytes of a batch: plain JSON, or a zlib envelope when `compress` is set."""
    raw = batch.to_bytes()
    if not compress:
        return raw
    body = base64.b64encode(zlib.compress(raw)).decode("ascii")
    return BatchEnvelope(encoding=Encoding.ZLIB_JSON, body=body).to_bytes()


def decode_batch(payload: bytes) -> TelemetryBatch:
    """A telemetry batch from the wire, plain or enveloped; MessageError if invalid."""
    return TelemetryBatch.from_bytes(payload)


class Event(_Frozen):
    """Something that happened once: an alarm edge, a state change, a job step."""

    ts: UtcDatetime
    kind: EventKind
    device: Name | None = None
    code: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    severity: Severity = Severity.INFO
    detail: Detail = Field(default_factory=dict)


class EventBatch(Message):
    """`emu/v1/{site}/events`: events in order; its own `seq`, idempotent as telemetry."""

    KIND: ClassVar[TopicKind] = TopicKind.EVENTS

    agent: Name
    seq: Seq
    sent_at: UtcDatetime | None = None
    events: tuple[Event, ...]


class Health(_Frozen):
    """Agent self-report carried in its status."""

    points_per_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    spool_depth: Annotated[int, Field(ge=0)] = 0
    spool_age_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    reconnects: Annotated[int, Field(ge=0)] = 0
    errors: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)


class Status(Message):
    """`emu/v1/{site}/status` (retained): is the agent there, and which version runs."""

    KIND: ClassVar[TopicKind] = TopicKind.STATUS

    state: AgentState
    agent: Name
    version: Annotated[str, Field(min_length=1, max_length=64)]
    ts: UtcDatetime
    health: Health | None = None


class Command(Message):
    """`emu/v1/{site}/cmd`: an order from the server, signed over `canonical_bytes`.

    The agent verifies the signature, that `site` is its own (a command copied to another
    site's topic is refused) and that it has not expired, before acting on it.
    """

    KIND: ClassVar[TopicKind] = TopicKind.CMD

    id: UUID
    site: str
    kind: CommandKind
    issued_at: UtcDatetime
    expires_at: UtcDatetime
    args: Detail = Field(default_factory=dict)
    signature: str | None = None

    @field_validator("site")
    @classmethod
    def _check_site(cls, value: str) -> str:
        try:
            return validate_site(value)
        except TopicError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("signature")
    @classmethod
    def _check_signature(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("signature must be base64") from exc
        if len(raw) != ED25519_SIGNATURE_BYTES:
            raise ValueError(
                f"signature must be {ED25519_SIGNATURE_BYTES} bytes (Ed25519), not {len(raw)}"
            )
        return value

    @model_validator(mode="after")
    def _check_window(self) -> Self:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self

    def expired(self, now: datetime) -> bool:
        """Whether the command may no longer be carried out at `now` (an aware datetime)."""
        return now >= self.expires_at

    def signed(self, signature: bytes) -> Command:
        """This command carrying `signature` (raw Ed25519 bytes over `canonical_bytes`)."""
        return self.model_validate(
            {**self.model_dump(), "signature": base64.b64encode(signature).decode("ascii")}
        )


def canonical_bytes(cmd: Command) -> bytes:
    """The bytes a command's signature covers: sorted keys, no whitespace, UTC, UTF-8."""
    data = cmd.model_dump(mode="json", exclude={"signature"})
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except ValueError as exc:
        raise MessageError(f"command {cmd.id} cannot be made canonical: {exc}") from exc
    return text.encode("utf-8")


class CommandAck(Message):
    """`emu/v1/{site}/cmd/ack`: what became of a command (progress, then a final result)."""

    KIND: ClassVar[TopicKind] = TopicKind.CMD_ACK

    command_id: UUID
    agent: Name
    ts: UtcDatetime
    result: AckResult
    detail: Detail = Field(default_factory=dict)


MESSAGE_TYPES: Mapping[TopicKind, type[Message]] = {
    TopicKind.TELEMETRY: TelemetryBatch,
    TopicKind.EVENTS: EventBatch,
    TopicKind.STATUS: Status,
    TopicKind.CMD: Command,
    TopicKind.CMD_ACK: CommandAck,
}


@overload
def parse_payload(kind: Literal[TopicKind.TELEMETRY], payload: bytes) -> TelemetryBatch: ...
@overload
def parse_payload(kind: Literal[TopicKind.EVENTS], payload: bytes) -> EventBatch: ...
@overload
def parse_payload(kind: Literal[TopicKind.STATUS], payload: bytes) -> Status: ...
@overload
def parse_payload(kind: Literal[TopicKind.CMD], payload: bytes) -> Command: ...
@overload
def parse_payload(kind: Literal[TopicKind.CMD_ACK], payload: bytes) -> CommandAck: ...
@overload
def parse_payload(kind: TopicKind, payload: bytes) -> Message: ...
def parse_payload(kind: TopicKind, payload: bytes) -> Message:
    """The message on a topic of `kind`; MessageError for anything that does not validate."""
    return MESSAGE_TYPES[kind].from_bytes(payload)
