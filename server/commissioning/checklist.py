"""The checklist of a plan, per series, from the profile's `[commissioning]` section.

Remote checks (protocols.commissioning.Check) are always on the list: the agent runs them in
either mode. The profile's on-site items (earthing, emergency stop...) are added when the plan
is on site, since only a technician there can do them. Each item carries the requirement in
words, so the written plan says what "pass" will mean.
"""

from __future__ import annotations

from typing import Any

from protocols.commissioning import Check, Requirements
from protocols.errors import ProfileError
from protocols.profiles import Profile, load_profile
from server.commissioning.errors import PlanInputError

ONSITE_WORDING = {
    "visual_inspection": "no visible damage; labels and clearances as installed per manual",
    "earthing": "protective earth continuity measured and recorded",
    "cabling_torque": "DC and AC terminals torqued to the manual's values",
    "emergency_stop": "emergency stop trips the unit and resets",
    "fire_suppression": "fire suppression armed and its signal wired",
    "dc_polarity": "DC string polarity checked before closing the isolators",
    "string_open_circuit_voltage": "open-circuit voltage of each string measured and recorded",
}


def profile_of(series: str) -> Profile:
    """The shipped profile of `series`, which must have a `[commissioning]` section."""
    try:
        profile = load_profile(series)
    except ProfileError as exc:
        raise PlanInputError(str(exc)) from exc
    if profile.commissioning is None:
        raise PlanInputError(f"series {series} has no commissioning requirements")
    return profile


def requirements_for(item: dict[str, Any]) -> Requirements:
    """The requirements of one equipment item (its `firmware` overrides the profile's)."""
    return Requirements.of(profile_of(item["series"]), firmware=item.get("firmware"))


def _remote_wording(profile: Profile, req: Requirements) -> dict[str, str]:
    ranges = "; ".join(f"{k} {lo:g}..{hi:g}" for k, (lo, hi) in sorted(req.ranges.items()))
    chain = ", ".join(str(m.id) for m in profile.models)
    return {
        Check.COMMUNICATION: "every read of one full pass of the unit's registers answered",
        Check.NAMEPLATE: f"{profile.manufacturer} {profile.model}, a serial number, "
                         f"SunSpec models {chain}",
        Check.RANGES: ranges or "no ranges defined",
        Check.ALARMS: f"no bit set in {req.alarm_point}",
        Check.CLOCK: f"site gateway clock within {req.clock_tolerance_s:g} s of the server's",
        Check.FIRMWARE: f"firmware {req.firmware}" if req.firmware else "firmware reported",
        Check.INSULATION: f"{req.insulation_point} at least {req.insulation_min_kohm:g} kOhm",
    }


def default_checklist(
    equipment: list[dict[str, Any]], mode: str
) -> dict[str, list[dict[str, str]]]:
    """Per series: every remote check, plus the on-site items when the plan is on site."""
    out: dict[str, list[dict[str, str]]] = {}
    for item in equipment:
        profile = profile_of(item["series"])
        spec = profile.commissioning
        assert spec is not None  # noqa: S101 - profile_of checked it
        words = _remote_wording(profile, requirements_for(item))
        items = [{"name": str(c), "where": "remote", "requirement": words[c]} for c in Check]
        if mode == "onsite":
            items += [{"name": name, "where": "onsite",
                       "requirement": ONSITE_WORDING.get(name, name.replace("_", " "))}
                      for name in spec.onsite]
        out[profile.series] = items
    return out
