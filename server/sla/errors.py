"""Errors of the SLA engine.

    ServerError (server.errors)
    └── InvalidInput (422)
        └── SlaConfigError   bad SLA terms: unknown zone, country, calendar or target
    NotifyError              a webhook or email could not be delivered (retried)
"""

from __future__ import annotations

from server.errors import InvalidInput


class SlaConfigError(InvalidInput):
    """SLA terms that cannot be used (named in the message)."""


class NotifyError(Exception):
    """A notification could not be delivered (it is retried later); not an HTTP error."""
