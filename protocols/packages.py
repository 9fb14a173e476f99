"""Upgrade packages: a signed manifest plus a payload (a full firmware image or a delta).

Why a manifest: the agent must be able to refuse a package that is unsigned, tampered or a
downgrade *before* anything touches a unit, with nothing but the package and the trusted
release keys. The manifest names the series, version, size and SHA-256 of the payload (and,
for a delta, of the image it rebuilds), the oldest version it may be installed over, the
install steps, and what it fixes (fault codes and ticket ids, so C/D tickets close when it is
installed). The release manager's Ed25519 key signs `canonical_bytes(manifest)`; since the
manifest carries the payload's hash, the signature covers the payload too.

Bundle layout (what `emu release build` writes and the server stores):

    offset  size  field
    0       8     magic  b"EMUPKG1\\n"
    8       4     manifest length m, big endian
    12      m     manifest, canonical JSON (sorted keys, no whitespace, UTF-8)
    12+m    1     signature length s (0: unsigned, 64: Ed25519)
    13+m    s     signature
    13+m+s  n     payload

Deltas are bsdiff4 patches between two consecutive images; the agent applies the patch to the
image it keeps of the running version and checks the result against `image_sha256`.
Pure: bytes in, typed values out; no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Literal

import bsdiff4
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocols.errors import (
    DowngradeRefused,
    FirmwareImageError,
    PackageError,
    PackageSignatureError,
    SignatureError,
    TamperedPackage,
)
from protocols.firmware import FirmwareImage
from protocols.signing import Ed25519PrivateKey, Ed25519PublicKey, key_id, sign, verify

MAGIC = b"EMUPKG1\n"
_LEN = struct.Struct(">I")
SIGNATURE_BYTES = 64
MAX_MANIFEST_BYTES = 64 * 1024
INSTALL_MODBUS = "modbus-firmware-update"
_VERSION = re.compile(r"^\d+(\.\d+){0,3}$")
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str, Field(pattern=_VERSION.pattern, max_length=16)]


def parse_version(text: str) -> tuple[int, ...]:
    """`"1.10.2"` -> (1, 10, 2); versions compare numerically, part by part."""
    if not _VERSION.match(text):
        raise PackageError(f"version {text!r} is not of the form 1.2.3")
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (4 - len(parts))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as `a` is older than, equal to or newer than `b`."""
    pa, pb = parse_version(a), parse_version(b)
    return (pa > pb) - (pa < pb)


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256, as in manifests."""
    return hashlib.sha256(data).hexdigest()


class Fixes(BaseModel):
    """What a release repairs: fault codes (C/D faults) and ticket ids."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fault_codes: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = ()
    tickets: tuple[Annotated[int, Field(ge=1)], ...] = ()

    def refs(self) -> list[str | int]:
        """The form the ticket core's `release_installed(fixes=...)` takes."""
        return [*self.fault_codes, *self.tickets]


