"""Signing and checking `cmd` messages: what both ends must agree on before an order is obeyed.

The server signs `canonical_bytes(cmd)` with its command key; the agent accepts a command only
if a trusted key signed it, it names the agent's own site, and it has not expired. Replays
(the same id twice) are the agent's to refuse, since only it knows what it already did.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime

from protocols.errors import SignatureError
from protocols.messages import Command, canonical_bytes
from protocols.signing import Ed25519PrivateKey, Ed25519PublicKey, sign, verify


def sign_command(cmd: Command, key: Ed25519PrivateKey) -> Command:
    """`cmd` with its Ed25519 signature."""
    return cmd.signed(sign(key, canonical_bytes(cmd)))


def check_command(cmd: Command, keys: Sequence[Ed25519PublicKey], site: str,
                  now: datetime) -> None:
    """Refuse (`SignatureError`) a command that is unsigned, forged, foreign or expired."""
    what = f"command {cmd.id} ({cmd.kind})"
    if cmd.signature is None:
        raise SignatureError(f"{what}: unsigned")
    verify(keys, canonical_bytes(cmd), base64.b64decode(cmd.signature), what)
    if cmd.site != site:
        raise SignatureError(f"{what}: addressed to site {cmd.site!r}, this is {site!r}")
    if cmd.expired(now):
        raise SignatureError(f"{what}: expired at {cmd.expires_at.isoformat()}")
