"""A private Mosquitto process running one of deploy/'s configuration files.

The file is used as shipped, with only its listener ports (free loopback ports instead) and
its file paths (test certificates, password and ACL files) swapped, so a test proves that
very configuration: `mosquitto -c` refuses a file it cannot parse, and the test fails.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import LOOPBACK, accepts_connections, free_tcp_port
from tests.support.waiting import wait_until

TIMEOUT = 10.0
PATH_KEYS = frozenset({"password_file", "acl_file", "certfile", "keyfile", "cafile", "capath",
                       "crlfile", "persistence_location", "pid_file"})


def _binary(name: str, *dirs: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((f"{d}/{name}" for d in dirs if os.access(f"{d}/{name}", os.X_OK)), None)


MOSQUITTO = _binary("mosquitto", "/usr/sbin", "/usr/local/sbin")
MOSQUITTO_PASSWD = _binary("mosquitto_passwd", "/usr/bin", "/usr/local/bin")


@dataclass
class Mosquitto:
    """A running private broker: its process, its ports (by the deployed port) and its log."""

    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path

    def port(self, deployed: str) -> int:
        """The port standing in for the configuration's `listener <deployed>`."""
        return self.ports[deployed]

    def log_text(self) -> str:
        """The broker's log so far (for failure messages)."""
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


def relocate(conf: Path, tmp: Path, ports: Mapping[str, int], files: Mapping[str, Path]) -> str:
    """`conf` with its listeners on `ports` (deployed port -> ours) and its paths on `files`."""
    out = []
    for line in conf.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            out.append(f"listener {ports[words[1]]} {LOOPBACK}")
        elif words[0] in PATH_KEYS:
            assert words[0] in files, f"the test gives no file for {line!r}"
            out.append(f"{words[0]} {files[words[0]]}")
        else:
            assert "/" not in line, f"the test does not know how to relocate: {line!r}"
            out.append(line)
    out += [
        "persistence false",
        f"log_dest file {tmp / 'mosquitto.log'}",
        "log_type all",
        f"user {getpass.getuser()}",  # as root, stay root: tmp_path is not the mosquitto user's
    ]
    return "\n".join(out) + "\n"


def listeners(conf: Path) -> list[str]:
    """The ports of the `listener` lines of `conf`."""
    return [line.split()[1] for line in conf.read_text(encoding="utf-8").splitlines()
            if line.startswith("listener ")]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the broker (kill it if it lingers) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)


def start(conf: Path, tmp: Path, files: Mapping[str, Path]) -> Mosquitto:
    """Run `conf` relocated into `tmp`; return once every listener accepts connections."""
    assert MOSQUITTO is not None, "mosquitto is not installed"
    log = tmp / "mosquitto.log"
    for attempt in range(3):
        ports = {p: free_tcp_port() for p in listeners(conf)}
        path = tmp / "mosquitto.conf"
        path.write_text(relocate(conf, tmp, ports, files), encoding="utf-8")
        stderr = (tmp / f"stderr-{attempt}.txt").open("wb")
        proc = subprocess.Popen([MOSQUITTO, "-c", str(path)], stdout=stderr, stderr=stderr)  # noqa: S603
        stderr.close()

        def up(p: subprocess.Popen[bytes] = proc, mine: dict[str, int] = ports) -> bool:
            exited = p.poll() is not None
            return exited or all(accepts_connections(LOOPBACK, q) for q in mine.values())

        try:
            wait_until(up, TIMEOUT, "the private Mosquitto to listen")
        except AssertionError:
            stop(proc)
            raise
        if proc.poll() is None:
            return Mosquitto(proc, ports, log)
        proc.wait()  # a port was taken in between: try others
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    errors = "".join((tmp / f"stderr-{n}.txt").read_text(errors="replace") for n in range(3))
    raise AssertionError(f"Mosquitto did not start with {conf.name}: {errors}{text}")


@contextmanager
def running(conf: Path, tmp: Path, files: Mapping[str, Path]) -> Iterator[Mosquitto]:
    """`start` ... `stop` as a context."""
    broker = start(conf, tmp, files)
    try:
        yield broker
    finally:
        stop(broker.proc)
