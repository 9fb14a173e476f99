"""`emu sites|faults|telemetry|users|tokens` against a live uvicorn server on a free port.

The verbs are synchronous (httpx), so each runs in a worker thread while the server serves
on the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta

import pytest
import typer
import uvicorn
from typer.testing import CliRunner, Result

from server.cli_verbs import parse_since, register
from server.core.db import Database
from tests.server.test_api_common import NOW, POINT, RAW_COUNT, World, seed_world
from tests.support.net import free_tcp_port
from tests.support.waiting import wait_for

emu = typer.Typer(name="emu", no_args_is_help=True)
register(emu)


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world."""
    return await seed_world(db)


@pytest.fixture
async def server_url(world: World) -> AsyncIterator[str]:
    """The world's app served by uvicorn on 127.0.0.1 (port chosen by the OS)."""
    config = uvicorn.Config(world.app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started or task.done(), 10, "uvicorn to start")
    if task.done():
        task.result()
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await wait_for(task, 10, "uvicorn to stop")


async def run(args: list[str], env: Mapping[str, str] | None = None) -> Result:
    """Invoke `emu ARGS` in a worker thread (the server runs on this loop)."""
    runner = CliRunner()
    base = {"EMU_SERVER_URL": "", "EMU_TOKEN": ""}
    merged = {**base, **(env or {})}
    return await asyncio.to_thread(lambda: runner.invoke(emu, args, env=merged))


def auth(url: str, token: str) -> list[str]:
    """`--server URL --token TOKEN`."""
    return ["--server", url, "--token", token]


async def test_sites_list_table_and_json(world: World, server_url: str) -> None:
    table = await run(["sites", "list", *auth(server_url, world.own.token)])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["ID", "CODE", "NAME", "ORG", "TIMEZONE"]
    assert world.own.site_code in table.output
    assert world.other.site_code not in table.output
    as_json = await run(["sites", "list", "--json", *auth(server_url, world.own.token)])
    assert as_json.exit_code == 0
    assert [s["id"] for s in json.loads(as_json.output)["data"]] == [world.own.site_id]


async def test_sites_without_verb_lists_from_environment(world: World, server_url: str) -> None:
    result = await run(["sites"], env={"EMU_SERVER_URL": server_url, "EMU_TOKEN": world.own.token})
    assert result.exit_code == 0, result.output
    assert world.own.site_code in result.output


async def test_sites_show_by_code_and_id(world: World, server_url: str) -> None:
    by_code = await run(["sites", "show", world.own.site_code,
                         *auth(server_url, world.engineer_token)])
    assert by_code.exit_code == 0, by_code.output
    assert "Europe/Berlin" in by_code.output
    assert f"emu-{world.own.marker}" in by_code.output
    by_id = await run(["sites", "show", str(world.own.site_id), "--json",
                       *auth(server_url, world.engineer_token)])
    shown = json.loads(by_id.output)
    assert shown["code"] == world.own.site_code
    assert [u["id"] for u in shown["units"]] == [world.own.unit_id]


async def test_sites_show_of_another_organisation_is_not_found(
    world: World, server_url: str
) -> None:
    for site in (world.other.site_code, str(world.other.site_id)):
        result = await run(["sites", "show", site, *auth(server_url, world.own.token)])
        assert result.exit_code == 1
        assert "not found" in result.output
        assert "404" in result.output


async def test_faults_list_with_filters(world: World, server_url: str) -> None:
    result = await run(["faults", "list", "--class", "A", "--state", "open",
                        "--site", world.own.site_code, "--json",
                        *auth(server_url, world.engineer_token)])
    assert result.exit_code == 0, result.output
    assert [f["id"] for f in json.loads(result.output)["data"]] == [world.own.fault_ids[0]]
    table = await run(["faults", "list", "-c", "a", "-c", "b", "--site", world.own.site_code,
                       *auth(server_url, world.engineer_token)])
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split()[:3] == ["ID", "CLASS", "STATE"]
    assert len(table.output.splitlines()) == 1 + 3


async def test_faults_show(world: World, server_url: str) -> None:
    result = await run(["faults", "show", str(world.own.fault_ids[1]),
                        *auth(server_url, world.own.token)])
    assert result.exit_code == 0, result.output
    assert f"fault B {world.own.marker}" in result.output


async def test_telemetry_series_and_rollup(world: World, server_url: str) -> None:
    since = (NOW - timedelta(hours=1)).isoformat()
    raw = await run(["telemetry", str(world.own.unit_id), "--point", POINT, "--since", since,
                     "--until", NOW.isoformat(), "--json", *auth(server_url, world.own.token)])
    assert raw.exit_code == 0, raw.output
    assert len(json.loads(raw.output)["samples"]) == RAW_COUNT
    table = await run(["telemetry", str(world.own.unit_id), "-p", POINT, "--since", since,
                       "--until", NOW.isoformat(), "--rollup", "1m", "--limit", "3",
                       *auth(server_url, world.own.token)])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["BUCKET", "(UTC)", "MEAN"]
    assert len(lines) == 1 + 3 + 1
    assert "latest 3 rows" in lines[-1]


