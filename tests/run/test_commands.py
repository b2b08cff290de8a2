"""The cloudbake commands that are not doit tasks, without a guest: stand-in QEMU programs play
a guest that never answers SSH, and an offline project has a "published" image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fixture.offline import offline_project
from tests.fixture.standin import install_standin_qemu, path_with, tools_folder


def cloudbake(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "cloudbake.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_a_guest_that_never_answers_ssh_is_the_machinery_status(tmp_path):
    offline_project(tmp_path, published=True, extra="")
    text = (tmp_path / "pipeline.yaml").read_text().replace("timeout: 10m}", "timeout: 4s}")
    (tmp_path / "pipeline.yaml").write_text(text)
    bin_dir = install_standin_qemu(tmp_path / "bin", "works")
    env = {"PATH": path_with(bin_dir), "CLOUDBAKE_STANDIN_GUEST_SECONDS": "600", "CLOUDBAKE_HEARTBEAT_S": "1"}
    result = cloudbake(tmp_path, "test-image", "--no-bake", env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 125, out
    # Every wait says what it waits for, with the time so far and the console's last line (heartbeat 1 s here);
    # the first boot of an image is the one its warm set is saved from.
    assert "[warm] waiting for: boot: SSH port answers (2 s so far); console: [    0.000000] Linux" in result.stderr
    (tmp_path / "cold.yaml").write_text(text.replace('test: {command: "true", timeout: 4s}',
                                                      'test: {command: "true", timeout: 4s, warm: false}'))
    (tmp_path / "cold.lock").write_bytes((tmp_path / "pipeline.lock").read_bytes())
    cold = cloudbake(tmp_path, "test-image", "--no-bake", "-p", "cold.yaml", env=env)
    assert cold.returncode == 125, cold.stderr
    assert "[test-image] waiting for: boot: SSH port answers (2 s so far)" in cold.stderr, cold.stderr
    assert "boot: 'SSH port answers' did not happen within test.timeout (4 s)" in out
    assert "cloudbake's machinery failed at stage boot (exit status 125)" in out and "Traceback" not in out
    assert list((tmp_path / "dist" / ".runs").iterdir()) == []
    # `cloudbake warm` boots the VM its set is saved from the same way, and says so under its own name.
    warm = cloudbake(tmp_path, "warm", env=env)
    assert "[warm] waiting for: boot: SSH port answers (2 s so far)" in warm.stderr, warm.stderr
    assert "could not save a warm state" in warm.stderr


def test_no_baked_image_is_the_machinery_status_naming_the_stage(tmp_path):
    offline_project(tmp_path)
    result = cloudbake(tmp_path, "test-image", "--no-bake")
    assert result.returncode == 125
    assert "base image: no baked image for the current key" in result.stderr and "run cloudbake bake" in result.stderr


def test_more_vms_than_fit_in_memory_are_refused_before_any_starts(tmp_path):
    offline_project(tmp_path, published=True)
    result = cloudbake(tmp_path, "test-image", "--no-bake", "-j", "64")
    assert result.returncode == 125
    assert "memory: 64 VMs at once need about" in result.stderr and "run at most -j" in result.stderr
    assert not (tmp_path / "dist" / ".runs").exists() or list((tmp_path / "dist" / ".runs").iterdir()) == []


def test_wrong_command_lines_are_usage_errors(tmp_path):
    offline_project(tmp_path, published=True)
    keep_many = cloudbake(tmp_path, "test-image", "--no-bake", "--keep", "-j", "2")
    assert keep_many.returncode == 2 and "--keep keeps one VM" in keep_many.stderr
    zero = cloudbake(tmp_path, "test-image", "--no-bake", "-j", "0")
    assert zero.returncode == 2 and "-j needs a number of VMs" in zero.stderr
    down = cloudbake(tmp_path, "down")
    assert down.returncode == 2 and "no VM is up" in down.stderr and "cloudbake up starts one" in down.stderr
    ssh = cloudbake(tmp_path, "ssh")
    assert ssh.returncode == 2 and "no VM is up" in ssh.stderr
    unknown = cloudbake(tmp_path, "down", "nope")
    assert unknown.returncode == 2 and "no VM 'nope'" in unknown.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("test: {forward: [22]}\n")
    bad_pipeline = cloudbake(tmp_path, "-p", str(broken), "ps")
    assert bad_pipeline.returncode == 2 and "guest port 22 is forwarded already" in bad_pipeline.stderr


def test_a_file_of_several_images_needs_image_where_it_matters(tmp_path):
    """test-image and up need --image in a file of several images; ps works on the shared output folder."""
    offline_project(tmp_path, published=True, extra="matrix:\n  vm.memory: [256M, 512M]\n")
    unnamed = cloudbake(tmp_path, "test-image", "--no-bake")
    assert unnamed.returncode == 2 and "describes 2 images (offline-256m, offline-512m); name one" in unnamed.stderr
    typo = cloudbake(tmp_path, "up", "--image", "offline-521m")
    assert typo.returncode == 2 and "did you mean 'offline-512m'" in typo.stderr
    ps = cloudbake(tmp_path, "ps", "--json")
    assert ps.returncode == 0 and json.loads(ps.stdout) == []
    missing = cloudbake(tmp_path, "test-image", "--no-bake", "--image", "offline-512m", "-j", "64")
    assert missing.returncode == 125 and "memory: 64 VMs at once" in missing.stderr  # the named image's run


def test_ps_lists_kept_vms_and_down_removes_them(tmp_path):
    """A kept run whose QEMU (here a sleeping stand-in) is alive is listed; down stops it and deletes its folder."""
    from cloudbake.run.runs import RunFiles, process_start_marker

    offline_project(tmp_path, published=True)
    assert cloudbake(tmp_path, "ps").stdout.strip() == "no VMs are up"
    qemu = subprocess.Popen(["sleep", "300"])
    try:
        folder = tmp_path / "dist" / ".runs" / "20261129-000000-1-abcdef"
        folder.mkdir(parents=True)
        RunFiles(folder).update_record(pid=1 << 22, kept=True, base="offline-x.qcow2", user="ubuntu", ssh_port=2222,
                                       forwards={"8080": 18080}, qemu_pid=qemu.pid,
                                       qemu_started=process_start_marker(qemu.pid))
        (folder / "id_ed25519").write_text("private")
        listed = json.loads(cloudbake(tmp_path, "ps", "--json").stdout)
        assert [(v["id"], v["state"], v["ssh_port"], v["ports"]) for v in listed] == [
            (folder.name, "kept", 2222, {"8080": 18080})]
        table = cloudbake(tmp_path, "ps").stdout
        assert folder.name in table and "8080->18080" in table
        down = cloudbake(tmp_path, "down", "--all")
        assert down.returncode == 0 and f"stopped {folder.name}" in down.stdout
        assert qemu.wait(10) is not None and not folder.exists()
    finally:
        qemu.kill()
        qemu.wait()


def _kept_run(tmp_path: Path, run_id: str, qemu: subprocess.Popen, port: int) -> Path:
    from cloudbake.run.runs import RunFiles, process_start_marker

    folder = tmp_path / "dist" / ".runs" / run_id
    folder.mkdir(parents=True)
    RunFiles(folder).update_record(pid=1 << 22, kept=True, base="offline-x.qcow2", user="ubuntu", ssh_port=port,
                                   forwards={}, qemu_pid=qemu.pid, qemu_started=process_start_marker(qemu.pid))
    return folder


def test_vm_verbs_pick_the_only_vm_and_take_unique_prefixes(tmp_path):
    """As with limactl and docker: `ssh -- CMD` and `down` need no id when one VM is up; a unique prefix names
    one; an ambiguous prefix is refused with what is up. A stand-in ssh prints what it was asked to run."""
    offline_project(tmp_path, published=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f"#!{sys.executable}\nimport sys\nprint('SSH', *sys.argv[1:])\n")
    (bin_dir / "ssh").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    sleepers = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]
    try:
        first = _kept_run(tmp_path, "a1b2c3d4", sleepers[0], 2201)
        _kept_run(tmp_path, "a1ffee00", sleepers[1], 2202)
        named = _kept_run(tmp_path, "web", sleepers[2], 2203)
        ambiguous = cloudbake(tmp_path, "down", "a1", env=env)
        assert ambiguous.returncode == 2 and "2 VMs match 'a1'" in ambiguous.stderr and "web" in ambiguous.stderr
        several = cloudbake(tmp_path, "ssh", "--", "true", env=env)
        assert several.returncode == 2 and "3 VMs are up" in several.stderr
        by_prefix = cloudbake(tmp_path, "ssh", "a1b", "--", "uname", "-a", env=env)
        assert by_prefix.returncode == 0, by_prefix.stderr
        assert "-p 2201" in by_prefix.stdout and by_prefix.stdout.rstrip().endswith("uname -a")
        assert cloudbake(tmp_path, "down", "web", "a1f", env=env).returncode == 0
        assert sleepers[2].wait(10) is not None and not named.exists()
        only = cloudbake(tmp_path, "ssh", "--", "echo", "hi", env=env)
        assert only.returncode == 0 and "-p 2201" in only.stdout and only.stdout.rstrip().endswith("echo hi")
        assert cloudbake(tmp_path, "--pipeline", "pipeline.yaml", "down", env=env).returncode == 0
        assert not first.exists()
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


def test_missing_host_programs_stop_a_run_before_anything_boots(tmp_path):
    """Without ssh (or zstd for warm start) nothing boots and the warm set stays: exit 125, the program and its
    install line named. A stand-in QEMU would log that it started."""
    from cloudbake.run.warm import warm_root

    offline_project(tmp_path, published=True)
    image = next((tmp_path / "dist").glob("offline-*.qcow2"))
    warm_set = warm_root(image) / f"{image.stem}-0123456789abcdef"
    warm_set.mkdir(parents=True)
    (warm_set / "warm.json").write_text("{}")
    tools = tools_folder(tmp_path / "tools", ("qemu-img", "ssh-keygen", "tar", "git", "zstd", "ps", "sleep"))
    bin_dir = install_standin_qemu(tmp_path / "bin", "works")
    result = cloudbake(tmp_path, "test-image", "--no-bake", env={"PATH": f"{bin_dir}:{tools}"})
    assert result.returncode == 125, result.stderr
    assert "host: missing on this host: ssh (install it: apt-get install openssh-client" in result.stderr
    assert "starting qemu" not in result.stderr and "Traceback" not in result.stderr
    (tools / "zstd").unlink()
    for verb in ("test-image", "up"):
        without_zstd = cloudbake(tmp_path, verb, *(["--no-bake"] if verb == "test-image" else []),
                                 env={"PATH": f"{bin_dir}:{tools}:/nonexistent"})
        assert without_zstd.returncode == 125, without_zstd.stderr
        assert "zstd (install it: apt-get install zstd; macOS: brew install zstd)" in without_zstd.stderr
    assert (warm_set / "warm.json").exists()   # a host-side problem never costs the warm set
    ssh = cloudbake(tmp_path, "ssh", "--", "true", env={"PATH": str(tools)})
    assert ssh.returncode == 125 and "missing on this host: ssh" in ssh.stderr and "Traceback" not in ssh.stderr
