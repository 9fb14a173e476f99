"""The firmware-update state machine of a simulated unit (protocol in `protocols.firmware`).

A unit receives an image in chunks, checks its size, SHA-256, magic and series, then
"reboots": it stops answering for `reboot_s` seconds and comes back running the new version.
For rollback tests it can be told, for its next update only, to `refuse` the image, to `fail`
mid-way (at a fraction of the bytes), or to come back `broken` (new version, unit in FAULT
with the FIRMWARE_FAULT alarm until a good image is installed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from protocols.clock import Clock
from protocols.errors import FirmwareImageError
from protocols.firmware import FirmwareImage, UpdateError, UpdateState


class UpdateBehaviour(StrEnum):
    """How the unit handles its next update."""

    NORMAL = "normal"
    REFUSE = "refuse"
    FAIL = "fail"
    BROKEN = "broken"


class WriteRejected(Exception):
    """A chunk or command the unit answers with a Modbus exception."""


@dataclass
class FirmwareSlot:
    """Firmware of one unit: running version, update progress, and failure modes."""

    series: str
    version: str
    clock: Clock
    reboot_s: float = 3.0
    state: UpdateState = UpdateState.IDLE
    error: UpdateError = UpdateError.NONE
    broken: bool = False
    behaviour: UpdateBehaviour = UpdateBehaviour.NORMAL
    fail_at: float = 0.5
    previous_version: str | None = None
    _size: int = 0
    _sha: bytes = b""
    _buf: bytearray | None = None
    _received: int = 0
    _reboot_until: float | None = None
    _pending: FirmwareImage | None = None
    _pending_broken: bool = False

    @property
    def progress(self) -> int:
        """Percent of the image received (100 once done)."""
        if self.state is UpdateState.DONE:
            return 100
        return int(100 * self._received / self._size) if self._size else 0

    def rebooting(self) -> bool:
        """Whether the unit is rebooting now (and so does not answer); finishes the reboot."""
        if self._reboot_until is None:
            return False
        if self.clock.monotonic() < self._reboot_until:
            return True
        self._reboot_until = None
        if self._pending is not None:
            self.previous_version = self.version
            self.version = self._pending.version
            self.broken = self._pending_broken
            self._pending = None
        self.state = UpdateState.DONE
        return False

    def set_behaviour(self, behaviour: UpdateBehaviour, fail_at: float = 0.5) -> None:
        """Make the next update refuse, fail or break; it applies once, then back to normal."""
        if not 0.0 < fail_at < 1.0:
            raise ValueError("fail_at must be between 0 and 1")
        self.behaviour = behaviour
        self.fail_at = fail_at

    def announce(self, size: int, sha256: bytes) -> None:
        """Size and hash of the image to come."""
        if self.state in (UpdateState.RECEIVING, UpdateState.VERIFYING):
            raise WriteRejected("an update is in progress")
        self._size, self._sha = size, sha256

    def begin(self) -> None:
        """Start receiving; a unit told to refuse says so here."""
        if self.behaviour is UpdateBehaviour.REFUSE:
            self.behaviour = UpdateBehaviour.NORMAL
            self._end(UpdateState.REFUSED, UpdateError.REFUSED_BY_UNIT)
            return
        if not 0 < self._size <= 64 * 1024 * 1024 or len(self._sha) != 32:
            self._end(UpdateState.FAILED, UpdateError.PROTOCOL)
            raise WriteRejected("announce a size and a SHA-256 before BEGIN")
        self._buf = bytearray(self._size)
        self._received = 0
        self.state, self.error = UpdateState.RECEIVING, UpdateError.NONE

    def chunk(self, offset: int, data: bytes) -> None:
        """Store one chunk; out-of-order or out-of-range chunks are rejected."""
        if self.state is not UpdateState.RECEIVING or self._buf is None:
            raise WriteRejected("not receiving an image")
        if offset != self._received or offset + len(data) > self._size:
            self._end(UpdateState.FAILED, UpdateError.PROTOCOL)
            raise WriteRejected(f"chunk at {offset} does not follow {self._received}")
        if (
            self.behaviour is UpdateBehaviour.FAIL
            and offset + len(data) >= self.fail_at * self._size
        ):
            self.behaviour = UpdateBehaviour.NORMAL
            self._end(UpdateState.FAILED, UpdateError.WRITE_FAILED)
            raise WriteRejected("flash write failed")
        self._buf[offset : offset + len(data)] = data
        self._received += len(data)

    def commit(self) -> None:
        """Verify the image; if good, reboot into it."""
        if self.state is not UpdateState.RECEIVING or self._buf is None:
            raise WriteRejected("nothing to commit")
        image = bytes(self._buf)
        self._buf = None
        if self._received != self._size or hashlib.sha256(image).digest() != self._sha:
            self._end(UpdateState.HASH_MISMATCH, UpdateError.HASH_MISMATCH)
            return
        try:
            parsed = FirmwareImage.parse(image)
        except FirmwareImageError:
            self._end(UpdateState.REFUSED, UpdateError.BAD_IMAGE)
            return
        if parsed.series != self.series:
            self._end(UpdateState.REFUSED, UpdateError.WRONG_SERIES)
            return
        self._pending = parsed
        self._pending_broken = self.behaviour is UpdateBehaviour.BROKEN
        self.behaviour = UpdateBehaviour.NORMAL
        self.state = UpdateState.REBOOTING
        self._reboot_until = self.clock.monotonic() + self.reboot_s

    def abort(self) -> None:
        """Drop a transfer in progress."""
        self._buf = None
        self._received = 0
        self.state, self.error = UpdateState.IDLE, UpdateError.NONE

    def _end(self, state: UpdateState, error: UpdateError) -> None:
        self._buf = None
        self.state, self.error = state, error
