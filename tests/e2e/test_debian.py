"""End to end with `source.distro: debian`: the fixture image (a real Debian 12 cloud image built with
mmdebstrap) served in cloud.debian.org's layout bakes and test-runs. One bake and one cold test run:
warm start, the registry and the rest are proven on the shared Ubuntu-layout bake."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.fixture.distros import DEBIAN_BUILD, build_debian_mirror
from tests.fixture.e2e import USER_DATA, doit
from tests.fixture.offline import write_files
from tests.fixture.server import MirrorServer

pytestmark = pytest.mark.e2e


def test_a_debian_source_bakes_and_test_runs(fixture_image: Path, tmp_path: Path) -> None:
    build_debian_mirror(tmp_path / "mirror", fixture_image)
    with MirrorServer(tmp_path / "mirror") as server:
        folder = tmp_path / "project"
        write_files(folder, USER_DATA, textwrap.dedent(f"""\
            name: deb
            source:
              distro: debian
              release: bookworm
              mirror: {server.url}
              verify: {{signature: none}}
            disk: {{size: +1G, compression: zstd}}
            vm: {{cpus: 2, memory: 1G, accel: auto, timeout: 15m, bake_qemu_args: [-no-shutdown]}}
            test:
              command: test -f /etc/cloudbake-e2e && grep -q 'ID=debian' /etc/os-release
              warm: false
              timeout: 10m
            cache: {{dir: {tmp_path / 'cache'}}}
            """))
        pipeline = f"pipeline={folder / 'pipeline.yaml'}"
        baked = doit("bake", pipeline, cwd=folder)
        assert baked.returncode == 0, baked.stdout + baked.stderr
        assert "trusting SHA512SUMS as served" in baked.stderr
        lock = json.loads((folder / "pipeline.lock").read_text())
        assert lock["source"]["distro"] == "debian" and lock["serial"] == DEBIAN_BUILD and lock["signed_by"] is None
        images = [p for p in (folder / "dist").glob("deb-*.qcow2") if not p.is_symlink()]
        assert len(images) == 1
        manifest = json.loads(images[0].with_suffix(".json").read_text())
        assert manifest["inputs"]["settings"]["distro"] == "debian"
        tested = doit("test-image", pipeline, cwd=folder, timeout=900)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "the test command passed" in tested.stderr
        # The pin holds offline: nothing more is asked of the mirror by a second bake.
        before = len(server.state.requests)
        again = doit("bake", pipeline, cwd=folder)
        assert again.returncode == 0 and len(server.state.requests) == before, again.stderr
