"""The central broker's user list and ACL, generated from the fleet registry.

Mosquitto 2.0 reads `password_file` lines `user:$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-
SHA512, 64-byte key, salt and key in base64 (what `mosquitto_passwd` writes; the integration
test checks both directions against the real tools). Enrolment stores each agent's password
hash on its `Agent` row in exactly this format, so the file is written from the database
without any password passing through here; only the server's own ingest user is hashed at
generation time, from its settings. Mosquitto re-reads `password_file` and `acl_file` on
SIGHUP (`systemctl reload mosquitto`), so rotating a site's password is: enrol, regenerate,
reload.

Salts are 12 printable ASCII bytes rather than arbitrary ones, so that the same hash can be
imported into EMQX's built-in database (whose `salt` is a string): see `emqx_user` and
deploy/emqx/README.md.

The ACL (`render_acl`, kept in deploy/mosquitto/acl) relies on the broker user name of an
agent being its site code: one `pattern` line per topic with `%u` confines every agent to
`emu/v1/<its site>/...`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from protocols.topics import PREFIX, TopicKind
from server.models import Agent

SERVER_USERNAME = "emu-server"
"""The broker user of the server's ingest (`mqtt.username`); no site may be coded like it."""

HASH_ID = "7"
"""Mosquitto's tag for PBKDF2-SHA512 password hashes."""

PBKDF2_ITERATIONS = 101
"""`mosquitto_passwd`'s default. Agent passwords are 256-bit random strings, so stretching
buys no security; it would only cost the broker CPU on every CONNECT."""

SALT_CHARS = 12
KEY_BYTES = 64
PASSWORD_FILE_MODE = 0o640
"""Owner root, group mosquitto: the broker reads it after dropping privileges."""

AGENT_WRITE = (TopicKind.TELEMETRY, TopicKind.EVENTS, TopicKind.STATUS, TopicKind.CMD_ACK)
AGENT_READ = (TopicKind.CMD,)


class BrokerAuthError(ValueError):
    """An entry that cannot go into a password file (bad user name, unknown hash format)."""


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Mosquitto's `$7$` PBKDF2-SHA512 hash of `password` (what `mosquitto_passwd -b` writes)."""
    if iterations < 1:
        raise BrokerAuthError("iterations must be at least 1")
    if salt is None:
        salt = secrets.token_urlsafe(9).encode("ascii")  # 12 printable bytes, see the docstring
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, KEY_BYTES)
    salt64 = base64.b64encode(salt).decode("ascii")
    key64 = base64.b64encode(key).decode("ascii")
    return f"${HASH_ID}${iterations}${salt64}${key64}"


@dataclass(frozen=True)
class ParsedHash:
    """The parts of a `$7$` hash."""

    iterations: int
    salt: bytes
    key: bytes


def parse_hash(encoded: str) -> ParsedHash:
    """Split a `$7$iterations$salt$key` hash; BrokerAuthError for anything else."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != HASH_ID:
        raise BrokerAuthError("not a Mosquitto PBKDF2-SHA512 ($7$) hash")
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        key = base64.b64decode(parts[4], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise BrokerAuthError(f"malformed $7$ hash: {exc}") from exc
    if iterations < 1 or not salt or len(key) != KEY_BYTES:
        raise BrokerAuthError("malformed $7$ hash: bad iterations, salt or key length")
    return ParsedHash(iterations=iterations, salt=salt, key=key)


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches a `$7$` hash (constant-time comparison)."""
    try:
        parsed = parse_hash(encoded)
    except BrokerAuthError:
        return False
    key = hashlib.pbkdf2_hmac(
        "sha512", password.encode("utf-8"), parsed.salt, parsed.iterations, KEY_BYTES
    )
    return hmac.compare_digest(key, parsed.key)


@dataclass(frozen=True)
class PasswordEntry:
    """One line of a password file: a broker user and its `$7$` hash."""

    username: str
    password_hash: str

    def __post_init__(self) -> None:
        """Refuse what would corrupt the file or could not be checked by the broker."""
        name = self.username
        if not name or ":" in name or any(c.isspace() or not c.isprintable() for c in name):
            raise BrokerAuthError(f"broker user name {name!r} is empty or holds ':' or spaces")
        parse_hash(self.password_hash)


def render_password_file(entries: Iterable[PasswordEntry]) -> str:
    """The text of a Mosquitto password file, sorted by user; duplicates are an error."""
    by_name: dict[str, PasswordEntry] = {}
    for entry in entries:
        if entry.username in by_name:
            raise BrokerAuthError(f"broker user {entry.username!r} appears twice")
        by_name[entry.username] = entry
    return "".join(f"{n}:{by_name[n].password_hash}\n" for n in sorted(by_name))


