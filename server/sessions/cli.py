"""`emu session`: request, approve, deny, revoke, list remote sessions; print or run `ssh`.

Talks to the API like the other operator verbs (`--server`, `--token` or EMU_SERVER_URL,
EMU_TOKEN). `connect` prints the stock OpenSSH command for the session, or with `--run`
runs it, with the gateway's host key pinned in `~/.config/emu/known_hosts`.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Literal

import typer

from server.cli_verbs import (
    DEFAULT_SERVER,
    Column,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    format_time,
    print_footer,
    print_json,
    print_record,
    print_table,
)

app = typer.Typer(help="Remote sessions: consent-gated SSH access to a site's gateway and "
                  "units.", no_args_is_help=True)
key_app = typer.Typer(help="Your public keys for the session gateway.", no_args_is_help=True)
app.add_typer(key_app, name="key")

SessionArg = Annotated[str, typer.Argument(help="session id (s + 12 hex digits)")]
NoteOpt = Annotated[str, typer.Option("--note", help="a note for the timeline")]
COLUMNS: list[Column] = [
    ("id", "ID", None), ("state", "STATE", None), ("ticket_id", "TICKET", None),
    ("site_id", "SITE", None), ("scope", "SCOPE", None), ("approval", "APPROVAL", None),
    ("requested_at", "REQUESTED (UTC)", format_time), ("ends_at", "ENDS (UTC)", format_time),
]
KNOWN_HOSTS = Path.home() / ".config" / "emu" / "known_hosts"


def _show(record: dict[str, object], as_json: bool) -> None:
    if as_json:
        print_json(record)
    else:
        print_record(record)


@app.command("request")
def request(
    ticket: Annotated[int, typer.Argument(min=1, help="ticket id")],
    reason: Annotated[str, typer.Option("--reason", help="why the session is needed")],
    shell: Annotated[bool, typer.Option("--shell", help="a shell on the gateway")] = False,
    unit: Annotated[list[str] | None, typer.Option("--unit", help="a unit's Modbus port "
                                                   "(repeatable)")] = None,
    minutes: Annotated[int, typer.Option("--minutes", min=1, max=480,
                                         help="maximum duration")] = 60,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Ask the customer for a remote session for a ticket."""
    if not shell and not unit:
        raise typer.BadParameter("ask for --shell and/or at least one --unit")
    body = {"ticket_id": ticket, "reason": reason, "max_duration_s": minutes * 60,
            "scope": {"shell": shell, "units": unit or []}}
    with api_client(server, token) as api:
        record = api.post("/sessions", body)
    _show(record, as_json)


def _decide(verb: str, session: str, server: str, token: str | None, as_json: bool,
            note: str | None = None) -> None:
    with api_client(server, token) as api:
        record = api.post(f"/sessions/{session}/{verb}",
                          None if note is None else {"note": note})
    _show(record, as_json)


@app.command("approve")
def approve(session: SessionArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """Consent to a session (customer of the site)."""
    _decide("approve", session, server, token, as_json)


@app.command("deny")
def deny(session: SessionArg, note: NoteOpt = "", server: ServerOpt = DEFAULT_SERVER,
         token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Refuse a session (customer of the site)."""
    _decide("deny", session, server, token, as_json, note)


@app.command("revoke")
def revoke(session: SessionArg, note: NoteOpt = "", server: ServerOpt = DEFAULT_SERVER,
           token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Withdraw access now; live connections are cut."""
    _decide("revoke", session, server, token, as_json, note)


@app.command("close")
def close(session: SessionArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
          as_json: JsonOpt = False) -> None:
    """End your session (engineer)."""
    _decide("close", session, server, token, as_json)


@app.command("list")
def list_sessions(
    state: Annotated[Literal["requested", "approved", "denied", "active", "closed", "expired",
                             "revoked"] | None, typer.Option("--state")] = None,
    ticket: Annotated[int | None, typer.Option("--ticket", min=1)] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Sessions you may see, newest first."""
    with api_client(server, token) as api:
        page = api.get("/sessions", state=state, ticket_id=ticket, limit=100)
    if as_json:
        print_json(page)
        return
    print_table(page["data"], COLUMNS)
    print_footer(page)


@app.command("connect")
def connect(
    session: SessionArg,
    unit: Annotated[str | None, typer.Option("--unit", help="forward this unit's port")] = None,
    run: Annotated[bool, typer.Option("--run", help="run ssh instead of printing it")] = False,
    identity: Annotated[Path | None, typer.Option("--identity", "-i",
                                                  help="your private key")] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """The stock `ssh` command for the session (shell, or `-L` to a unit)."""
    with api_client(server, token) as api:
        info = api.get(f"/sessions/{session}/connect")
    if unit is not None:
        if unit not in info["units"]:
            raise typer.BadParameter(f"{unit} is not in this session's scope", param_hint="--unit")
        command = info["units"][unit]
    elif info["shell"]:
        command = info["shell"]
    else:
        command = next(iter(info["units"].values()))
    argv = shlex.split(command)
    if identity is not None:
        argv[1:1] = ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    if info.get("known_hosts"):
        KNOWN_HOSTS.parent.mkdir(parents=True, exist_ok=True)
        lines = KNOWN_HOSTS.read_text().splitlines() if KNOWN_HOSTS.exists() else []
        if info["known_hosts"] not in lines:
            KNOWN_HOSTS.write_text("\n".join([*lines, info["known_hosts"]]) + "\n")
        argv[1:1] = ["-o", f"UserKnownHostsFile={KNOWN_HOSTS}", "-o", "StrictHostKeyChecking=yes"]
    if not run:
        typer.echo(shlex.join(argv))
        return
    os.execvp(argv[0], argv)  # noqa: S606 - the user asked to run their own ssh


@key_app.command("add")
def key_add(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a .pub file")],
    name: Annotated[str, typer.Option("--name")] = "key",
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Register a public key (engineers)."""
    with api_client(server, token) as api:
        record = api.post("/users/me/ssh-keys", {"public_key": path.read_text().strip(),
                                                 "name": name})
    _show(record, as_json)


@key_app.command("list")
def key_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
             as_json: JsonOpt = False) -> None:
    """Your registered keys."""
    with api_client(server, token) as api:
        rows = api.get("/users/me/ssh-keys")
    if as_json:
        print_json(rows)
        return
    print_table(rows, [("id", "ID", None), ("name", "NAME", None),
                       ("fingerprint", "FINGERPRINT", None)])
