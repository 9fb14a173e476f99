"""Errors of the SLA engine.

    ServerError (server.errors)
    └── InvalidInput (422)
        └── SlaConfigError   bad SLA terms: unknown zone, country, calendar or target
"""

from __future__ import annotations

from server.errors import InvalidInput


class SlaConfigError(InvalidInput):
    """SLA terms that cannot be used (named in the message)."""
