"""Errors of the commissioning service (HTTP status in brackets, mapped at the API edge).

    ServerError (server.errors)
    ├── NotFound (404)
    │   └── PlanNotFound          no such plan (or not visible to the caller)
    ├── Conflict (409)
    │   ├── IllegalPlanMove       the plan's state does not allow this
    │   └── NoAgentChannel        a remote run needs the command channel and an agent
    └── InvalidInput (422)
        └── PlanInputError        an unknown series, check or technician list out of shape
"""

from __future__ import annotations

from server.errors import Conflict, InvalidInput, NotFound


class PlanNotFound(NotFound):
    """No such commissioning plan (or the caller may not see it)."""


class IllegalPlanMove(Conflict):
    """A state change or edit the plan's state forbids."""


class NoAgentChannel(Conflict):
    """The server cannot send commands (no command channel configured)."""


class PlanInputError(InvalidInput):
    """Input that cannot make a plan or a result."""
