"""`emu tickets ...` and `emu sla report`: service requests and SLA figures over the API.

Same conventions as the other verbs (server/cli_verbs.py): `--server`/`--token` (or
`EMU_SERVER_URL`/`EMU_TOKEN`), `--json` for scripts, exit 1 when the server refuses, 2 for
usage errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer

from server.cli_verbs import (
    DEFAULT_SERVER,
    Column,
    JsonOpt,
    LimitOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    format_time,
    print_footer,
    print_json,
    print_record,
    print_table,
)
from server.sla.report import SlaReport, report_csv

tickets_app = typer.Typer(help="Service requests (tickets) with their SLA clocks.",
                          no_args_is_help=True)
sla_app = typer.Typer(help="SLA figures: the monthly compliance report.", no_args_is_help=True)

TicketArg = Annotated[int, typer.Argument(min=1, help="ticket id")]
TICKET_COLUMNS: list[Column] = [
    ("id", "ID", None), ("fault_class", "CLASS", None), ("state", "STATE", None),
    ("site_id", "SITE", None), ("source", "SOURCE", None), ("assignee", "ASSIGNEE", None),
    ("title", "TITLE", None), ("created_at", "OPENED (UTC)", format_time),
]
EVENT_COLUMNS: list[Column] = [
    ("ts", "TIME (UTC)", format_time), ("kind", "EVENT", None), ("actor", "BY", None),
    ("text", "TEXT", None),
]
CLOCK_COLUMNS: list[Column] = [
    ("kind", "CLOCK", None), ("target_s", "TARGET S", None), ("due_at", "DUE (UTC)", format_time),
    ("paused_for", "PAUSED", lambda v: ",".join(v) if v else "-"),
    ("outcome", "OUTCOME", None), ("warned_at", "WARNED", format_time),
    ("breached_at", "BREACHED", format_time),
]
REPORT_COLUMNS: list[Column] = [
    ("customer", "CUSTOMER", None), ("fault_class", "CLASS", None), ("tickets", "TICKETS", None),
    ("clocks_met", "MET", None), ("clocks_breached", "BREACHED", None),
    ("compliance_pct", "COMPLIANCE %", None), ("mtta_s", "MTTA S", None),
    ("mttr_s", "MTTR S", None),
]
BREACH_COLUMNS: list[Column] = [
    ("ticket_id", "TICKET", None), ("customer", "CUSTOMER", None), ("site", "SITE", None),
    ("fault_class", "CLASS", None), ("clock", "CLOCK", None), ("due_at", "DUE (UTC)", format_time),
    ("cause", "CAUSE", None),
]


def _show(ticket: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(ticket)
        return
    print_record(ticket, skip=("events", "links", "clocks", "parts", "unit_ids"))
    typer.echo("")
    print_table(ticket["clocks"], CLOCK_COLUMNS)
    typer.echo("")
    print_table(ticket["events"], EVENT_COLUMNS)


def _post(server: str, token: str | None, path: str, body: dict[str, Any],
          as_json: bool) -> None:
    with api_client(server, token) as api:
        answer = api.post(path, body)
    if "clocks" in answer:
        _show(answer, as_json)
    elif as_json:
        print_json(answer)
    else:
        print_record(answer)


@tickets_app.command("list")
def tickets_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    state: Annotated[list[str] | None, typer.Option("--state", help="repeatable")] = None,
    fault_class: Annotated[list[str] | None, typer.Option("--class", "-c")] = None,
    site: Annotated[int | None, typer.Option("--site", min=1, help="site id")] = None,
    assignee: Annotated[str | None, typer.Option("--assignee")] = None,
    open_only: Annotated[bool, typer.Option("--open", help="open tickets only")] = False,
    limit: LimitOpt = 100,
    as_json: JsonOpt = False,
) -> None:
    """Tickets you may see, newest first."""
    with api_client(server, token) as api:
        page = api.get("/tickets", state=state or [], **{"class": [c.upper() for c in
                                                                    fault_class or []]},
                       site_id=site, assignee=assignee, open=open_only or None, limit=limit)
    if as_json:
        print_json(page)
        return
    print_table(page["data"], TICKET_COLUMNS)
    print_footer(page)


@tickets_app.command("show")
def tickets_show(ticket_id: TicketArg, server: ServerOpt = DEFAULT_SERVER,
                 token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """One ticket: its fields, SLA clocks and timeline."""
    with api_client(server, token) as api:
        _show(api.get(f"/tickets/{ticket_id}"), as_json)


@tickets_app.command("create")
def tickets_create(
    site: Annotated[int, typer.Option("--site", min=1, help="site id")],
    title: Annotated[str, typer.Option("--title")],
    source: Annotated[Literal["phone", "portal", "upgrade_request"],
                      typer.Option("--source")] = "phone",
    fault_class: Annotated[str | None, typer.Option("--class", "-c", help="A-D")] = None,
    description: Annotated[str, typer.Option("--description")] = "",
    unit: Annotated[list[int] | None, typer.Option("--unit", min=1, help="repeatable")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open a ticket (a phone call, a portal request or an upgrade request)."""
    body = {"site_id": site, "title": title, "source": source, "description": description,
            "fault_class": fault_class.upper() if fault_class else None,
            "unit_ids": unit or []}
    _post(server, token, "/tickets", body, as_json)


