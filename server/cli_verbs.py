"""Operator verbs over the server's API: `emu sites`, `faults`, `telemetry`, `users`, `tokens`.

`register(app)` attaches them to the `emu` root. Every verb takes `--server URL` and `--token`
(or `EMU_SERVER_URL`, `EMU_TOKEN`) and prints a table, or the API's JSON with `--json` for
scripts. Exit codes: 0 ok, 1 the server could not be reached or refused the request (the
message says why), 2 usage.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import typer

from server.client import ApiClient, ApiError, ClientError

DEFAULT_SERVER = "http://127.0.0.1:8080"
SERVER_ENV = "EMU_SERVER_URL"
TOKEN_ENV = "EMU_TOKEN"  # noqa: S105 - the variable's name, not a token

ServerOpt = Annotated[
    str, typer.Option("--server", envvar=SERVER_ENV, help="server base URL", show_default=True)
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar=TOKEN_ENV, help="API bearer token",
                             show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON (for scripts)")]
LimitOpt = Annotated[int, typer.Option("--limit", min=1, max=1000, help="rows to show")]

Column = tuple[str, str, Callable[[Any], str] | None]
"""(key, header, formatter) of a table column."""


# --- connection and output -------------------------------------------------------------------


@contextmanager
def api_client(server: str, token: str | None) -> Iterator[ApiClient]:
    """A client for the duration of a verb; client errors become a message and exit 1."""
    if not token:
        raise typer.BadParameter(f"no API token: pass --token or set {TOKEN_ENV}",
                                 param_hint="--token")
    if not re.match(r"^https?://", server):
        raise typer.BadParameter("must start with http:// or https://", param_hint="--server")
    try:
        with ApiClient(server, token) as client:
            yield client
    except ApiError as exc:
        hint = f" (check --token / {TOKEN_ENV})" if exc.status == 401 else ""
        typer.secho(f"error: the server refused: {exc.detail} [{exc.status}]{hint}",
                    err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    except ClientError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc


def _env_connection() -> tuple[str, str | None]:
    """Server and token from the environment, for a group invoked without a verb."""
    return os.environ.get(SERVER_ENV, DEFAULT_SERVER), os.environ.get(TOKEN_ENV)


def format_time(value: Any) -> str:
    """An API timestamp as `YYYY-MM-DD HH:MM:SS` UTC."""
    if not isinstance(value, str):
        return "-"
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
    """Rows as aligned text columns under a header."""
    cells = [
        [(fmt or _cell)(row.get(key)) for key, _, fmt in columns] for row in rows
    ]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def print_json(data: Any) -> None:
    """`--json` output: the API's own shape, for scripts."""
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def print_record(data: dict[str, Any], skip: Sequence[str] = ()) -> None:
    """One object as aligned `key  value` lines; timestamps shown in UTC."""
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key in skip:
            continue
        timestamp = key.endswith(("_at", "_seen", "_since")) and value
        shown = format_time(value) if timestamp else _cell(value)
        typer.echo(f"{key.ljust(width)}  {shown}")


def print_footer(page: dict[str, Any]) -> None:
    """Say when a list shows only part of what matched."""
    shown = len(page["data"])
    if page["count"] > shown:
        typer.echo(f"({shown} of {page['count']}; use --limit/--offset for more)")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`90s`, `15m`, `1h`, `2d`, `1w` before now, or an ISO-8601 time (UTC if no zone)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(value.strip().lower())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (90s, 15m, 1h, 2d, 1w) nor an ISO-8601 time"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


# --- emu sites -------------------------------------------------------------------------------

sites_app = typer.Typer(
    help="Sites you may see. Without a verb: `list`.", invoke_without_command=True,
    no_args_is_help=False,
)

SITE_COLUMNS: list[Column] = [
    ("id", "ID", None), ("code", "CODE", None), ("name", "NAME", None),
    ("org_id", "ORG", None), ("timezone", "TIMEZONE", None),
]
UNIT_COLUMNS: list[Column] = [
    ("id", "ID", None), ("device", "DEVICE", None), ("model", "MODEL", None),
    ("serial", "SERIAL", None), ("firmware", "FIRMWARE", None),
    ("comm_lost", "COMM LOST", None), ("last_seen", "LAST SEEN", format_time),
]


