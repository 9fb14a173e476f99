"""Fault rules: the shipped ones load and classify the simulator's faults as the terms say;
broken files and site policies fail with the file (or policy) and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import fault_rules
from protocols.errors import ProfileError
from protocols.fault_rules import (
    SEVERITY,
    AlarmBitCondition,
    FaultRuleError,
    RuleBook,
    ThresholdRule,
    load_rulebook,
    rules_json_schema,
    shipped_rule_sets,
    validate_policy,
    worse,
)
from protocols.profiles import shipped_profiles

# what each simulated fault (simulators/faults.py) must be classified as
SIMULATED: dict[str, str] = {
    "trip": "A",
    "grid_loss": "A",
    "comm_loss": "A",
    "over_temperature": "B",
    "insulation_low": "B",
    "soc_low": "B",
    "derating": "C",
    "intermittent_comms": "D",
}


def test_every_shipped_profile_has_its_rules() -> None:
    assert shipped_rule_sets() == shipped_profiles() == ["EMU-BS", "EMU-PV"]


@pytest.mark.parametrize("series", ["EMU-BS", "EMU-PV"])
def test_simulated_faults_get_their_class(series: str) -> None:
    book = load_rulebook(series)
    assert book.sources == ("rules/common.toml", f"rules/{series.lower()}.toml")
    classes = {r.code: r.fault_class for r in book.enabled}
    assert {code: classes.get(code) for code in SIMULATED} == SIMULATED


@pytest.mark.parametrize("series", ["EMU-BS", "EMU-PV", None])
def test_shipped_rules_are_sound(series: str | None) -> None:
    book = load_rulebook(series)
    codes = [r.code for r in book.rules]
    assert len(codes) == len(set(codes))
    kinds = {c.kind for r in book.enabled for c in (*r.triggers, *r.escalations)}
    expected = {"threshold", "alarm_bit", "flapping", "comm_loss"}
    assert expected <= kinds
    for rule in book.enabled:
        assert rule.title
        if rule.escalate is not None:
            assert worse(rule.escalate.fault_class, rule.fault_class)
        for cond in (*rule.triggers, *rule.escalations):
            book.catalog.check(cond)  # points, bits and symbols exist
    assert all(p.startswith(("emu.", "battery.", "bms.", "storage_basic.")) for p in book.points)


def test_rate_rules_ship_for_both_series() -> None:
    assert load_rulebook("EMU-BS").rule("cell_temperature_rising").kind == "rate"
    assert load_rulebook("EMU-PV").rule("temperature_rising").kind == "rate"


def test_unknown_series_gets_the_common_rules_on_the_vendor_block() -> None:
    book = load_rulebook("EMU-XX")
    assert book.sources == ("rules/common.toml",)
    assert book.catalog.name == "vendor model 64901"
    assert "soc_low" not in {r.code for r in book.rules}
    assert load_rulebook(None).rule("trip").fault_class == "A"


def test_severity_order() -> None:
    assert sorted(SEVERITY, key=SEVERITY.__getitem__) == ["A", "B", "C", "D"]
    assert worse("A", "B")
    assert not worse("D", "C")


def test_trigger_conditions_of_a_rule() -> None:
    rule = load_rulebook("EMU-BS").rule("over_temperature")
    own, bit = rule.triggers
    assert own is rule
    assert isinstance(bit, AlarmBitCondition)
    assert bit.bit == "OVER_TEMPERATURE"
    assert [c.kind for c in rule.escalations] == ["threshold", "alarm_bit"]
    data = rule.as_dict()
    assert data["class"] == "B"
    assert data["code"] == "over_temperature"


def test_json_schema_names_the_class_key() -> None:
    schema = rules_json_schema()
    text = str(schema)
    assert "'class'" in text
    assert "threshold" in text


# --- site policy -------------------------------------------------------------------------


def _bs(policy: dict[str, Any]) -> RuleBook:
    return load_rulebook("EMU-BS").with_policy(policy, "site s1")


def _threshold(book: RuleBook, code: str) -> ThresholdRule:
    rule = book.rule(code)
    assert isinstance(rule, ThresholdRule)
    return rule


def test_policy_changes_thresholds_class_and_holds() -> None:
    book = _bs({
        "defaults": {"clear_hold_s": 2},
        "rules": {
            "over_temperature": {"value": 60.0, "class": "A", "escalate": None},
            "derating": {"clear_hold_s": 99, "escalate": {"title": "zero output"}},
            "alarm_flapping": {"enabled": False},
        },
    })
    ot = _threshold(book, "over_temperature")
    assert (ot.value, ot.fault_class, ot.escalate, ot.clear_hold_s) == (60.0, "A", None, 2.0)
    derating = book.rule("derating")
    assert derating.clear_hold_s == 99
    assert derating.escalate is not None
    assert derating.escalate.title == "zero output"
    assert derating.escalate.fault_class == "A"  # tables merge key by key
    assert book.rule("trip").clear_hold_s == 2
    assert "alarm_flapping" not in {r.code for r in book.enabled}
    assert book.sources[-1] == "site s1"
    shipped = _threshold(load_rulebook("EMU-BS"), "over_temperature")
    assert shipped.value == 70.0  # untouched


BS_CODES = sorted(r.code for r in load_rulebook("EMU-BS").rules)


@settings(max_examples=50, deadline=None)
@given(
    disabled=st.sets(st.sampled_from(BS_CODES)),
    hold=st.none() | st.floats(min_value=0, max_value=3600),
    classes=st.dictionaries(st.sampled_from(BS_CODES), st.sampled_from("ABCD"), max_size=4),
)
def test_policy_changes_exactly_what_it_names(
    disabled: set[str], hold: float | None, classes: dict[str, str]
) -> None:
    shipped = load_rulebook("EMU-BS")
    rules: dict[str, dict[str, Any]] = {c: {"enabled": False} for c in disabled}
    for code, cls in classes.items():
        rule = shipped.rule(code)
        if rule.escalate is not None and not worse(rule.escalate.fault_class, cls):
            continue  # the escalation must stay worse than the class
        rules.setdefault(code, {})["class"] = cls
    policy: dict[str, Any] = {"rules": rules}
    if hold is not None:
        policy["defaults"] = {"clear_hold_s": hold}
    book = shipped.with_policy(policy)
    assert {r.code for r in book.enabled} == {r.code for r in shipped.enabled} - disabled
    for new, old in zip(book.rules, shipped.rules, strict=True):
        assert new.code == old.code
        assert new.fault_class == rules.get(new.code, {}).get("class", old.fault_class)
        assert new.clear_hold_s == (old.clear_hold_s if hold is None else hold)
        assert new.triggers[1:] == old.triggers[1:]
    assert shipped.with_policy({}) is shipped


def test_policy_adds_a_rule_for_one_series() -> None:
    policy = {"rules": {"hot_cells": {
        "series": ["EMU-BS"], "kind": "threshold", "title": "Cells hot", "class": "B",
        "point": "bms.CellTmpMax", "op": ">", "value": 45.0, "for_s": 30,
    }}}
    validate_policy(policy)
    assert _threshold(_bs(policy), "hot_cells").value == 45.0
    pv = load_rulebook("EMU-PV").with_policy(policy)
    assert "hot_cells" not in {r.code for r in pv.rules}


def test_policy_for_a_code_of_another_series_is_skipped() -> None:
    book = load_rulebook("EMU-PV").with_policy({"rules": {"cell_temperature_rising": {"limit": 5}}})
    assert "cell_temperature_rising" not in {r.code for r in book.rules}


def test_enum_symbols_resolve() -> None:
    book = _bs({"rules": {"stopped": {
        "kind": "threshold", "title": "Stopped", "class": "A",
        "point": "emu.Status", "op": "==", "value": "TRIPPED",
    }}})
    assert book.catalog.symbol("emu.Status", "TRIPPED") == 6
    assert book.catalog.bit("emu.Alarm", "TRIP") == 3


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"rulez": {}}, "site s1: rulez: Extra inputs are not permitted"),
        ({"rules": {"nope": {"value": 1}}}, "site s1: rules.nope: no shipped rule 'nope'"),
        ({"rules": {"over_temperature": {"value": "HOT"}}},
         "site s1: rules.over_temperature.value: emu.IntTmp is not an enum"),
        ({"rules": {"over_temperature": {"point": "emu.Nope"}}},
         "site s1: rules.over_temperature.point: no point 'emu.Nope' in profile EMU-BS"),
        ({"rules": {"trip": {"bit": "NOPE"}}},
         "site s1: rules.trip.bit: emu.Alarm has no bit 'NOPE'; it has OVER_TEMPERATURE"),
        ({"rules": {"trip": {"kind": "alarm_bit", "point": "emu.IntTmp"}}},
         "site s1: rules.trip.point: emu.IntTmp is a int16, not a bitfield"),
        ({"rules": {"derating": {"escalate": {"class": "D"}}}},
         "site s1: rules.derating: escalate.class: D is not more severe than the rule's class C"),
        ({"rules": {"derating": {"also": [{"kind": "threshold", "point": "emu.FwVer",
                                           "op": ">", "value": 1}]}}},
         "site s1: rules.derating.also[0].point: emu.FwVer is a string, not a number"),
        ({"rules": {"over_temperature": {"escalate": {"when": [
            {"kind": "alarm_bit", "point": "emu.Alarm", "bit": "HOT"}]}}}},
         "site s1: rules.over_temperature.escalate.when[0].bit: emu.Alarm has no bit 'HOT'"),
        ({"rules": {"intermittent_comms": {"count": 1}}},
         "site s1: rules.intermittent_comms: count: Input should be greater than or equal to 2"),
        ({"rules": {"alarm_flapping": {"point": None}}},
         "site s1: rules.alarm_flapping: point: a value signal needs the point"),
        ({"rules": {"x": {"kind": "threshold", "title": "x"}}},
         "site s1: rules.x: class: Field required"),
        ({"rules": {"trip": {"series": "EMU-BS"}}}, "site s1: trip: series: a list"),
        ({"rules": {"trip": {"class": "E"}}}, "site s1: rules.trip: class: Input should be 'A'"),
    ],
)
def test_bad_policies_name_the_key(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(FaultRuleError) as err:
        _bs(policy)
    assert message in str(err.value)
    assert isinstance(err.value, ProfileError)


def test_validate_policy_checks_every_series() -> None:
    validate_policy({"rules": {"cell_temperature_rising": {"limit": 3}}})  # EMU-BS only: fine
    with pytest.raises(FaultRuleError, match=r"policy\.fault_rules: rules\.x\.point: no point "
                                             r"'bms\.CellTmpMax' in profile EMU-PV"):
        validate_policy({"rules": {"x": {"kind": "threshold", "title": "x", "class": "B",
                                         "point": "bms.CellTmpMax", "op": ">", "value": 1}}})


# --- rule files --------------------------------------------------------------------------


@pytest.fixture
def rules_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty rules directory in place of the shipped one."""
    monkeypatch.setattr(fault_rules, "RULES_DIR", tmp_path)
    return tmp_path


