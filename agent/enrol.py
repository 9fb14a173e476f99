"""`emu agent enrol`: trade a one-time token for this agent's broker credentials.

The agent POSTs `{token, agent_id}` to the server's `/api/v1/enrol` and writes what comes back
into its own TOML file: `site` and `agent_id` at the top, `username` and `password` (and, if
the server sends them, `url` and `ca_file`) under `[broker]`. The file is edited in place,
line by line, so other keys and comments stay as they were; the edit is checked by parsing
the result, and it is planned *before* the token is spent, so a file we cannot edit safely
(e.g. `broker` written as an inline table) fails without burning the token. The file is
replaced atomically with mode 0600 (it now holds a password), keeping its owner.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer

from agent.errors import AgentError
from agent.sessions import load_or_create_key, public_key_line
from protocols.enrolment import Credentials as EnrolledCredentials
from protocols.errors import TopicError
from protocols.topics import validate_site

ENROL_PATH = "/api/v1/enrol"
TIMEOUT_S = 30.0
CONFIG_MODE = 0o600
CA_FILE_NAME = "emu-broker-ca.pem"
SSH_KEY_NAME = "emu-agent-ssh-key"
"""The agent's own key for the remote-session gateway, next to its config (mode 0600)."""
NEW_FILE_HEADER = "# Site agent configuration; credentials written by `emu agent enrol`.\n"

Updates = dict[str | None, dict[str, str]]
"""Keys to set per table of a TOML file (None: its top level)."""

