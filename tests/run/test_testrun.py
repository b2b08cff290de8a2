"""test-image's pure parts: the SSH command, the per-run seed, overlays and leftover cleanup. No boots here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from cloudbake.config.pipeline import load_pipeline
from cloudbake.run.runs import RunFiles, clean_leftovers, make_overlay, run_seed_files, runs_root
from cloudbake.run.ssh import ssh_argv


def test_ssh_pins_the_host_key_and_uses_only_the_run_key(tmp_path):
    files = RunFiles(tmp_path)
    argv = ssh_argv(files, 2222, "ubuntu", "make check")
    joined = " ".join(argv)
    assert "StrictHostKeyChecking=yes" in joined and "StrictHostKeyChecking=no" not in joined
    assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in joined
    assert "IdentitiesOnly=yes" in joined and f"-i {tmp_path / 'id_ed25519'}" in joined
    assert argv[-3:] == ["ubuntu@127.0.0.1", "--", "make check"]
    assert argv[argv.index("-p") + 1] == "2222"


def test_run_seed_carries_run_key_and_host_key(make_pipeline):
    pipeline = load_pipeline(make_pipeline("cloud_init: {user: dev}\n"))
    files = run_seed_files(pipeline, "ssh-ed25519 AAAArun run", "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n",
                           "ssh-ed25519 AAAAhost host", "cloudbake-run-1")
    doc = yaml.safe_load(files.user_data)
    assert doc["users"][0]["name"] == "dev" and doc["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 AAAArun run"]
    assert doc["ssh_keys"]["ed25519_public"] == "ssh-ed25519 AAAAhost host"
    assert doc["ssh_pwauth"] is False and "power_state" not in doc
    assert yaml.safe_load(files.meta_data)["instance-id"] == "cloudbake-run-1"


def test_overlay_names_its_base_relatively(tmp_path):
    base = tmp_path / "dist" / "img-0123456789abcdef.qcow2"
    base.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    run_folder = runs_root(base) / "r1"
    run_folder.mkdir(parents=True)
    overlay = run_folder / "disk.qcow2"
    make_overlay(base, overlay)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["backing-filename"] == "../../img-0123456789abcdef.qcow2"
    assert overlay.stat().st_size < 1 << 20
    moved = tmp_path / "moved"
    (tmp_path / "dist").rename(moved)
    assert subprocess.run(["qemu-img", "info", str(moved / ".runs" / "r1" / "disk.qcow2")],
                          capture_output=True).returncode == 0


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    """Dead owners and kept VMs whose QEMU is gone go; live owners and kept VMs still running stay."""
    from cloudbake.run.runs import process_start_marker

    base = tmp_path / "dist" / "img.qcow2"
    root = runs_root(base)
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout.strip())
    stand_in_qemu = subprocess.Popen(["sleep", "60"])
    try:
        running = {"qemu_pid": stand_in_qemu.pid, "qemu_started": process_start_marker(stand_in_qemu.pid)}
        for name, info in (("dead", {"pid": dead_pid}), ("alive", {"pid": os.getpid()}),
                           ("kept", {"pid": dead_pid, "kept": True, **running}),
                           ("kept-but-gone", {"pid": dead_pid, "kept": True, "qemu_pid": dead_pid}),
                           ("kept-pid-reused", {"pid": dead_pid, "kept": True, "qemu_pid": stand_in_qemu.pid,
                                                "qemu_started": "Mon Jan  1 00:00:00 2001"})):
            (root / name).mkdir(parents=True)
            (root / name / "run.json").write_text(json.dumps(info))
            (root / name / "disk.qcow2").write_bytes(b"x")
        removed = clean_leftovers(base)
        assert sorted(p.name for p in removed) == ["dead", "kept-but-gone", "kept-pid-reused"]
        assert sorted(p.name for p in root.iterdir()) == ["alive", "kept"]
        assert stand_in_qemu.poll() is None, "a reused pid is not ours to kill"
    finally:
        stand_in_qemu.kill()
        stand_in_qemu.wait()


def test_a_test_run_command_looks_the_base_image_up_once(tmp_path, monkeypatch):
    """Two runs at once (and the warm set each would save first) share the one lookup of the published image
    and its check against the manifest, and the one resolution of the build. A stand-in QEMU that exits at
    once makes both runs fail at their boot, quickly."""
    from cloudbake.config.paths import resolve_paths
    from cloudbake.image import build
    from cloudbake.run import runs
    from cloudbake.run.testrun import TestRequest, run_test_image
    from tests.fixture.offline import offline_project

    file = offline_project(tmp_path, published=True)
    file.write_text(file.read_text().replace("accel: auto", "accel: tcg"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'QEMU emulator version 7.2.0' && exit 0\n"
                    "echo 'no guest here' >&2; exit 1\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    checked = []
    real_verify = runs.verify_chain  # type: ignore[attr-defined]

    def counted(image):
        checked.append(image)
        return real_verify(image)

    monkeypatch.setattr(runs, "verify_chain", counted)
    pipeline = load_pipeline(file)
    monkeypatch.setattr(build, "resolutions", 0)
    outcome = run_test_image(pipeline, resolve_paths(pipeline), TestRequest(jobs=2))
    assert [result.stage for result in outcome.runs] == ["boot", "boot"]
    assert len(checked) == 1 and build.resolutions == 1