def _list_sites(
    server: str, token: str | None, org: int | None, limit: int, offset: int, as_json: bool
) -> None:
    with api_client(server, token) as api:
        page = api.get("/sites", org_id=org, limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    print_table(page["data"], SITE_COLUMNS)
    print_footer(page)


@sites_app.callback()
def sites_default(ctx: typer.Context) -> None:
    """Sites you may see (a customer: its own organisation's)."""
    if ctx.invoked_subcommand is None:
        server, token = _env_connection()
        _list_sites(server, token, None, 100, 0, False)


@sites_app.command("list")
def sites_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    org: Annotated[int | None, typer.Option("--org", min=1, help="organisation id")] = None,
    limit: LimitOpt = 100,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List sites."""
    _list_sites(server, token, org, limit, offset, as_json)


@sites_app.command("show")
def sites_show(
    site: Annotated[str, typer.Argument(help="site id or code")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One site and its units."""
    with api_client(server, token) as api:
        if site.isdigit():
            record = api.get(f"/sites/{int(site)}")
        else:
            found = api.get("/sites", code=site, limit=1)["data"]
            if not found:
                raise ApiError(404, f"site {site!r} not found")
            record = found[0]
        units = api.get("/units", site_id=record["id"], limit=1000)
    if as_json:
        print_json({**record, "units": units["data"]})
        return
    print_record(record)
    typer.echo("")
    print_table(units["data"], UNIT_COLUMNS)


# --- emu faults ------------------------------------------------------------------------------

faults_app = typer.Typer(
    help="Faults (classes A-D) of the sites you may see. Without a verb: open faults.",
    invoke_without_command=True, no_args_is_help=False,
)

FAULT_COLUMNS: list[Column] = [
    ("id", "ID", None), ("fault_class", "CLASS", None), ("state", "STATE", None),
    ("site_id", "SITE", None), ("unit_id", "UNIT", None), ("code", "CODE", None),
    ("title", "TITLE", None), ("opened_at", "OPENED (UTC)", format_time),
    ("cleared_at", "CLEARED (UTC)", format_time),
]


def _list_faults(server: str, token: str | None, as_json: bool, **params: Any) -> None:
    with api_client(server, token) as api:
        page = api.get("/faults", **params)
    if as_json:
        print_json(page)
        return
    print_table(page["data"], FAULT_COLUMNS)
    print_footer(page)


@faults_app.callback()
def faults_default(ctx: typer.Context) -> None:
    """Open faults, newest first."""
    if ctx.invoked_subcommand is None:
        server, token = _env_connection()
        _list_faults(server, token, False, state="open", limit=100)


@faults_app.command("list")
def faults_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    fault_class: Annotated[
        list[str] | None,
        typer.Option("--class", "-c", help="A, B, C or D (repeatable)", show_default=False),
    ] = None,
    state: Annotated[
        Literal["open", "cleared"] | None, typer.Option("--state", help="open or cleared")
    ] = None,
    site: Annotated[str | None, typer.Option("--site", help="site code")] = None,
    unit: Annotated[int | None, typer.Option("--unit", min=1, help="unit id")] = None,
    since: Annotated[str | None, typer.Option("--since", help="1h, 2d, ... or ISO time")] = None,
    limit: LimitOpt = 100,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List faults, newest first."""
    classes = [c.upper() for c in fault_class or []]
    bad = [c for c in classes if c not in ("A", "B", "C", "D")]
    if bad:
        raise typer.BadParameter(f"unknown class {bad[0]!r}; use A, B, C or D",
                                 param_hint="--class")
    start = parse_since(since).isoformat() if since else None
    _list_faults(server, token, as_json, **{"class": classes}, state=state, site=site,
                 unit_id=unit, since=start, limit=limit, offset=offset)


@faults_app.command("show")
def faults_show(
    fault_id: Annotated[int, typer.Argument(min=1, help="fault id")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One fault with its evidence."""
    with api_client(server, token) as api:
        record = api.get(f"/faults/{fault_id}")
    if as_json:
        print_json(record)
        return
    print_record(record)


# --- emu telemetry ---------------------------------------------------------------------------

POINT_COLUMNS: list[Column] = [
    ("point", "POINT", None), ("value", "VALUE", None), ("text", "TEXT", None),
    ("quality", "QUALITY", None), ("ts", "TIME (UTC)", format_time),
]
RAW_COLUMNS: list[Column] = [
    ("ts", "TIME (UTC)", format_time), ("value", "VALUE", None), ("text", "TEXT", None),
    ("quality", "QUALITY", None),
]
ROLLUP_COLUMNS: list[Column] = [
    ("ts", "BUCKET (UTC)", format_time), ("value", "MEAN", None), ("min", "MIN", None),
    ("max", "MAX", None), ("count", "N", None),
]


def telemetry(
    unit_id: Annotated[int, typer.Argument(min=1, help="unit id (see `emu sites show`)")],
    point: Annotated[
        str | None, typer.Option("--point", "-p", help="point name; without it: latest values")
    ] = None,
    since: Annotated[str, typer.Option("--since", help="90s, 15m, 1h, 2d or ISO time")] = "1h",
    until: Annotated[str | None, typer.Option("--until", help="ISO time (default now)")] = None,
    rollup: Annotated[
        Literal["raw", "1m", "1h"], typer.Option("--rollup", help="raw, 1m or 1h")
    ] = "raw",
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="latest N rows")] = 1000,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Readings of a unit: the latest value of every point, or with --point a time series."""
    if point is None:
        with api_client(server, token) as api:
            points = api.get(f"/units/{unit_id}/points")
        if as_json:
            print_json(points)
        else:
            print_table(points, POINT_COLUMNS)
        return
    start = parse_since(since)
    end = parse_since(until) if until else None
    with api_client(server, token) as api:
        series = api.get(
            f"/units/{unit_id}/telemetry", point=point, rollup=rollup, limit=limit,
            start=start.isoformat(), end=end.isoformat() if end else None,
        )
    if as_json:
        print_json(series)
        return
    print_table(series["samples"], RAW_COLUMNS if rollup == "raw" else ROLLUP_COLUMNS)
    if series["truncated"]:
        typer.echo(f"(latest {limit} rows shown; narrow --since or raise --limit)")


# --- emu users / emu tokens ------------------------------------------------------------------

users_app = typer.Typer(help="Users of the API (admin), and who you are.", no_args_is_help=True)

USER_COLUMNS: list[Column] = [
    ("id", "ID", None), ("name", "NAME", None), ("role", "ROLE", None),
    ("org_id", "ORG", None), ("email", "E-MAIL", None),
    ("created_at", "CREATED (UTC)", format_time),
]
TOKEN_COLUMNS: list[Column] = [
    ("id", "ID", None), ("name", "NAME", None), ("created_at", "CREATED (UTC)", format_time),
    ("expires_at", "EXPIRES (UTC)", format_time), ("last_used", "LAST USED (UTC)", format_time),
]
DaysOpt = Annotated[
    float | None,
    typer.Option("--days", min=0.001, max=3650, help="lifetime in days (default 90)"),
]


@users_app.command("me")
def users_me(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
             as_json: JsonOpt = False) -> None:
    """The user your token belongs to."""
    with api_client(server, token) as api:
        record = api.get("/users/me")
    if as_json:
        print_json(record)
    else:
        print_record(record)


@users_app.command("list")
def users_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    role: Annotated[
        Literal["admin", "engineer", "customer"] | None, typer.Option("--role")
    ] = None,
    org: Annotated[int | None, typer.Option("--org", min=1, help="organisation id")] = None,
    limit: LimitOpt = 100,
    as_json: JsonOpt = False,
) -> None:
    """List users (admin)."""
    with api_client(server, token) as api:
        page = api.get("/users", role=role, org_id=org, limit=limit)
    if as_json:
        print_json(page)
        return
    print_table(page["data"], USER_COLUMNS)
    print_footer(page)


@users_app.command("set-password")
def users_set_password(
    user_id: Annotated[int, typer.Argument(min=1, help="the user's id (see `emu users list`)")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from standard input")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Set a user's dashboard password (admin); prompts twice unless --password-stdin."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("new password", hide_input=True, confirmation_prompt=True)
    if not 10 <= len(password) <= 200:
        raise typer.BadParameter("use 10 to 200 characters", param_hint="password")
    with api_client(server, token) as api:
        api.post(f"/users/{user_id}/password", {"password": password})
    typer.echo(f"password of user {user_id} set")


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="log-in name")],
    role: Annotated[Literal["admin", "engineer", "customer"], typer.Option("--role")],
    org: Annotated[int | None, typer.Option("--org", min=1, help="organisation id")] = None,
    email: Annotated[str | None, typer.Option("--email")] = None,
    with_token: Annotated[
        bool, typer.Option("--with-token", help="also issue a token and print it once")
    ] = False,
    days: DaysOpt = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a user (admin); a customer needs --org."""
    body = {"name": name, "role": role, "org_id": org, "email": email}
    with api_client(server, token) as api:
        user = api.post("/users", body)
        issued = (
            api.post(f"/users/{user['id']}/tokens", {"name": "initial", "expires_in_days": days}
                     if days else {"name": "initial"})
            if with_token else None
        )
    if as_json:
        print_json({**user, "token": issued})
        return
    print_record(user)
    if issued:
        typer.echo(f"\ntoken (shown once): {issued['token']}")


