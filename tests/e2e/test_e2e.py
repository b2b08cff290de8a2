"""End to end under TCG: a real bake of the fixture image from the fixture mirror, and throwaway test VMs.

One bake is shared by the whole session; each test that boots says why it needs its own guest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.fixture.e2e import USER_DATA, cloudbake, doit, qemu_processes, write_project
from tests.fixture.mirror import sha256_file as sha256

pytestmark = pytest.mark.e2e


def test_bake_publishes_a_self_contained_image_with_manifest(baked):
    image = baked["image"]
    manifest = json.loads(image.with_suffix(".json").read_text())
    assert image.name == f"e2e-{manifest['key']}.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    upstream = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(baked["upstream"])],
                                         capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == manifest["image"]["virtual_size"] == upstream["virtual-size"] + (1 << 30)
    assert manifest["cloud_init"]["errors"] == [] and manifest["cloud_init"]["generalized"] is True
    # The boot profile: systemd's slowest units and cloud-init's stage times, as the guest measured them.
    profile = manifest["boot_profile"]
    assert profile["slowest_units"] and all(unit["unit"].count(".") >= 1 and unit["seconds"] >= 0
                                            for unit in profile["slowest_units"]), profile
    assert set(profile["cloud_init_stages"]) >= {"init-local", "init", "modules-config"}, profile
    assert "slowest units of the boot: " in baked["log"]
    assert manifest["image"]["sha256"] == sha256(image)
    assert manifest["qemu"]["firmware"] == "uefi" and manifest["qemu"]["accel"] in ("tcg", "kvm")
    assert manifest["inputs"]["upstream"]["sha256"] == sha256(baked["folder"] / "cache" / "images" / next(
        p.name for p in (baked["folder"] / "cache" / "images").glob("*.img")))
    assert (image.parent / "e2e.qcow2").resolve() == image
    serial = (baked["folder"] / "build" / "e2e" / "serial.log").read_text(errors="replace")
    assert "Cloud-init v." in serial and "finished at" in serial and "reboot: Power down" in serial
    assert "generalizes itself" in baked["log"]
    # The guest runs cloud-init 22.4, whose schema refuses the list-form sudo rule that cloudbake accepts (and
    # cloud-init runs): the bake shows the guest's own annotated verdict, not the advice to run it.
    assert "the guest's cloud-init warned about the user-data" in baked["log"], baked["log"]
    assert "sudo" in baked["log"].split("the guest's cloud-init warned", 1)[1]
    text = image.with_suffix(".json").read_text()
    assert "PRIVATE KEY" not in text and "runcmd" not in text
    assert (baked["folder"] / "pipeline.lock").is_file()
    assert qemu_processes(str(baked["folder"])) == []


def test_auto_accel_matches_what_this_hosts_kvm_does(baked):
    """The shared bake ran with accel auto on the real host: whatever its KVM does, the manifest, the log
    and the remembered verdict agree with it."""
    manifest = json.loads(baked["image"].with_suffix(".json").read_text())
    accel, reason = manifest["qemu"]["accel"], manifest["qemu"]["accel_reason"]
    verdict = baked["folder"] / "cache" / "host" / "kvm-verdict.json"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert accel == "tcg" and "/dev/kvm is missing or not accessible" in reason
        assert not verdict.exists()
    elif accel == "kvm":  # a host whose KVM runs guests: no fallback, nothing remembered
        assert "falling back to TCG" not in baked["log"] and not verdict.exists()
    else:  # a broken KVM (it hangs or aborts here): one warning, QEMU's words remembered
        assert accel == "tcg" and "KVM cannot run guests here" in reason
        assert baked["log"].count("falling back to TCG") == 1
        assert json.loads(verdict.read_text())["verdict"] in reason


def test_noop_rebake_does_nothing(baked, real_server):
    before = len(real_server.state.requests)
    result = doit("bake", f"pipeline={baked['pipeline']}", cwd=baked["folder"])
    assert result.returncode == 0, result.stderr
    assert "starting qemu" not in result.stderr
    assert len(real_server.state.requests) == before


def test_cache_key_matches_published_key(baked):
    result = doit("-r", "zero", "cache-key", f"pipeline={baked['pipeline']}", cwd=baked["folder"], timeout=60)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(baked["image"].with_suffix(".json").read_text())
    assert result.stdout.strip() == manifest["key"]


def test_restored_cache_skips_the_bake(baked, real_server, tmp_path):
    """A fresh checkout with only output.dir restored (no doit state, no download cache, server gone)."""
    fresh = tmp_path / "fresh"
    (fresh / "cloud-init").mkdir(parents=True)
    shutil.copy(baked["folder"] / "cloud-init" / "user-data.yaml", fresh / "cloud-init")
    shutil.copy(baked["pipeline"], fresh / "pipeline.yaml")
    shutil.copy(baked["folder"] / "pipeline.lock", fresh / "pipeline.lock")
    text = (fresh / "pipeline.yaml").read_text().replace(str(baked["folder"] / "cache"), str(fresh / "cache"))
    (fresh / "pipeline.yaml").write_text(text)
    shutil.copytree(baked["folder"] / "dist", fresh / "dist", symlinks=True)
    before = len(real_server.state.requests)
    result = doit("bake", f"pipeline={fresh / 'pipeline.yaml'}", cwd=fresh)
    assert result.returncode == 0, result.stderr
    assert "starting qemu" not in result.stderr
    assert len(real_server.state.requests) == before
    assert not (fresh / "cache" / "images").exists()


def test_up_ssh_ps_down_and_the_pinned_host_key(baked):
    """A VM for people and harnesses: up prints how to reach it, ssh runs in it, ps lists it; after the
    guest's host key is swapped, cloudbake's SSH refuses to talk to it; down leaves nothing."""
    cli, folder = baked["cloudbake"], baked["folder"]
    up = cloudbake(cli, "up", "--json", cwd=folder)
    assert up.returncode == 0, up.stdout + up.stderr
    vm = json.loads(up.stdout)
    run_folder = Path(vm["serial_log"]).parent
    try:
        assert vm["state"] == "kept" and vm["ssh_port"] and oct((run_folder / "id_ed25519").stat().st_mode
                                                                 & 0o777) == "0o600"
        listed = json.loads(cloudbake(cli, "ps", "--json", cwd=folder).stdout)
        assert [v["id"] for v in listed] == [vm["id"]]
        hello = cloudbake(cli, "ssh", vm["id"], "cat", "/etc/cloudbake-e2e", cwd=folder, timeout=120)
        assert hello.returncode == 0 and hello.stdout == "baked\n", hello.stderr
        direct = subprocess.run(vm["ssh"] + ["--", "hostname"], capture_output=True, text=True, timeout=120)
        assert direct.stdout.strip() == "cloudbake"
        # The user whose empty key list asked for cloudbake's keys logs in with this run's key, and its
        # list-form sudo rule works (and only that rule).
        as_faas = [arg.replace(f"{vm['user']}@", "faas@") for arg in vm["ssh"]]
        faas = subprocess.run([*as_faas, "--", "sudo -n /usr/bin/id -u; sudo -n true || echo refused"],
                              capture_output=True, text=True, timeout=120)
        assert faas.stdout.split() == ["0", "refused"], faas.stderr
        swap = ("sudo -n rm -f /etc/ssh/ssh_host_ed25519_key* && sudo -n ssh-keygen -q -t ed25519 -N '' "
                "-f /etc/ssh/ssh_host_ed25519_key && sudo -n systemctl restart ssh")
        assert cloudbake(cli, "ssh", vm["id"], swap, cwd=folder, timeout=120).returncode == 0
        refused = cloudbake(cli, "ssh", vm["id"], "true", cwd=folder, timeout=120)
        assert refused.returncode == 255 and "Host key verification failed" in refused.stderr
    finally:
        down = cloudbake(cli, "down", vm["id"], cwd=folder, timeout=120)
    assert down.returncode == 0 and f"stopped {vm['id']}" in down.stdout
    assert json.loads(cloudbake(cli, "ps", "--json", cwd=folder).stdout) == []
    assert not run_folder.exists() and qemu_processes(str(baked["image"].parent)) == []


def test_ssh_that_never_comes_up_is_the_machinery_status(baked, tmp_path):
    """The guest is real but gets 15 s: SSH cannot answer in time, and that is cloudbake's failure (125),
    with the stage named, not a test failure."""
    import yaml

    doc = yaml.safe_load(baked["pipeline"].read_text())
    doc["cloud_init"]["user_data"] = str(baked["folder"] / "cloud-init" / "user-data.yaml")
    doc["output"] = {"dir": str(baked["folder"] / "dist")}
    doc["test"]["timeout"] = "15s"
    doc["test"]["warm"] = False  # a warm start would answer within 15 s
    pipeline = tmp_path / "short.yaml"
    pipeline.write_text(yaml.safe_dump(doc))
    shutil.copy(baked["folder"] / "pipeline.lock", tmp_path / "short.lock")
    started = time.monotonic()
    result = cloudbake(baked["cloudbake"], "-p", str(pipeline), "test-image", "--no-bake", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 125, out
    assert "boot: 'SSH port answers' did not happen within test.timeout (15 s)" in out
    assert "cloudbake's machinery failed at stage boot (exit status 125)" in out and "last lines of" in out
    assert time.monotonic() - started < 120
    assert qemu_processes(str(baked["image"].parent)) == []
    assert list((baked["image"].parent / ".runs").iterdir()) == []


# --- bakes that must fail: each needs its own guest --------------------------------------


def test_failing_runcmd_fails_the_bake_naming_the_module(tmp_path, real_mirror, real_server):
    pipeline = write_project(tmp_path, real_server.url, real_mirror.key, accel="tcg",
                             user_data="#cloud-config\nruncmd:\n  - [sh, -c, 'echo boom; exit 3']\n",
                             cache=tmp_path / "cache")
    result = doit("bake", f"pipeline={pipeline}", cwd=tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "cloud-init reported errors in module scripts_user" in out and "Traceback" not in out
    assert not list((tmp_path / "dist").glob("*.qcow2")) if (tmp_path / "dist").exists() else True
    # The project's bake runs with -no-shutdown: a failed guest's QEMU is kept up to inspect,
    # and the bake says how to reach its monitor. The test then stops it as a user would.
    kept = qemu_processes(str(tmp_path))
    assert len(kept) == 1 and "kept running for inspection" in out, out
    named = re.search(r"stop it with `kill (\d+)`", out)
    assert named is not None, out
    pid = int(named.group(1))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while qemu_processes(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_processes(str(tmp_path)) == []


def test_guest_that_never_powers_off_hits_the_timeout(tmp_path, real_mirror, real_server):
    pipeline = write_project(tmp_path, real_server.url, real_mirror.key, accel="tcg",
                             user_data="#cloud-config\nbootcmd:\n  - [sleep, '100000']\n", cache=tmp_path / "cache")
    text = pipeline.read_text().replace("timeout: 15m", "timeout: 40s")
    pipeline.write_text(text)
    result = doit("bake", f"pipeline={pipeline}", cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "did not finish within 40 s" in out and "serial.log" in out
    assert qemu_processes(str(tmp_path)) == []
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_ctrl_c_during_boot_leaves_nothing(tmp_path, real_mirror, real_server):
    pipeline = write_project(tmp_path, real_server.url, real_mirror.key, accel="tcg",
                             user_data="#cloud-config\nruncmd: [[echo, sigint]]\n", cache=tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), "bake",
                             f"pipeline={pipeline}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    serial = tmp_path / "build" / "e2e" / "serial.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (serial.exists() and serial.stat().st_size > 0):
        time.sleep(0.5)
    assert serial.exists() and serial.stat().st_size > 0, "the guest never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted" in out + err
    assert qemu_processes(str(tmp_path)) == []
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_restored_cache_with_changed_user_data_misses(baked, tmp_path):
    """Changing user-data changes the key offline (no boot needed to see the miss)."""
    fresh = tmp_path / "changed"
    shutil.copytree(baked["folder"] / "cloud-init", fresh / "cloud-init")
    shutil.copy(baked["pipeline"], fresh / "pipeline.yaml")
    shutil.copy(baked["folder"] / "pipeline.lock", fresh / "pipeline.lock")
    (fresh / "cloud-init" / "user-data.yaml").write_text(USER_DATA + "timezone: Europe/Berlin\n")
    result = doit("-r", "zero", "cache-key", f"pipeline={fresh / 'pipeline.yaml'}", cwd=fresh, timeout=60)
    manifest = json.loads(baked["image"].with_suffix(".json").read_text())
    assert result.returncode == 0 and result.stdout.strip() != manifest["key"]


# --- CI, played on this machine ------------------------------------------------------------


def users_workflow() -> str:
    """The workflow docs/ci.md tells a user to write: its first YAML block, as written."""
    text = (PROJECT / "docs" / "ci.md").read_text()
    found = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert found is not None
    return found.group(1)


def _users_repository(folder: Path, mirror_url: str, key) -> Path:
    """A user's repository: their pipeline, cloud-init and a workflow of about ten lines, nothing of
    cloudbake's (no tasks/, no dodo.py, no .venv), in git as a checkout would be."""
    folder.mkdir(parents=True)
    write_project(folder, mirror_url, key, accel="tcg")
    text = (folder / "pipeline.yaml").read_text()
    # The download cache in the runner's home, the default.
    (folder / "pipeline.yaml").write_text("\n".join(line for line in text.splitlines()
                                                   if not line.startswith("cache:")) + "\n")
    workflow = folder / ".github" / "workflows" / "vm-tests.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text(users_workflow())
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run(["git", "add", "."], cwd=folder, check=True)
    return workflow