async def test_telemetry_without_point_shows_latest_values(
    world: World, server_url: str
) -> None:
    result = await run(["telemetry", str(world.own.unit_id), *auth(server_url, world.own.token)])
    assert result.exit_code == 0, result.output
    assert POINT in result.output
    assert world.own.marker in result.output  # the text point's value


async def test_users_and_tokens(world: World, server_url: str) -> None:
    me = await run(["users", "me", *auth(server_url, world.own.token)])
    assert me.exit_code == 0, me.output
    assert f"cust-{world.own.marker}" in me.output
    created = await run(["tokens", "create", "--name", "ci", "--days", "7", "--json",
                         *auth(server_url, world.own.token)])
    assert created.exit_code == 0, created.output
    token = json.loads(created.output)
    listed = await run(["tokens", "list", *auth(server_url, token["token"])])
    assert "ci" in listed.output
    revoked = await run(["tokens", "revoke", str(token["id"]), *auth(server_url, token["token"])])
    assert revoked.exit_code == 0
    after = await run(["users", "me", *auth(server_url, token["token"])])
    assert after.exit_code == 1
    assert "401" in after.output
    assert "EMU_TOKEN" in after.output


async def test_admin_creates_user_with_token(world: World, server_url: str) -> None:
    name = f"cli-{world.own.marker}"
    result = await run(["users", "create", name, "--role", "customer", "--org",
                        str(world.own.org_id), "--with-token", "--json",
                        *auth(server_url, world.admin_token)])
    assert result.exit_code == 0, result.output
    token = json.loads(result.output)["token"]["token"]
    sites = await run(["sites", "list", "--json", *auth(server_url, token)])
    assert [s["id"] for s in json.loads(sites.output)["data"]] == [world.own.site_id]
    refused = await run(["users", "list", *auth(server_url, world.own.token)])
    assert refused.exit_code == 1
    assert "requires role admin" in refused.output


async def test_connection_refused_is_exit_1() -> None:
    url = f"http://127.0.0.1:{free_tcp_port()}"
    result = await run(["faults", "list", "--server", url, "--token", "t"])
    assert result.exit_code == 1
    assert f"cannot reach the server at {url}" in result.output


async def test_bad_token_is_exit_1_with_hint(world: World, server_url: str) -> None:
    result = await run(["sites", "list", *auth(server_url, "wrong")])
    assert result.exit_code == 1
    assert "invalid token" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["sites", "list", "--server", "http://127.0.0.1:9"],  # no token
        ["sites", "list", "--server", "ftp://x", "--token", "t"],
        ["faults", "list", "--class", "E", "--token", "t"],
        ["faults", "list", "--state", "closed", "--token", "t"],
        ["faults", "list", "--since", "last tuesday", "--token", "t"],
        ["telemetry", "abc", "--token", "t"],
        ["telemetry", "0", "--token", "t"],
        ["telemetry", "5", "--point", "soc", "--rollup", "5m", "--token", "t"],
        ["telemetry", "5", "--point", "soc", "--since", "soon", "--token", "t"],
        ["tokens", "create", "--days", "3", "--no-expiry", "--token", "t"],
        ["faults", "frobnicate"],
    ],
)
async def test_usage_errors_exit_2(args: list[str]) -> None:
    result = await run(args)
    assert result.exit_code == 2, result.output


def test_parse_since() -> None:
    assert parse_since("90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_since("15m", NOW) == NOW - timedelta(minutes=15)
    assert parse_since("2d", NOW) == NOW - timedelta(days=2)
    assert parse_since("1w", NOW) == NOW - timedelta(weeks=1)
    assert parse_since("2031-03-14T11:00:00", NOW) == NOW - timedelta(hours=1)
    assert parse_since("2031-03-14T12:00:00+01:00", NOW) == NOW - timedelta(hours=1)


async def test_session_verbs(world: World, server_url: str) -> None:
    sid = world.own.session_id
    listed = await run(["session", "list", *auth(server_url, world.own.token)])
    assert listed.exit_code == 0, listed.output
    assert sid in listed.output
    other = await run(["session", "list", *auth(server_url, world.other.token)])
    assert sid not in other.output
    connect = await run(["session", "connect", sid, *auth(server_url, world.engineer_token)])
    assert connect.exit_code == 0, connect.output
    assert f"-p 2222 {sid}@127.0.0.1" in connect.output
    refused = await run(["session", "approve", sid, *auth(server_url, world.other.token)])
    assert refused.exit_code == 1
    assert "404" in refused.output
    denied = await run(["session", "deny", sid, "--note", "not now",
                        *auth(server_url, world.own.token)])
    assert denied.exit_code == 0, denied.output
    assert "denied" in denied.output
    usage = await run(["session", "request", "1", "--reason", "x",
                       *auth(server_url, world.engineer_token)])
    assert usage.exit_code == 2  # neither --shell nor --unit