@tickets_app.command("comment")
def tickets_comment(ticket_id: TicketArg, text: Annotated[str, typer.Argument()],
                    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                    as_json: JsonOpt = False) -> None:
    """Add a comment to the timeline."""
    _post(server, token, f"/tickets/{ticket_id}/comments", {"text": text}, as_json)


@tickets_app.command("move")
def tickets_move(
    ticket_id: TicketArg,
    state: Annotated[str, typer.Argument(help="acknowledged, in_progress, waiting_on_customer, "
                                              "awaiting_release, resolved, closed")],
    note: Annotated[str, typer.Option("--note")] = "",
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Move the ticket's state (acknowledge, resolve, close, reopen ...)."""
    _post(server, token, f"/tickets/{ticket_id}/transition", {"state": state, "note": note},
          as_json)


@tickets_app.command("assign")
def tickets_assign(ticket_id: TicketArg, assignee: Annotated[str, typer.Argument()],
                   server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Give the ticket to an engineer (user name)."""
    _post(server, token, f"/tickets/{ticket_id}/assign", {"assignee": assignee}, as_json)


@tickets_app.command("diagnose")
def tickets_diagnose(
    ticket_id: TicketArg,
    diagnosis: Annotated[str, typer.Option("--diagnosis")],
    solution: Annotated[str, typer.Option("--solution", help="the proposed solution")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Record the diagnosis and the proposed solution."""
    _post(server, token, f"/tickets/{ticket_id}/diagnosis",
          {"diagnosis": diagnosis, "proposed_solution": solution}, as_json)


@tickets_app.command("phone")
def tickets_phone(
    ticket_id: TicketArg,
    notes: Annotated[str, typer.Option("--notes")],
    outcome: Annotated[Literal["solved", "needs_remote_support", "follow_up"],
                       typer.Option("--outcome")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Record telephone support and its outcome."""
    _post(server, token, f"/tickets/{ticket_id}/phone", {"notes": notes, "outcome": outcome},
          as_json)


@sla_app.command("report")
def sla_report(
    month: Annotated[str, typer.Option("--month", help="YYYY-MM, e.g. 2026-11")],
    fmt: Annotated[Literal["table", "json", "csv"], typer.Option("--format")] = "table",
    org: Annotated[int | None, typer.Option("--org", min=1, help="one organisation")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """SLA compliance per class and customer, MTTA, MTTR and the breaches of a month."""
    with api_client(server, token) as api:
        data = api.get("/sla/report", month=month, org_id=org)
    if fmt == "json":
        print_json(data)
    elif fmt == "csv":
        typer.echo(report_csv(SlaReport.from_dict(data)), nl=False)
    else:
        typer.echo(f"SLA report {data['month']}")
        print_table(data["rows"], REPORT_COLUMNS)
        typer.echo("")
        typer.echo(f"breaches: {len(data['breaches'])}")
        if data["breaches"]:
            print_table(data["breaches"], BREACH_COLUMNS)
