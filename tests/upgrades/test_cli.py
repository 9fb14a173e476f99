"""`emu release keygen|build|sign|upload|list` and `emu plans` against the real API."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

from typer.testing import CliRunner

from emu.cli import app, register
from protocols.packages import Package, verify_package
from protocols.signing import load_private_key, load_public_key
from tests.upgrades.world import Api, firmware

register()
runner = CliRunner()


def emu(*args: str) -> tuple[int, str]:
    """Run `emu ...`; exit code and output (stdout and stderr)."""
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


async def test_keygen_build_sign_upload(tmp_path: Path, api: Api) -> None:
    key, pkg, delta = tmp_path / "release.pem", tmp_path / "fw.pkg", tmp_path / "d.pkg"
    code, out = emu("release", "keygen", "-o", str(key))
    assert code == 0, out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = out.split("public key:")[1].strip()
    assert emu("release", "keygen", "-o", str(key))[0] == 2  # never overwrites by accident
    (tmp_path / "fw.bin").write_bytes(firmware("3.0.0"))
    (tmp_path / "old.bin").write_bytes(firmware("2.9.0"))
    code, out = emu("release", "build", str(tmp_path / "fw.bin"), "-o", str(pkg),
                    "--minimum-version", "2.0.0", "--fixes-fault", "derating",
                    "--fixes-ticket", "7", "--notes", "fixes derating")
    assert code == 0, out
    assert "unsigned" in out
    code, out = emu("release", "build", str(tmp_path / "fw.bin"), "--base",
                    str(tmp_path / "old.bin"), "-o", str(delta))
    assert code == 0, out
    for path in (pkg, delta):
        code, out = emu("release", "sign", str(path), "--key", str(key))
        assert code == 0, out
        signed = Package.parse(path.read_bytes())
        verify_package(signed, [load_public_key(public)])
    assert signed.manifest.kind == "delta"
    assert load_private_key(key.read_bytes()) is not None
    manifest = Package.parse(pkg.read_bytes()).manifest
    assert manifest.fixes.refs() == ["derating", 7]
    # this key is not trusted by the server: the upload is refused, with the reason
    server = ["--server", api.url, "--token", api.tokens["admin"]]
    code, out = await asyncio.to_thread(emu, "release", "upload", str(pkg), *server)
    assert code == 1
    assert "does not verify with any trusted key" in out
    code, out = await asyncio.to_thread(emu, "release", "list", "--json", *server)
    assert code == 0, out
    assert isinstance(json.loads(out)["data"], list)


def test_build_refuses_a_file_that_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"junk")
    code, out = emu("release", "build", str(tmp_path / "junk.bin"), "-o", str(tmp_path / "x"))
    assert code == 2
    assert "not a firmware image" in out
