"""Agent enrolment: one-time tokens, expiry, hashed and rotated broker passwords, the HTTP edge,
the agent's side (`agent/enrol.py`) and the broker files generated from the registry.

The router is mounted on a bare FastAPI app with the project's error mapping and a manual
clock; callers authenticate with real bearer tokens of real users in the test database.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import tomllib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import typer
from fastapi import FastAPI
from sqlmodel import col, select
from typer.testing import CliRunner

from agent.config import load_agent_settings
from agent.enrol import (
    EnrolmentError,
    enrol,
    enrol_command,
    enrol_url,
    request_credentials,
    update_toml,
)
from protocols.clock import ManualClock
from protocols.signing import generate_private_key
from server.api.enrolment import router
from server.api.errors import install_error_handlers
from server.broker_auth import (
    BrokerAuthError,
    PasswordEntry,
    agent_entries,
    broker_passwd_command,
    emqx_user,
    hash_password,
    parse_hash,
    render_acl,
    render_password_file,
    verify_password,
    write_password_file,
)
from server.commands.service import CommandService
from server.core.config import ServerSettings
from server.core.db import Database
from server.core.security import Unauthorized, hash_token, new_token
from server.enrolment import EnrolmentOptions, create_enrolment, redeem
from server.errors import Conflict
from server.models import Agent, ApiToken, Organisation, Site, User
from tests.support.net import free_tcp_port

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"
# `mosquitto_passwd -b FILE siteA secret123` (Mosquitto 2.0.11)
MOSQUITTO_LINE = (
    "siteA:$7$101$MBjc8X57jsJvmEzl$d5zZlaYuJgo/7KJB57heMdgUkiJ1skra4edqpRIMUgJ0xWgBEcefDFas72K"
    "it1E4u+8zI/VKkcs0fN0lUckFgQ=="
)


def _uid() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class Env:
    """An app with the enrolment router, its clock, and a fresh organisation with one site."""

    db: Database
    clock: ManualClock
    client: httpx.AsyncClient
    transport: httpx.ASGITransport
    site: str
    admin: dict[str, str]
    customer: dict[str, str]
    app: FastAPI


async def _user(db: Database, role: str, org_id: int | None) -> dict[str, str]:
    token = new_token()
    async with db.session() as s:
        user = User(name=f"{role}-{_uid()}", role=role, org_id=org_id)
        s.add(user)
        await s.flush()
        assert user.id is not None
        s.add(ApiToken(user_id=user.id, token_hash=hash_token(token)))
    return {"Authorization": f"Bearer {token}"}


async def _site(db: Database, org_id: int) -> str:
    code = f"s-{_uid()}"
    async with db.session() as s:
        s.add(Site(code=code, name=f"Site {code}", org_id=org_id))
    return code


@pytest.fixture
async def env(db: Database) -> AsyncIterator[Env]:
    clock = ManualClock(T0)
    app = FastAPI()
    app.state.db = db
    app.state.clock = clock.now
    app.state.enrolment = EnrolmentOptions(broker_url="mqtts://mqtt.test:8883", ca_pem=CA_PEM)
    app.state.commands = CommandService(
        ServerSettings(database_url=db.url, secret_key=secrets.token_hex(16)), db,
        key=generate_private_key())
    install_error_handlers(app)
    app.include_router(router, prefix="/api/v1")
    async with db.session() as s:
        org = Organisation(name=f"org-{_uid()}")
        s.add(org)
        await s.flush()
        assert org.id is not None
        org_id = org.id
    site = await _site(db, org_id)
    admin = await _user(db, "admin", None)
    customer = await _user(db, "customer", org_id)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emu.test") as client:
        yield Env(db, clock, client, transport, site, admin, customer, app)


async def _issue(env: Env, agent_id: str | None = None, ttl_s: int | None = None) -> str:
    body: dict[str, object] = {}
    if agent_id is not None:
        body["agent_id"] = agent_id
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    r = await env.client.post(f"/api/v1/sites/{env.site}/enrolments", json=body,
                              headers=env.admin)
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    token: str = r.json()["token"]
    return token


async def _agent(db: Database, agent_id: str) -> Agent:
    async with db.session() as s:
        agent = (await s.exec(select(Agent).where(Agent.agent_id == agent_id))).one()
    return agent


# --- the one-time token -------------------------------------------------------------------


async def test_token_gives_site_credentials_once(env: Env) -> None:
    token = await _issue(env)
    r = await env.client.post("/api/v1/enrol", json={"token": token, "agent_id": env.site})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["site"] == env.site
    assert body["agent_id"] == env.site
    assert body["broker_username"] == env.site  # the site code: what the ACL's %u matches
    assert body["broker_url"] == "mqtts://mqtt.test:8883"
    assert body["ca_pem"] == CA_PEM
    assert body["command_key"] == env.app.state.commands.public_key  # what agents must trust
    password = body["broker_password"]
    assert len(password) >= 40

    again = await env.client.post("/api/v1/enrol", json={"token": token, "agent_id": env.site})
    assert again.status_code == 409
    assert "used already" in again.json()["detail"]

    agent = await _agent(env.db, env.site)
    assert agent.enrolled_at == T0
    assert agent.enrolment_expires is None
    assert agent.mqtt_username == env.site


async def test_password_and_token_are_stored_hashed(env: Env) -> None:
    token = await _issue(env)
    pending = await _agent(env.db, env.site)
    assert pending.enrolment_token_hash == hash_token(token)
    assert token not in (pending.enrolment_token_hash or "")
    r = await env.client.post("/api/v1/enrol", json={"token": token, "agent_id": env.site})
    password = r.json()["broker_password"]
    agent = await _agent(env.db, env.site)
    stored = agent.mqtt_password_hash
    assert stored is not None
    assert password not in stored
    assert stored.startswith("$7$")
    assert verify_password(password, stored)
    assert not verify_password(password + "x", stored)


async def test_token_expires(env: Env) -> None:
    token = await _issue(env, ttl_s=3600)
    env.clock.advance(3600)
    r = await env.client.post("/api/v1/enrol", json={"token": token, "agent_id": env.site})
    assert r.status_code == 401
    assert "expired" in r.json()["detail"]
    assert (await _agent(env.db, env.site)).mqtt_username is None


async def test_token_works_until_just_before_expiry(env: Env) -> None:
    token = await _issue(env, ttl_s=3600)
    env.clock.advance(3599)
    r = await env.client.post("/api/v1/enrol", json={"token": token, "agent_id": env.site})
    assert r.status_code == 200, r.text


async def test_reenrolment_rotates_the_password(env: Env) -> None:
    first = await env.client.post(
        "/api/v1/enrol", json={"token": await _issue(env), "agent_id": env.site}
    )
    old = first.json()["broker_password"]
    env.clock.advance(60)
    second = await env.client.post(
        "/api/v1/enrol", json={"token": await _issue(env), "agent_id": env.site}
    )
    assert second.status_code == 200, second.text
    new = second.json()["broker_password"]
    assert new != old
    agent = await _agent(env.db, env.site)
    assert agent.mqtt_password_hash is not None
    assert verify_password(new, agent.mqtt_password_hash)
    assert not verify_password(old, agent.mqtt_password_hash)
    assert agent.enrolled_at == T0 + timedelta(seconds=60)


async def test_new_token_replaces_a_pending_one(env: Env) -> None:
    old = await _issue(env)
    new = await _issue(env)
    r = await env.client.post("/api/v1/enrol", json={"token": old, "agent_id": env.site})
    assert r.status_code == 401
    r = await env.client.post("/api/v1/enrol", json={"token": new, "agent_id": env.site})
    assert r.status_code == 200


async def test_replacement_gateway_takes_over_the_site_user(env: Env) -> None:
    gw1, gw2 = f"gw-{_uid()}", f"gw-{_uid()}"
    await env.client.post("/api/v1/enrol", json={"token": await _issue(env, gw1), "agent_id": gw1})
    r = await env.client.post(
        "/api/v1/enrol", json={"token": await _issue(env, gw2), "agent_id": gw2}
    )
    assert r.status_code == 200, r.text
    assert r.json()["broker_username"] == env.site
    old, new = await _agent(env.db, gw1), await _agent(env.db, gw2)
    assert old.mqtt_username is None
    assert old.mqtt_password_hash is None
    assert new.mqtt_username == env.site
    async with env.db.session() as s:
        entries = [e for e in await agent_entries(s) if e.username == env.site]
    assert len(entries) == 1
    assert verify_password(r.json()["broker_password"], entries[0].password_hash)


async def test_token_of_another_agent_is_refused_and_not_spent(env: Env) -> None:
    token = await _issue(env)
    r = await env.client.post("/api/v1/enrol", json={"token": token, "agent_id": "intruder"})
    assert r.status_code == 403
    r = await env.client.post("/api/v1/enrol", json={"token": token, "agent_id": env.site})
    assert r.status_code == 200


async def test_unknown_token_is_401(env: Env) -> None:
    r = await env.client.post("/api/v1/enrol", json={"token": new_token(), "agent_id": env.site})
    assert r.status_code == 401
    assert "unknown" in r.json()["detail"]


async def test_concurrent_redemptions_succeed_once(env: Env) -> None:
    async with env.db.session() as s:
        issued = await create_enrolment(s, env.site, env.site, now=T0)

    async def attempt() -> str:
        try:
            async with env.db.session() as s:
                await redeem(s, issued.token, env.site, now=T0)
        except (Conflict, Unauthorized) as exc:
            return type(exc).__name__
        return "ok"

    outcomes = sorted(await asyncio.gather(attempt(), attempt()))
    assert outcomes == ["Conflict", "ok"]


# --- who may issue, and bad input ---------------------------------------------------------


async def test_unknown_site_is_404(env: Env) -> None:
    r = await env.client.post("/api/v1/sites/no-such-site/enrolments", json={},
                              headers=env.admin)
    assert r.status_code == 404


async def test_only_admins_issue_tokens(env: Env) -> None:
    url = f"/api/v1/sites/{env.site}/enrolments"
    r = await env.client.post(url, json={}, headers=env.customer)
    assert r.status_code == 403
    r = await env.client.post(url, json={})
    assert r.status_code == 401


async def test_agent_of_another_site_is_409(env: Env) -> None:
    agent_id = f"gw-{_uid()}"
    await _issue(env, agent_id)
    async with env.db.session() as s:
        site = (await s.exec(select(Site).where(Site.code == env.site))).one()
        org_id = site.org_id
    other = await _site(env.db, org_id)
    r = await env.client.post(f"/api/v1/sites/{other}/enrolments", json={"agent_id": agent_id},
                              headers=env.admin)
    assert r.status_code == 409
    assert "another site" in r.json()["detail"]


async def test_site_coded_like_the_server_user_cannot_enrol(env: Env) -> None:
    env.app.state.enrolment = EnrolmentOptions(reserved_usernames=frozenset({env.site}))
    r = await env.client.post(f"/api/v1/sites/{env.site}/enrolments", json={},
                              headers=env.admin)
    assert r.status_code == 409
    assert "broker user of the server" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"ttl_s": 5},
        {"ttl_s": 400 * 86400},
        {"ttl_s": "soon"},
        {"agent_id": "bad/id"},
        {"agent_id": "x" * 65},
        {"agent_id": "$SYS"},
        {"unexpected": 1},
    ],
)
async def test_bad_issue_requests_are_422(env: Env, body: dict[str, object]) -> None:
    r = await env.client.post(f"/api/v1/sites/{env.site}/enrolments", json=body,
                              headers=env.admin)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("invalid request")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"token": "short", "agent_id": "a"},
        {"token": "x" * 43},
        {"token": "x" * 43, "agent_id": "a/b"},
        {"token": "x" * 43 + " y", "agent_id": "a"},
        {"token": 12345678901234567890, "agent_id": "a"},
        ["not", "an", "object"],
    ],
)
async def test_bad_enrol_requests_are_422(env: Env, body: object) -> None:
    r = await env.client.post("/api/v1/enrol", json=body)
    assert r.status_code == 422, r.text


async def test_malformed_json_is_422(env: Env) -> None:
    r = await env.client.post("/api/v1/enrol", content=b"{not json",
                              headers={"content-type": "application/json"})
    assert r.status_code == 422


async def test_bad_site_code_in_path_is_422(env: Env) -> None:
    r = await env.client.post("/api/v1/sites/$bad/enrolments", json={}, headers=env.admin)
    assert r.status_code == 422


# --- the agent's side ---------------------------------------------------------------------


async def test_agent_writes_credentials_into_its_config(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    original = (REPO / "deploy/agent/agent.toml").read_text(encoding="utf-8")
    config.write_text(original, encoding="utf-8")
    config.chmod(0o644)
    token = await _issue(env)

    creds = await enrol("http://emu.test", token, env.site, config, transport=env.transport)

    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    text = config.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    before = tomllib.loads(original)
    assert data["site"] == env.site
    assert data["agent_id"] == env.site
    ca_file = tmp_path / "emu-broker-ca.pem"
    assert ca_file.read_text(encoding="utf-8") == CA_PEM
    assert data["broker"] == {
        **before["broker"],
        "username": env.site,
        "password": creds.password,
        "url": "mqtts://mqtt.test:8883",
        "ca_file": str(ca_file),
    }
    for key in ("uplink", "spool", "local_mqtt", "devices", "state_dir"):
        assert data[key] == before[key]
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert comments
    assert all(line in text.splitlines() for line in comments)  # comments survive
    settings = load_agent_settings(config)
    assert settings.site == env.site
    assert settings.broker.username == env.site
    assert settings.broker.password == creds.password
    assert settings.commands.trusted == (env.app.state.commands.public_key,)
    agent = await _agent(env.db, env.site)
    assert agent.mqtt_password_hash is not None
    assert verify_password(creds.password, agent.mqtt_password_hash)


async def test_agent_creates_a_missing_config(env: Env, tmp_path: Path) -> None:
    env.app.state.enrolment = EnrolmentOptions()  # no URL, no CA: the agent keeps its own
    config = tmp_path / "new.toml"
    creds = await enrol("http://emu.test/api/v1/", await _issue(env), env.site, config,
                        transport=env.transport)
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    assert data == {
        "site": env.site,
        "agent_id": env.site,
        "broker": {"username": env.site, "password": creds.password},
        "commands": {"server_key": env.app.state.commands.public_key},
    }
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


async def test_refused_token_leaves_the_config_alone(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('site = "old"\n', encoding="utf-8")
    with pytest.raises(EnrolmentError, match="refused the enrolment: unknown enrolment token"):
        await enrol("http://emu.test", new_token(), env.site, config, transport=env.transport)
    assert config.read_text(encoding="utf-8") == 'site = "old"\n'


async def test_uneditable_config_fails_before_the_token_is_spent(
    env: Env, tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('site = "x"\nbroker = { url = "mqtt://h:1883" }\n', encoding="utf-8")
    token = await _issue(env)
    with pytest.raises(EnrolmentError, match="inline table"):
        await enrol("http://emu.test", token, env.site, config, transport=env.transport)
    config.write_text('site = "x"\n[broker]\nurl = "mqtt://h:1883"\n', encoding="utf-8")
    await enrol("http://emu.test", token, env.site, config, transport=env.transport)
    assert tomllib.loads(config.read_text(encoding="utf-8"))["broker"]["url"] == (
        "mqtts://mqtt.test:8883"
    )


async def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(EnrolmentError, match=r"cannot reach http://127\.0\.0\.1"):
        await request_credentials(f"http://127.0.0.1:{free_tcp_port()}", new_token(), "a",
                                  timeout=5)


def test_enrol_command_reports_failure_with_exit_1(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(enrol_command)
    result = CliRunner().invoke(app, [
        "--server", f"http://127.0.0.1:{free_tcp_port()}", "--token", new_token(),
        "--config", str(tmp_path / "agent.toml"), "--agent-id", "gw-1",
    ])
    assert result.exit_code == 1
    assert "enrolment failed: cannot reach" in result.output


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://emu.example.net", "https://emu.example.net/api/v1/enrol"),
        ("https://emu.example.net/", "https://emu.example.net/api/v1/enrol"),
        ("https://emu.example.net:8443/api/v1", "https://emu.example.net:8443/api/v1/enrol"),
    ],
)
def test_enrol_url(given: str, expected: str) -> None:
    assert enrol_url(given) == expected


def test_enrol_url_refuses_non_http() -> None:
    with pytest.raises(EnrolmentError, match="--server"):
        enrol_url("mqtt://emu.example.net")


def test_update_toml_keeps_comments_and_other_keys() -> None:
    text = (
        "# head\n"
        'site = "old"   # the site\n'
        "\n"
        "[broker]\n"
        'url = "mqtt://h:1883"\n'
        "password = 'p' # secret\n"
        "[spool]\n"
        "max_mb = 5\n"
    )
    out = update_toml(text, {None: {"site": "new", "agent_id": "gw"},
                             "broker": {"password": 'q"\\', "username": "new"}})
    assert 'site = "new"   # the site' in out
    assert 'password = "q\\"\\\\" # secret' in out
    assert tomllib.loads(out) == {
        "site": "new",
        "agent_id": "gw",
        "broker": {"url": "mqtt://h:1883", "password": 'q"\\', "username": "new"},
        "spool": {"max_mb": 5},
    }


def test_update_toml_refuses_dotted_broker_keys() -> None:
    with pytest.raises(EnrolmentError, match="cannot update it in place"):
        update_toml('broker.url = "mqtt://h"\n', {"broker": {"username": "u"}})


# --- broker files -------------------------------------------------------------------------


def test_deployed_acl_is_the_generated_one() -> None:
    assert (REPO / "deploy/mosquitto/acl").read_text(encoding="utf-8") == render_acl()


def test_hash_matches_mosquitto_passwd() -> None:
    _user_name, encoded = MOSQUITTO_LINE.split(":", 1)
    assert verify_password("secret123", encoded)
    assert not verify_password("secret124", encoded)
    salt = parse_hash(encoded).salt
    assert hash_password("secret123", salt=salt) == encoded


def test_hash_uses_fresh_printable_salts() -> None:
    a, b = hash_password("pw"), hash_password("pw")
    assert a != b
    assert verify_password("pw", a)
    assert verify_password("pw", b)
    assert parse_hash(a).salt.decode("ascii").isprintable()


@pytest.mark.parametrize(
    "encoded", ["", "plain", "$6$abc$def", "$7$x$c2FsdA==$a2V5", "$7$101$c2FsdA==$a2V5"]
)
def test_malformed_hashes_never_verify(encoded: str) -> None:
    assert not verify_password("pw", encoded)
    with pytest.raises(BrokerAuthError):
        parse_hash(encoded)


@pytest.mark.parametrize("name", ["", "a:b", "a b", "a\nb"])
def test_password_entries_refuse_bad_user_names(name: str) -> None:
    with pytest.raises(BrokerAuthError):
        PasswordEntry(name, hash_password("pw"))


def test_password_file_is_sorted_and_refuses_duplicates(tmp_path: Path) -> None:
    b, a = PasswordEntry("b", hash_password("1")), PasswordEntry("a", hash_password("2"))
    path = tmp_path / "passwd"
    assert write_password_file(path, [b, a]) == 2
    assert path.read_text(encoding="utf-8") == f"a:{a.password_hash}\nb:{b.password_hash}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with pytest.raises(BrokerAuthError, match="twice"):
        render_password_file([a, a])


def test_emqx_user_row() -> None:
    entry = PasswordEntry("site-1", hash_password("pw", salt=b"abcdefghijkl"))
    row = emqx_user(entry)
    parsed = parse_hash(entry.password_hash)
    assert row == {"user_id": "site-1", "password_hash": parsed.key.hex(),
                   "salt": "abcdefghijkl", "is_superuser": False}
    with pytest.raises(BrokerAuthError, match="not text"):
        emqx_user(PasswordEntry("x", hash_password("pw", salt=b"\xff\xfe")))


def test_broker_passwd_command_writes_agents_and_server(
    server_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def seed() -> tuple[str, str]:
        db = Database(server_db_url)
        try:
            async with db.session() as s:
                org = Organisation(name=f"org-{_uid()}")
                s.add(org)
                await s.flush()
                assert org.id is not None
                code = f"s-{_uid()}"
                s.add(Site(code=code, name=code, org_id=org.id))
            async with db.session() as s:
                issued = await create_enrolment(s, code, code, now=T0)
            async with db.session() as s:
                creds = await redeem(s, issued.token, code, now=T0)
        finally:
            await db.close()
        return code, creds.password

    code, password = asyncio.run(seed())
    monkeypatch.setenv("EMU_DATABASE_URL", server_db_url)
    monkeypatch.setenv("EMU_MQTT__USERNAME", "emu-server")
    monkeypatch.setenv("EMU_MQTT__PASSWORD", "server-secret")
    app = typer.Typer()
    app.command()(broker_passwd_command)
    out = tmp_path / "passwd"
    runner = CliRunner()

    result = runner.invoke(app, ["--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in out.read_text(encoding="utf-8").splitlines())
    assert verify_password(password, lines[code])
    assert verify_password("server-secret", lines["emu-server"])

    result = runner.invoke(app, ["--out", str(tmp_path / "users.json"), "--format", "emqx-json"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "users.json").read_text(encoding="utf-8"))
    assert {r["user_id"] for r in rows} >= {code, "emu-server"}


async def test_agent_entries_skip_unenrolled_agents(env: Env) -> None:
    await _issue(env, f"gw-{_uid()}")  # pending, no credentials yet
    async with env.db.session() as s:
        names = {e.username for e in await agent_entries(s)}
        pending = (
            await s.exec(select(Agent).where(col(Agent.mqtt_username).is_(None)))
        ).all()
    assert env.site not in names
    assert pending
