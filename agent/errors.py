"""Errors raised by the site agent.

    AgentError
    ├── DeviceError           a unit could not be read
    │   ├── CommError         no answer: timeout, refused or dropped connection
    │   └── ReplyError        an answer we cannot use: Modbus exception, malformed reply
    ├── DiscoveryError        SunSpec auto-discovery found no usable model chain
    ├── EnrolmentError        the server refused the enrolment token (agent/enrol.py)
    ├── SpoolError            the on-disk spool cannot be opened or written
    ├── UplinkError           the central broker refused us (bad credentials, TLS files)
    └── UpgradeError          an upgrade job did not end with the new version installed
        ├── UpgradeRefused    refused before touching the unit (signature, hash, downgrade,
        │                     window closed): nothing was installed
        ├── UpgradeFailed     download, pre-check or install failed (no rollback possible
        │                     or needed)
        └── UpgradeRolledBack the install failed and the previous image was reinstalled
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


class UpgradeError(AgentError):
    """An upgrade job did not end with the new version running."""


class UpgradeRefused(UpgradeError):
    """Refused before anything touched the unit: unsigned, tampered, downgrade, window over."""


class UpgradeFailed(UpgradeError):
    """A download, pre-check or install step failed."""


class UpgradeRolledBack(UpgradeError):
    """The install failed; the unit runs its previous version again."""
