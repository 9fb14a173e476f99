"""`emu sim` as a user runs it: a real process, a SunSpec client, and the control verbs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from typer.testing import CliRunner

from emu.cli import app, register
from protocols.firmware import FirmwareImage
from protocols.profiles import load_profile
from tests.simulators.modbus_io import read_points
from tests.simulators.test_modbus import scan_with_pysunspec2
from tests.support.net import free_tcp_port
from tests.support.process import read_until
from tests.support.waiting import wait_for

runner = CliRunner()
register()


def test_faults_lists_every_fault() -> None:
    result = runner.invoke(app, ["sim", "faults"])
    assert result.exit_code == 0
    for name in ("over_temperature", "insulation_low", "grid_loss", "trip", "comm_loss",
                 "derating", "intermittent_comms", "slow_response"):
        assert name in result.output


def test_profiles_lists_both_series() -> None:
    result = runner.invoke(app, ["sim", "profiles"])
    assert result.exit_code == 0
    assert "EMU-BS" in result.output
    assert "EMU-PV" in result.output


def test_image_builds_a_parseable_image(tmp_path: Path) -> None:
    out = tmp_path / "fw.bin"
    result = runner.invoke(app, ["sim", "image", "--series", "EMU-PV", "--version", "2.0.1",
                                 "-o", str(out), "--payload-kib", "1"])
    assert result.exit_code == 0, result.output
    image = FirmwareImage.parse(out.read_bytes())
    assert (image.series, image.version) == ("EMU-PV", "2.0.1")


@pytest.mark.parametrize(
    "args",
    [
        ["sim", "--units", "0"],
        ["sim", "--profile", "EMU-XX"],
        ["sim", "--mqtt", "http://x"],
        ["sim", "inject", "melting"],
        ["sim", "inject", "trip", "--param", "nonsense"],
        ["sim", "image", "--series", "EMU-XX", "--version", "1", "-o", "x.bin"],
    ],
)
def test_bad_usage_exits_2(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output


def test_control_verbs_without_a_simulator_exit_1() -> None:
    result = runner.invoke(app, ["sim", "status", "--control-port", str(free_tcp_port())])
    assert result.exit_code == 1
    assert "is `emu sim` running" in result.output


def test_every_command_has_help() -> None:
    for args in (["--help"], ["sim", "--help"], *[["sim", c, "--help"] for c in
                 ("faults", "profiles", "inject", "clear", "status", "update-mode", "image")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, args
        assert "Usage" in result.output


async def _emu(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emu", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


@pytest.mark.integration
async def test_emu_sim_process_end_to_end() -> None:
    """The acceptance run: `emu sim --units 3 --port P`, read by pysunspec2, fault injected."""
    port, control = free_tcp_port(), free_tcp_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emu", "sim", "--units", "3", "--port", str(port),
        "--control-port", str(control),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        banner = await read_until(proc.stdout, "control", 20, "the simulator's banner")
        assert f"127.0.0.1:{port} unit ids 1..3" in banner
        for unit_id in (1, 2, 3):
            found = await asyncio.to_thread(scan_with_pysunspec2, "127.0.0.1", port, unit_id)
            assert found["Mn"] == "Shanghai Energy"
            assert {1, 64901} <= set(found["models"])  # type: ignore[call-overload]

        code, out = await _emu("sim", "inject", "over_temperature", "--unit", "1",
                               "--control-port", str(control))
        assert code == 0, out
        profile = load_profile("EMU-BS")
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
        await client.connect()
        try:
            readings = await read_points(client, profile, 1)
            assert float(readings["emu.IntTmp"].value or 0) > 60
            assert readings["emu.Alarm"].value == 1
            code, out = await _emu("sim", "clear", "--unit", "1", "--control-port", str(control))
            assert code == 0, out
            readings = await read_points(client, profile, 1)
            assert readings["emu.Alarm"].value == 0
        finally:
            client.close()
        code, out = await _emu("sim", "status", "--control-port", str(control))
        assert code == 0
        assert "EMU-PV" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = await wait_for(proc.communicate(), 10, "the simulator to stop")
    assert proc.returncode == 0, rest
