"""The ticket state machine (pure): which moves are legal and what they do to the clocks.

    new -> acknowledged -> in_progress -> waiting_on_customer -> in_progress ...
                                       -> awaiting_release (C/D: fixed by a later release)
                                       -> resolved -> closed
    resolved / closed -> in_progress   (reopen)

Acknowledging (or any first move out of `new`) meets the response clock; `waiting_on_customer`
pauses the clocks (reason `customer`) until the ticket leaves it; `awaiting_release` exempts
the resolution clock (clause 3 (2): C/D defects are solved by a later release); `resolved`
meets every clock still open.
"""

from __future__ import annotations

NEW = "new"
ACKNOWLEDGED = "acknowledged"
IN_PROGRESS = "in_progress"
WAITING = "waiting_on_customer"
AWAITING_RELEASE = "awaiting_release"
RESOLVED = "resolved"
CLOSED = "closed"

STATES = (NEW, ACKNOWLEDGED, IN_PROGRESS, WAITING, AWAITING_RELEASE, RESOLVED, CLOSED)
OPEN_STATES = frozenset({NEW, ACKNOWLEDGED, IN_PROGRESS, WAITING, AWAITING_RELEASE})

MOVES: dict[str, frozenset[str]] = {
    NEW: frozenset({ACKNOWLEDGED, IN_PROGRESS, WAITING, AWAITING_RELEASE, RESOLVED, CLOSED}),
    ACKNOWLEDGED: frozenset({IN_PROGRESS, WAITING, AWAITING_RELEASE, RESOLVED, CLOSED}),
    IN_PROGRESS: frozenset({WAITING, AWAITING_RELEASE, RESOLVED, CLOSED}),
    WAITING: frozenset({ACKNOWLEDGED, IN_PROGRESS, AWAITING_RELEASE, RESOLVED, CLOSED}),
    AWAITING_RELEASE: frozenset({IN_PROGRESS, WAITING, RESOLVED, CLOSED}),
    RESOLVED: frozenset({CLOSED, IN_PROGRESS}),
    CLOSED: frozenset({IN_PROGRESS}),
}

SOURCES = ("fault", "phone", "portal", "upgrade_request")
CLASSES = ("A", "B", "C", "D")
LINK_KINDS = ("fault", "session", "release", "part", "plan", "commissioning")


def legal(current: str, target: str) -> bool:
    """Whether `current -> target` is a move of the machine."""
    return target in MOVES.get(current, frozenset())
