"""`emu release`, `emu plans`, `emu rollouts`: packages, written plans and rollouts.

`emu release keygen|build|sign` work offline on the release manager's machine (the signing
key never leaves it); `upload` and the plan and rollout verbs talk to the server's API with
`--server`/`--token` like every operator verb (server/cli_verbs.py).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from protocols.errors import PackageError, SignatureError
from protocols.packages import Fixes, Package, build_delta, build_full, sign_package
from protocols.signing import (
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_text,
)
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

release_app = typer.Typer(help="Upgrade packages: keygen, build, sign (offline), upload, list.",
                          no_args_is_help=True)
plans_app = typer.Typer(help="Written upgrade plans: create, issue, confirm, schedule, ...",
                        no_args_is_help=True)
rollouts_app = typer.Typer(help="Rollouts: progress of scheduled and running plans.",
                           no_args_is_help=True)

PlanArg = Annotated[int, typer.Argument(min=1, help="plan id")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(f"{path}: {exc.strerror or exc}", 2) from exc


def _page(server: str, token: str | None, path: str, columns: list[Column], as_json: bool,
          **params: Any) -> None:
    """One list verb: the API's page as a table (or its JSON)."""
    with api_client(server, token) as api:
        page = api.get(path, limit=1000, **params)
    if as_json:
        print_json(page)
        return
    print_table(page["data"], columns)
    print_footer(page)


# --- emu release -----------------------------------------------------------------------------


@release_app.command("keygen")
def release_keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="private key file to write")],
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Make a release signing key (PEM, mode 0600) and print its public key for the server
    (`upgrades.release_keys`) and the agents (`upgrades.release_keys`)."""
    if out.exists() and not force:
        raise _fail(f"{out} exists; pass --force to replace it", 2)
    key = generate_private_key()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))
    typer.echo(f"private key: {out} (keep it offline; only `emu release sign` needs it)")
    typer.echo(f"public key:  {public_key_text(key)}")


@release_app.command("build")
def release_build(
    image: Annotated[Path, typer.Argument(help="the firmware image (emu sim image makes one)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="package file to write")],
    base: Annotated[Path | None, typer.Option(
        "--base", help="the previous version's image: build a delta against it")] = None,
    minimum_version: Annotated[str | None, typer.Option(
        "--minimum-version", help="oldest version it installs over")] = None,
    fault: Annotated[list[str] | None, typer.Option(
        "--fixes-fault", help="a fault code it fixes (repeatable)")] = None,
    ticket: Annotated[list[int] | None, typer.Option(
        "--fixes-ticket", min=1, help="a ticket id it fixes (repeatable)")] = None,
    notes: Annotated[str, typer.Option("--notes", help="release notes")] = "",
) -> None:
    """Build an unsigned package (manifest + image, or a bsdiff4 delta with --base)."""
    data = _read(image)
    fixes = Fixes(fault_codes=tuple(fault or ()), tickets=tuple(ticket or ()))
    now = datetime.now(UTC)
    try:
        if base is None:
            pkg = build_full(data, created_at=now, minimum_version=minimum_version,
                             fixes=fixes, notes=notes)
        else:
            pkg = build_delta(_read(base), data, created_at=now,
                              minimum_version=minimum_version, fixes=fixes, notes=notes)
    except PackageError as exc:
        raise _fail(str(exc), 2) from exc
    out.write_bytes(pkg.to_bytes())
    m = pkg.manifest
    typer.echo(f"{out}: {m.name}, payload {m.size} bytes (image {m.image_size}), unsigned")


@release_app.command("sign")
def release_sign(
    package: Annotated[Path, typer.Argument(help="package from `emu release build`")],
    key: Annotated[Path, typer.Option("--key", help="release signing key (PEM)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="default: in place")] = None,
) -> None:
    """Sign a package with the release key (Ed25519 over the canonical manifest)."""
    try:
        pkg = Package.parse(_read(package))
        signed = sign_package(pkg, load_private_key(_read(key), str(key)))
    except (PackageError, SignatureError) as exc:
        raise _fail(str(exc), 2) from exc
    (out or package).write_bytes(signed.to_bytes())
    typer.echo(f"{out or package}: {signed.manifest.name} signed by key "
               f"{signed.manifest.key_id}")


RELEASE_COLUMNS: list[Column] = [
    ("id", "ID", None), ("series", "SERIES", None), ("version", "VERSION", None),
    ("kind", "KIND", None), ("base_version", "BASE", None), ("size", "BYTES", None),
    ("minimum_version", "MIN", None), ("uploaded_at", "UPLOADED (UTC)", format_time),
]


@release_app.command("upload")
def release_upload(
    package: Annotated[Path, typer.Argument(help="signed package")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Upload a signed package; the server verifies signature and hash before accepting."""
    data = _read(package)
    with api_client(server, token) as api:
        row = api.request("POST", "/releases", content=data)
    if as_json:
        print_json(row)
        return
    typer.echo(f"release {row['id']}: {row['series']} {row['version']} ({row['kind']}) accepted")


