"""Device profiles: one TOML file per EMU series, validated against a pydantic schema.

A profile names the SunSpec models a series carries, in chain order (standard models come
from the SunSpec definitions, vendor models from `models/model_<id>.json` beside this file,
in the same SunSpec JSON shape), any extra input-register points, and the valid range of
points. `Profile.points` is the flat list of absolute `PointDef`s the planner, the agent and
the simulator all use, so the three cannot disagree about an address.
"""

from __future__ import annotations

import functools
import json
import tomllib
from collections.abc import Iterable
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocols.commissioning import CommissioningSpec
from protocols.errors import CodecError, ProfileError, SunSpecError
from protocols.registers import (
    ByteOrder,
    PointDef,
    PointType,
    Table,
    WordOrder,
    register_count,
)
from protocols.sunspec import ModelDef, ModelHeader, layout_chain, model_from_dict, standard_model

PROFILE_DIR = resources.files(__name__)
VENDOR_MODEL_MIN = 64000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """A model in the chain; `repeats` is the number of repeating-group instances."""

    id: int = Field(ge=1, le=65534)
    repeats: int = Field(default=0, ge=0, le=64)
    poll: bool = True


class InputPoint(_Strict):
    """A point outside the SunSpec chain, at an explicit address (e.g. BMS input registers)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    address: int = Field(ge=0, le=65535)
    type: PointType
    size: int | None = Field(default=None, ge=1, le=125)
    table: Table = Table.INPUT
    scale: float | None = None
    units: str | None = None
    word_order: WordOrder = WordOrder.BIG
    byte_order: ByteOrder = ByteOrder.BIG
    label: str | None = None

    @model_validator(mode="after")
    def _check_layout(self) -> InputPoint:
        try:
            PointDef(
                name=self.name,
                address=self.address,
                type=self.type,
                size=self.size or register_count(self.type),
                table=self.table,
            )
        except CodecError as exc:
            raise ValueError(str(exc)) from exc
        return self


class Profile(_Strict):
    """The schema of a profile file (see `profile_json_schema()`)."""

    series: str = Field(pattern=r"^[A-Z][A-Z0-9-]+$", description="product series, e.g. EMU-BS")
    kind: Literal["battery_storage", "pv_inverter", "hybrid"]
    description: str
    manufacturer: str
    model: str
    sunspec_base: Literal[0, 40000, 50000] = 40000
    poll_interval_s: float = Field(default=5.0, gt=0)
    max_gap: int = Field(default=8, ge=0, le=120, description="registers a read may skip")
    models: tuple[ModelRef, ...] = Field(min_length=1)
    input_block: str = Field(default="io", pattern=r"^[a-z][a-z0-9_]*$")
    input_points: tuple[InputPoint, ...] = ()
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    commissioning: CommissioningSpec | None = Field(
        default=None, description="what commissioning requires of this series"
    )

    @model_validator(mode="after")
    def _check(self) -> Profile:
        if self.models[0].id != 1:
            raise ValueError("models: the chain must start with the common model 1")
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError("models: a model appears twice")
        for m in self.models:
            model_def(m.id)  # raises for an unknown model
        names = {p.name for p in self.points}
        for key, (lo, hi) in self.ranges.items():
            if key not in names:
                raise ValueError(f"ranges.{key}: no such point")
            if lo > hi:
                raise ValueError(f"ranges.{key}: minimum {lo} is above maximum {hi}")
        if self.commissioning is not None:
            self._check_commissioning(self.commissioning, names)
        return self

    @staticmethod
    def _check_commissioning(spec: CommissioningSpec, names: set[str]) -> None:
        for key in (spec.insulation_point, spec.alarm_point, *spec.ranges):
            if key not in names:
                raise ValueError(f"commissioning: no such point {key}")
        for key, (lo, hi) in spec.ranges.items():
            if lo > hi:
                raise ValueError(f"commissioning.ranges.{key}: minimum {lo} is above {hi}")

    @functools.cached_property
    def chain(self) -> tuple[tuple[ModelDef, int], ...]:
        """Model definitions with their repeat counts, in chain order."""
        return tuple((model_def(m.id), m.repeats) for m in self.models)

    @functools.cached_property
    def _layout(self) -> tuple[tuple[PointDef, ...], tuple[ModelHeader, ...], int]:
        points, headers, end = layout_chain(self.chain, self.sunspec_base)
        extra = [
            PointDef(
                name=f"{self.input_block}.{p.name}",
                address=p.address,
                type=p.type,
                size=p.size or register_count(p.type),
                table=p.table,
                scale=p.scale,
                units=p.units,
                word_order=p.word_order,
                byte_order=p.byte_order,
                label=p.label,
                sentinel=False,
            )
            for p in self.input_points
        ]
        all_points = [
            replace(p, minimum=self.ranges[p.name][0], maximum=self.ranges[p.name][1])
            if p.name in self.ranges
            else p
            for p in (*points, *extra)
        ]
        return tuple(all_points), tuple(headers), end

    @property
    def points(self) -> tuple[PointDef, ...]:
        """Every point of the device, with absolute addresses."""
        return self._layout[0]

    @property
    def headers(self) -> tuple[ModelHeader, ...]:
        """Where each model's ID register sits."""
        return self._layout[1]

    @property
    def end_address(self) -> int:
        """Address of the SunSpec end marker (0xFFFF, 0)."""
        return self._layout[2]

    @functools.cached_property
    def poll_points(self) -> tuple[PointDef, ...]:
        """The points the agent reads each cycle: data, not headers, pads or write-only areas."""
        skip_models = {model_def(m.id).name for m in self.models if not m.poll}
        out = []
        for p in self.points:
            leaf = p.name.rsplit(".", 1)[-1]
            if leaf in ("ID", "L") and p.name.count(".") == 1 and p.table is Table.HOLDING:
                continue
            if p.type is PointType.PAD or p.access == "W":
                continue
            if p.name.split(".", 1)[0] in skip_models:
                continue
            out.append(p)
        return tuple(out)

    def point(self, name: str) -> PointDef:
        """One point by name; KeyError names the profile."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"profile {self.series} has no point {name!r}")


@functools.cache
def vendor_model(model_id: int) -> ModelDef:
    """A vendor model shipped with the profiles (SunSpec JSON shape)."""
    path = PROFILE_DIR / "models" / f"model_{model_id}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SunSpecError(f"no vendor model definition {model_id}") from exc
    return model_from_dict(data, vendor=True)


def model_def(model_id: int) -> ModelDef:
    """Standard SunSpec models from the SunSpec definitions; vendor ids from our files."""
    return vendor_model(model_id) if model_id >= VENDOR_MODEL_MIN else standard_model(model_id)


def _format_validation(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err["loc"])
        # cross-field checks name their key in the message already
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def parse_profile(data: dict[str, Any], source: str = "<profile>") -> Profile:
    """Validate a profile dict; errors name the source and the key."""
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_format_validation(source, exc)) from exc
    except (SunSpecError, CodecError) as exc:
        raise ProfileError(f"{source}: models: {exc}") from exc


def load_profile_file(path: Path) -> Profile:
    """Load a profile from a TOML file of the operator's."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ProfileError(f"{path}: no such profile file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read the profile file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from exc
    return parse_profile(data, str(path))


def shipped_profiles() -> list[str]:
    """Series names of the profiles that ship with the product."""
    return sorted(
        p.name.removesuffix(".toml").upper()
        for p in PROFILE_DIR.iterdir()
        if p.name.endswith(".toml")
    )


@functools.cache
def load_profile(name: str) -> Profile:
    """A shipped profile by series (`EMU-BS`), or a profile file by path."""
    if name.endswith(".toml") or "/" in name:
        return load_profile_file(Path(name))
    res = PROFILE_DIR / f"{name.lower()}.toml"
    if not res.is_file():
        raise ProfileError(f"unknown profile {name!r}; shipped: {', '.join(shipped_profiles())}")
    return parse_profile(tomllib.loads(res.read_text(encoding="utf-8")), f"{name.lower()}.toml")


def profile_json_schema() -> dict[str, Any]:
    """JSON Schema of the profile format, for editors and reviewers."""
    return Profile.model_json_schema()


def all_profiles() -> Iterable[Profile]:
    """Every shipped profile."""
    return (load_profile(n) for n in shipped_profiles())
