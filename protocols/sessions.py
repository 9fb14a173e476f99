"""Remote sessions, the parts both ends agree on: states, scope, grant, tunnel frames, audit chain.

    requested --approve--> approved --engineer connects--> active --> closed | expired | revoked
        |                     |  (claim-by passes: expired; revoke: revoked)
        +--deny--> denied     +--revoke--> revoked           (ticket closed: closed)

A `Grant` is what the server's signed `session.open` command carries to the agent: the
session id, its scope, the claim-by deadline and the maximum duration. The agent enforces it
on its own clock, so a server alone cannot widen or extend an approved session.

The agent offers each approved target to the SSH gateway as a reverse ("tcpip-forward")
listener named after it: a unit as `(<device name>, 502)`, the gateway shell as
`(SHELL_TARGET, SHELL_PORT)`. A unit's channel carries raw Modbus TCP bytes. The shell channel
carries `Frame`s (type byte, 4-byte big-endian length, payload), because a shell needs more
than one byte stream: the request (command, terminal), stdin, stdout, stderr, its EOFs, window
changes and the exit status.

The audit log is a hash chain per session: `hash = sha256(prev_hash || canonical(entry))`, so
changing, removing or reordering an entry breaks every hash after it (`verify_chain`).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocols.errors import ProtocolError


class SessionError(ProtocolError):
    """A session message, scope or frame that breaks these rules."""


class SessionState(StrEnum):
    """Where a remote session is in its life (DESIGN.md "Remote sessions")."""

    REQUESTED = "requested"
    APPROVED = "approved"
    DENIED = "denied"
    ACTIVE = "active"
    CLOSED = "closed"
    EXPIRED = "expired"
    REVOKED = "revoked"


ENDED = frozenset({SessionState.DENIED, SessionState.CLOSED, SessionState.EXPIRED,
                   SessionState.REVOKED})
"""States a session never leaves."""

LIVE = frozenset({SessionState.APPROVED, SessionState.ACTIVE})
"""States in which the gateway admits the engineer."""

MOVES: Mapping[SessionState, frozenset[SessionState]] = {
    SessionState.REQUESTED: frozenset({SessionState.APPROVED, SessionState.DENIED,
                                       SessionState.EXPIRED, SessionState.REVOKED,
                                       SessionState.CLOSED}),
    SessionState.APPROVED: frozenset({SessionState.ACTIVE, SessionState.EXPIRED,
                                      SessionState.REVOKED, SessionState.CLOSED}),
    SessionState.ACTIVE: frozenset({SessionState.CLOSED, SessionState.EXPIRED,
                                    SessionState.REVOKED}),
}


def can_move(current: SessionState, target: SessionState) -> bool:
    """Whether `current -> target` is a legal transition."""
    return target in MOVES.get(current, frozenset())


SHELL_TARGET = "gateway-shell"
SHELL_PORT = 22
UNIT_PORT = 502
"""Modbus TCP: the one port of a unit a session can reach."""

DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SESSION_ID = re.compile(r"^s[0-9a-f]{12}$")
AGENT_USER_PREFIX = "agent+"
"""The gateway user name of an agent's tunnel: `agent+<session id>`."""

DeviceName = Annotated[str, Field(pattern=DEVICE_NAME.pattern)]


def check_session_id(value: str) -> str:
    """A session id (`s` + 12 hex digits), else SessionError."""
    if not SESSION_ID.match(value):
        raise SessionError(f"not a session id: {value!r}")
    return value


class Scope(BaseModel):
    """What an approval reaches: the gateway's shell and/or named units' Modbus ports."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shell: bool = False
    units: tuple[DeviceName, ...] = ()

    @field_validator("units")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a unit is named twice")
        return tuple(sorted(value))

    def allows(self, host: str, port: int) -> bool:
        """Whether the target `(host, port)` is inside this scope."""
        if host == SHELL_TARGET:
            return self.shell and port == SHELL_PORT
        return port == UNIT_PORT and host in self.units

    def targets(self) -> list[tuple[str, int]]:
        """Every `(host, port)` the agent offers for this scope."""
        out = [(SHELL_TARGET, SHELL_PORT)] if self.shell else []
        return out + [(unit, UNIT_PORT) for unit in self.units]

    @property
    def empty(self) -> bool:
        """Neither a shell nor a unit: nothing to approve."""
        return not self.shell and not self.units


class Grant(BaseModel):
    """The `args` of a signed `session.open` command: everything the agent enforces itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session: str
    scope: Scope
    claim_by: datetime
    max_duration_s: int = Field(gt=0, le=7 * 86400)
    approval: Literal["customer", "onsite"] = "customer"
    approved: bool = True
    """False: the on-site technician must still approve at the gateway (`emu agent approve`)."""

    @field_validator("session")
    @classmethod
    def _check_id(cls, value: str) -> str:
        try:
            return check_session_id(value)
        except SessionError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("claim_by")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("claim_by must carry a time zone")
        return value

    def hard_end(self) -> datetime:
        """The latest moment any access may last: claim-by plus the maximum duration."""
        return self.claim_by + timedelta(seconds=self.max_duration_s)


# --- shell channel frames ---------------------------------------------------------------------