def test_the_action_in_a_users_repository_bakes_once_then_restores(tmp_path, real_mirror, real_server,
                                                                   built_package):
    """docs/ci.md's ten lines (`uses: cloudbake/cloudbake@v1`: this checkout's action.yml), step by step as
    GitHub runs them, in a user's repository and two fresh runners sharing only the cache: the first has no
    lock, pins one, misses, bakes, saves the warm state and the image before testing, tests, and says to
    commit the lock; the second (lock committed, fresh home) restores the image and not the downloads: no
    HTTP request, no bake, no boot before its test VM, which resumes warm. A failing suite fails the job
    with its own status and uploads the logs."""
    from tests.test_ci import replay

    action = {"cloudbake/cloudbake@v1": PROJECT}
    cache = tmp_path / "actions-cache"
    first = tmp_path / "run-1" / "repo"
    workflow = _users_repository(first, real_server.url, real_mirror.key)
    assert len([line for line in workflow.read_text().splitlines() if line.strip()]) <= 12
    run_1 = replay(first, cache, tmp_path / "run-1" / "home", built_package, workflow=workflow, actions=action)
    assert not run_1.failed, [(s.name, s.outcome, s.stderr[-2000:]) for s in run_1.steps]
    assert "Install cloudbake" in [s.name for s in run_1.steps]
    key = run_1.outputs["key"]["key"]
    assert run_1.outputs["test"]["exit-status"] == "0"
    assert run_1.outputs["lock"]["fetched"] == "true" and (first / "pipeline.lock").is_file()
    assert run_1.outputs["image"]["cache-hit"] == "" and run_1.step("Save the baked image").outcome == "success"
    assert "starting qemu" in run_1.step("Bake").stderr
    assert "saved the warm state" in run_1.step("Save the warm state").stderr
    names = [s.name for s in run_1.steps]

    def position(part: str) -> int:
        return next(index for index, name in enumerate(names) if part in name)
    assert position("Save the warm state") < position("Save the baked image") < position("Test inside a throwaway VM")
    tested_1 = run_1.step("Test inside a throwaway VM").stderr
    assert tested_1.count("starting qemu") == 1 and "resumed warm" in tested_1
    assert f"`{key}`" in run_1.summary and "| image cache | miss |" in run_1.summary
    assert "pipeline.lock` was missing" in run_1.summary and "bake stages" in run_1.summary
    assert (cache / f"cloudbake-image-Linux-{key}").is_dir()
    downloads = [entry for entry in cache.iterdir() if entry.name.startswith("cloudbake-download-")]
    assert len(downloads) == 1

    second = tmp_path / "run-2" / "repo"
    _users_repository(second, real_server.url, real_mirror.key)
    shutil.copy(first / "pipeline.lock", second / "pipeline.lock")  # committed, as the first summary asked
    requests_before = len(real_server.state.requests)
    run_2 = replay(second, cache, tmp_path / "run-2" / "home", built_package, workflow=workflow, actions=action)
    assert not run_2.failed, [(s.name, s.outcome, s.stderr[-2000:]) for s in run_2.steps]
    assert run_2.outputs["key"]["key"] == key
    assert run_2.outputs["lock"]["fetched"] == "false"
    assert run_2.step("Restore the download cache").outcome == "skipped"   # an image hit needs no downloads
    assert run_2.step("Save the baked image").outcome == "skipped"
    assert "starting qemu" not in run_2.step("Bake").stderr
    assert len(real_server.state.requests) == requests_before
    # A fresh runner with the cache restored: no guest boots in this job. The one QEMU is the
    # test VM, resumed from the warm set the first job saved into the cache.
    assert "starting qemu" not in run_2.step("Save the warm state").stderr
    tested = run_2.step("Test inside a throwaway VM").stderr
    assert sum(step.stderr.count("starting qemu") for step in run_2.steps) == 1
    assert "resumed warm" in tested and "booting it once" not in tested
    assert "| image cache | hit |" in run_2.summary and "was missing" not in run_2.summary

    # Another job, a suite that fails: the job fails with the suite's status and uploads the logs.
    from tests.fixture.actions import LocalRunner

    third = tmp_path / "run-3" / "repo"
    _users_repository(third, real_server.url, real_mirror.key)
    shutil.copy(first / "pipeline.lock", third / "pipeline.lock")
    (tmp_path / "run-3" / "home").mkdir()
    failing = LocalRunner(workflow, "tests", third, cache, tmp_path / "run-3" / "home",
                          env={"XDG_CACHE_HOME": str(tmp_path / "run-3" / "home" / ".cache"), **built_package.pip_env()},
                          inputs={"cloudbake-version": str(built_package.wheel), "command": "echo failing; exit 3"},
                          actions=action, artifacts_root=tmp_path / "uploaded").run()
    assert failing.step("Test inside a throwaway VM").outcome == "failure"
    assert failing.outputs["test"]["exit-status"] == "3"
    assert failing.step("Upload serial logs").outcome == "success"
    assert (tmp_path / "uploaded" / "cloudbake-logs" / "pipeline.lock").is_file()
