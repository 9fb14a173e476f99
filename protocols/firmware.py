"""Firmware images and the Modbus update protocol of the EMU vendor block (model 64901).

Image format v1 (what a unit flashes; an upgrade package carries one):

    offset  size  field
    0       8     magic  b"EMUFW1\\0\\0"
    8       16    series, UTF-8, NUL padded   (e.g. "EMU-BS")
    24      16    version, UTF-8, NUL padded  (e.g. "2.4.1")
    40      4     payload length, big endian
    44      n     payload

Update protocol, all writes to holding registers of the vendor block:
  1. FwImgSize + FwImgSha256 (one write), 2. FwUpdCtl = BEGIN,
  3. per chunk of at most 200 bytes: FwChunkOff + FwChunkLen + FwChunk (one write),
  4. FwUpdCtl = COMMIT; then poll FwUpdSt: VERIFYING → REBOOTING (the unit stops answering)
     → DONE with the new FwVer, or REFUSED / HASH_MISMATCH / FAILED with FwUpdErr set.
`transfer_writes` plans those writes without doing I/O, so the agent and tests share it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

from protocols.errors import FirmwareImageError
from protocols.profiles import Profile
from protocols.registers import PointDef, PointType, encode

MAGIC = b"EMUFW1\0\0"
_HEADER = struct.Struct(">8s16s16sI")
VENDOR_BLOCK = "emu"


class UpdateCommand(IntEnum):
    """Values written to FwUpdCtl."""

    IDLE = 0
    BEGIN = 1
    COMMIT = 2
    ABORT = 3


class UpdateState(IntEnum):
    """Values read from FwUpdSt."""

    IDLE = 0
    RECEIVING = 1
    VERIFYING = 2
    REBOOTING = 3
    DONE = 4
    REFUSED = 5
    HASH_MISMATCH = 6
    FAILED = 7

    @property
    def final(self) -> bool:
        """Whether the update has ended, well or badly."""
        return self in (UpdateState.DONE, UpdateState.REFUSED, UpdateState.HASH_MISMATCH,
                        UpdateState.FAILED)


class UpdateError(IntEnum):
    """Values read from FwUpdErr."""

    NONE = 0
    REFUSED_BY_UNIT = 1
    HASH_MISMATCH = 2
    WRITE_FAILED = 3
    BAD_IMAGE = 4
    WRONG_SERIES = 5
    PROTOCOL = 6


@dataclass(frozen=True, slots=True)
class FirmwareImage:
    """A parsed image: which series it is for, its version, and its payload."""

    series: str
    version: str
    payload: bytes = b""

    def to_bytes(self) -> bytes:
        """The image as flashed."""
        series, version = self.series.encode(), self.version.encode()
        if not 0 < len(series) <= 16 or not 0 < len(version) <= 16:
            raise FirmwareImageError("series and version take 1 to 16 bytes each")
        return _HEADER.pack(MAGIC, series, version, len(self.payload)) + self.payload

    @classmethod
    def parse(cls, data: bytes) -> FirmwareImage:
        """Parse and check an image; FirmwareImageError says what is wrong."""
        if len(data) < _HEADER.size:
            raise FirmwareImageError(f"image of {len(data)} bytes is shorter than its header")
        magic, series, version, length = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise FirmwareImageError("not an EMU firmware image (bad magic)")
        if len(data) != _HEADER.size + length:
            raise FirmwareImageError(
                f"payload length {length} does not match the image size {len(data)}"
            )
        try:
            return cls(
                series=series.rstrip(b"\0").decode(),
                version=version.rstrip(b"\0").decode(),
                payload=data[_HEADER.size :],
            )
        except UnicodeDecodeError as exc:
            raise FirmwareImageError("series or version is not UTF-8") from exc


@dataclass(frozen=True, slots=True)
class Write:
    """One Modbus write-multiple-registers request."""

    address: int
    registers: tuple[int, ...]
    purpose: str


@dataclass(frozen=True, slots=True)
class UpdateMap:
    """Addresses of the update registers in one profile's vendor block."""

    ctl: PointDef
    state: PointDef
    progress: PointDef
    error: PointDef
    size: PointDef
    sha256: PointDef
    chunk_offset: PointDef
    chunk_length: PointDef
    chunk: PointDef
    version: PointDef

    @classmethod
    def of(cls, profile: Profile) -> UpdateMap:
        """Find the update registers; a profile without a vendor block cannot be updated."""
        try:
            p = profile.point
            m = cls(
                ctl=p(f"{VENDOR_BLOCK}.FwUpdCtl"),
                state=p(f"{VENDOR_BLOCK}.FwUpdSt"),
                progress=p(f"{VENDOR_BLOCK}.FwUpdProg"),
                error=p(f"{VENDOR_BLOCK}.FwUpdErr"),
                size=p(f"{VENDOR_BLOCK}.FwImgSize"),
                sha256=p(f"{VENDOR_BLOCK}.FwImgSha256"),
                chunk_offset=p(f"{VENDOR_BLOCK}.FwChunkOff"),
                chunk_length=p(f"{VENDOR_BLOCK}.FwChunkLen"),
                chunk=p(f"{VENDOR_BLOCK}.FwChunk"),
                version=p(f"{VENDOR_BLOCK}.FwVer"),
            )
        except KeyError as exc:
            raise FirmwareImageError(f"{profile.series} has no firmware update block") from exc
        if m.sha256.end != m.chunk_offset.address or m.size.end != m.sha256.address:
            raise FirmwareImageError(f"{profile.series}: update registers are not contiguous")
        return m

    @property
    def chunk_bytes(self) -> int:
        """Bytes one chunk write carries."""
        return 2 * self.chunk.size


def transfer_writes(profile: Profile, image: bytes) -> list[Write]:
    """Every write, in order, that sends `image` to a unit of this profile and commits it."""
    m = UpdateMap.of(profile)
    writes = [
        Write(
            m.size.address,
            encode(PointType.UINT32, len(image))
            + encode(PointType.HEX, hashlib.sha256(image).hexdigest(), size=m.sha256.size),
            "announce size and sha256",
        ),
        Write(m.ctl.address, encode(PointType.UINT16, UpdateCommand.BEGIN), "begin"),
    ]
    step = m.chunk_bytes
    for off in range(0, len(image), step):
        chunk = image[off : off + step]
        data = chunk if len(chunk) % 2 == 0 else chunk + b"\0"
        regs = tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
        writes.append(
            Write(
                m.chunk_offset.address,
                encode(PointType.UINT32, off) + encode(PointType.UINT16, len(chunk)) + regs,
                f"chunk at {off}",
            )
        )
    writes.append(Write(m.ctl.address, encode(PointType.UINT16, UpdateCommand.COMMIT), "commit"))
    return writes