class FrameType(StrEnum):
    """One byte naming what a shell-channel frame carries."""

    REQUEST = "H"   # JSON: {"command": str | null, "term": str | null, "cols", "rows"}
    STDIN = "I"
    STDIN_EOF = "E"
    STDOUT = "O"
    STDERR = "R"
    WINDOW = "W"    # JSON: {"cols", "rows"}
    EXIT = "X"      # 4-byte big-endian signed exit status


_HEAD = struct.Struct(">cI")
MAX_FRAME = 1 << 20


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload of a REQUEST or WINDOW frame as a dict."""
        try:
            value = json.loads(self.payload)
        except ValueError as exc:
            raise SessionError(f"{self.type.name} frame is not JSON") from exc
        if not isinstance(value, dict):
            raise SessionError(f"{self.type.name} frame is not a JSON object")
        return value

    def exit_status(self) -> int:
        """The status carried by an EXIT frame."""
        if len(self.payload) != 4:
            raise SessionError("EXIT frame must carry 4 bytes")
        status: int = struct.unpack(">i", self.payload)[0]
        return status


def encode_frame(kind: FrameType, payload: bytes = b"") -> bytes:
    """One frame on the wire."""
    if len(payload) > MAX_FRAME:
        raise SessionError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEAD.pack(kind.value.encode("ascii"), len(payload)) + payload


def json_frame(kind: FrameType, body: Mapping[str, Any]) -> bytes:
    """A REQUEST or WINDOW frame."""
    return encode_frame(kind, json.dumps(dict(body), separators=(",", ":")).encode())


def exit_frame(status: int) -> bytes:
    """An EXIT frame."""
    return encode_frame(FrameType.EXIT, struct.pack(">i", status))


def data_frames(kind: FrameType, data: bytes, chunk: int = 32768) -> Iterable[bytes]:
    """`data` as frames of at most `chunk` bytes (so no frame outgrows MAX_FRAME)."""
    for i in range(0, len(data), chunk):
        yield encode_frame(kind, data[i : i + chunk])


class FrameDecoder:
    """Incremental decoder: feed bytes as they come, get whole frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by `data`; SessionError on an unknown type or oversize frame."""
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= _HEAD.size:
            raw_type, length = _HEAD.unpack_from(self._buf)
            try:
                kind = FrameType(raw_type.decode("ascii", "replace"))
            except ValueError as exc:
                raise SessionError(f"unknown frame type {raw_type!r}") from exc
            if length > MAX_FRAME:
                raise SessionError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            end = _HEAD.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(kind, bytes(self._buf[_HEAD.size : end])))
            del self._buf[:end]
        return frames


# --- recordings --------------------------------------------------------------------------------


def asciicast_header(width: int, height: int, started: datetime, title: str,
                     term: str | None = None) -> str:
    """The first line of an asciicast v2 file (what asciinema plays)."""
    header: dict[str, Any] = {"version": 2, "width": width, "height": height,
                              "timestamp": int(started.timestamp()), "title": title}
    if term:
        header["env"] = {"TERM": term}
    return json.dumps(header, separators=(",", ":"))


def asciicast_event(elapsed_s: float, kind: Literal["o", "i"], data: bytes) -> str:
    """One event line: `[seconds, "o"|"i", text]` (bytes decoded as UTF-8, bad bytes replaced)."""
    return json.dumps([round(elapsed_s, 6), kind, data.decode("utf-8", "replace")],
                      ensure_ascii=False)


def replay_output(cast_lines: Sequence[str]) -> str:
    """The terminal output of an asciicast v2 recording, concatenated (what a replay shows)."""
    if not cast_lines:
        raise SessionError("empty recording")
    header = json.loads(cast_lines[0])
    if not isinstance(header, dict) or header.get("version") != 2:
        raise SessionError("not an asciicast v2 recording")
    out = []
    for line in cast_lines[1:]:
        if line.strip():
            _, kind, text = json.loads(line)
            if kind == "o":
                out.append(text)
    return "".join(out)


# --- audit chain -------------------------------------------------------------------------------

GENESIS = "0" * 64


def canonical(entry: Mapping[str, Any]) -> bytes:
    """An audit entry as hashed: JSON, sorted keys, no whitespace, UTF-8."""
    return json.dumps(dict(entry), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str).encode("utf-8")


def chain_hash(prev_hash: str, entry: Mapping[str, Any]) -> str:
    """The hash of `entry` following `prev_hash` in its chain."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(entry)).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    """Result of `verify_chain`: ok, or the first entry (by position) that does not fit."""

    ok: bool
    entries: int
    first_bad: int | None = None
    reason: str = ""


def verify_chain(entries: Sequence[tuple[Mapping[str, Any], str, str]]) -> ChainCheck:
    """Check `(entry, prev_hash, hash)` triples in order from the genesis hash."""
    prev = GENESIS
    for i, (entry, prev_hash, digest) in enumerate(entries):
        if prev_hash != prev:
            return ChainCheck(False, len(entries), i, "does not follow the entry before it")
        if chain_hash(prev_hash, entry) != digest:
            return ChainCheck(False, len(entries), i, "content does not match its hash")
        prev = digest
    return ChainCheck(True, len(entries))
