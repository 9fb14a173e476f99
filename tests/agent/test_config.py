"""Agent configuration: one TOML file, `EMU_AGENT_*` overrides, and errors that name the key.

Also the CLI edge: `emu agent -c bad.toml` exits 2 with one clear message, `check-config` says ok
on a good file, and `emu agent status` shows the health file a running agent wrote.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.config import load_agent_settings
from agent.service import HEALTH_FILE
from emu.cli import app, register
from emu.settings import ConfigError
from tests.agent.agent_harness import running_agent
from tests.support.net import free_tcp_port
from tests.support.waiting import wait_for

runner = CliRunner()
register()

GOOD = """\
site = "site-1"

[broker]
url = "mqtt://127.0.0.1:1883"

[uplink]
compress = true

[[devices]]
name = "bs-1"
protocol = "modbus-tcp"
profile = "EMU-BS"
host = "127.0.0.1"
port = 5020
unit_id = 1

[[devices]]
name = "pv-1"
protocol = "modbus-tcp"
profile = "EMU-PV"
host = "127.0.0.1"
port = 5020
unit_id = 2
"""


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the EMU_AGENT_* variables it means; none leak in from the shell."""
    for name in [k for k in os.environ if k.startswith("EMU_AGENT_")]:
        monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_agent_settings(path)
    return str(info.value)


def test_good_file_loads(tmp_path: Path) -> None:
    settings = load_agent_settings(write(tmp_path, GOOD))
    assert settings.site == "site-1"
    assert settings.agent == "site-1"
    assert settings.uplink.compress is True
    assert (settings.broker.host, settings.broker.port) == ("127.0.0.1", 1883)
    assert [d.name for d in settings.devices] == ["bs-1", "pv-1"]
    assert settings.devices[1].unit_id == 2


@pytest.mark.parametrize(
    ("before", "after", "key"),
    [
        ('url = "mqtt://', 'urll = "mqtt://', "broker.urll"),
        ("compress = true", "compres = true", "uplink.compres"),
        ('site = "site-1"', 'site = "site-1"\nsitee = "x"', "sitee"),
        ("unit_id = 2", "unit = 2", "devices.1.unit"),
    ],
    ids=["broker", "uplink", "top-level", "device"],
)
def test_typo_is_an_unknown_key_naming_file_and_key(
    tmp_path: Path, before: str, after: str, key: str
) -> None:
    path = write(tmp_path, GOOD.replace(before, after, 1))
    message = config_error(path)
    assert message == f"{path}: {key}: unknown key (check the spelling)"


@pytest.mark.parametrize(
    ("before", "after", "named"),
    [
        ("port = 5020", "port = 0", "devices.0.port"),
        ('protocol = "modbus-tcp"', 'protocol = "modbus-udp"', "devices.0.protocol"),
        ('host = "127.0.0.1"\n', "", "devices.0: a modbus-tcp device needs host"),
        ('name = "pv-1"', 'name = "bs-1"', "duplicate name bs-1"),
        ('site = "site-1"', 'site = "site/1"', "site"),
        ('site = "site-1"', 'site = "$SYS"', "site"),
        ('url = "mqtt://127.0.0.1:1883"', 'url = "http://127.0.0.1"', "broker.url"),
        ("compress = true", "compress = 3", "uplink.compress"),
        ('site = "site-1"\n', "", "site: Field required"),
    ],
    ids=["port-0", "unknown-protocol", "tcp-without-host", "duplicate-name", "site-slash",
         "site-dollar", "broker-scheme", "not-a-bool", "no-site"],
)
def test_bad_value_is_named(tmp_path: Path, before: str, after: str, named: str) -> None:
    path = write(tmp_path, GOOD.replace(before, after, 1))
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert named in message


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    assert "no such configuration file" in config_error(tmp_path / "missing.toml")
    assert "not valid TOML" in config_error(write(tmp_path, "site = \n"))


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMU_AGENT_BROKER__URL", "mqtts://broker.example.com")
    monkeypatch.setenv("EMU_AGENT_SITE", "site-2")
    monkeypatch.setenv("EMU_AGENT_UPLINK__COMPRESS", "false")
    monkeypatch.setenv("EMU_AGENT_DEVICES", json.dumps(
        [{"name": "m-1", "protocol": "mqtt", "profile": "EMU-BS", "topic": "site/m-1"}]))
    settings = load_agent_settings(write(tmp_path, GOOD))
    assert settings.site == "site-2"
    assert (settings.broker.host, settings.broker.port, settings.broker.tls) == (
        "broker.example.com", 8883, True)
    assert settings.uplink.compress is False
    assert [d.name for d in settings.devices] == ["m-1"]


