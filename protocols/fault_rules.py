"""Fault rules: which conditions of a unit's telemetry make a fault, and of which class (A-D).

Rules ship per device series as TOML beside the profiles, in `profiles/rules/`: `common.toml`
holds the rules every EMU series shares (the vendor block 64901, communication), and
`<series>.toml` includes it and adds rules or overrides them by code. A site can override
them again (`Site.policy["fault_rules"]`, validated by `RulePolicy`): change a threshold, a
class or a hold time, disable a rule, or add one of its own. Everything is checked against the
series' profile when loaded (points exist, bit and enum names are spelled right), and every
error names the file (or policy) and the key, so that a typo fails at load time rather than as
a fault that never fires.

Kinds of condition (`for_s`: how long it must hold before it counts):

    threshold  point <op> value                   emu.IntTmp > 70; value may be an enum name
    rate       change of point per minute over window_s beyond limit (rise, fall or either)
    flapping   >= count occurrences within window_s: changes of a point (or one of its bits),
               degraded poll cycles (stale/comm_lost samples, missed cycles), or events
    alarm_bit  a named bit of a bitfield point is set
    comm_loss  the agent reported comm_lost (and it lasted for_s), or silence for silence_s (0: off)

A rule is one condition plus optional `also` conditions (any of them triggers it), a class by
the effect on the customer's business (service terms, section 3), an optional `escalate`
(worse conditions and the more severe class they raise an open fault to) and `clear_hold_s`,
how long every condition must stay false before the fault clears.
"""

from __future__ import annotations

import functools
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from typing import Annotated, Any, Literal, Self, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from protocols.errors import ProfileError
from protocols.messages import EventKind, Quality
from protocols.profiles import PROFILE_DIR, load_profile, model_def, shipped_profiles
from protocols.registers import PointDef, PointType

RULES_DIR: Traversable = PROFILE_DIR / "rules"
COMMON = "common"
VENDOR_MODEL = 64901  # the EMU vendor block every series carries
POLICY_KEY = "fault_rules"  # where a site's overrides live in `Site.policy`

FaultClass = Literal["A", "B", "C", "D"]
SEVERITY: Mapping[str, int] = {"A": 0, "B": 1, "C": 2, "D": 3}
"""Rank of a class; lower is worse (A: basic function lost)."""

_BITFIELDS = (PointType.BITFIELD16, PointType.BITFIELD32)
_ENUMS = (PointType.ENUM16, PointType.ENUM32)
_NOT_NUMBERS = (PointType.STRING, PointType.HEX, PointType.EUI48, PointType.IPV6ADDR,
                PointType.PAD)


class FaultRuleError(ProfileError):
    """A fault-rule file or a site's rule policy is invalid; the message names source and key."""


def worse(a: str, b: str) -> bool:
    """Whether class `a` is more severe than class `b`."""
    return SEVERITY[a] < SEVERITY[b]


# --- schema ------------------------------------------------------------------------------