_HEADER = re.compile(r"^\s*\[\[?\s*(?P<name>[^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
_STRING_LINE = re.compile(
    r"""^(?P<head>\s*[A-Za-z0-9_-]+\s*=\s*)(?P<value>"(?:[^"\\]|\\.)*"|'[^']*')(?P<tail>\s*(?:#.*)?)$"""
)


class EnrolmentError(AgentError):
    """Enrolment failed: the server refused the token, or the answer could not be stored."""


# --- talking to the server -------------------------------------------------------------------


def enrol_url(server_url: str) -> str:
    """The enrolment endpoint of a server given by its base URL (with or without /api/v1)."""
    parts = urlsplit(server_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnrolmentError(f"--server must look like https://host[:port], not {server_url!r}")
    base = server_url.rstrip("/")
    return base.removesuffix("/api/v1") + ENROL_PATH


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    return response.reason_phrase


def _parse_answer(body: Any) -> EnrolledCredentials:
    if not isinstance(body, dict):
        raise EnrolmentError("the server's answer is not a JSON object")
    try:
        creds = EnrolledCredentials(
            site=validate_site(str(body["site"])),
            agent_id=str(body["agent_id"]),
            username=str(body["broker_username"]),
            password=str(body["broker_password"]),
            broker_url=None if body.get("broker_url") is None else str(body["broker_url"]),
            ca_pem=None if body.get("ca_pem") is None else str(body["ca_pem"]),
            command_key=None if body.get("command_key") is None else str(body["command_key"]),
            gateway=None if body.get("gateway") is None else str(body["gateway"]),
            gateway_host_key=None if body.get("gateway_host_key") is None
            else str(body["gateway_host_key"]),
        )
    except KeyError as exc:
        raise EnrolmentError(f"the server's answer lacks {exc.args[0]!r}") from exc
    except TopicError as exc:
        raise EnrolmentError(f"the server sent an unusable site id: {exc}") from exc
    if not creds.username or not creds.password:
        raise EnrolmentError("the server sent an empty broker user name or password")
    return creds


async def request_credentials(
    server_url: str,
    token: str,
    agent_id: str,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout: float = TIMEOUT_S,  # noqa: ASYNC109  (passed to httpx, which enforces it)
    ssh_public_key: str | None = None,
) -> EnrolledCredentials:
    """POST the token; the credentials, or EnrolmentError saying why not."""
    url = enrol_url(server_url)
    try:
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            body = {"token": token, "agent_id": agent_id}
            if ssh_public_key is not None:
                body["ssh_public_key"] = ssh_public_key
            response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise EnrolmentError(f"cannot reach {url}: {exc or type(exc).__name__}") from exc
    if response.status_code == 404:
        raise EnrolmentError(f"{url}: not found (is --server the server's base URL?)")
    if response.status_code in (401, 403, 409, 422):
        raise EnrolmentError(f"the server refused the enrolment: {_detail(response)}")
    if response.status_code != 200:
        raise EnrolmentError(f"{url}: HTTP {response.status_code}: {_detail(response)}")
    try:
        body = response.json()
    except ValueError as exc:
        raise EnrolmentError(f"{url}: the answer is not JSON") from exc
    return _parse_answer(body)


# --- editing the TOML file -------------------------------------------------------------------


def _toml_string(value: str) -> str:
    # JSON's string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def _regions(lines: list[str]) -> list[tuple[str | None, int, int]]:
    """(table name or None for the top level, first line, end) of each part of the file."""
    found: list[tuple[str | None, int]] = [(None, 0)]
    for i, line in enumerate(lines):
        match = _HEADER.match(line)
        if match:
            bracket = line.lstrip()[:2]
            name = match["name"] + ("[]" if bracket == "[[" else "")
            found.append((name, i))
    return [
        (name, start, found[n + 1][1] if n + 1 < len(found) else len(lines))
        for n, (name, start) in enumerate(found)
    ]


def _set_key(lines: list[str], table: str | None, key: str, value: str) -> list[str]:
    """`lines` with `key = value` set in `table`, replacing the key's line or adding one."""
    rendered = _toml_string(value)
    key_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
    region = next(((s, e) for name, s, e in _regions(lines) if name == table), None)
    if region is None:
        tail = [] if not lines or not lines[-1].strip() else [""]
        return [*lines, *tail, f"[{table}]", f"{key} = {rendered}"]
    start, end = region
    for i in range(start, end):
        if key_re.match(lines[i]):
            match = _STRING_LINE.match(lines[i])
            if match:  # keep the line's own comment
                lines = list(lines)
                lines[i] = f"{match['head']}{rendered}{match['tail']}"
                return lines
            return [*lines[:i], f"{key} = {rendered}", *lines[i + 1 :]]
    last = max((i for i in range(start, end) if lines[i].strip()), default=start - 1)
    return [*lines[: last + 1], f"{key} = {rendered}", *lines[last + 1 :]]


def update_toml(text: str, updates: Updates) -> str:
    """`text` with each `updates[table][key]` set (table None: the top level), checked.

    EnrolmentError if the result would not parse to exactly the original plus the updates.
    """
    try:
        expected: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EnrolmentError(f"not valid TOML: {exc}") from exc
    lines = text.splitlines()
    for table, values in updates.items():
        for key, value in values.items():
            lines = _set_key(lines, table, key, value)
            if table is None:
                expected[key] = value
            else:
                section = expected.setdefault(table, {})
                if not isinstance(section, dict):
                    raise EnrolmentError(f"{table!r} is not a table")
                section[key] = value
    result = "\n".join(lines) + "\n"
    try:
        ok = tomllib.loads(result) == expected
    except tomllib.TOMLDecodeError:
        ok = False
    if not ok:
        raise EnrolmentError(
            "cannot update it in place (is [broker] written as an inline table or with "
            "dotted keys?); write it as a [broker] table and enrol again"
        )
    return result


def config_updates(creds: EnrolledCredentials, ca_file: Path | None,
                   key_file: Path | None = None) -> Updates:
    """The keys enrolment sets in the agent's TOML."""
    broker = {"username": creds.username, "password": creds.password}
    if creds.broker_url is not None:
        broker["url"] = creds.broker_url
    if ca_file is not None:
        broker["ca_file"] = str(ca_file)
    updates: Updates = {None: {"site": creds.site, "agent_id": creds.agent_id},
                        "broker": broker}
    if creds.command_key is not None:
        updates["commands"] = {"server_key": creds.command_key}
    if creds.gateway is not None and creds.gateway_host_key is not None:
        updates["sessions"] = {"gateway": creds.gateway,
                               "gateway_host_key": creds.gateway_host_key}
        if key_file is not None:
            updates["sessions"]["key_file"] = str(key_file)
    return updates


def _read(path: Path) -> str:
    if not path.exists():
        return NEW_FILE_HEADER
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrolmentError(f"{path}: cannot read: {exc}") from exc


def _write_atomically(path: Path, text: str, mode: int) -> None:
    """Replace `path` (mode `mode`, same owner as before when we may) without a torn file."""
    owner = None
    if path.exists():
        st = path.stat()
        owner = (st.st_uid, st.st_gid)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(fh.fileno(), *owner)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_config(config_path: Path, agent_id: str) -> None:
    """Fail now, before the token is spent, if the file could not take the credentials."""
    path = config_path.resolve()
    if not path.parent.is_dir():
        raise EnrolmentError(f"{path.parent}: no such directory")
    if not os.access(path.parent, os.W_OK):
        raise EnrolmentError(f"{path.parent}: not writable")
    probe = EnrolledCredentials("probe", agent_id, "probe", "probe", "mqtts://probe", "probe",
                                "probe", "probe:2222", "ssh-ed25519 probe")
    try:
        update_toml(_read(path), config_updates(probe, path.parent / CA_FILE_NAME,
                                                path.parent / SSH_KEY_NAME))
    except EnrolmentError as exc:
        raise EnrolmentError(f"{path}: {exc}") from exc


def write_credentials(config_path: Path, creds: EnrolledCredentials,
                      key_file: Path | None = None) -> Path:
    """Store `creds` in the agent's TOML (and the CA next to it); return the file written."""
    path = config_path.resolve()
    ca_file = None
    try:
        if creds.ca_pem is not None:
            ca_file = path.parent / CA_FILE_NAME
            _write_atomically(ca_file, creds.ca_pem, 0o644)
        text = update_toml(_read(path), config_updates(creds, ca_file, key_file))
        _write_atomically(path, text, CONFIG_MODE)
    except OSError as exc:
        raise EnrolmentError(f"{path}: cannot write: {exc}") from exc
    except EnrolmentError as exc:
        raise EnrolmentError(f"{path}: {exc}") from exc
    return path


async def enrol(
    server_url: str,
    token: str,
    agent_id: str,
    config_path: Path,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> EnrolledCredentials:
    """Exchange `token` at `server_url` and write the credentials into `config_path`."""
    await asyncio.to_thread(check_config, config_path, agent_id)
    key_file = (await asyncio.to_thread(config_path.resolve)).parent / SSH_KEY_NAME
    key = await asyncio.to_thread(load_or_create_key, key_file)
    creds = await request_credentials(server_url, token, agent_id, transport=transport,
                                      ssh_public_key=public_key_line(key))
    try:
        await asyncio.to_thread(write_credentials, config_path, creds, key_file)
    except EnrolmentError as exc:
        raise EnrolmentError(
            f"{exc}\nthe token is spent: fix this and ask the administrator for a new one"
        ) from exc
    return creds


def enrol_command(
    server: Annotated[str, typer.Option("--server", "-s", help="Server base URL (https://...).")],
    token: Annotated[
        str,
        typer.Option("--token", "-t", envvar="EMU_ENROL_TOKEN",
                     help="One-time enrolment token (or EMU_ENROL_TOKEN, kept out of `ps`)."),
    ],
    config: Annotated[
        Path, typer.Option("--config", "-c", help="agent.toml to write the credentials into.")
    ],
    agent_id: Annotated[
        str | None,
        typer.Option("--agent-id", help="This agent's id, as the token was issued for "
                     "(default: agent_id in the config, else its site)."),
    ] = None,
) -> None:
    """Enrol this agent: trade a one-time token for its own broker credentials."""
    try:
        chosen = agent_id or _configured_agent_id(config)
        if chosen is None:
            raise EnrolmentError("--agent-id is needed (the config names no agent_id or site)")
        if urlsplit(server).scheme == "http" and urlsplit(server).hostname not in (
            "127.0.0.1", "localhost", "::1"
        ):
            typer.secho("warning: plain http: the password crosses the network unencrypted",
                        err=True, fg=typer.colors.YELLOW)
        creds = asyncio.run(enrol(server, token, chosen, config))
    except EnrolmentError as exc:
        typer.secho(f"enrolment failed: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    typer.echo(f"enrolled agent {creds.agent_id} of site {creds.site}: broker user "
               f"{creds.username}, credentials written to {config} (mode 0600)")
    overridden = [v for v in ("EMU_AGENT_BROKER__USERNAME", "EMU_AGENT_BROKER__PASSWORD",
                              "EMU_AGENT_SITE") if v in os.environ]
    if overridden:
        typer.secho(f"warning: {', '.join(overridden)} set in the environment override the file",
                    err=True, fg=typer.colors.YELLOW)


def _configured_agent_id(config: Path) -> str | None:
    """agent_id, else site, from an existing config (the agent's id defaults to its site)."""
    if not config.exists():
        return None
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EnrolmentError(f"{config}: cannot read: {exc}") from exc
    for key in ("agent_id", "site"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return None
