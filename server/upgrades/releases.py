"""Release packages on the server: accept only what a trusted release key signed, store it,
and hand agents a download link.

An upload is refused (422, with the reason) when it is not a package, is unsigned or signed
by no key in `upgrades.release_keys`, or its payload does not match the signed manifest.
The payload goes to `<data_dir>/releases/<series>/`; the database keeps the manifest and
signature, so a job carries everything the agent needs to check the bytes it downloads.

Agents have no API token: a download link carries a capability instead, an HMAC of the
package id and an expiry under the server's secret key (`?exp=...&sig=...`). The link grants
reading one package's bytes until it expires; integrity never rests on it (the agent checks
the signed manifest).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
from datetime import datetime, timedelta
from pathlib import Path

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.errors import PackageError, SignatureError
from protocols.packages import Manifest, Package, PackageRef, compare_versions, verify_package
from protocols.signing import Ed25519PublicKey, load_public_keys
from server.api.deps import id_of
from server.core.config import ServerSettings
from server.errors import Conflict, Forbidden, InvalidInput, NotFound
from server.upgrades.models import ReleasePackage


def releases_dir(settings: ServerSettings) -> Path:
    """Where payloads are stored."""
    return settings.data_dir / "releases"


def trusted_keys(settings: ServerSettings) -> list[Ed25519PublicKey]:
    """The release public keys uploads must be signed with."""
    try:
        return load_public_keys(settings.upgrades.release_keys, "upgrades.release_keys")
    except SignatureError as exc:
        raise InvalidInput(str(exc)) from exc


async def accept_upload(
    session: AsyncSession, settings: ServerSettings, data: bytes, *, uploaded_by: str | None,
    now: datetime,
) -> ReleasePackage:
    """Verify and store an uploaded bundle; the existing row if the same bytes came before."""
    keys = trusted_keys(settings)
    if not keys:
        raise Conflict("no release key is configured (upgrades.release_keys): uploads are "
                       "refused until one is")
    try:
        pkg = Package.parse(data)
        verify_package(pkg, keys)
    except PackageError as exc:
        raise InvalidInput(f"package refused: {exc}") from exc
    m = pkg.manifest
    base = m.base_version or ""
    existing = (await session.exec(select(ReleasePackage).where(
        ReleasePackage.series == m.series, ReleasePackage.version == m.version,
        ReleasePackage.kind == m.kind, ReleasePackage.base_version == base))).first()
    if existing is not None:
        if existing.sha256 == m.sha256:
            return existing
        raise Conflict(f"{m.name} exists already with other contents")
    rel = Path(m.series) / f"{m.version}-{m.kind}-{base or 'image'}-{m.sha256[:16]}.bin"
    await asyncio.to_thread(_write_atomic, releases_dir(settings) / rel, pkg.payload)
    row = ReleasePackage(
        series=m.series, version=m.version, kind=m.kind, base_version=base, sha256=m.sha256,
        size=m.size, image_sha256=m.image_sha256, minimum_version=m.minimum_version,
        manifest=m.model_dump(mode="json"),
        signature=base64.b64encode(pkg.signature or b"").decode(),
        notes=m.notes, path=str(rel), uploaded_by=uploaded_by, uploaded_at=now,
    )
    session.add(row)
    await session.flush()
    return row


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def get_release(session: AsyncSession, release_id: int) -> ReleasePackage:
    """A package by id (404 if unknown)."""
    row = await session.get(ReleasePackage, release_id)
    if row is None:
        raise NotFound(f"release {release_id} not found")
    return row


async def full_package(session: AsyncSession, series: str, version: str) -> ReleasePackage | None:
    """The full package of one version, if uploaded (the image a rollback reinstalls)."""
    return (await session.exec(select(ReleasePackage).where(
        ReleasePackage.series == series, ReleasePackage.version == version,
        ReleasePackage.kind == "full"))).first()


async def delta_package(session: AsyncSession, series: str, base: str,
                        version: str) -> ReleasePackage | None:
    """A delta from `base` to `version`, if uploaded."""
    return (await session.exec(select(ReleasePackage).where(
        ReleasePackage.series == series, ReleasePackage.version == version,
        ReleasePackage.kind == "delta", ReleasePackage.base_version == base))).first()


async def newest_version(session: AsyncSession, series: str) -> str | None:
    """The newest full release of a series."""
    versions = (await session.exec(select(ReleasePackage.version).where(
        ReleasePackage.series == series, col(ReleasePackage.kind) == "full"))).all()
    best: str | None = None
    for v in versions:
        if best is None or compare_versions(v, best) > 0:
            best = v
    return best


# --- download links --------------------------------------------------------------------------


def _mac(settings: ServerSettings, release_id: int, exp: int) -> str:
    key = hashlib.sha256(b"emu-release-download:" + (settings.secret_key or "").encode()).digest()
    return hmac.new(key, f"{release_id}:{exp}".encode(), hashlib.sha256).hexdigest()


def download_url(settings: ServerSettings, base_url: str, row: ReleasePackage,
                 now: datetime) -> str:
    """An absolute link to a package's payload, valid for `upgrades.download_ttl_s`."""
    exp = int((now + timedelta(seconds=settings.upgrades.download_ttl_s)).timestamp())
    return (f"{base_url.rstrip('/')}/api/v1/releases/{id_of(row)}/download"
            f"?exp={exp}&sig={_mac(settings, id_of(row), exp)}")


def check_download(settings: ServerSettings, release_id: int, exp: int, sig: str,
                   now: datetime) -> None:
    """Refuse a forged or expired link (403)."""
    if not hmac.compare_digest(_mac(settings, release_id, exp), sig):
        raise Forbidden("invalid download link")
    if now.timestamp() > exp:
        raise Forbidden("the download link has expired")


def package_ref(settings: ServerSettings, base_url: str, row: ReleasePackage,
                now: datetime) -> PackageRef:
    """What a job tells the agent about one package."""
    return PackageRef(url=download_url(settings, base_url, row, now),
                      manifest=Manifest.model_validate(row.manifest), signature=row.signature)