class Manifest(BaseModel):
    """What a package is, signed by the release manager."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    series: Annotated[str, Field(min_length=1, max_length=16)]
    version: Version
    kind: Literal["full", "delta"] = "full"
    sha256: Sha256
    size: Annotated[int, Field(ge=1)]
    image_sha256: Sha256
    image_size: Annotated[int, Field(ge=1)]
    base_version: Version | None = None
    base_sha256: Sha256 | None = None
    minimum_version: Version | None = None
    install_steps: tuple[str, ...] = (INSTALL_MODBUS,)
    fixes: Fixes = Fixes()
    notes: Annotated[str, Field(max_length=20_000)] = ""
    created_at: datetime
    key_id: str | None = None

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("created_at needs a time zone")
        return value

    @property
    def name(self) -> str:
        """`EMU-BS 1.1.0` or `EMU-BS 1.0.0->1.1.0 (delta)`, for messages."""
        if self.kind == "delta":
            return f"{self.series} {self.base_version}->{self.version} (delta)"
        return f"{self.series} {self.version}"


def canonical_bytes(manifest: Manifest) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    data = manifest.model_dump(mode="json")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_manifest(data: bytes | str) -> Manifest:
    """A manifest from JSON; PackageError names what is wrong."""
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise PackageError(f"invalid manifest: {where}: {first['msg']}") from exc


@dataclass(frozen=True, slots=True)
class Package:
    """A manifest, its signature (None until signed) and the payload."""

    manifest: Manifest
    payload: bytes
    signature: bytes | None = None

    def to_bytes(self) -> bytes:
        """The bundle as stored and uploaded."""
        m = canonical_bytes(self.manifest)
        sig = self.signature or b""
        return MAGIC + _LEN.pack(len(m)) + m + bytes([len(sig)]) + sig + self.payload

    @classmethod
    def parse(cls, data: bytes) -> Package:
        """Split a bundle; PackageError if it is not one (nothing is verified here)."""
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LEN.size + 1:
            raise PackageError("not an EMU upgrade package (bad magic)")
        (mlen,) = _LEN.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + _LEN.size
        if mlen > MAX_MANIFEST_BYTES or start + mlen + 1 > len(data):
            raise PackageError("package truncated in its manifest")
        manifest = parse_manifest(data[start : start + mlen])
        slen = data[start + mlen]
        if slen not in (0, SIGNATURE_BYTES) or start + mlen + 1 + slen > len(data):
            raise PackageError("package truncated in its signature")
        sig = data[start + mlen + 1 : start + mlen + 1 + slen] or None
        return cls(manifest, data[start + mlen + 1 + slen :], sig)


def build_full(
    image: bytes, *, created_at: datetime, minimum_version: str | None = None,
    fixes: Fixes = Fixes(), notes: str = "",  # noqa: B008 - frozen model
    install_steps: tuple[str, ...] = (INSTALL_MODBUS,),
) -> Package:
    """An unsigned package carrying a whole image (series and version read from its header)."""
    fw = _parse_image(image)
    digest = sha256_hex(image)
    manifest = _manifest(
        series=fw.series, version=fw.version, kind="full", sha256=digest, size=len(image),
        image_sha256=digest, image_size=len(image), minimum_version=minimum_version,
        fixes=fixes, notes=notes, install_steps=install_steps, created_at=created_at,
    )
    return Package(manifest, image)


def build_delta(
    base_image: bytes, image: bytes, *, created_at: datetime,
    minimum_version: str | None = None, fixes: Fixes = Fixes(),  # noqa: B008 - frozen model
    notes: str = "", install_steps: tuple[str, ...] = (INSTALL_MODBUS,),
) -> Package:
    """An unsigned bsdiff4 delta from `base_image` to `image` (same series, newer version)."""
    base, new = _parse_image(base_image), _parse_image(image)
    if base.series != new.series:
        raise PackageError(f"a delta needs one series, not {base.series} and {new.series}")
    if compare_versions(new.version, base.version) <= 0:
        raise PackageError(f"a delta goes forward: {base.version} -> {new.version} does not")
    patch = bsdiff4.diff(base_image, image)
    manifest = _manifest(
        series=new.series, version=new.version, kind="delta", sha256=sha256_hex(patch),
        size=len(patch), image_sha256=sha256_hex(image), image_size=len(image),
        base_version=base.version, base_sha256=sha256_hex(base_image),
        minimum_version=minimum_version, fixes=fixes, notes=notes,
        install_steps=install_steps, created_at=created_at,
    )
    return Package(manifest, patch)


def _parse_image(image: bytes) -> FirmwareImage:
    try:
        return FirmwareImage.parse(image)
    except FirmwareImageError as exc:
        raise PackageError(f"not a firmware image: {exc}") from exc


def _manifest(**fields: object) -> Manifest:
    try:
        return Manifest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PackageError(f"invalid manifest: {'.'.join(map(str, first['loc']))}: "
                           f"{first['msg']}") from exc


def sign_package(package: Package, key: Ed25519PrivateKey) -> Package:
    """The package signed with `key` (the manifest records which key, for rotation)."""
    manifest = package.manifest.model_copy(update={"key_id": key_id(key)})
    return replace(package, manifest=manifest, signature=sign(key, canonical_bytes(manifest)))


def verify_manifest(manifest: Manifest, signature: bytes | None,
                    keys: list[Ed25519PublicKey]) -> None:
    """Refuse an unsigned manifest or one no trusted release key signed."""
    if not signature:
        raise PackageSignatureError(f"{manifest.name}: the package is not signed")
    try:
        verify(keys, canonical_bytes(manifest), signature, manifest.name)
    except SignatureError as exc:
        raise PackageSignatureError(str(exc)) from exc


def verify_payload(manifest: Manifest, payload: bytes) -> None:
    """Refuse a payload whose size or SHA-256 differs from the signed manifest."""
    if len(payload) != manifest.size:
        raise TamperedPackage(
            f"{manifest.name}: payload is {len(payload)} bytes, the manifest says {manifest.size}"
        )
    if sha256_hex(payload) != manifest.sha256:
        raise TamperedPackage(f"{manifest.name}: payload SHA-256 does not match the manifest")


def verify_package(package: Package, keys: list[Ed25519PublicKey]) -> None:
    """Signature, then payload size and hash; a full package's image must match its header."""
    verify_manifest(package.manifest, package.signature, keys)
    verify_payload(package.manifest, package.payload)
    if package.manifest.kind == "full":
        check_image(package.manifest, package.payload)


