"""Topic names: build/parse round trips, site-id rules, shared subscriptions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import TopicError
from protocols.topics import (
    SITE_MAX_LENGTH,
    TopicKind,
    parse_topic,
    strip_share,
    subscription,
    topic,
    validate_site,
)

SITE_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (TopicKind.TELEMETRY, "emu/v1/sh-01/telemetry"),
        (TopicKind.EVENTS, "emu/v1/sh-01/events"),
        (TopicKind.STATUS, "emu/v1/sh-01/status"),
        (TopicKind.CMD, "emu/v1/sh-01/cmd"),
        (TopicKind.CMD_ACK, "emu/v1/sh-01/cmd/ack"),
    ],
)
def test_topic_names(kind: TopicKind, expected: str) -> None:
    assert topic("sh-01", kind) == expected
    assert parse_topic(expected) == ("sh-01", kind)


@settings(max_examples=200)
@given(SITE_IDS, st.sampled_from(list(TopicKind)))
def test_topic_round_trip(site: str, kind: TopicKind) -> None:
    assert parse_topic(topic(site, kind)) == (site, kind)


@pytest.mark.parametrize(
    "site",
    ["", "a/b", "+", "#", "site+1", "site#", "$SYS", " site", "site id", "-lead", ".hidden",
     "x" * (SITE_MAX_LENGTH + 1), "caf\u00e9", "tab\t", "nul\0"],
)
def test_invalid_site_ids_raise(site: str) -> None:
    with pytest.raises(TopicError, match="site id"):
        validate_site(site)
    with pytest.raises(TopicError):
        topic(site, TopicKind.TELEMETRY)


def test_longest_site_id_is_accepted() -> None:
    site = "s" * SITE_MAX_LENGTH
    assert validate_site(site) == site


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "does not start"),
        ("emu/v2/site/telemetry", "does not start"),
        ("other/v1/site/telemetry", "does not start"),
        ("/emu/v1/site/telemetry", "does not start"),
        ("emu/v1/site", "no kind"),
        ("emu/v1/site/", "ends in ''"),
        ("emu/v1//telemetry", "site id must not be empty"),
        ("emu/v1/site/telemetry/", "ends in 'telemetry/'"),
        ("emu/v1/site/cmd_ack", "ends in 'cmd_ack'"),
        ("emu/v1/site/cmd/nack", "ends in 'cmd/nack'"),
        ("emu/v1/a/b/telemetry", "ends in 'b/telemetry'"),
        ("emu/v1/+/telemetry", "site id"),
        ("emu/v1/site/#", "ends in '#'"),
        ("$share/emu-ingest/emu/v1/site/telemetry", "does not start"),
    ],
)
def test_foreign_topics_raise(name: str, match: str) -> None:
    with pytest.raises(TopicError, match=match):
        parse_topic(name)


def test_subscriptions() -> None:
    assert subscription(TopicKind.TELEMETRY) == "emu/v1/+/telemetry"
    assert subscription(TopicKind.CMD_ACK) == "emu/v1/+/cmd/ack"
    assert (
        subscription(TopicKind.TELEMETRY, "emu-ingest")
        == "$share/emu-ingest/emu/v1/+/telemetry"
    )
    assert subscription(TopicKind.EVENTS, "g1") == "$share/g1/emu/v1/+/events"


@pytest.mark.parametrize("group", ["", "a/b", "a+", "#", "$x"])
def test_bad_share_groups_raise(group: str) -> None:
    with pytest.raises(TopicError, match="share group"):
        subscription(TopicKind.TELEMETRY, group)


@pytest.mark.parametrize("kind", list(TopicKind))
def test_strip_share(kind: TopicKind) -> None:
    plain = subscription(kind)
    assert strip_share(subscription(kind, "emu-ingest")) == plain
    assert strip_share(plain) == plain


@pytest.mark.parametrize("flt", ["$share/", "$share/group", "$share//emu/v1/+/status",
                                 "$share/group/", "$share/g+/emu/v1/+/status"])
def test_malformed_shared_subscriptions_raise(flt: str) -> None:
    with pytest.raises(TopicError):
        strip_share(flt)


def test_kind_values_and_suffixes() -> None:
    assert [k.value for k in TopicKind] == ["telemetry", "events", "status", "cmd", "cmd_ack"]
    assert TopicKind.CMD_ACK.suffix == "cmd/ack"
    assert TopicKind.STATUS.suffix == "status"
