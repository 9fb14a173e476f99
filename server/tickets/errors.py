"""Errors of the ticket service (HTTP status in brackets, mapped at the API edge).

    ServerError (server.errors)
    ├── NotFound (404)
    │   └── TicketNotFound        no such ticket (or not visible)
    ├── Conflict (409)
    │   ├── IllegalTransition     the state machine does not allow this move
    │   └── OutOfStock            no depot holds the part in the quantity asked
    └── InvalidInput (422)
        └── TicketInputError      a bad source, class, link kind or pause reason
"""

from __future__ import annotations

from server.errors import Conflict, InvalidInput, NotFound


class TicketNotFound(NotFound):
    """No such ticket."""


class IllegalTransition(Conflict):
    """A state change the ticket's state machine forbids."""


class OutOfStock(Conflict):
    """The part is not in stock where it was asked for."""


class TicketInputError(InvalidInput):
    """Input the ticket service cannot accept."""
