"""Ed25519 keys and signatures, shared by signed commands and signed upgrade packages.

Why one module: the server signs commands, the release manager signs packages, and the agent
verifies both; each side must agree on key formats. Private keys travel as PKCS#8 PEM files;
public keys as the 32 raw bytes in base64 (short enough for a TOML value or an enrolment
answer) or as PEM. A verifier holds a *list* of trusted public keys so that a key can be
rotated: add the new key everywhere, start signing with it, then drop the old one.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.errors import SignatureError

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "private_key_pem",
    "public_key_text",
    "sign",
    "verify",
]


def generate_private_key() -> Ed25519PrivateKey:
    """A new signing key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the file's mode protects it)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes, where: str = "key") -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM; `where` names the file in the error."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{where}: not a usable PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{where}: an Ed25519 key is required, not {type(key).__name__}")
    return key


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The public key as base64 of its 32 raw bytes."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short, stable name for a key (first 8 base64 characters), for logs and manifests."""
    return public_key_text(key)[:8]


def load_public_key(text: str | bytes, where: str = "public key") -> Ed25519PublicKey:
    """A public key from base64 raw bytes or PEM."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SignatureError(f"{where}: not a usable PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{where}: an Ed25519 key is required, not {type(key).__name__}")
        return key
    try:
        raw = base64.b64decode(data.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{where}: expected base64 of 32 bytes or PEM ({exc})") from exc


def load_public_keys(texts: Iterable[str], where: str = "public keys") -> list[Ed25519PublicKey]:
    """Every trusted key of a list (a rotation keeps old and new side by side)."""
    return [load_public_key(t, f"{where}[{i}]") for i, t in enumerate(texts)]


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte signature of `data`."""
    return key.sign(data)


def verify(keys: Sequence[Ed25519PublicKey], data: bytes, signature: bytes, what: str) -> None:
    """Accept `signature` over `data` if any trusted key made it, else `SignatureError`."""
    if not keys:
        raise SignatureError(f"{what}: no trusted public key is configured")
    for key in keys:
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return
    raise SignatureError(f"{what}: the signature does not verify with any trusted key")
