"""A virtual null-modem cable for Modbus RTU tests: two linked ptys made by `socat`.

`serial_pair(directory)` runs `socat -d -d pty,raw,echo=0,link=<dir>/a pty,raw,echo=0,link=<dir>/b`,
waits (with a deadline) until both symlinks exist, yields their paths and stops socat on exit.
Bytes written to one end come out of the other, as on a cable between two serial ports.
`serial_pair_fixture()` wraps it into a pytest fixture a test module binds to a name; without
socat (Debian package `socat`) the tests that use it are skipped, saying why.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.waiting import wait_until

START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class SerialPair:
    """The two ends of the virtual cable (symlinks to /dev/pts/N) and socat's log file."""

    a: str
    b: str
    log: Path


def socat_path() -> str | None:
    """Where socat is installed, or None."""
    return shutil.which("socat")


@contextmanager
def serial_pair(directory: Path, timeout: float = START_TIMEOUT) -> Iterator[SerialPair]:
    """Run socat with two linked ptys under `directory` until the block ends.

    Skips the calling test when socat is not installed; fails naming socat's log when the
    ptys do not appear within `timeout` seconds or socat exits early.
    """
    socat = socat_path()
    if socat is None:
        pytest.skip("socat is not installed (Debian: apt-get install socat): no serial pair")
    a, b, log = directory / "a", directory / "b", directory / "socat.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        wait_until(
            lambda: _ready(proc, a, b, log),
            timeout,
            f"socat to link {a} and {b} (log: {log})",
        )
        yield SerialPair(str(a), str(b), log)
    finally:
        _stop(proc)


def _ready(proc: subprocess.Popen[bytes], a: Path, b: Path, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(
            f"socat exited with {proc.returncode}: {log.read_text(errors='replace').strip()}"
        )
    return a.exists() and b.exists()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def serial_pair_fixture(name: str = "serial_pair") -> Callable[..., Iterator[SerialPair]]:
    """A function-scoped fixture yielding a fresh `SerialPair` in the test's tmp_path.

    Bind it in a test module: `serial_pair = serial_pair_fixture()`.
    """

    @pytest.fixture(name=name)
    def fixture(tmp_path: Path) -> Iterator[SerialPair]:
        with serial_pair(tmp_path) as pair:
            yield pair

    return fixture