Code = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
PointName = Annotated[str, Field(min_length=1, max_length=128)]
Seconds = Annotated[float, Field(ge=0, le=7 * 86400, allow_inf_nan=False)]
Window = Annotated[float, Field(gt=0, le=7 * 86400, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Condition(_Strict):
    for_s: Seconds = Field(default=0.0, description="how long the condition must hold")


class ThresholdCondition(_Condition):
    """`point op value`, e.g. emu.IntTmp > 70; `value` may name a symbol of an enum point."""

    kind: Literal["threshold"]
    point: PointName
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: float | str


class RateCondition(_Condition):
    """The point changes faster than `limit` per minute, measured over `window_s`."""

    kind: Literal["rate"]
    point: PointName
    limit: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    window_s: Window
    direction: Literal["rise", "fall", "either"] = "rise"


class FlappingCondition(_Condition):
    """At least `count` occurrences within `window_s`.

    `signal` says what occurs: `value` (the point's value, or one `bit` of it, changes),
    `quality` (a poll cycle with a sample of one of `qualities`, of `point` or of any point
    when it is not given; with `gaps`, a missed poll cycle too, unless it is part of a comm
    loss the agent reported: that is the comm_loss rule's), or `events` (events of the given
    kinds, and codes if given).
    """

    kind: Literal["flapping"]
    signal: Literal["value", "quality", "events"]
    window_s: Window
    count: int = Field(ge=2, le=100_000)
    point: PointName | None = None
    bit: str | None = None
    qualities: tuple[Quality, ...] = (Quality.STALE,)
    gaps: bool = True
    events: tuple[EventKind, ...] = ()
    codes: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_signal(self) -> Self:
        if self.signal == "value" and self.point is None:
            raise ValueError("point: a value signal needs the point whose changes count")
        if self.signal == "events" and not self.events:
            raise ValueError("events: an events signal needs the event kinds that count")
        if self.signal != "events" and (self.events or self.codes):
            raise ValueError("events: only an events signal counts events")
        if self.bit is not None and self.signal != "value":
            raise ValueError("bit: only a value signal watches a bit")
        if self.signal == "quality" and not self.qualities:
            raise ValueError("qualities: a quality signal needs the qualities that count")
        return self


class AlarmBitCondition(_Condition):
    """The named bit of a bitfield point is set."""

    kind: Literal["alarm_bit"]
    point: PointName
    bit: str


class CommLossCondition(_Condition):
    """The unit is unreachable: a comm_lost event (or all-comm_lost samples), or silence."""

    kind: Literal["comm_loss"]
    events: bool = Field(default=True, description="use comm_lost/comm_restored from the agent")
    silence_s: Seconds = Field(default=60.0, description="no data this long is a loss; 0: off")


Condition = Annotated[
    ThresholdCondition | RateCondition | FlappingCondition | AlarmBitCondition
    | CommLossCondition,
    Field(discriminator="kind"),
]
AnyCondition = (ThresholdCondition | RateCondition | FlappingCondition | AlarmBitCondition
                | CommLossCondition)


class Escalation(_Strict):
    """A worse condition: while any of `when` holds, the open fault is raised to `class`."""

    fault_class: FaultClass = Field(alias="class")
    title: str | None = Field(default=None, max_length=200)
    when: tuple[Condition, ...] = Field(min_length=1)


class _Rule(_Strict):
    code: Code
    title: str = Field(min_length=1, max_length=200)
    fault_class: FaultClass = Field(alias="class")
    description: str | None = None
    enabled: bool = True
    clear_hold_s: Seconds = 30.0
    also: tuple[Condition, ...] = ()
    escalate: Escalation | None = None

    @model_validator(mode="after")
    def _check_escalation(self) -> Self:
        esc = self.escalate
        if esc is not None and not worse(esc.fault_class, self.fault_class):
            raise ValueError(
                f"escalate.class: {esc.fault_class} is not more severe than the rule's class "
                f"{self.fault_class}"
            )
        return self

    @property
    def triggers(self) -> tuple[AnyCondition, ...]:
        """The rule's own condition and its `also` conditions: any of them opens the fault."""
        return (cast("AnyCondition", self), *self.also)  # every concrete rule is a condition

    @property
    def escalations(self) -> tuple[AnyCondition, ...]:
        """The worse conditions, if any."""
        return self.escalate.when if self.escalate else ()

    def as_dict(self) -> dict[str, Any]:
        """The rule as its file would say it (for a fault's evidence)."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)


class ThresholdRule(_Rule, ThresholdCondition):
    """A rule whose own condition is a threshold."""


class RateRule(_Rule, RateCondition):
    """A rule whose own condition is a rate of change."""


class FlappingRule(_Rule, FlappingCondition):
    """A rule whose own condition is a flapping count."""


class AlarmBitRule(_Rule, AlarmBitCondition):
    """A rule whose own condition is an alarm bit."""


class CommLossRule(_Rule, CommLossCondition):
    """A rule whose own condition is communication loss."""


Rule = Annotated[
    ThresholdRule | RateRule | FlappingRule | AlarmBitRule | CommLossRule,
    Field(discriminator="kind"),
]
AnyRule = ThresholdRule | RateRule | FlappingRule | AlarmBitRule | CommLossRule
_RULE = TypeAdapter[AnyRule](Rule)


class RuleDefaults(_Strict):
    """Values for rules that do not set their own."""

    clear_hold_s: Seconds | None = None


class RuleFile(_Strict):
    """A shipped rule file: includes, defaults, rules, and overrides of included rules."""

    series: str | None = None
    include: tuple[str, ...] = ()
    defaults: RuleDefaults = RuleDefaults()
    rules: tuple[dict[str, Any], ...] = ()
    overrides: dict[Code, dict[str, Any]] = Field(default_factory=dict)


class RulePolicy(_Strict):
    """A site's overrides (`Site.policy["fault_rules"]`).

    `rules` maps a code to the keys to change (a null removes a key, back to its default;
    `{"enabled": false}` disables the rule); a code no shipped rule has must be a whole rule.
    Either may carry `series` (a list), limiting it to units of those series. `defaults`
    apply to every rule that does not set the key itself.
    """

    defaults: RuleDefaults = RuleDefaults()
    rules: dict[Code, dict[str, Any]] = Field(default_factory=dict)


# --- errors ------------------------------------------------------------------------------

_KIND_TAGS = {"threshold", "rate", "flapping", "alarm_bit", "comm_loss"}


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and part in _KIND_TAGS:
            continue  # the union's tag: the reader knows the kind already
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = _loc(err["loc"])
        lines.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(lines)


# --- point catalogue ---------------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """The points rules may name, for one series (or the vendor block alone)."""

    name: str
    points: Mapping[str, PointDef]

    @classmethod
    def of_series(cls, series: str | None) -> Catalog:
        """A shipped profile's points, or the vendor block's for an unknown series."""
        if series is not None and series.upper() in shipped_profiles():
            profile = load_profile(series.upper())
            return cls(f"profile {profile.series}", {p.name: p for p in profile.points})
        block = model_def(VENDOR_MODEL).layout(0)
        return cls(f"vendor model {VENDOR_MODEL}", {p.name: p for p in block})

    def check(self, cond: AnyCondition) -> None:
        """Raise ValueError (naming the key) for a point, bit or symbol that does not exist."""
        point = getattr(cond, "point", None)
        if point is None:
            return
        p = self.points.get(point)
        if p is None:
            raise ValueError(f"point: no point {point!r} in {self.name}")
        if isinstance(cond, AlarmBitCondition) or (
            isinstance(cond, FlappingCondition) and cond.bit is not None
        ):
            bit = cond.bit
            if p.type not in _BITFIELDS:
                raise ValueError(f"point: {point} is a {p.type.value}, not a bitfield")
            if bit not in p.symbol_map().values():
                raise ValueError(
                    f"bit: {point} has no bit {bit!r}; it has "
                    f"{', '.join(p.symbol_map().values())}"
                )
        if isinstance(cond, ThresholdCondition | RateCondition) and p.type in _NOT_NUMBERS:
            raise ValueError(f"point: {point} is a {p.type.value}, not a number")
        if isinstance(cond, ThresholdCondition) and isinstance(cond.value, str):
            if p.type not in _ENUMS:
                raise ValueError(f"value: {point} is not an enum; give a number")
            if cond.value not in p.symbol_map().values():
                raise ValueError(
                    f"value: {point} has no symbol {cond.value!r}; it has "
                    f"{', '.join(p.symbol_map().values())}"
                )

    def bit(self, point: str, name: str) -> int:
        """Bit number of a named bit."""
        return {n: b for b, n in self.points[point].symbols}[name]

    def symbol(self, point: str, name: str) -> int:
        """Value of a named enum symbol."""
        return {n: v for v, n in self.points[point].symbols}[name]


# --- the rule book -----------------------------------------------------------------------


@dataclass(frozen=True)
class RuleBook:
    """The rules in force for one series (and one site's policy, if any)."""

    series: str | None
    rules: tuple[AnyRule, ...]
    catalog: Catalog
    sources: tuple[str, ...]
    raw: Mapping[str, Mapping[str, Any]] = field(repr=False)
    defaults: Mapping[str, Any] = field(repr=False)

    @property
    def enabled(self) -> tuple[AnyRule, ...]:
        """The rules that are evaluated."""
        return tuple(r for r in self.rules if r.enabled)

    def rule(self, code: str) -> AnyRule:
        """One rule by code; KeyError names the book."""
        for r in self.rules:
            if r.code == code:
                return r
        raise KeyError(f"no fault rule {code!r} for {self.series or 'an unknown series'}")

    @functools.cached_property
    def points(self) -> frozenset[str]:
        """Every point an enabled rule reads."""
        out = set()
        for r in self.enabled:
            for cond in (*r.triggers, *r.escalations):
                point = getattr(cond, "point", None)
                if point is not None:
                    out.add(point)
        return frozenset(out)

    def with_policy(
        self, policy: Mapping[str, Any] | None, source: str = "site policy"
    ) -> RuleBook:
        """This book with a site's overrides (`RulePolicy`) on top; FaultRuleError if invalid."""
        if not policy:
            return self
        try:
            pol = RulePolicy.model_validate(policy)
        except ValidationError as exc:
            raise FaultRuleError(_describe(source, exc)) from exc
        raw = {code: dict(r) for code, r in self.raw.items()}
        for code, given in pol.rules.items():
            patch = dict(given)
            only = patch.pop("series", None)
            if only is not None and not _names_series(only, self.series, f"{source}: {code}"):
                continue
            if code in raw:
                raw[code] = _merge(raw[code], patch)
            elif "kind" in patch:
                raw[code] = {"code": code, **patch}
            elif code not in _shipped_codes():
                raise FaultRuleError(
                    f"{source}: rules.{code}: no shipped rule {code!r} to override (a new rule "
                    "needs at least kind, title and class)"
                )
        defaults = {**self.defaults, **pol.defaults.model_dump(exclude_none=True)}
        return _build(self.series, raw, defaults, self.catalog, (*self.sources, source))


def _names_series(only: object, series: str | None, where: str) -> bool:
    if not isinstance(only, list) or not all(isinstance(s, str) for s in only):
        raise FaultRuleError(f"{where}: series: a list of series names, e.g. [\"EMU-BS\"]")
    return series is not None and series.upper() in {s.upper() for s in only}


@functools.cache
def _shipped_codes() -> frozenset[str]:
    return frozenset(
        r.code for s in (*shipped_rule_sets(), None) for r in load_rulebook(s).rules
    )


def _merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`patch` over `base`: tables merge key by key, a None removes a key, the rest replaces."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _validate_rule(code: str, data: Mapping[str, Any], defaults: Mapping[str, Any],
                   catalog: Catalog, where: str) -> AnyRule:
    merged = {**{k: v for k, v in defaults.items() if k not in data}, **data}
    try:
        rule = _RULE.validate_python(merged)
    except ValidationError as exc:
        raise FaultRuleError(_describe(f"{where}: rules.{code}", exc)) from exc
    for key, conds in (("", (rule,)), ("also", rule.also), ("escalate.when", rule.escalations)):
        for i, cond in enumerate(conds):
            try:
                catalog.check(cond)
            except ValueError as exc:
                at = f"{key}[{i}]." if key else ""
                raise FaultRuleError(f"{where}: rules.{code}.{at}{exc}") from None
    return rule


def _build(series: str | None, raw: Mapping[str, Mapping[str, Any]],
           defaults: Mapping[str, Any], catalog: Catalog, sources: tuple[str, ...]) -> RuleBook:
    where = sources[-1]
    rules = tuple(_validate_rule(code, data, defaults, catalog, where) for code, data in
                  raw.items())
    return RuleBook(series, rules, catalog, sources, raw, dict(defaults))


# --- files -------------------------------------------------------------------------------


def _read(name: str) -> RuleFile:
    res = RULES_DIR / f"{name}.toml"
    where = f"rules/{name}.toml"
    if not res.is_file():
        raise FaultRuleError(f"{where}: no such rule file")
    try:
        data = tomllib.loads(res.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise FaultRuleError(f"{where}: not valid TOML: {exc}") from exc
    try:
        return RuleFile.model_validate(data)
    except ValidationError as exc:
        raise FaultRuleError(_describe(where, exc)) from exc


def _collect(name: str, seen: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, Any]],
                                                             dict[str, Any], tuple[str, ...]]:
    """Raw rules (by code, in order), defaults and source names of a file and its includes."""
    where = f"rules/{name}.toml"
    if name in seen:
        raise FaultRuleError(f"{where}: include: circular ({' -> '.join((*seen, name))})")
    f = _read(name)
    raw: dict[str, dict[str, Any]] = {}
    defaults: dict[str, Any] = {}
    sources: tuple[str, ...] = ()
    for inc in f.include:
        r, d, s = _collect(inc, (*seen, name))
        raw.update(r)
        defaults.update(d)
        sources += s
    for i, rule in enumerate(f.rules):
        code = rule.get("code")
        if not isinstance(code, str):
            raise FaultRuleError(f"{where}: rules[{i}].code: every rule needs a code")
        if code in raw:
            raise FaultRuleError(
                f"{where}: rules.{code}: defined twice (change an included rule under "
                f"[overrides.{code}])"
            )
        raw[code] = dict(rule)
    for code, patch in f.overrides.items():
        if code not in raw:
            raise FaultRuleError(f"{where}: overrides.{code}: no rule {code!r} to override")
        raw[code] = _merge(raw[code], patch)
    defaults.update(f.defaults.model_dump(exclude_none=True))
    return raw, defaults, (*sources, where)


def shipped_rule_sets() -> list[str]:
    """Series that ship their own rule file (the others get the common rules)."""
    return sorted(
        p.name.removesuffix(".toml").upper()
        for p in RULES_DIR.iterdir()
        if p.name.endswith(".toml") and p.name != f"{COMMON}.toml"
    )


@functools.cache
def load_rulebook(series: str | None) -> RuleBook:
    """The shipped rules of a series; an unknown (or None) series gets the common rules."""
    key = series.upper() if series else None
    name = key.lower() if key is not None and key in shipped_rule_sets() else COMMON
    raw, defaults, sources = _collect(name)
    return _build(key, raw, defaults, Catalog.of_series(key), sources)


def validate_policy(policy: Mapping[str, Any], source: str = "policy.fault_rules") -> None:
    """Check a site's rule policy against every shipped series (for the API to refuse bad ones).

    A code that only some series have is fine; a code none has must be a whole rule.
    """
    for series in (*shipped_rule_sets(), None):
        load_rulebook(series).with_policy(policy, source)


def policy_key(policy: Mapping[str, Any] | None) -> str:
    """A stable key of a policy, to cache books built from it."""
    return json.dumps(policy or {}, sort_keys=True, separators=(",", ":"), default=str)


def rules_json_schema() -> dict[str, Any]:
    """JSON Schema of one rule, for editors and reviewers."""
    return _RULE.json_schema(by_alias=True)
