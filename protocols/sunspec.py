"""SunSpec: model definitions, register layout and a sans-I/O model-chain walker.

The model definitions are the SunSpec Alliance's own JSON files as shipped in `pysunspec2`
(read as data; none of its I/O code is used here), so the layouts are not hand-copied.
Vendor models (ids 64000-65535) come from our device profiles in the same shape.

`ModelChainWalker` finds the `SunS` marker (base 40000, then 0, then 50000) and walks the
model headers to the end marker. It asks for reads and is fed the registers, so the agent,
the simulator tests and any transport can drive it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from protocols.errors import SunSpecError
from protocols.registers import PointDef, PointType, register_count

SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
END_MODEL_ID = 0xFFFF
DEFAULT_BASES = (40000, 0, 50000)
MAX_MODELS = 256


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One point of a model definition, with its offset inside the model or group."""

    name: str
    type: PointType
    size: int
    offset: int
    sf: str | None = None
    units: str | None = None
    access: str = "R"
    label: str | None = None
    symbols: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A repeating group (e.g. the MPPT `module` of model 160)."""

    name: str
    points: tuple[PointSpec, ...]

    @property
    def length(self) -> int:
        """Registers one repetition occupies."""
        return sum(p.size for p in self.points)


@dataclass(frozen=True, slots=True)
class ModelDef:
    """A SunSpec model: fixed block points (ID and L included) and an optional repeating group."""

    id: int
    name: str
    points: tuple[PointSpec, ...]
    label: str | None = None
    group: GroupSpec | None = None
    vendor: bool = False

    @property
    def fixed_length(self) -> int:
        """Registers of the fixed block, ID and L included."""
        return sum(p.size for p in self.points)

    def length(self, repeats: int = 0) -> int:
        """The model's L value: registers after the ID and L header."""
        group_len = self.group.length if self.group else 0
        return self.fixed_length - 2 + repeats * group_len

    def layout(self, base: int, repeats: int = 0, prefix: str | None = None) -> list[PointDef]:
        """Absolute point definitions for this model placed at `base` (its ID register)."""
        if repeats and self.group is None:
            raise SunSpecError(f"model {self.id} has no repeating group")
        pre = prefix or self.name
        by_name = {p.name for p in self.points}
        out = [_point_def(f"{pre}.{p.name}", p, base, pre, by_name, pre) for p in self.points]
        if self.group is not None:
            gbase = base + self.fixed_length
            gnames = {p.name for p in self.group.points}
            for i in range(repeats):
                gpre = f"{pre}.{self.group.name}{i + 1}"
                for p in self.group.points:
                    out.append(_point_def(f"{gpre}.{p.name}", p, gbase, gpre, gnames, pre))
                gbase += self.group.length
        return out


def _point_def(
    name: str, spec: PointSpec, base: int, own_prefix: str, own_names: set[str], model_prefix: str
) -> PointDef:
    sf = None
    if spec.sf is not None:
        # an SF point in a repeating group may live in the group itself or in the fixed block
        sf = f"{own_prefix}.{spec.sf}" if spec.sf in own_names else f"{model_prefix}.{spec.sf}"
    return PointDef(
        name=name,
        address=base + spec.offset,
        type=spec.type,
        size=spec.size,
        sf=sf,
        units=spec.units,
        access=spec.access,
        label=spec.label,
        symbols=spec.symbols,
        sentinel=spec.type is not PointType.PAD,
    )


