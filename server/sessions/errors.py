"""Errors of remote sessions, mapped to HTTP statuses by the API edge.

    ServerError (server/errors.py)
    ├── NotFound
    │   └── SessionNotFound      no such session, or not the caller's to see (404)
    ├── Forbidden
    │   └── NotYourSession       the caller may see it but not do this to it (403)
    ├── Conflict
    │   └── SessionStateError    the session's state does not allow this (409)
    └── InvalidInput
        └── SessionInputError    a bad scope, duration, key or unit name (422)
"""

from __future__ import annotations

from server.errors import Conflict, Forbidden, InvalidInput, NotFound


class SessionNotFound(NotFound):
    """No such session, or the caller may not see it."""


class NotYourSession(Forbidden):
    """The caller may see the session but not approve, revoke or use it."""


class SessionStateError(Conflict):
    """The session's current state does not allow the request."""


class SessionInputError(InvalidInput):
    """Input that cannot be accepted (scope, duration, key, unit)."""
