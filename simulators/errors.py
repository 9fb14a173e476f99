"""Errors raised by the simulator.

SimulatorError
├── UnknownFaultError     a fault name or parameter that does not exist
├── UnknownUnitError      a unit id the simulator does not serve
└── ControlError          the control channel of a running simulator failed
"""

from __future__ import annotations


class SimulatorError(Exception):
    """Base of every simulator error."""


class UnknownFaultError(SimulatorError):
    """No such fault, or no such parameter of a fault."""


class UnknownUnitError(SimulatorError):
    """No unit with that id."""


class ControlError(SimulatorError):
    """The running simulator could not be reached or refused the request."""