def check_image(manifest: Manifest, image: bytes) -> None:
    """The rebuilt or downloaded image is the one the manifest signed, for its series."""
    if len(image) != manifest.image_size or sha256_hex(image) != manifest.image_sha256:
        raise TamperedPackage(f"{manifest.name}: the image does not match image_sha256")
    fw = _parse_image(image)
    if (fw.series, fw.version) != (manifest.series, manifest.version):
        raise TamperedPackage(
            f"{manifest.name}: the image says {fw.series} {fw.version}, not the manifest's"
        )


def apply_delta(manifest: Manifest, base_image: bytes, patch: bytes) -> bytes:
    """Rebuild the full image from the running version's image and a verified delta."""
    if manifest.kind != "delta" or manifest.base_sha256 is None:
        raise PackageError(f"{manifest.name} is not a delta")
    if sha256_hex(base_image) != manifest.base_sha256:
        raise PackageError(f"{manifest.name}: the kept base image is not {manifest.base_version}")
    verify_payload(manifest, patch)
    try:
        image: bytes = bsdiff4.patch(base_image, patch)
    except Exception as exc:  # bsdiff4 raises bare ValueError/RuntimeError on a bad patch
        raise TamperedPackage(f"{manifest.name}: the delta does not apply: {exc}") from exc
    check_image(manifest, image)
    return image


def check_version_policy(manifest: Manifest, current: str, *, rollback: bool = False) -> None:
    """No downgrade unless the plan says rollback; respect the package's minimum version.

    Installing the running version again is refused too: a unit is never upgraded twice.
    """
    order = compare_versions(manifest.version, current)
    if order < 0 and not rollback:
        raise DowngradeRefused(
            f"{manifest.name} is older than the running {current}: a downgrade needs a "
            "rollback plan"
        )
    if order == 0:
        raise DowngradeRefused(f"{manifest.name} is already running")
    if order > 0 and rollback:
        raise DowngradeRefused(f"{manifest.name} is newer than {current}: not a rollback")
    if (not rollback and manifest.minimum_version is not None
            and compare_versions(current, manifest.minimum_version) < 0):
        raise DowngradeRefused(
            f"{manifest.name} needs at least {manifest.minimum_version}; the unit runs {current}"
        )


class PackageRef(BaseModel):
    """Where to fetch a package's payload, with the manifest and signature to check it by."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: Annotated[str, Field(min_length=1, max_length=2000)]
    manifest: Manifest
    signature: Annotated[str, Field(max_length=128)] | None = None


class PrecheckLimits(BaseModel):
    """The safe operating range a unit must be in before an install starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    soc_min: float = 20.0
    soc_max: float = 95.0
    max_power_w: float = 90_000.0


class UpgradeJob(BaseModel):
    """The `upgrade.job` command's args: one unit, one package, one window (UTC bounds).

    `previous` is the package of the version the unit runs now: the agent keeps it, so that a
    failed install can be undone; `delta`, when given, is tried first if the agent already
    has the image it applies to.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: int
    target_id: int
    device: Annotated[str, Field(min_length=1, max_length=64)]
    rollback: bool = False
    window_start: datetime
    window_end: datetime
    package: PackageRef
    delta: PackageRef | None = None
    previous: PackageRef | None = None
    settle_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    limits: PrecheckLimits = PrecheckLimits()