def _parse_points(raw_points: Sequence[Mapping[str, Any]], where: str) -> tuple[PointSpec, ...]:
    specs: list[PointSpec] = []
    offset = 0
    for raw in raw_points:
        try:
            ptype = PointType(raw["type"])
            size = int(raw.get("size") or register_count(ptype))
            symbols = tuple(
                sorted((int(s["value"]), str(s["name"])) for s in raw.get("symbols", ()))
            )
            spec = PointSpec(
                name=str(raw["name"]),
                type=ptype,
                size=size,
                offset=offset,
                sf=raw.get("sf") if isinstance(raw.get("sf"), str) else None,
                units=raw.get("units"),
                access=str(raw.get("access", "R")),
                label=raw.get("label"),
                symbols=symbols,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise SunSpecError(f"{where}: bad point {raw.get('name', '?')!r}: {exc}") from exc
        specs.append(spec)
        offset += size
    return tuple(specs)


def model_from_dict(data: Mapping[str, Any], *, vendor: bool = False) -> ModelDef:
    """Build a model definition from the SunSpec JSON shape (`{"id":..,"group":{..}}`)."""
    try:
        mid = int(data["id"])
        group = data["group"]
        name = str(group["name"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SunSpecError(f"model definition lacks id/group/name: {exc}") from exc
    points = _parse_points(group.get("points", ()), f"model {mid}")
    if [p.name for p in points[:2]] != ["ID", "L"]:
        raise SunSpecError(f"model {mid}: the first two points must be ID and L")
    subgroups = group.get("groups", ())
    if len(subgroups) > 1:
        raise SunSpecError(f"model {mid}: more than one repeating group is not supported")
    rep = None
    if subgroups:
        sub = subgroups[0]
        if sub.get("groups"):
            raise SunSpecError(f"model {mid}: nested repeating groups are not supported")
        rep = GroupSpec(str(sub["name"]), _parse_points(sub.get("points", ()), f"model {mid}"))
    return ModelDef(
        id=mid, name=name, points=points, label=group.get("label"), group=rep, vendor=vendor
    )


@functools.cache
def standard_model(model_id: int) -> ModelDef:
    """The SunSpec Alliance definition of a standard model, from pysunspec2's data files."""
    path = resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SunSpecError(f"no SunSpec definition for model {model_id}") from exc
    return model_from_dict(json.loads(text))


@dataclass(frozen=True, slots=True)
class ModelHeader:
    """A model found on a device: its id, its L and the address of its ID register."""

    id: int
    length: int
    address: int


@dataclass
class ModelChainWalker:
    """Sans-I/O discovery: `next_read()` says what to read, `feed()` takes the answer.

    Feed `None` when the read failed (a Modbus exception, e.g. illegal address): the walker
    then tries the next base address. `done` turns true at the end marker.
    """

    bases: Sequence[int] = DEFAULT_BASES
    max_models: int = MAX_MODELS
    base: int | None = None
    models: list[ModelHeader] = field(default_factory=list)
    done: bool = False
    _base_index: int = 0
    _cursor: int = 0

    def next_read(self) -> tuple[int, int] | None:
        """(address, count) of the next read, or None when discovery is finished."""
        if self.done:
            return None
        if self.base is None:
            if self._base_index >= len(self.bases):
                raise SunSpecError(f"no SunS marker at any of {list(self.bases)}")
            return self.bases[self._base_index], 2
        return self._cursor, 2

    def feed(self, registers: Sequence[int] | None) -> None:
        """Consume the registers answering the last `next_read()`."""
        if self.done:
            raise SunSpecError("the model chain is already complete")
        if self.base is None:
            if registers is not None and tuple(registers[:2]) == SUNS_MARKER:
                self.base = self.bases[self._base_index]
                self._cursor = self.base + 2
            else:
                self._base_index += 1
            return
        if registers is None or len(registers) < 2:
            raise SunSpecError(f"model header at {self._cursor} could not be read")
        model_id, length = registers[0], registers[1]
        if model_id == END_MODEL_ID:
            self.done = True
            return
        if len(self.models) >= self.max_models:
            raise SunSpecError(f"more than {self.max_models} models: the chain does not end")
        nxt = self._cursor + 2 + length
        if nxt + 2 > 0x10000:  # the next header (or end marker) must fit below 65536
            raise SunSpecError(f"model {model_id} at {self._cursor} runs past the register map")
        self.models.append(ModelHeader(model_id, length, self._cursor))
        self._cursor = nxt


def walk_chain(regs: Mapping[int, int], **kw: Any) -> ModelChainWalker:
    """Convenience for tests: walk a chain over an in-memory `{address: register}` map."""
    walker = ModelChainWalker(**kw)
    while (req := walker.next_read()) is not None:
        addr, count = req
        values = [regs[a] for a in range(addr, addr + count) if a in regs]
        walker.feed(values if len(values) == count else None)
    return walker


def repeats_from_length(model: ModelDef, length: int) -> int:
    """How many repeating-group instances a model with this L carries."""
    fixed = model.fixed_length - 2
    if model.group is None or model.group.length == 0:
        if length < fixed:
            raise SunSpecError(f"model {model.id}: L={length} is shorter than {fixed}")
        return 0
    extra = length - fixed
    if extra < 0 or extra % model.group.length:
        raise SunSpecError(f"model {model.id}: L={length} does not fit its repeating group")
    return extra // model.group.length


def layout_chain(
    models: Iterable[tuple[ModelDef, int]], base: int = DEFAULT_BASES[0]
) -> tuple[list[PointDef], list[ModelHeader], int]:
    """Place models one after another from `base`: points, headers and the end-marker address."""
    points: list[PointDef] = []
    headers: list[ModelHeader] = []
    addr = base + 2
    for model, repeats in models:
        points.extend(model.layout(addr, repeats))
        length = model.length(repeats)
        headers.append(ModelHeader(model.id, length, addr))
        addr += 2 + length
    return points, headers, addr
