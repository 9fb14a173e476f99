"""Errors raised by the protocol core.

    ProtocolError
    ├── CodecError            a value cannot be encoded to / decoded from registers
    ├── PlanError             a read plan cannot be made (point larger than one request, ...)
    ├── SunSpecError          no SunS marker, a broken model chain, an unknown model
    ├── ProfileError          a device profile file is missing or invalid (names file and key)
    ├── MessageError          an MQTT payload does not match its schema
    ├── FirmwareImageError    a firmware image is truncated, foreign or malformed
    ├── TopicError            a topic is not one of ours
    ├── SignatureError        a key is unusable, or a signature does not verify
    └── PackageError          an upgrade package is malformed or may not be installed
        ├── PackageSignatureError   unsigned, or signed by no trusted release key
        ├── TamperedPackage         payload or image differs from the signed manifest
        └── DowngradeRefused        older than the running version (and not a rollback)
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error the protocol core raises."""


class CodecError(ProtocolError):
    """A value does not fit its point type, or registers do not decode."""


class PlanError(ProtocolError):
    """The points cannot be planned into Modbus read requests."""


class SunSpecError(ProtocolError):
    """The SunSpec model chain is missing or malformed."""


class ProfileError(ProtocolError):
    """A device profile is invalid; the message names the file and the key."""


class MessageError(ProtocolError):
    """A payload does not validate against its message schema."""


class FirmwareImageError(ProtocolError):
    """A firmware image cannot be parsed or does not belong to the unit."""


class TopicError(ProtocolError):
    """A topic string is not an `emu/v1/...` topic this project knows."""


class SignatureError(ProtocolError):
    """A signing key cannot be loaded, or a signature does not verify with any trusted key."""


class PackageError(ProtocolError):
    """An upgrade package cannot be read, or must not be installed."""


class PackageSignatureError(PackageError):
    """The package is unsigned or no trusted release key signed it."""


class TamperedPackage(PackageError):
    """The payload (or the image rebuilt from it) does not match the signed manifest."""


class DowngradeRefused(PackageError):
    """The version policy refuses this package for this unit (downgrade, minimum version)."""
