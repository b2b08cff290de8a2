"""arm64 guests end to end under TCG: fetch the arm64 image, bake it with AAVMF UEFI on `virt`, test it.

Marked `arm64` (and `e2e`): the fixture takes about 20 minutes to build the first time on an
x86_64 host; `pytest -m "not arm64"` skips it locally.
"""

from __future__ import annotations

import json

import pytest

from tests.fixture.e2e import doit, qemu_processes, write_project

pytestmark = [pytest.mark.e2e, pytest.mark.arm64]


def test_arm64_bake_and_test_image(tmp_path, arm64_mirror, arm64_server):
    pipeline = write_project(tmp_path, arm64_server.url, arm64_mirror.key, accel="auto",
                             extra="")
    pipeline.write_text(pipeline.read_text().replace("name: e2e", "name: e2e-arm64")
                        .replace("source:\n", "source:\n  arch: arm64\n")
                        .replace("timeout: 15m", "timeout: 25m").replace("timeout: 10m", "timeout: 20m"))
    baked = doit("bake", f"pipeline={pipeline}", cwd=tmp_path, timeout=2400)
    assert baked.returncode == 0, baked.stdout + baked.stderr
    lock = json.loads((tmp_path / "pipeline.lock").read_text())
    assert lock["url"].endswith("/noble/current/noble-server-cloudimg-arm64.img")
    image = next(p for p in (tmp_path / "dist").glob("e2e-arm64-*.qcow2") if not p.is_symlink())
    manifest = json.loads(image.with_suffix(".json").read_text())
    assert manifest["qemu"]["firmware"] == "uefi" and manifest["qemu"]["machine"] == "arm64"
    assert manifest["qemu"]["accel"] == "tcg" and "arm64 guest" in manifest["qemu"]["accel_reason"]
    assert manifest["cloud_init"]["errors"] == []
    serial = (tmp_path / "build" / "e2e-arm64" / "serial.log").read_text(errors="replace")
    assert "aarch64" in serial or "arm64" in serial
    tested = doit("test-image", f"pipeline={pipeline}", "cmd=uname -m && test -f /etc/cloudbake-e2e",
                  cwd=tmp_path, timeout=2400)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "aarch64" in tested.stdout
    assert "resumed warm" in tested.stderr, tested.stderr  # warm start works for arm64 (AAVMF) too
    assert qemu_processes(str(tmp_path)) == []