def _write(d: Path, name: str, text: str) -> None:
    (d / f"{name}.toml").write_text(text, encoding="utf-8")


TRIP = """
[[rules]]
code = "trip"
title = "Tripped"
class = "A"
kind = "alarm_bit"
point = "emu.Alarm"
bit = "TRIP"
"""


def test_a_series_file_includes_and_overrides(rules_dir: Path) -> None:
    _write(rules_dir, "common", "[defaults]\nclear_hold_s = 5\n" + TRIP)
    _write(rules_dir, "emu-bs", 'include = ["common"]\n[overrides.trip]\nclass = "B"\n'
           "clear_hold_s = 7\n")
    raw, defaults, sources = fault_rules._collect("emu-bs")
    assert raw["trip"]["class"] == "B"
    assert defaults == {"clear_hold_s": 5}
    assert sources == ("rules/common.toml", "rules/emu-bs.toml")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"emu-bs": "rules = 3"}, "rules/emu-bs.toml: rules: Input should be a valid"),
        ({"emu-bs": "x = ["}, "rules/emu-bs.toml: not valid TOML"),
        ({"emu-bs": 'include = ["common"]'}, "rules/common.toml: no such rule file"),
        ({"emu-bs": 'include = ["common"]', "common": 'include = ["emu-bs"]'},
         "rules/emu-bs.toml: include: circular (emu-bs -> common -> emu-bs)"),
        ({"emu-bs": TRIP + TRIP}, "rules/emu-bs.toml: rules.trip: defined twice"),
        ({"emu-bs": '[overrides.nope]\nclass = "A"\n'},
         "rules/emu-bs.toml: overrides.nope: no rule 'nope' to override"),
        ({"emu-bs": '[[rules]]\ntitle = "x"\n'}, "rules/emu-bs.toml: rules[0].code: every rule"),
    ],
)
def test_bad_rule_files_name_file_and_key(
    rules_dir: Path, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        _write(rules_dir, name, text)
    with pytest.raises(FaultRuleError) as err:
        fault_rules._collect("emu-bs")
    assert message in str(err.value)


def test_a_bad_rule_in_a_file_names_it(rules_dir: Path) -> None:
    _write(rules_dir, "emu-bs", TRIP.replace('bit = "TRIP"', 'bit = "TRIPP"'))
    raw, defaults, sources = fault_rules._collect("emu-bs")
    with pytest.raises(FaultRuleError, match=r"rules/emu-bs.toml: rules\.trip\.bit: emu\.Alarm "
                                             r"has no bit 'TRIPP'"):
        fault_rules._build("EMU-BS", raw, defaults, fault_rules.Catalog.of_series("EMU-BS"),
                           sources)
