"""Errors raised by the site agent.

    AgentError
    ├── DeviceError           a unit could not be read
    │   ├── CommError         no answer: timeout, refused or dropped connection
    │   └── ReplyError        an answer we cannot use: Modbus exception, malformed reply
    ├── DiscoveryError        SunSpec auto-discovery found no usable model chain
    ├── EnrolmentError        the server refused the enrolment token (agent/enrol.py)
    ├── SpoolError            the on-disk spool cannot be opened or written
    └── UplinkError           the central broker refused us (bad credentials, TLS files)
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every agent error."""


class DeviceError(AgentError):
    """Reading a unit failed."""


class CommError(DeviceError):
    """The unit did not answer (timeout, connection refused or lost)."""


class ReplyError(DeviceError):
    """The unit answered with a Modbus exception or a reply we could not decode."""

    def __init__(self, message: str, exception_code: int | None = None) -> None:
        super().__init__(message)
        self.exception_code = exception_code


class DiscoveryError(AgentError):
    """No SunSpec model chain could be found or mapped to points."""


class SpoolError(AgentError):
    """The spool database cannot be used."""


class UplinkError(AgentError):
    """The central broker cannot be used with this configuration."""
