"""Errors raised by the server, mapped to HTTP statuses at the API edge.

    ServerError
    ├── NotFound          (404) no such object, or not visible to the caller
    ├── Forbidden         (403) the caller's role may not do this
    ├── Conflict          (409) the request clashes with the current state
    ├── InvalidInput      (422) well-formed but unacceptable input
    └── IngestError       a batch from the broker was refused (counted, never raised to HTTP)
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every server error; `status` is the HTTP status it maps to."""

    status = 500


class NotFound(ServerError):
    """No such object, or the caller may not see it (we do not tell which)."""

    status = 404


class Forbidden(ServerError):
    """Authenticated, but not allowed."""

    status = 403


class Conflict(ServerError):
    """Clashes with the current state."""

    status = 409


class InvalidInput(ServerError):
    """Well-formed input that cannot be accepted."""

    status = 422


class IngestError(ServerError):
    """A message from the broker that cannot be stored."""
