"""Register codecs: typed point values to and from 16-bit Modbus registers.

One `PointDef` says where a value lives and how it is laid out (type, word and byte order,
scale). `encode`/`decode` turn single values into register tuples and back, honouring the
SunSpec "not implemented" sentinels; `decode_image` decodes every point of a device from the
registers read, resolving SunSpec `*_SF` scale-factor points.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from protocols.errors import CodecError


class PointType(StrEnum):
    """Register layouts a point can have (the SunSpec type names, plus float64)."""

    INT16 = "int16"
    UINT16 = "uint16"
    COUNT = "count"
    ACC16 = "acc16"
    ENUM16 = "enum16"
    BITFIELD16 = "bitfield16"
    SUNSSF = "sunssf"
    PAD = "pad"
    INT32 = "int32"
    UINT32 = "uint32"
    ACC32 = "acc32"
    ENUM32 = "enum32"
    BITFIELD32 = "bitfield32"
    IPADDR = "ipaddr"
    INT64 = "int64"
    UINT64 = "uint64"
    ACC64 = "acc64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"
    EUI48 = "eui48"
    IPV6ADDR = "ipv6addr"
    HEX = "hex"  # raw bytes of `size` registers (hashes); not a SunSpec type


class Table(StrEnum):
    """Modbus register tables a point can be read from."""

    HOLDING = "holding"
    INPUT = "input"


class WordOrder(StrEnum):
    """Order of 16-bit words in a multi-register value; SunSpec is big (high word first)."""

    BIG = "big"
    LITTLE = "little"


class ByteOrder(StrEnum):
    """Order of the two bytes inside each register; Modbus is big."""

    BIG = "big"
    LITTLE = "little"


# struct format and register count of each fixed-size numeric type
_NUMERIC: dict[PointType, tuple[str, int]] = {
    PointType.INT16: ("h", 1),
    PointType.UINT16: ("H", 1),
    PointType.COUNT: ("H", 1),
    PointType.ACC16: ("H", 1),
    PointType.ENUM16: ("H", 1),
    PointType.BITFIELD16: ("H", 1),
    PointType.SUNSSF: ("h", 1),
    PointType.PAD: ("H", 1),
    PointType.INT32: ("i", 2),
    PointType.UINT32: ("I", 2),
    PointType.ACC32: ("I", 2),
    PointType.ENUM32: ("I", 2),
    PointType.BITFIELD32: ("I", 2),
    PointType.IPADDR: ("I", 2),
    PointType.INT64: ("q", 4),
    PointType.UINT64: ("Q", 4),
    PointType.ACC64: ("Q", 4),
    PointType.FLOAT32: ("f", 2),
    PointType.FLOAT64: ("d", 4),
}

# SunSpec "not implemented" raw values (floats use NaN, strings all NUL)
NOT_IMPLEMENTED: dict[PointType, int] = {
    PointType.INT16: -0x8000,
    PointType.UINT16: 0xFFFF,
    PointType.COUNT: 0,
    PointType.ACC16: 0,
    PointType.ENUM16: 0xFFFF,
    PointType.BITFIELD16: 0xFFFF,
    PointType.SUNSSF: -0x8000,
    PointType.PAD: 0x8000,
    PointType.INT32: -0x80000000,
    PointType.UINT32: 0xFFFFFFFF,
    PointType.ACC32: 0,
    PointType.ENUM32: 0xFFFFFFFF,
    PointType.BITFIELD32: 0xFFFFFFFF,
    PointType.IPADDR: 0,
    PointType.INT64: -0x8000000000000000,
    PointType.UINT64: 0xFFFFFFFFFFFFFFFF,
    PointType.ACC64: 0,
}

_FLOATS = frozenset({PointType.FLOAT32, PointType.FLOAT64})
_RAW_BYTES = frozenset(
    {PointType.STRING, PointType.EUI48, PointType.IPV6ADDR, PointType.HEX}
)
_FIXED_SIZE_RAW = {PointType.EUI48: 4, PointType.IPV6ADDR: 8}

Value = int | float | str


def register_count(point_type: PointType, size: int | None = None) -> int:
    """Registers a value of this type occupies (strings take `size`)."""
    if point_type in _NUMERIC:
        return _NUMERIC[point_type][1]
    if point_type in _FIXED_SIZE_RAW:
        return _FIXED_SIZE_RAW[point_type]
    if size is None or size < 1:
        raise CodecError(f"a {point_type} point needs a size of at least one register")
    return size


def _to_words(data: bytes, word_order: WordOrder, byte_order: ByteOrder) -> tuple[int, ...]:
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if word_order is WordOrder.LITTLE:
        words.reverse()
    if byte_order is ByteOrder.LITTLE:
        words = [w[::-1] for w in words]
    return tuple(int.from_bytes(w, "big") for w in words)


def _from_words(
    registers: Iterable[int], word_order: WordOrder, byte_order: ByteOrder
) -> bytes:
    words = []
    for reg in registers:
        if not 0 <= reg <= 0xFFFF:
            raise CodecError(f"register value {reg} is not a 16-bit unsigned integer")
        w = reg.to_bytes(2, "big")
        words.append(w[::-1] if byte_order is ByteOrder.LITTLE else w)
    if word_order is WordOrder.LITTLE:
        words.reverse()
    return b"".join(words)


def encode(
    point_type: PointType,
    value: Value | None,
    *,
    size: int | None = None,
    word_order: WordOrder = WordOrder.BIG,
    byte_order: ByteOrder = ByteOrder.BIG,
) -> tuple[int, ...]:
    """Encode one raw (unscaled) value; `None` encodes the "not implemented" sentinel."""
    count = register_count(point_type, size)
    if point_type in _RAW_BYTES:
        if value is None:
            return (0,) * count
        if not isinstance(value, str):
            raise CodecError(f"a {point_type} point takes a string, not {value!r}")
        if point_type is PointType.STRING:
            data = value.encode("utf-8")
        else:
            try:
                data = bytes.fromhex(value)
            except ValueError as exc:
                raise CodecError(f"{value!r} is not hex for a {point_type} point") from exc
        if len(data) > 2 * count:
            raise CodecError(f"{value!r} does not fit in {count} registers")
        return _to_words(data.ljust(2 * count, b"\0"), word_order, byte_order)
    fmt = _NUMERIC[point_type][0]
    if value is None:
        value = math.nan if point_type in _FLOATS else NOT_IMPLEMENTED[point_type]
    if isinstance(value, str):
        raise CodecError(f"a {point_type} point takes a number, not {value!r}")
    if point_type not in _FLOATS and isinstance(value, float):
        if not value.is_integer():
            raise CodecError(f"a {point_type} point takes an integer, not {value!r}")
        value = int(value)
    try:
        data = struct.pack(">" + fmt, value)
    except (struct.error, OverflowError) as exc:
        raise CodecError(f"{value!r} does not fit a {point_type} point") from exc
    return _to_words(data, word_order, byte_order)


def decode(
    point_type: PointType,
    registers: Iterable[int],
    *,
    word_order: WordOrder = WordOrder.BIG,
    byte_order: ByteOrder = ByteOrder.BIG,
    sentinel: bool = True,
) -> Value | None:
    """Decode one raw value; `None` when it is the "not implemented" sentinel."""
    regs = tuple(registers)
    data = _from_words(regs, word_order, byte_order)
    if point_type in _RAW_BYTES:
        expected = _FIXED_SIZE_RAW.get(point_type)
        if expected is not None and len(regs) != expected:
            raise CodecError(f"a {point_type} point needs {expected} registers, got {len(regs)}")
        if sentinel and not any(data):
            return None
        if point_type is PointType.STRING:
            try:
                return data.rstrip(b"\0").decode("utf-8").rstrip()
            except UnicodeDecodeError as exc:
                raise CodecError(f"string registers are not UTF-8: {regs!r}") from exc
        return data.hex()
    fmt, count = _NUMERIC[point_type]
    if len(regs) != count:
        raise CodecError(f"a {point_type} point needs {count} registers, got {len(regs)}")
    (value,) = struct.unpack(">" + fmt, data)
    if point_type in _FLOATS:
        return None if sentinel and math.isnan(value) else float(value)
    if sentinel and value == NOT_IMPLEMENTED[point_type]:
        return None
    return int(value)


@dataclass(frozen=True, slots=True)
class PointDef:
    """Where one point lives on a device and how to turn its registers into a value.

    `scale` is a fixed multiplier (vendor registers such as "0.1 V"); `sf` names another
    point of the same device holding a SunSpec power-of-ten scale factor.
    """

    name: str
    address: int
    type: PointType
    size: int = 1
    table: Table = Table.HOLDING
    scale: float | None = None
    sf: str | None = None
    units: str | None = None
    word_order: WordOrder = WordOrder.BIG
    byte_order: ByteOrder = ByteOrder.BIG
    sentinel: bool = True
    access: str = "R"
    minimum: float | None = None
    maximum: float | None = None
    symbols: tuple[tuple[int, str], ...] = field(default=())
    label: str | None = None

    def __post_init__(self) -> None:
        if self.address < 0 or self.address + self.size > 0x10000:
            raise CodecError(f"{self.name}: address {self.address} is outside 0..65535")
        if self.size != register_count(self.type, self.size):
            raise CodecError(
                f"{self.name}: a {self.type} point takes "
                f"{register_count(self.type, self.size)} registers, not {self.size}"
            )

    @property
    def end(self) -> int:
        """First address after this point."""
        return self.address + self.size

    def symbol_map(self) -> dict[int, str]:
        """Enum values or bit numbers to their names."""
        return dict(self.symbols)


@dataclass(frozen=True, slots=True)
class Reading:
    """One decoded value; `raw` is kept so that alarms can be told apart from scaled data."""

    value: Value | None
    raw: Value | None
    out_of_range: bool = False


class RegisterImage:
    """Registers read from one device, by table and address, so points decode in any order."""

    __slots__ = ("_regs",)

    def __init__(self) -> None:
        self._regs: dict[Table, dict[int, int]] = {Table.HOLDING: {}, Table.INPUT: {}}

    def put(self, table: Table, address: int, registers: Iterable[int]) -> None:
        """Record registers read from `address` on."""
        regs = self._regs[table]
        for offset, value in enumerate(registers):
            regs[address + offset] = value

    def get(self, table: Table, address: int, count: int) -> tuple[int, ...] | None:
        """The registers at `address`, or None if any of them was not read."""
        regs = self._regs[table]
        try:
            return tuple(regs[a] for a in range(address, address + count))
        except KeyError:
            return None


def scale_value(raw: Value | None, point: PointDef, sf: int | None) -> Value | None:
    """Apply a fixed scale or a SunSpec scale factor to a raw value."""
    if raw is None or isinstance(raw, str):
        return raw
    if point.type in (PointType.BITFIELD16, PointType.BITFIELD32, PointType.ENUM16,
                      PointType.ENUM32, PointType.SUNSSF, PointType.PAD):
        return raw
    value: float | int = raw
    if point.sf is not None:
        if sf is None:
            return None
        value = raw * 10.0**sf if sf < 0 else raw * 10**sf
    if point.scale is not None:
        value = value * point.scale
    if isinstance(value, float):
        value = round(value, 9)
    return value


def unscale_value(value: Value | None, point: PointDef, sf: int | None) -> Value | None:
    """Inverse of `scale_value`: the raw integer that encodes an engineering value."""
    if value is None or isinstance(value, str) or point.type in _FLOATS:
        return value
    raw: float = float(value)
    if point.scale is not None:
        raw = raw / point.scale
    if point.sf is not None:
        raw = raw / 10.0 ** (sf or 0)
    return round(raw)


def decode_point(point: PointDef, regs: tuple[int, ...], sf: int | None) -> Reading:
    """Decode and scale one point, flagging values outside its valid range."""
    raw = decode(
        point.type, regs,
        word_order=point.word_order, byte_order=point.byte_order, sentinel=point.sentinel,
    )
    value = scale_value(raw, point, sf)
    out = False
    if isinstance(value, int | float) and not isinstance(value, bool):
        out = (point.minimum is not None and value < point.minimum) or (
            point.maximum is not None and value > point.maximum
        )
    return Reading(value=value, raw=raw, out_of_range=out)


def decode_image(
    points: Iterable[PointDef], image: RegisterImage, errors: list[str] | None = None
) -> dict[str, Reading]:
    """Decode every point whose registers are in `image`, resolving `*_SF` points first.

    A point whose registers do not decode (e.g. a string that is not UTF-8) is left out and,
    if `errors` is given, its name is appended there: one bad register never costs the rest.
    """
    pts = list(points)
    by_name: Mapping[str, PointDef] = {p.name: p for p in pts}
    factors: dict[str, int | None] = {}
    for p in pts:
        if p.sf is not None and p.sf not in factors:
            sfp = by_name.get(p.sf)
            regs = image.get(sfp.table, sfp.address, sfp.size) if sfp else None
            raw = decode(PointType.SUNSSF, regs) if regs is not None else None
            factors[p.sf] = raw if isinstance(raw, int) and -10 <= raw <= 10 else None
    out: dict[str, Reading] = {}
    for p in pts:
        regs = image.get(p.table, p.address, p.size)
        if regs is None:
            continue
        try:
            out[p.name] = decode_point(p, regs, factors.get(p.sf) if p.sf else None)
        except CodecError:
            if errors is not None:
                errors.append(p.name)
    return out