def _write_atomically(path: Path, text: str, mode: int) -> None:
    """Replace `path` with `text` so the broker never reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_password_file(
    path: Path, entries: Iterable[PasswordEntry], mode: int = PASSWORD_FILE_MODE
) -> int:
    """Write a Mosquitto password file atomically; return the number of users in it."""
    text = render_password_file(entries)
    _write_atomically(path, text, mode)
    return text.count("\n")


async def agent_entries(session: AsyncSession) -> list[PasswordEntry]:
    """Password entries of every enrolled agent (user name = site code)."""
    rows = await session.exec(
        select(Agent)
        .where(col(Agent.mqtt_username).is_not(None))
        .where(col(Agent.mqtt_password_hash).is_not(None))
        .order_by(col(Agent.mqtt_username))
    )
    return [
        PasswordEntry(username=a.mqtt_username, password_hash=a.mqtt_password_hash)
        for a in rows.all()
        if a.mqtt_username is not None and a.mqtt_password_hash is not None
    ]


def render_acl(server_username: str = SERVER_USERNAME) -> str:
    """Mosquitto `acl_file` text: agents confined to their site, the server reads all sites."""
    agent_lines = [f"pattern write {PREFIX}/%u/{k.suffix}" for k in AGENT_WRITE]
    agent_lines += [f"pattern read {PREFIX}/%u/{k.suffix}" for k in AGENT_READ]
    return "\n".join([
        "# Mosquitto 2.0 acl_file of EMU Remote Service (server/broker_auth.py: render_acl;",
        "# tests/server/test_enrolment.py keeps this copy equal to it). Reload: SIGHUP.",
        "# Anything not granted below is denied, including to anonymous clients.",
        "#",
        "# Agents log in with their site code as user name (given at enrolment), so %u is the",
        "# site: an agent may only publish and receive under its own emu/v1/<site>/.",
        "# Mosquitto 2.0 checks `read` when delivering, not when subscribing: a subscription",
        "# to another site is acknowledged, but nothing is ever delivered through it.",
        *agent_lines,
        "",
        "# The server's ingest user reads every site (also through $share/emu-ingest/...:",
        "# Mosquitto checks the topic a message is delivered on) and sends commands.",
        f"user {server_username}",
        f"topic read {PREFIX}/+/#",
        f"topic write {PREFIX}/+/{TopicKind.CMD.suffix}",
        "",
    ])


def emqx_user(entry: PasswordEntry) -> dict[str, object]:
    """`entry` as a row for EMQX's built-in database import (pbkdf2, sha512, hex hash)."""
    parsed = parse_hash(entry.password_hash)
    try:
        salt = parsed.salt.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BrokerAuthError(
            f"{entry.username}: its salt is not text (hash not made by this server); "
            "enrol again to get an EMQX-compatible hash"
        ) from exc
    if not salt.isprintable():
        raise BrokerAuthError(f"{entry.username}: its salt is not printable text")
    return {
        "user_id": entry.username,
        "password_hash": parsed.key.hex(),
        "salt": salt,
        "is_superuser": False,
    }


def write_emqx_users(path: Path, entries: Iterable[PasswordEntry]) -> int:
    """Write an EMQX user-import JSON file (see deploy/emqx/README.md); return the count."""
    rows = [emqx_user(e) for e in entries]
    names = [r["user_id"] for r in rows]
    if len(set(names)) != len(names):
        raise BrokerAuthError("a broker user appears twice")
    _write_atomically(path, json.dumps(rows, indent=2) + "\n", 0o600)
    return len(rows)


async def collect_entries(
    database_url: str, server_user: PasswordEntry | None
) -> list[PasswordEntry]:
    """Every agent's entry from the database, plus the server's own user if given."""
    from server.core.db import Database

    db = Database(database_url)
    try:
        async with db.session() as session:
            entries = await agent_entries(session)
    finally:
        await db.close()
    if server_user is not None:
        if any(e.username == server_user.username for e in entries):
            raise BrokerAuthError(
                f"a site is coded {server_user.username!r}, like the server's broker user"
            )
        entries.append(server_user)
    return entries


class PasswdFormat(StrEnum):
    """What `broker-passwd` writes."""

    MOSQUITTO = "mosquitto"
    EMQX_JSON = "emqx-json"


def broker_passwd_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (replaced atomically).")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="server.toml (every key also as EMU_*).")
    ] = None,
    fmt: Annotated[
        PasswdFormat,
        typer.Option("--format", help="mosquitto password_file, or EMQX user-import JSON."),
    ] = PasswdFormat.MOSQUITTO,
) -> None:
    """Write the broker's user list from the enrolled agents (then reload the broker: SIGHUP).

    The server's own broker user (`mqtt.username` / `mqtt.password`) is included when both
    are set; it must be the user named in the ACL (emu-server).
    """
    from emu.settings import ConfigError
    from server.core.config import load_server_settings

    try:
        settings = load_server_settings(config, demo=True)  # reads no secrets of the API
    except ConfigError as exc:
        typer.secho(f"configuration error:\n{exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    mqtt = settings.mqtt
    server_user = None
    if mqtt.username and mqtt.password:
        server_user = PasswordEntry(mqtt.username, hash_password(mqtt.password))
    else:
        typer.secho(
            "warning: mqtt.username/mqtt.password not set: the server's own broker user is "
            "not in the file", err=True, fg=typer.colors.YELLOW,
        )
    try:
        entries = asyncio.run(collect_entries(settings.database_url, server_user))
        if fmt is PasswdFormat.EMQX_JSON:
            count = write_emqx_users(out, entries)
        else:
            count = write_password_file(out, entries)
    except (BrokerAuthError, OSError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    typer.echo(f"{out}: {count} broker user(s); reload the broker (SIGHUP) to apply")
