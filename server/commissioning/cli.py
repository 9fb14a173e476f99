"""`emu commissioning ...`: plans, runs, on-site results and reports over the server's API.

The after-sales lead creates and issues plans, the customer acknowledges them, technicians
record on-site results, and anyone allowed downloads the written plan and the report. Same
conventions as the other verbs (server/cli_verbs.py): `--server`/`--token` (or
`EMU_SERVER_URL`/`EMU_TOKEN`), `--json` for scripts, exit 1 when the server refuses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from server.cli_verbs import (
    DEFAULT_SERVER,
    Column,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    format_time,
    print_json,
    print_record,
    print_table,
)

app = typer.Typer(help="Commissioning plans, remote runs, on-site results and reports.",
                  no_args_is_help=True)

PLAN_COLUMNS: list[Column] = [
    ("number", "PLAN", None), ("site_id", "SITE", None), ("state", "STATE", None),
    ("mode", "MODE", None), ("version", "V", None), ("title", "TITLE", None),
    ("starts_on", "FROM", None), ("acknowledged_at", "ACKNOWLEDGED", format_time),
]
CHECK_COLUMNS: list[Column] = [
    ("check", "CHECK", None), ("source", "SOURCE", None),
    ("passed", "RESULT", lambda v: "PASS" if v else "FAIL"), ("detail", "EVIDENCE", None),
]
PlanArg = Annotated[int, typer.Argument(min=1, help="plan id (CP-0007 is 7)")]
OutOpt = Annotated[Path | None, typer.Option("--output", "-o", help="write to this file")]
_EQUIPMENT = re.compile(
    r"^(?P<series>[A-Z][A-Z0-9-]+):(?P<count>\d+)(?::(?P<serials>[^@]*))?(?:@(?P<fw>\S+))?$")
_TARGET = re.compile(r"^(?P<host>[^:/\s]+)(?::(?P<port>\d+))?(?:/(?P<ids>[\d,\- ]+))?$")


def parse_equipment(text: str) -> dict[str, Any]:
    """`EMU-BS:3` or `EMU-BS:3:SN1,SN2` or `EMU-PV:2@1.2.0` (required firmware)."""
    m = _EQUIPMENT.match(text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r}: expected SERIES:COUNT[:SERIAL,...][@FIRMWARE]",
                                 param_hint="--equipment")
    item: dict[str, Any] = {"series": m["series"], "count": int(m["count"])}
    if m["serials"]:
        item["serials"] = [s.strip() for s in m["serials"].split(",") if s.strip()]
    if m["fw"]:
        item["firmware"] = m["fw"]
    return item


def parse_target(text: str) -> dict[str, Any]:
    """`HOST[:PORT][/UNIT-IDS]`, e.g. `192.0.2.10:502/1-10`."""
    m = _TARGET.match(text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r}: expected HOST[:PORT][/1-10]", param_hint="--target")
    return {"host": m["host"], "port": int(m["port"] or 502), "unit_ids": m["ids"] or "1-10"}


def _show_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(plan)
        return
    print_record({k: v for k, v in plan.items()
                   if k not in ("equipment", "checklist", "targets", "technicians")})
    typer.echo(f"technicians      {', '.join(plan['technicians']) or '-'}")
    for item in plan["equipment"]:
        serials = ", ".join(item.get("serials") or []) or "-"
        typer.echo(f"equipment        {item['series']} x{item['count']} ({item.get('type')}); "
                   f"serials {serials}")
    for target in plan["targets"]:
        typer.echo(f"target           {target['host']}:{target['port']} ids {target['unit_ids']}")
    for series, items in plan["checklist"].items():
        typer.echo(f"checklist {series}: " + ", ".join(i["name"] for i in items))


def _write(data: bytes, output: Path | None) -> None:
    if output is None:
        typer.echo(data.decode("utf-8", errors="replace"))
        return
    output.write_bytes(data)
    typer.echo(f"wrote {output} ({len(data)} bytes)")


@app.command("list")
def list_plans(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
    site: Annotated[int | None, typer.Option("--site", min=1, help="site id")] = None,
    state: Annotated[str | None, typer.Option("--state", help="draft, issued, ...")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Plans you may see, newest first."""
    with api_client(server, token) as api:
        page = api.get("/commissioning/plans", site_id=site, state=state, limit=1000)
    if as_json:
        print_json(page)
    else:
        print_table(page["data"], PLAN_COLUMNS)


@app.command("show")
def show(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
         as_json: JsonOpt = False) -> None:
    """One plan: equipment, targets, technicians, checklist."""
    with api_client(server, token) as api:
        _show_plan(api.get(f"/commissioning/plans/{plan}"), as_json)


