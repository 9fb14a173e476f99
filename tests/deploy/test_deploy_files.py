"""deploy/ is valid even though no container engine or systemd runs here.

- compose.yml against the Compose Specification's JSON schema (the copy check-jsonschema
  ships, Apache-2.0, from the compose-spec project), plus what the schema cannot see: every
  service has an image, dependencies, volumes and mounted files exist.
- systemd units through `systemd-analyze verify` (skipped where it is not installed), with
  the install path of `emu` pointed at this checkout's; any complaint fails the test.
- Mosquitto configurations by starting Mosquitto on them (paths and ports swapped).
- The openssl commands of deploy/tls/README.md make a CA whose certificates the mutual-TLS
  broker configuration accepts.
- postgresql.conf names only settings the running PostgreSQL knows.
Each check is shown to bite on a broken copy, so a check that passes everything fails here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

from server.broker_auth import SERVER_USERNAME, PasswordEntry, hash_password, write_password_file
from tests.support import mosquitto
from tests.support.tls import CertFiles, TestCA, mqtt_verdict

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNITS = [*sorted((DEPLOY / "systemd").iterdir()), DEPLOY / "agent/emu-agent.service"]
INSTALLED_EMU = "/opt/emu/bin/emu"


# -- compose ----------------------------------------------------------------------------------
@functools.cache
def _compose_schema() -> dict[str, Any]:
    text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema: dict[str, Any] = json.loads(text.read_text(encoding="utf-8"))
    return schema


def _schema_errors(doc: object) -> list[str]:
    cls = jsonschema.validators.validator_for(_compose_schema())
    validator = cls(_compose_schema(), format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = YAML(typ="safe").load(DEPLOY / "compose.yml")
    return doc


def test_compose_file_matches_the_compose_spec_schema() -> None:
    assert _schema_errors(_compose()) == []


def test_the_schema_check_catches_mistakes() -> None:
    broken = _compose()
    broken["services"]["server-1"]["restart_policy"] = "always"  # no such key
    broken["services"]["caddy"]["ports"] = "443:443"  # a list, not a string
    errors = "\n".join(_schema_errors(broken))
    assert "'restart_policy' was unexpected" in errors
    assert "services/caddy/ports" in errors


def test_compose_references_resolve() -> None:
    doc = _compose()
    services = doc["services"]
    assert {"server-1", "server-2", "postgres", "mosquitto", "caddy"} <= services.keys()
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: no image"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                path = DEPLOY / source
                secret = path.is_relative_to(DEPLOY / "secrets")
                assert secret or path.exists(), f"{name} mounts missing {source}"
            else:
                assert source in doc["volumes"], f"{name} uses undeclared volume {source}"
        for env_file in svc.get("env_file", []):
            assert (DEPLOY / f"{env_file}.example").exists(), f"no example for {env_file}"
    build = services["server-1"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    caddy = (DEPLOY / "compose/Caddyfile").read_text(encoding="utf-8")
    upstreams = re.findall(r"(server-\d):(\d+)", caddy)
    assert {s for s, _ in upstreams} == {n for n in services if n.startswith("server-")}
    assert {p for _, p in upstreams} == {"8080"}  # compose/server.toml's http.port


# -- systemd ----------------------------------------------------------------------------------
def _verify(directory: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return subprocess.run(  # noqa: S603
        [tool, "verify", "--man=no", *sorted(str(p) for p in directory.iterdir())],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"},  # siblings, then the system's
    )


def _relocated_units(tmp: Path) -> Path:
    """The units with `emu` (and any tool missing here) at paths that exist on this machine."""
    emu = Path(sys.executable).parent / "emu"
    out = tmp / "units"
    out.mkdir()
    for unit in UNITS:
        text = unit.read_text(encoding="utf-8").replace(INSTALLED_EMU, str(emu))
        for tool in sorted(set(re.findall(r"(/usr/bin/[\w-]+)", text))):
            if not Path(tool).exists():
                text = text.replace(tool, "/bin/true")
        (out / unit.name).write_text(text, encoding="utf-8")
    return out


def test_systemd_units_verify(tmp_path: Path) -> None:
    result = _verify(_relocated_units(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr


def test_systemd_verify_catches_mistakes(tmp_path: Path) -> None:
    units = _relocated_units(tmp_path)
    unit = units / "emu-server@.service"
    unit.write_text(unit.read_text().replace("Restart=always", "Restart=sometimes"))
    result = _verify(units)
    assert "restart" in (result.stdout + result.stderr).lower()


# -- Mosquitto --------------------------------------------------------------------------------
def _broker_files(tmp: Path, ca: TestCA, server: CertFiles) -> dict[str, Path]:
    passwd = tmp / "passwd"
    write_password_file(passwd, [PasswordEntry(SERVER_USERNAME, hash_password("x" * 20))])
    return {"password_file": passwd, "acl_file": DEPLOY / "mosquitto/acl", "cafile": ca.cert,
            "certfile": server.cert, "keyfile": server.key, "persistence_location": tmp}


@pytest.fixture
def no_mosquitto_skip() -> None:
    """Skip where Mosquitto is not installed."""
    if mosquitto.MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (Debian package `mosquitto`)")


@pytest.mark.usefixtures("no_mosquitto_skip")
@pytest.mark.parametrize("conf", ["compose/mosquitto.conf", "mosquitto/mosquitto.conf",
                                  "mosquitto/mtls.conf"])
def test_mosquitto_starts_on_the_deployed_configuration(tmp_path: Path, conf: str) -> None:
    ca = TestCA(tmp_path)
    files_ = _broker_files(tmp_path, ca, ca.server("broker"))
    with mosquitto.running(DEPLOY / conf, tmp_path, files_) as broker:
        assert broker.proc.poll() is None
        assert set(broker.ports) == {"8883", "1883"}


@pytest.mark.usefixtures("no_mosquitto_skip")
def test_mosquitto_refuses_a_broken_configuration(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text((DEPLOY / "compose/mosquitto.conf").read_text() + "max_queued_mesages 5\n")
    ca = TestCA(tmp_path)
    with pytest.raises(AssertionError, match="did not start"):
        mosquitto.start(bad, tmp_path, _broker_files(tmp_path, ca, ca.server("broker")))


# -- the documented openssl commands ------------------------------------------------------------
def _readme_script() -> str:
    text = (DEPLOY / "tls/README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None
    return block.group(1)


@pytest.mark.usefixtures("no_mosquitto_skip")
def test_openssl_commands_make_a_working_pki(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    pki = tmp_path / "pki"
    script = _readme_script().replace("mkdir -p pki && cd pki", f"cd {pki}")
    pki.mkdir()
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script],  # noqa: S603, S607
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "client-site-0001.crt: OK" in result.stdout
    passwd = tmp_path / "passwd"
    write_password_file(passwd, [PasswordEntry(SERVER_USERNAME, hash_password("x" * 20))])
    files_ = {"password_file": passwd, "acl_file": DEPLOY / "mosquitto/acl",
              "cafile": pki / "ca.crt", "certfile": pki / "broker.crt",
              "keyfile": pki / "broker.key"}
    with mosquitto.running(DEPLOY / "mosquitto/mtls.conf", tmp_path, files_) as broker:
        site = CertFiles(pki / "client-site-0001.crt", pki / "client-site-0001.key")
        assert mqtt_verdict(broker.port("8883"), pki / "ca.crt", site) == "connected"


# -- PostgreSQL -------------------------------------------------------------------------------
def _conf_names(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def test_postgresql_conf_names_known_settings(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("needs PostgreSQL (EMU_TEST_DATABASE_URL)")
    import psycopg

    libpq = "postgresql://" + database_url.split("://", 1)[1]
    with psycopg.connect(libpq) as conn:
        known = {r[0] for r in conn.execute("SELECT name FROM pg_settings").fetchall()}
    names = _conf_names(DEPLOY / "postgres/postgresql.conf")
    assert len(names) > 10
    assert sorted(set(names) - known) == []
