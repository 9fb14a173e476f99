"""Upgrade packages: manifest, signature, tamper and downgrade checks, deltas."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import (
    DowngradeRefused,
    PackageError,
    PackageSignatureError,
    TamperedPackage,
)
from protocols.firmware import FirmwareImage
from protocols.packages import (
    Fixes,
    Package,
    apply_delta,
    build_delta,
    build_full,
    check_version_policy,
    compare_versions,
    sign_package,
    verify_package,
)
from protocols.signing import generate_private_key

NOW = datetime(2026, 5, 1, tzinfo=UTC)


def firmware(version: str, size: int = 64 * 1024, seed: int = 7, change: int = 0) -> bytes:
    """A deterministic image; `change` flips that many bytes in the middle (a small fix)."""
    rng = random.Random(seed)
    payload = bytearray(rng.randbytes(size))
    for i in range(change):
        payload[size // 2 + i] ^= 0x5A
    return FirmwareImage("EMU-BS", version, bytes(payload)).to_bytes()


def test_signed_package_round_trips_and_verifies() -> None:
    key = generate_private_key()
    pkg = sign_package(build_full(firmware("1.1.0"), created_at=NOW, minimum_version="1.0.0",
                                  fixes=Fixes(fault_codes=("derating",), tickets=(12,)),
                                  notes="fixes derating"), key)
    again = Package.parse(pkg.to_bytes())
    assert again == pkg
    verify_package(again, [key.public_key()])
    assert again.manifest.fixes.refs() == ["derating", 12]
    assert again.manifest.key_id is not None


def test_rotation_accepts_any_trusted_key() -> None:
    old, new = generate_private_key(), generate_private_key()
    pkg = sign_package(build_full(firmware("1.1.0"), created_at=NOW), new)
    verify_package(pkg, [old.public_key(), new.public_key()])


def test_unsigned_and_wrongly_signed_packages_are_refused() -> None:
    key, other = generate_private_key(), generate_private_key()
    pkg = build_full(firmware("1.1.0"), created_at=NOW)
    with pytest.raises(PackageSignatureError, match="not signed"):
        verify_package(pkg, [key.public_key()])
    with pytest.raises(PackageSignatureError, match="does not verify"):
        verify_package(sign_package(pkg, other), [key.public_key()])


def test_tampered_payload_and_manifest_are_refused() -> None:
    key = generate_private_key()
    pkg = sign_package(build_full(firmware("1.1.0"), created_at=NOW), key)
    data = bytearray(pkg.to_bytes())
    data[-100] ^= 1
    with pytest.raises(TamperedPackage, match="SHA-256"):
        verify_package(Package.parse(bytes(data)), [key.public_key()])
    forged = Package(pkg.manifest.model_copy(update={"notes": "edited"}), pkg.payload,
                     pkg.signature)
    with pytest.raises(PackageSignatureError):
        verify_package(forged, [key.public_key()])


@pytest.mark.parametrize("data", [b"", b"EMUPKG1\n", b"junk" * 10, b"EMUPKG1\n\0\0\xff\xffxx"])
def test_garbage_is_not_a_package(data: bytes) -> None:
    with pytest.raises(PackageError):
        Package.parse(data)


def test_version_policy() -> None:
    m = build_full(firmware("1.1.0"), created_at=NOW, minimum_version="1.0.0").manifest
    check_version_policy(m, "1.0.0")
    with pytest.raises(DowngradeRefused, match="downgrade"):
        check_version_policy(m, "1.2.0")
    check_version_policy(m, "1.2.0", rollback=True)
    with pytest.raises(DowngradeRefused, match="already running"):
        check_version_policy(m, "1.1.0")
    with pytest.raises(DowngradeRefused, match="at least"):
        check_version_policy(m, "0.9.0")
    with pytest.raises(DowngradeRefused, match="not a rollback"):
        check_version_policy(m, "1.0.0", rollback=True)


@given(st.lists(st.integers(0, 999), min_size=1, max_size=4),
       st.lists(st.integers(0, 999), min_size=1, max_size=4))
def test_versions_compare_numerically(a: list[int], b: list[int]) -> None:
    va, vb = ".".join(map(str, a)), ".".join(map(str, b))
    pa, pb = tuple(a) + (0,) * (4 - len(a)), tuple(b) + (0,) * (4 - len(b))
    assert compare_versions(va, vb) == (pa > pb) - (pa < pb)


def test_delta_rebuilds_the_image_and_is_small_for_a_small_change() -> None:
    key = generate_private_key()
    base, new = firmware("1.0.0"), firmware("1.0.1", change=64)
    delta = sign_package(build_delta(base, new, created_at=NOW), key)
    verify_package(Package.parse(delta.to_bytes()), [key.public_key()])
    assert delta.manifest.size <= 0.2 * len(new)
    assert apply_delta(delta.manifest, base, delta.payload) == new
    with pytest.raises(PackageError, match="base image"):
        apply_delta(delta.manifest, firmware("1.0.0", seed=8), delta.payload)
    with pytest.raises(PackageError, match="forward"):
        build_delta(new, base, created_at=NOW)
