"""The server's command signing key: one Ed25519 key per deployment, made on first start.

Several server processes must sign with the same key (agents trust one): point them at one
`commands.key_file` (a shared volume or a secret). Creation is race-safe (written aside, then
hard-linked into place): two processes starting at once end up with the same key.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from protocols.errors import SignatureError
from protocols.signing import (
    Ed25519PrivateKey,
    generate_private_key,
    load_private_key,
    private_key_pem,
)
from server.errors import ServerError

KEY_MODE = 0o600


class KeyFileError(ServerError):
    """The signing key file cannot be read, created or used."""


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The key in `path`, created (mode 0600) if there is none yet (blocking)."""
    try:
        return load_private_key(path.read_bytes(), str(path))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the command key: {exc}") from exc
    except SignatureError as exc:
        raise KeyFileError(str(exc)) from exc
    key = generate_private_key()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_key_pem(key))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic, and refuses to replace a key another process made
        except FileExistsError:
            return load_private_key(path.read_bytes(), str(path))
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create the command key: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return key


async def load_or_create_key_async(path: Path) -> Ed25519PrivateKey:
    """`load_or_create_key` off the event loop."""
    return await asyncio.to_thread(load_or_create_key, path)