def test_environment_alone_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMU_AGENT_SITE", "site-3")
    assert load_agent_settings(None).site == "site-3"


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("EMU_AGENT_BROKER__URL", "http://broker", "$EMU_AGENT_BROKER__URL (broker.url): must"),
        ("EMU_AGENT_BROKER__URLL", "mqtt://x", "$EMU_AGENT_BROKER__URLL (broker.urll): unknown"),
        ("EMU_AGENT_UPLINK__BATCH_MAX_POINTS", "0",
         "$EMU_AGENT_UPLINK__BATCH_MAX_POINTS (uplink.batch_max_points)"),
        ("EMU_AGENT_SITE", "a/b", "$EMU_AGENT_SITE (site)"),
        ("EMU_AGENT_DEVICES", '[{"name": "x", "protocol": "mqtt", "profile": "EMU-BS"}]',
         "$EMU_AGENT_DEVICES (devices.0): an mqtt device needs topic"),
    ],
    ids=["url", "typo", "range", "site", "devices-json"],
)
def test_bad_environment_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, named: str
) -> None:
    monkeypatch.setenv(name, value)
    message = config_error(write(tmp_path, GOOD))
    assert named in message
    assert str(tmp_path) not in message, "the file is not where the bad value came from"


# --- the CLI -----------------------------------------------------------------------------


def test_cli_bad_config_exits_2_with_one_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("port = 5020", "port = 0", 1))
    result = runner.invoke(app, ["agent", "-c", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [
        "configuration error:",
        f"{path}: devices.0.port: Input should be greater than or equal to 1",
    ]


@pytest.mark.parametrize(
    "text",
    [GOOD.replace('url = "mqtt://', 'urll = "mqtt://', 1),
     GOOD.replace('site = "site-1"', 'site = "site/1"', 1),
     "site = ["],
    ids=["typo", "bad-site", "not-toml"],
)
def test_cli_refuses_bad_files_with_exit_2(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    for verb in (["agent", "-c", str(path)], ["agent", "check-config", "-c", str(path)]):
        result = runner.invoke(app, verb)
        assert result.exit_code == 2, (verb, result.output, result.exception)
        assert result.output.startswith("configuration error:\n"), result.output
        assert str(path) in result.output
        assert "Traceback" not in result.output


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["agent", "check-config", "-c", str(write(tmp_path, GOOD))])
    assert result.exit_code == 0, result.output
    assert "ok: site site-1, 2 device(s)" in result.output


def test_check_config_refuses_an_unknown_profile(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('profile = "EMU-PV"', 'profile = "EMU-XX"', 1))
    result = runner.invoke(app, ["agent", "check-config", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert "devices.pv-1.profile" in result.output


async def test_status_shows_what_a_running_agent_wrote(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = write(tmp_path, f"""\
        site = "site-status"
        state_dir = "{state}"
        [broker]
        url = "mqtt://127.0.0.1:{free_tcp_port()}"
        protocol = "3.1.1"
        [uplink]
        health_interval_s = 0.2
        """)
    missing = runner.invoke(app, ["agent", "status", "-c", str(path)])
    assert missing.exit_code == 1
    assert f"no {HEALTH_FILE} in {state}" in missing.output

    settings = load_agent_settings(path)
    async with running_agent(settings):  # no broker there: health is written all the same
        await wait_for((state / HEALTH_FILE).is_file, 10.0, "the agent's health file")

    shown = runner.invoke(app, ["agent", "status", "-c", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "agent site-status site site-status" in shown.output
    assert "DISCONNECTED" in shown.output
    as_json = runner.invoke(app, ["agent", "status", "--json", "-c", str(path)])
    assert as_json.exit_code == 0, as_json.output
    health = json.loads(as_json.output)
    assert health["site"] == "site-status"
    assert health["uplink"]["connected"] is False
