"""Layered images end to end under TCG: a child image built on the shared bake, rebaked exactly when it must be.

The base of the layered pipeline is the shared bake's image (same settings, seed and upstream,
so the same key): it is linked in, not baked again. The boots here: the child (1), the child
after its user-data changed (2), base and child after the base's user-data changed (3, 4), and
the child's test run (5, which also saves its warm state).

The child also bakes a project's dependencies by their content (test.dependencies): a lock file
naming a wheel served on 127.0.0.1 (the guest reaches it at 10.0.2.2) and the project's own install
script; its test run imports the dependency without downloading anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.fixture.e2e import USER_DATA, doit, qemu_processes, write_project
from tests.fixture.wheels import INSTALL_DEPS, serve_wheel

pytestmark = pytest.mark.e2e

CHILD = """\
images:
  - name: e2e
  - name: app
    from: e2e
    cloud_init: {user_data: cloud-init/app.yaml}
    disk: {flatten: false}
    test: {dependencies: {files: [deps.lock, "tools/*.py"], install: python3 tools/install_deps.py}}
"""

APP_USER_DATA = """\
#cloud-config
write_files:
  - path: /etc/cloudbake-app
    content: "{version}\\n"
"""


def published(dist: Path, name: str) -> list[Path]:
    return sorted(p for p in dist.glob(f"{name}-*.qcow2") if not p.is_symlink())


def manifest(image: Path) -> dict:
    return json.loads(image.with_suffix(".json").read_text())


def test_layered_image_bakes_after_its_base_and_rebakes_only_when_its_inputs_change(baked, real_server, real_mirror,
                                                                                    tmp_path):
    pipeline = write_project(tmp_path, real_server.url, real_mirror.key, extra=CHILD,
                             cache=baked["folder"] / "cache")
    (tmp_path / "cloud-init" / "app.yaml").write_text(APP_USER_DATA.format(version="one"))
    wheel, lock_line = serve_wheel(real_mirror.root, real_server.url, "depmod",
                                   {"__init__.py": b"VALUE = 'baked from the lock'\n"})
    (tmp_path / "deps.lock").write_text(lock_line)
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "install_deps.py").write_text(INSTALL_DEPS)
    # The shared bake is this file's base image: link it in with its lock, as a restored cache would.
    dist = tmp_path / "dist"
    dist.mkdir()
    for file in (baked["image"], baked["image"].with_suffix(".json")):
        os.link(file, dist / file.name)
    shutil.copy(baked["folder"] / "pipeline.lock", tmp_path / "pipeline.e2e.lock")

    first = doit("bake", f"pipeline={pipeline}", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert not (tmp_path / "build" / "e2e" / "serial.log").exists()  # the base was not booted
    [base] = published(dist, "e2e")
    assert base.name == baked["image"].name
    [app] = published(dist, "app")
    app_manifest = manifest(app)
    assert app_manifest["image"]["backing"] == base.name
    assert app_manifest["parent"] == {"name": "e2e", "key": manifest(base)["key"], "file": base.name,
                                      "sha256": manifest(base)["image"]["sha256"]}
    assert app_manifest["inputs"]["parent_key"] == manifest(base)["key"]
    assert app_manifest["cloud_init"]["errors"] == [] and app_manifest["cloud_init"]["generalized"] is True
    assert app.stat().st_size < base.stat().st_size / 2  # only what the child adds
    assert len(real_server.requests_for(wheel)) == 1   # the child's bake installed the locked wheel

    # The key covers the dependency files' content: an edited test file keeps it, an edited lock moves it.
    def key() -> str:
        printed = doit("-r", "zero", "cache-key:app", f"pipeline={pipeline}", cwd=tmp_path, timeout=60)
        assert printed.returncode == 0, printed.stderr
        return printed.stdout.split()[0]

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_app.py").write_text("def test_x(): pass\n")
    assert key() == app_manifest["key"]
    (tmp_path / "deps.lock").write_text(lock_line + "# pinned again\n")
    assert key() != app_manifest["key"]
    (tmp_path / "deps.lock").write_text(lock_line)
    assert key() == app_manifest["key"]

    # The child's user-data changed: only the child is baked again.
    (tmp_path / "cloud-init" / "app.yaml").write_text(APP_USER_DATA.format(version="two"))
    second = doit("bake", f"pipeline={pipeline}", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert not (tmp_path / "build" / "e2e" / "serial.log").exists()
    assert published(dist, "e2e") == [base]
    [app_two] = [p for p in published(dist, "app") if p != app]
    assert manifest(app_two)["parent"]["key"] == manifest(base)["key"]

    # The base's user-data changed: the base is baked, then the child on the new base.
    (tmp_path / "cloud-init" / "user-data.yaml").write_text(
        USER_DATA + "  - [sh, -c, \"echo rebased > /etc/cloudbake-base\"]\n")
    third = doit("bake", f"pipeline={pipeline}", cwd=tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert (tmp_path / "build" / "e2e" / "serial.log").is_file()
    [new_base] = [p for p in published(dist, "e2e") if p != base]
    [app_three] = [p for p in published(dist, "app") if p not in (app, app_two)]
    assert manifest(app_three)["parent"]["key"] == manifest(new_base)["key"]
    assert manifest(app_three)["image"]["backing"] == new_base.name
    log = third.stdout + third.stderr
    assert log.index(f"baking {new_base.name}") < log.index(f"baking {app_three.name}")

    # A test run of the child reads the whole chain: the base's change and the child's own file.
    baked_wheels = len(real_server.requests_for(wheel))
    tested = doit("test-image:app", f"pipeline={pipeline}",
                  "cmd=grep -q rebased /etc/cloudbake-base && grep -q two /etc/cloudbake-app "
                  "&& test -f /etc/cloudbake-e2e && cd ~/src && PYTHONPATH=.deps python3 -c "
                  "'import depmod; assert depmod.VALUE == \"baked from the lock\"'", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert len(real_server.requests_for(wheel)) == baked_wheels   # the test run downloaded nothing
    assert qemu_processes(str(tmp_path)) == []
