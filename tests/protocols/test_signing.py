"""Ed25519 keys and signed commands: formats, rotation, and every way a command is refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from protocols.commands import check_command, sign_command
from protocols.errors import SignatureError
from protocols.messages import Command, CommandKind
from protocols.signing import (
    generate_private_key,
    load_private_key,
    load_public_key,
    load_public_keys,
    private_key_pem,
    public_key_text,
    sign,
    verify,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def command(site: str = "site-a", ttl_s: float = 60) -> Command:
    return Command(id=uuid.uuid4(), site=site, kind=CommandKind.DIAGNOSTIC, issued_at=NOW,
                   expires_at=NOW + timedelta(seconds=ttl_s), args={"action": "ping"})


def test_key_formats_round_trip() -> None:
    key = generate_private_key()
    again = load_private_key(private_key_pem(key))
    assert public_key_text(again) == public_key_text(key)
    pem = key.public_key().public_bytes_raw()
    assert load_public_key(public_key_text(key)).public_bytes_raw() == pem


@pytest.mark.parametrize("text", ["", "not base64!", "AAAA", "-----BEGIN PUBLIC KEY-----\nx\n"])
def test_bad_public_keys_are_named(text: str) -> None:
    with pytest.raises(SignatureError, match="server_key"):
        load_public_key(text, "server_key")


def test_bad_private_key() -> None:
    with pytest.raises(SignatureError, match=r"key\.pem"):
        load_private_key(b"garbage", "key.pem")


def test_rotation_accepts_old_and_new() -> None:
    old, new = generate_private_key(), generate_private_key()
    keys = load_public_keys([public_key_text(old), public_key_text(new)])
    for key in (old, new):
        verify(keys, b"data", sign(key, b"data"), "x")
    with pytest.raises(SignatureError, match="does not verify"):
        verify(keys, b"data", sign(generate_private_key(), b"data"), "x")
    with pytest.raises(SignatureError, match="no trusted public key"):
        verify([], b"data", sign(old, b"data"), "x")


def test_signed_command_passes_and_survives_the_wire() -> None:
    key = generate_private_key()
    cmd = sign_command(command(), key)
    received = Command.from_bytes(cmd.to_bytes())
    check_command(received, [key.public_key()], "site-a", NOW)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c, k: c, "unsigned"),
        (lambda c, k: sign_command(c, generate_private_key()), "does not verify"),
        (lambda c, k: Command.model_validate(
            {**sign_command(c, k).model_dump(), "args": {"action": "shell"}}), "does not verify"),
        (lambda c, k: sign_command(command(site="site-b"), k), "addressed to site"),
        (lambda c, k: sign_command(command(ttl_s=1), k), "expired"),
    ],
    ids=["unsigned", "foreign-key", "tampered", "other-site", "expired"],
)
def test_refused_commands(mutate: object, match: str) -> None:
    key = generate_private_key()
    cmd = mutate(command(), key)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=match):
        check_command(cmd, [key.public_key()], "site-a", NOW + timedelta(seconds=5))