@app.command("create")
def create(
    site: Annotated[int, typer.Option("--site", min=1, help="site id")],
    title: Annotated[str, typer.Option("--title")],
    equipment: Annotated[list[str], typer.Option(
        "--equipment", "-e", help="SERIES:COUNT[:SERIAL,...][@FIRMWARE], repeatable")],
    mode: Annotated[Literal["remote", "onsite"], typer.Option("--mode")] = "remote",
    technician: Annotated[list[str] | None, typer.Option(
        "--technician", "-t", help="designated technician, repeatable")] = None,
    target: Annotated[list[str] | None, typer.Option(
        "--target", help="HOST[:PORT][/UNIT-IDS] the agent probes, repeatable")] = None,
    visits: Annotated[int, typer.Option("--visits", min=1)] = 1,
    starts_on: Annotated[str | None, typer.Option("--from", help="YYYY-MM-DD")] = None,
    ends_on: Annotated[str | None, typer.Option("--to", help="YYYY-MM-DD")] = None,
    ticket: Annotated[int | None, typer.Option("--ticket", min=1)] = None,
    notes: Annotated[str, typer.Option("--notes")] = "",
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """A draft plan (the checklist comes from each series' profile)."""
    body = {"site_id": site, "title": title, "mode": mode, "visits": visits,
            "equipment": [parse_equipment(e) for e in equipment],
            "technicians": technician or [], "targets": [parse_target(t) for t in target or []],
            "starts_on": starts_on, "ends_on": ends_on, "ticket_id": ticket, "notes": notes}
    with api_client(server, token) as api:
        _show_plan(api.post("/commissioning/plans", body), as_json)


@app.command("issue")
def issue(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Issue the plan: its next written version is stored for the customer."""
    with api_client(server, token) as api:
        doc = api.post(f"/commissioning/plans/{plan}/issue", {})
    typer.echo(f"issued {doc['title']}")


@app.command("acknowledge")
def acknowledge(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER,
                token: TokenOpt = None) -> None:
    """Acknowledge an issued plan (the customer)."""
    with api_client(server, token) as api:
        done = api.post(f"/commissioning/plans/{plan}/acknowledge", {})
    typer.echo(f"plan {done['number']} version {done['version']} acknowledged")


def _move(plan: int, move: str, server: str, token: str | None) -> None:
    with api_client(server, token) as api:
        done = api.post(f"/commissioning/plans/{plan}/{move}", {})
    typer.echo(f"plan {done['number']} is {done['state']}")


@app.command("schedule")
def schedule(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Schedule an acknowledged plan."""
    _move(plan, "schedule", server, token)


@app.command("complete")
def complete(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Complete the plan: units that passed join the fleet."""
    _move(plan, "complete", server, token)


@app.command("cancel")
def cancel(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Cancel the plan."""
    _move(plan, "cancel", server, token)


@app.command("run")
def run(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Send the remote check to the site's agent (`emu commissioning report` shows results)."""
    with api_client(server, token) as api:
        started = api.post(f"/commissioning/plans/{plan}/runs", {})
    typer.echo(f"run {started['id']} sent (command {started['command_id']})")


@app.command("record")
def record(
    plan: PlanArg,
    serial: Annotated[str | None, typer.Option("--serial", help="the unit's serial")] = None,
    check: Annotated[str | None, typer.Option("--check", help="checklist item")] = None,
    passed: Annotated[bool | None, typer.Option("--pass/--fail", help="the result")] = None,
    detail: Annotated[str, typer.Option("--detail", help="what was measured or seen")] = "",
    series: Annotated[str | None, typer.Option("--series")] = None,
    from_file: Annotated[Path | None, typer.Option(
        "--file", help='JSON list of {"serial", "check", "passed", "detail"...}')] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Record on-site results (one with --serial/--check/--pass, or many with --file)."""
    if from_file is not None:
        try:
            results = json.loads(from_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"{from_file}: {exc}", param_hint="--file") from exc
    elif serial and check and passed is not None:
        results = [{"serial": serial, "check": check, "passed": passed, "detail": detail,
                    "series": series}]
    else:
        raise typer.BadParameter("give --serial, --check and --pass/--fail, or --file")
    with api_client(server, token) as api:
        rows = api.post(f"/commissioning/plans/{plan}/results", {"results": results})
    typer.echo(f"{len(rows)} result(s) recorded")


@app.command("report")
def report(
    plan: PlanArg,
    fmt: Annotated[Literal["text", "json", "html", "pdf"], typer.Option("--format")] = "text",
    output: OutOpt = None,
    version: Annotated[int | None, typer.Option("--version", min=1)] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """The commissioning report: a summary (text), or the JSON, HTML or PDF document."""
    path = f"/commissioning/plans/{plan}/report"
    with api_client(server, token) as api:
        if fmt in ("html", "pdf"):
            _write(api.download(path, format=fmt, version=version), output)
            return
        data = api.get(path, version=version)
    if fmt == "json":
        _write(json.dumps(data, indent=2).encode(), output)
        return
    s = data["summary"]
    typer.echo(f"{data['title']}: {s['verdict'].upper()} - {s['passed']} passed, "
               f"{s['failed']} failed, {s['incomplete']} incomplete of {s['planned']} planned; "
               f"{s['missing']} missing, {s['unexpected']} unexpected")
    for m in data["missing"]:
        typer.echo(f"MISSING     {m['detail']}")
    for u in data["unexpected"]:
        typer.echo(f"UNEXPECTED  {u['series']} {u['serial']} at {u['address']}")
    for u in data["units"]:
        typer.echo(f"\n{u['series']} {u['serial']}: {u['status'].upper()}"
                   + (f" (pending: {', '.join(u['pending'])})" if u["pending"] else ""))
        print_table(u["checks"], CHECK_COLUMNS)


@app.command("document")
def document(
    plan: PlanArg,
    fmt: Annotated[Literal["html", "pdf"], typer.Option("--format")] = "pdf",
    output: OutOpt = None,
    version: Annotated[int | None, typer.Option("--version", min=1)] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """The written plan as issued (latest version unless --version)."""
    with api_client(server, token) as api:
        data = api.download(f"/commissioning/plans/{plan}/document", format=fmt,
                            version=version)
    _write(data, output)
