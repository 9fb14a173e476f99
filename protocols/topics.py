"""MQTT topic names: the one place that spells `emu/v1/{site}/...`.

Agent, server and tests build and parse topics here, so a typo cannot split the fleet into
two namespaces. Site ids become one topic level, so they are validated: an id holding `/`,
`+` or `#` would change which subscriptions match it, and one starting with `$` would land
in the broker's reserved space. Server ingest subscribes through `$share/<group>/...` so
that several server processes split the load; the broker delivers messages under the
plain topic, which `parse_topic` reads.
"""

from __future__ import annotations

import re
from enum import StrEnum

from protocols.errors import TopicError

PREFIX = "emu/v1"
SHARE_PREFIX = "$share/"
DEFAULT_SHARE_GROUP = "emu-ingest"
SITE_MAX_LENGTH = 64

_SITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TopicKind(StrEnum):
    """The topics under `emu/v1/{site}/`; `suffix` is how each is spelled in the topic."""

    TELEMETRY = "telemetry"
    EVENTS = "events"
    STATUS = "status"
    CMD = "cmd"
    CMD_ACK = "cmd_ack"

    @property
    def suffix(self) -> str:
        """The topic levels after the site id (`cmd/ack` for CMD_ACK)."""
        return "cmd/ack" if self is TopicKind.CMD_ACK else self.value


_BY_SUFFIX = {k.suffix: k for k in TopicKind}


def validate_site(site: str) -> str:
    """Return `site` if it is a usable site id (one topic level, sane charset), else raise."""
    if not site:
        raise TopicError("site id must not be empty")
    if len(site) > SITE_MAX_LENGTH:
        raise TopicError(f"site id {site[:20]!r}... is longer than {SITE_MAX_LENGTH} characters")
    if not _SITE_RE.fullmatch(site):
        raise TopicError(
            f"site id {site!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' and '-' (no '/', '+', '#' or spaces)"
        )
    return site


def topic(site: str, kind: TopicKind) -> str:
    """The topic a message of `kind` for `site` is published on."""
    return f"{PREFIX}/{validate_site(site)}/{kind.suffix}"


def parse_topic(name: str) -> tuple[str, TopicKind]:
    """(site, kind) of a received topic; TopicError for anything that is not ours."""
    head = PREFIX + "/"
    if not name.startswith(head):
        raise TopicError(f"topic {name!r} does not start with {head!r}")
    site, sep, suffix = name[len(head) :].partition("/")
    if not sep:
        raise TopicError(f"topic {name!r} has no kind after the site id")
    kind = _BY_SUFFIX.get(suffix)
    if kind is None:
        known = ", ".join(sorted(_BY_SUFFIX))
        raise TopicError(f"topic {name!r} ends in {suffix!r}, not one of: {known}")
    try:
        validate_site(site)
    except TopicError as exc:
        raise TopicError(f"topic {name!r}: {exc}") from exc
    return site, kind


def subscription(kind: TopicKind, shared_group: str | None = None) -> str:
    """Filter for `kind` from every site, optionally as an MQTT 5 shared subscription."""
    flt = f"{PREFIX}/+/{kind.suffix}"
    if shared_group is None:
        return flt
    if not _GROUP_RE.fullmatch(shared_group):
        raise TopicError(
            f"share group {shared_group!r} must be non-empty letters, digits, '.', '_', '-'"
        )
    return f"{SHARE_PREFIX}{shared_group}/{flt}"


def strip_share(topic_filter: str) -> str:
    """The plain filter behind a `$share/<group>/` prefix (brokers without shares need it)."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return topic_filter
    group, sep, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not group or not sep or not rest:
        raise TopicError(f"shared subscription {topic_filter!r} needs $share/<group>/<filter>")
    if "+" in group or "#" in group:
        raise TopicError(f"share group {group!r} must not hold wildcards")
    return rest
