"""The key names the image, not the person who baked it: one key for this repository's default pipeline
under any home, checkout path, time zone, umask and locale."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cloudbake.config.pipeline import load_pipeline
from cloudbake.source.lock import Lock, lock_source, write_lock
from tests.conftest import PROJECT

PERSONAL_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHomeKeyHomeKeyHomeKeyHomeKeyHomeKeyHomeKey me@laptop\n"


def _checkout(dest: Path) -> Path:
    """The default pipeline as a user's checkout holds it, with a committed lock."""
    dest.mkdir(parents=True)
    shutil.copy(PROJECT / "pipeline.yaml", dest / "pipeline.yaml")
    shutil.copytree(PROJECT / "cloud-init", dest / "cloud-init")
    pipeline = load_pipeline(dest / "pipeline.yaml")
    write_lock(dest / "pipeline.lock", Lock(
        source=lock_source(pipeline.source),
        url="https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img", serial="20261120",
        sha256="5" * 64, size=600 << 20, signed_by="D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81",
        signature_time="2026-11-20T10:00:00Z"))
    return dest / "pipeline.yaml"


def _cache_key(pipeline: Path, home: Path, tz: str, umask: str, lang: str) -> str:
    env = {**os.environ, "HOME": str(home), "TZ": tz, "LANG": lang, "LC_ALL": lang, "XDG_CACHE_HOME": ""}
    env.pop("XDG_CACHE_HOME")
    doit = f"{sys.executable} -m doit -f {PROJECT / 'dodo.py'} -r zero cache-key pipeline={pipeline}"
    result = subprocess.run(["sh", "-c", f"umask {umask} && exec {doit}"], cwd=pipeline.parent, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_one_key_for_every_baker(tmp_path):
    with_key, without_key = tmp_path / "home-alice", tmp_path / "home-ci"
    (with_key / ".ssh").mkdir(parents=True)
    (with_key / ".ssh" / "id_ed25519.pub").write_text(PERSONAL_KEY)
    without_key.mkdir()
    first = _checkout(tmp_path / "src" / "cloudbake")
    second = _checkout(tmp_path / "work" / "other" / "checkout-2")
    keys = {
        _cache_key(first, with_key, "UTC", "022", "C.UTF-8"),
        _cache_key(second, without_key, "Asia/Kathmandu", "077", "C"),
        _cache_key(first, without_key, "America/St_Johns", "002", "C.UTF-8"),
        _cache_key(second, with_key, "UTC", "027", "C"),
    }
    assert len(keys) == 1
    assert len(keys.pop()) == 16


def test_default_pipeline_bakes_no_personal_key(tmp_path, monkeypatch):
    from cloudbake.image.seed import build_seed_files

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519.pub").write_text(PERSONAL_KEY)
    monkeypatch.setenv("HOME", str(home))
    pipeline = load_pipeline(_checkout(tmp_path / "checkout"))
    assert pipeline.cloud_init.ssh_authorized_keys == ()
    assert b"HomeKey" not in build_seed_files(pipeline).user_data


def _bake_in_process(pipeline: Path, monkeypatch) -> int:
    """``cloudbake -p PIPELINE bake`` in this process, so the engine's counters can be read afterwards."""
    from cloudbake import cli

    context, _ = cli.task_definitions()
    monkeypatch.setattr(context, "_default_pipeline", context.DEFAULT_PIPELINE)
    monkeypatch.chdir(pipeline.parent)
    return cli.main(["-p", str(pipeline), "bake"])


def test_a_command_resolves_the_build_once_per_image(tmp_path, monkeypatch):
    """`doit bake` asks fetch and bake whether they are up to date, and bake's action would resolve it again:
    they share one resolution. A layered file resolves each of its two images once (the child's build
    holds its parent's)."""
    from cloudbake.image import build
    from tests.fixture.offline import offline_project

    single = offline_project(tmp_path / "one", published=True)
    monkeypatch.setattr(build, "resolutions", 0)
    assert _bake_in_process(single, monkeypatch) == 0
    assert build.resolutions == 1
    layered = offline_project(tmp_path / "two", published=True,
                              extra="images:\n  - name: base\n  - name: app\n    from: base\n")
    monkeypatch.setattr(build, "resolutions", 0)
    assert _bake_in_process(layered, monkeypatch) == 0
    assert build.resolutions == 2


def test_cloudbake_test_image_resolves_the_build_once(tmp_path, monkeypatch):
    """As a user runs it: `cloudbake test-image` checks the bake is up to date (doit), then looks the base up
    for its run; both see the pipeline the front door loaded, so the image resolves once. The stand-in
    guest never answers SSH, so the run ends at the boot (125) without a real VM."""
    from cloudbake import cli
    from cloudbake.image import build
    from tests.fixture.offline import offline_project
    from tests.fixture.standin import install_standin_qemu, path_with

    pipeline = offline_project(tmp_path, published=True)
    pipeline.write_text(pipeline.read_text().replace('test: {command: "true", timeout: 10m}',
                                                     'test: {command: "true", timeout: 3s, warm: false}'))
    monkeypatch.setenv("PATH", path_with(install_standin_qemu(tmp_path / "bin", "works")))
    monkeypatch.setenv("CLOUDBAKE_STANDIN_GUEST_SECONDS", "600")
    context, _ = cli.task_definitions()
    monkeypatch.setattr(context, "_default_pipeline", context.DEFAULT_PIPELINE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build, "resolutions", 0)
    assert cli.main(["test-image", "-p", str(pipeline)]) == 125
    assert build.resolutions == 1


def test_a_rewritten_lock_or_user_data_resolves_afresh(tmp_path):
    """What is kept is the build of the pipeline as it is: a new lock (doit fetch in the same command) or an
    edited user-data gives a new build, and an unchanged one the same object."""
    from cloudbake.config.paths import resolve_paths
    from cloudbake.image.build import resolve_build
    from tests.fixture.offline import offline_project

    pipeline = load_pipeline(offline_project(tmp_path, published=True))
    paths = resolve_paths(pipeline)
    first = resolve_build(pipeline, paths)
    assert resolve_build(pipeline, paths) is first
    lock = paths.lock_file.read_text()
    assert first.lock.serial is not None
    paths.lock_file.write_text(lock.replace(first.lock.serial, "20261201"))
    moved = resolve_build(pipeline, paths)
    assert moved is not first and moved.lock.serial == "20261201" and moved.key == first.key
    paths.lock_file.write_text(lock)
    user_data = pipeline.cloud_init.user_data
    user_data.write_text(user_data.read_text() + "\nbootcmd: [[touch, /etc/edited]]\n")
    edited = resolve_build(pipeline, paths)
    assert edited.key != first.key


def test_the_key_and_lock_cover_the_distribution_and_ubuntus_stay_as_they_were(make_pipeline):
    """Another distribution is another image; an Ubuntu pipeline's settings and lock source hold no distro
    field, so every key and lock made before Debian and Fedora stays valid."""
    from cloudbake.image.build import image_settings
    from cloudbake.source.lock import lock_source

    ubuntu = load_pipeline(make_pipeline("source: {release: noble}\n"))
    debian = load_pipeline(make_pipeline("source: {distro: debian, release: bookworm, verify: {signature: none}}\n"))
    assert "distro" not in image_settings(ubuntu) and "distro" not in lock_source(ubuntu.source)
    assert image_settings(debian)["distro"] == "debian" and lock_source(debian.source)["distro"] == "debian"
    assert image_settings(debian) != image_settings(ubuntu)


def test_a_key_file_a_glob_now_matches_or_a_changed_dependency_file_resolves_afresh(tmp_path):
    """The build is kept by every file its seed reads, not only user-data: a new key matching
    `keys/*.pub`, or an edited lock file of test.dependencies, gives a new build in the same process."""
    from cloudbake.config.paths import resolve_paths
    from cloudbake.image.build import resolve_build
    from tests.fixture.offline import offline_project

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPseedtestkeyseedtestkeyseedtestkeyseedtest one@host"
    pipeline_file = offline_project(tmp_path, published=True)
    pipeline_file.write_text(pipeline_file.read_text().replace(
        'test: {command: "true", timeout: 10m}',
        'test: {command: "true", timeout: 10m, dependencies: {files: [uv.lock], install: make}}')
        + "cloud_init: {ssh_authorized_keys: ['keys/*.pub']}\n")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "one.pub").write_text(key + "\n")
    (tmp_path / "uv.lock").write_text("version = 1\n")
    pipeline = load_pipeline(pipeline_file)
    paths = resolve_paths(pipeline)
    first = resolve_build(pipeline, paths)
    assert resolve_build(pipeline, paths) is first
    (tmp_path / "keys" / "two.pub").write_text(key.replace("one@", "two@") + "\n")
    second = resolve_build(pipeline, paths)
    assert second.key != first.key and b"two@host" in second.seed.user_data
    (tmp_path / "uv.lock").write_text("version = 2\n")
    third = resolve_build(pipeline, paths)
    assert third.key != second.key