@release_app.command("list")
def release_list(
    series: Annotated[str | None, typer.Option("--series")] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Uploaded packages, newest first."""
    _page(server, token, "/releases", RELEASE_COLUMNS, as_json, series=series)


# --- emu plans -------------------------------------------------------------------------------

PLAN_COLUMNS: list[Column] = [
    ("id", "ID", None), ("state", "STATE", None), ("title", "TITLE", None),
    ("series", "SERIES", None), ("release_id", "RELEASE", None), ("org_id", "ORG", None),
    ("counts", "UNITS", None), ("created_at", "CREATED (UTC)", format_time),
]


def _show_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(plan)
        return
    print_record(plan)


@plans_app.command("list")
def plans_list(
    state: Annotated[str | None, typer.Option("--state")] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Plans you may see (a customer: its organisation's)."""
    _page(server, token, "/plans", PLAN_COLUMNS, as_json, state=state)


@plans_app.command("show")
def plans_show(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
               as_json: JsonOpt = False) -> None:
    """One plan with its 30-day delivery clock."""
    with api_client(server, token) as api:
        _show_plan(api.get(f"/plans/{plan}"), as_json)


@plans_app.command("create")
def plans_create(
    spec: Annotated[Path, typer.Argument(help="JSON file with the plan's fields "
                                              "(docs/upgrades.md)")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Write a draft plan from a JSON file."""
    try:
        body = json.loads(_read(spec))
    except ValueError as exc:
        raise _fail(f"{spec}: not JSON: {exc}", 2) from exc
    with api_client(server, token) as api:
        _show_plan(api.post("/plans", body), as_json)


def _action(name: str, help_text: str) -> None:
    def command(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                as_json: JsonOpt = False) -> None:
        with api_client(server, token) as api:
            _show_plan(api.post(f"/plans/{plan}/{name}", {}), as_json)

    command.__doc__ = help_text
    plans_app.command(name)(command)


_action("issue", "Fix the targets and issue the written plan (HTML + PDF) to the customer.")
_action("revise", "Take an issued plan back to draft.")
_action("schedule", "The vendor confirms the customer's window; the rollout may start.")
_action("pause", "Start nothing new (running installs finish).")
_action("resume", "Carry on after a pause.")


@plans_app.command("abort")
def plans_abort(plan: PlanArg, reason: Annotated[str, typer.Option("--reason")] = "",
                server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                as_json: JsonOpt = False) -> None:
    """Stop for good; units not started are left untouched."""
    with api_client(server, token) as api:
        _show_plan(api.post(f"/plans/{plan}/abort", {"reason": reason}), as_json)


@plans_app.command("confirm")
def plans_confirm(
    plan: PlanArg,
    window: Annotated[int, typer.Option("--window", min=0, help="index of the window")],
    personnel: Annotated[list[str], typer.Option("--personnel", help="on-site (repeatable)")],
    sign: Annotated[str, typer.Option("--sign", help="your full name, as signature")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """(Customer) confirm a plan: pick a window, name your personnel, sign."""
    body = {"window": window, "personnel": personnel, "signature": sign}
    with api_client(server, token) as api:
        _show_plan(api.post(f"/plans/{plan}/confirm", body), as_json)


@plans_app.command("checkin")
def plans_checkin(
    plan: PlanArg, site: Annotated[int, typer.Option("--site", min=1, help="site id")],
    name: Annotated[str, typer.Option("--name", help="who is on site")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """(Customer) your personnel are on site: the site may start."""
    with api_client(server, token) as api:
        _show_plan(api.post(f"/plans/{plan}/checkin", {"site_id": site, "name": name}), as_json)


@plans_app.command("document")
def plans_document(
    plan: PlanArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write (.pdf or .html)")],
    version: Annotated[int | None, typer.Option("--version", min=1,
                                                help="default: the latest")] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Save the written plan (PDF or HTML, by the file's suffix)."""
    fmt = "pdf" if out.suffix.lower() == ".pdf" else "html"
    with api_client(server, token) as api:
        if version is None:
            docs = api.get(f"/plans/{plan}/documents")
            if not docs:
                raise _fail(f"plan {plan} has not been issued yet")
            version = int(docs[-1]["version"])
        data = api.download(f"/plans/{plan}/documents/{version}.{fmt}")
    out.write_bytes(data)
    typer.echo(f"{out}: plan {plan} version {version}")


# --- emu rollouts ----------------------------------------------------------------------------

TARGET_COLUMNS: list[Column] = [
    ("wave", "WAVE", None), ("site_id", "SITE", None), ("device", "DEVICE", None),
    ("state", "STATE", None), ("stage", "STAGE", None), ("from_version", "FROM", None),
    ("to_version", "TO", None), ("finished_at", "FINISHED (UTC)", format_time),
]


@rollouts_app.command("list")
def rollouts_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Scheduled, running and finished rollouts."""
    _page(server, token, "/rollouts", PLAN_COLUMNS, as_json)


@rollouts_app.command("show")
def rollouts_show(plan: PlanArg, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Every unit of a rollout with its wave, state and latest stage."""
    with api_client(server, token) as api:
        rows = api.get(f"/rollouts/{plan}")
    if as_json:
        print_json(rows)
        return
    print_table(rows, TARGET_COLUMNS)


def register(app: typer.Typer) -> None:
    """Attach `release`, `plans` and `rollouts` to the `emu` root app."""
    app.add_typer(release_app, name="release")
    app.add_typer(plans_app, name="plans")
    app.add_typer(rollouts_app, name="rollouts")
