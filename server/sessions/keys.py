"""Public keys for the gateway: engineers register theirs; an agent's comes with enrolment."""

from __future__ import annotations

import asyncssh
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.models import Agent
from server.sessions.errors import SessionInputError, SessionNotFound
from server.sessions.gateway import key_text
from server.sessions.models import AgentSshKey, SshKey

ALLOWED_TYPES = frozenset({"ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                           "ecdsa-sha2-nistp521", "ssh-rsa", "sk-ssh-ed25519@openssh.com",
                           "sk-ecdsa-sha2-nistp256@openssh.com"})
MIN_RSA_BITS = 3072


def parse_public_key(text: str) -> tuple[str, str]:
    """`(type base64, SHA256 fingerprint)` of an OpenSSH public key line, else SessionInputError."""
    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise SessionInputError(f"public_key: not an OpenSSH public key ({exc})") from exc
    normal = key_text(key)
    if normal.split()[0] not in ALLOWED_TYPES:
        raise SessionInputError(f"public_key: key type {normal.split()[0]} is not accepted")
    if normal.startswith("ssh-rsa ") and getattr(key, "key_size", MIN_RSA_BITS) < MIN_RSA_BITS:
        raise SessionInputError(f"public_key: RSA keys need at least {MIN_RSA_BITS} bits")
    return normal, key.get_fingerprint("sha256")


async def add_key(s: AsyncSession, user_id: int, text: str, name: str) -> SshKey:
    """Register a key for `user_id` (SessionInputError if bad or already registered)."""
    normal, fingerprint = parse_public_key(text)
    dupe = (await s.exec(select(SshKey).where(SshKey.user_id == user_id,
                                              SshKey.public_key == normal))).first()
    if dupe is not None:
        raise SessionInputError("public_key: this key is registered already")
    row = SshKey(user_id=user_id, name=name, public_key=normal, fingerprint=fingerprint)
    s.add(row)
    await s.flush()
    return row


async def list_keys(s: AsyncSession, user_id: int) -> list[SshKey]:
    """A user's keys."""
    rows = await s.exec(select(SshKey).where(SshKey.user_id == user_id).order_by(col(SshKey.id)))
    return list(rows.all())


async def delete_key(s: AsyncSession, user_id: int, key_id: int) -> None:
    """Remove one of a user's keys."""
    row = await s.get(SshKey, key_id)
    if row is None or row.user_id != user_id:
        raise SessionNotFound(f"ssh key {key_id} not found")
    await s.delete(row)


async def set_agent_key(s: AsyncSession, agent: Agent, text: str) -> AgentSshKey:
    """The key `agent` dials the gateway with (replacing an earlier one)."""
    normal, _ = parse_public_key(text)
    if agent.id is None:  # pragma: no cover - rows read back always have their key
        raise SessionNotFound("agent has no id")
    row = (await s.exec(select(AgentSshKey).where(AgentSshKey.agent_id == agent.id))).first()
    if row is None:
        row = AgentSshKey(agent_id=agent.id, site_id=agent.site_id, public_key=normal)
    row.public_key = normal
    s.add(row)
    await s.flush()
    return row