tokens_app = typer.Typer(help="Your own API tokens.", no_args_is_help=True)


@tokens_app.command("list")
def tokens_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                as_json: JsonOpt = False) -> None:
    """Your tokens (metadata only)."""
    with api_client(server, token) as api:
        page = api.get("/users/me/tokens", limit=1000)
    if as_json:
        print_json(page)
        return
    print_table(page["data"], TOKEN_COLUMNS)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option("--name", help="what the token is for")] = "token",
    days: DaysOpt = None,
    never: Annotated[bool, typer.Option("--no-expiry", help="a token that never expires")]
    = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new token for yourself; its secret is printed once."""
    if never and days is not None:
        raise typer.BadParameter("use either --days or --no-expiry", param_hint="--days")
    body: dict[str, Any] = {"name": name}
    if never:
        body["expires_in_days"] = None
    elif days is not None:
        body["expires_in_days"] = days
    with api_client(server, token) as api:
        created = api.post("/users/me/tokens", body)
    if as_json:
        print_json(created)
        return
    print_record(created, skip=("token",))
    typer.echo(f"\ntoken (shown once): {created['token']}")


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[int, typer.Argument(min=1, help="token id (see `emu tokens list`)")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Revoke one of your tokens."""
    with api_client(server, token) as api:
        api.delete(f"/users/me/tokens/{token_id}")
    typer.echo(f"token {token_id} revoked")


def register(app: typer.Typer) -> None:
    """Attach `sites`, `faults`, `telemetry`, `users` and `tokens` to the `emu` root app.

    `telemetry` is a single command (`emu telemetry UNIT_ID --point P`), not a group: click
    groups cannot take a positional argument before their verbs.
    """
    app.add_typer(sites_app, name="sites")
    app.add_typer(faults_app, name="faults")
    app.command("telemetry", no_args_is_help=True)(telemetry)
    app.add_typer(users_app, name="users")
    app.add_typer(tokens_app, name="tokens")
    from server.sessions.cli import app as session_app

    app.add_typer(session_app, name="session")
    from server.commissioning.cli import app as commissioning_app
    from server.tickets.cli import sla_app, tickets_app

    app.add_typer(commissioning_app, name="commissioning")
    app.add_typer(tickets_app, name="tickets")
    app.add_typer(sla_app, name="sla")
