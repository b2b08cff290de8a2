"""arm64 guests end to end under TCG, as one cell of a matrix: bake amd64 and arm64 with one `doit bake`
(AAVMF UEFI on `virt` for arm64), print both keys, test the arm64 image.

Marked `arm64` (and `e2e`): the fixture takes about 20 minutes to build the first time on an
x86_64 host; `pytest -m "not arm64"` skips it locally.
"""

from __future__ import annotations

import json

import pytest

from tests.fixture.e2e import doit, qemu_processes, write_project

pytestmark = [pytest.mark.e2e, pytest.mark.arm64]


MATRIX = """\
matrix:
  release: [noble]
  arch: [amd64, arm64]
"""


def test_matrix_bakes_amd64_and_arm64_with_one_bake_and_tests_arm64(tmp_path, arm64_mirror, arm64_server):
    """One `doit bake` of a matrix bakes both architectures (the arm64 one with AAVMF UEFI on `virt`);
    `doit cache-key` prints both keys; the arm64 image runs its tests (resumed warm)."""
    pipeline = write_project(tmp_path, arm64_server.url, arm64_mirror.key, accel="auto", extra=MATRIX)
    pipeline.write_text(pipeline.read_text().replace("timeout: 15m", "timeout: 25m").replace("timeout: 10m",
                                                                                             "timeout: 20m"))
    baked = doit("bake", f"pipeline={pipeline}", cwd=tmp_path, timeout=3000)
    assert baked.returncode == 0, baked.stdout + baked.stderr
    keys = {}
    for arch in ("amd64", "arm64"):
        name = f"e2e-noble-{arch}"
        lock = json.loads((tmp_path / f"pipeline.{name}.lock").read_text())
        assert lock["url"].endswith(f"/noble/current/noble-server-cloudimg-{arch}.img")
        [image] = [p for p in (tmp_path / "dist").glob(f"{name}-*.qcow2") if not p.is_symlink()]
        manifest = json.loads(image.with_suffix(".json").read_text())
        assert manifest["name"] == name and manifest["cloud_init"]["errors"] == []
        assert manifest["qemu"]["firmware"] == "uefi" and manifest["qemu"]["machine"] == arch
        keys[name] = manifest["key"]
    arm64 = json.loads((tmp_path / "dist" / f"e2e-noble-arm64-{keys['e2e-noble-arm64']}.json").read_text())
    assert arm64["qemu"]["accel"] == "tcg" and "arm64 guest" in arm64["qemu"]["accel_reason"]
    serial = (tmp_path / "build" / "e2e-noble-arm64" / "serial.log").read_text(errors="replace")
    assert "aarch64" in serial or "arm64" in serial
    printed = doit("-r", "zero", "cache-key", f"pipeline={pipeline}", cwd=tmp_path)
    assert sorted(printed.stdout.splitlines()) == sorted(f"{key}  {name}" for name, key in keys.items())
    tested = doit("test-image:e2e-noble-arm64", f"pipeline={pipeline}", "cmd=uname -m && test -f /etc/cloudbake-e2e",
                  cwd=tmp_path, timeout=2400)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "aarch64" in tested.stdout
    assert "resumed warm" in tested.stderr, tested.stderr  # warm start works for arm64 (AAVMF) too
    assert qemu_processes(str(tmp_path)) == []
