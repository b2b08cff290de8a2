"""A Machine's commands, copies, upload and environment, without a guest.

A stand-in `ssh` runs the remote command on this machine with HOME set to a folder that plays
the guest user's home (and `sudo -n` runs it as is), so the real scripts cloudbake sends, the
host's real GNU tar and a real shell do the work. Real guests run them in tests/e2e/test_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.run.machine import CommandFailedError, Machine
from cloudbake.run.runs import RunFiles
from cloudbake.run.ssh import GuestShell

STANDIN_SSH = """#!/bin/sh
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done
shift
if [ -n "$STANDIN_SSH_SLEEP" ]; then exec sleep "$STANDIN_SSH_SLEEP"; fi
export HOME="$STANDIN_GUEST_HOME"
cd "$HOME"
sh -c "$*"
status=$?
if [ -n "$STANDIN_SSH_DROP" ]; then echo "Connection to 127.0.0.1 closed by remote host." >&2; exit 255; fi
exit $status
"""
STANDIN_SUDO = '#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n'


def install_guest_tools(folder: Path) -> tuple[Path, Path]:
    """Stand-in `ssh` and `sudo` in ``folder/bin`` and a guest home ``folder/guest-home``; returns both."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name, text in (("ssh", STANDIN_SSH), ("sudo", STANDIN_SUDO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    home = folder / "guest-home"
    home.mkdir()
    return bin_dir, home


@pytest.fixture
def guest(tmp_path, monkeypatch):
    """The stand-in tools first on PATH; returns the guest home."""
    bin_dir, home = install_guest_tools(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_GUEST_HOME", str(home))
    return home


def attached(make_pipeline, test: str = "{}", **kw) -> Machine:
    """A Machine as start() leaves it, minus the boot: run folder, port, guest prepared."""
    pipeline = load_pipeline(make_pipeline(f"test: {test}\n"))
    machine = Machine(pipeline, resolve_paths(pipeline), **kw)
    folder = pipeline.file.parent / "run"
    folder.mkdir()
    machine.files = RunFiles(folder)
    machine.ssh_port = 2222
    machine.shell = GuestShell(machine.files, 2222, machine.user, pipeline.test.workdir, machine.output_prefix)
    machine._prepare_guest()
    machine._ready = True
    return machine


def test_command_status_output_and_workdir(guest, make_pipeline):
    machine = attached(make_pipeline)
    result = machine.run("pwd; echo oops >&2; exit 7")
    assert result.status == 7 and not result.ok
    assert result.stdout.strip() == str(guest / "src") and result.stderr.strip() == "oops"
    assert machine.run("true").ok


def test_a_command_that_exits_255_is_told_apart_from_a_lost_connection(guest, make_pipeline, monkeypatch):
    machine = attached(make_pipeline)
    assert machine.run("exit 255").status == 255
    monkeypatch.setenv("STANDIN_SSH_DROP", "1")
    assert machine.shell is not None
    machine.shell._status_nonce = "fresh"  # the lost run never recorded a status
    monkeypatch.setenv("STANDIN_SSH_SLEEP", "")
    (guest / ".cloudbake" / "status.fresh").unlink(missing_ok=True)
    with pytest.raises(MachineryError, match="ssh: the SSH connection to the guest broke") as caught:
        machine.run("kill -9 $$")
    assert caught.value.stage == "ssh"


def test_env_reaches_the_command_but_never_its_command_line(guest, make_pipeline, monkeypatch, caplog):
    calls = guest.parent / "ssh-argv.log"
    ssh = guest.parent / "bin" / "ssh"
    ssh.write_text(ssh.read_text().replace("#!/bin/sh\n", f'#!/bin/sh\necho "$*" >> {calls}\n', 1))
    machine = attached(make_pipeline, "{env: {SECRET: 's3cr3t value', EMPTY: ''}, forward: [8080]}",
                       env={"CLOUDBAKE_SHARD": "1"})
    machine.forwards = ()
    out = machine.run('printf "%s|%s|%s" "$SECRET" "$CLOUDBAKE_SHARD" "${EMPTY-unset}"', env={"PER_CALL": "x"})
    assert out.stdout == "s3cr3t value|1|"
    assert machine.run('echo "$PER_CALL"').stdout.strip() == "", "a call's env is for that call only"
    assert "s3cr3t" not in calls.read_text() and "s3cr3t" not in caplog.text
    env_file = guest / ".cloudbake" / "env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"


def test_check_true_raises_with_the_status(guest, make_pipeline):
    machine = attached(make_pipeline)
    with pytest.raises(CommandFailedError, match="exit status 3") as caught:
        machine.run("echo bad >&2; exit 3", check=True)
    assert caught.value.result.stderr.strip() == "bad"


def test_a_command_that_outlives_its_timeout_is_the_timeout_stage(guest, make_pipeline):
    machine = attached(make_pipeline)
    with pytest.raises(MachineryError) as caught:
        machine.run("sleep 30", timeout=1)
    assert caught.value.stage == "timeout"


def test_upload_sends_the_git_work_tree_minus_ignored_files(guest, make_pipeline):
    machine = attached(make_pipeline)
    project = machine.pipeline.file.parent
    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("print('hi')\n")
    (project / "notes with space.txt").write_text("n")
    (project / ".gitignore").write_text("*.log\nrun/\n")
    (project / "debug.log").write_text("ignored")
    (project / "gone.txt").write_text("tracked then deleted")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run(["git", "-C", str(project), "add", "gone.txt", "src"], check=True)
    (project / "gone.txt").unlink()
    machine.upload_project()
    sent = guest / "src"
    assert (sent / "src" / "app.py").read_text() == "print('hi')\n"
    assert (sent / "notes with space.txt").exists() and (sent / "pipeline.yaml").exists()
    assert not (sent / "debug.log").exists() and not (sent / "gone.txt").exists() and not (sent / "run").exists()


def test_upload_of_listed_globs_and_nothing_outside_git(guest, make_pipeline):
    machine = attached(make_pipeline, f"{{upload: ['tests/**/*.py', cloud-init], workdir: /tmp/cb-wd-{os.getpid()}}}")
    project = machine.pipeline.file.parent
    (project / "tests" / "deep").mkdir(parents=True)
    (project / "tests" / "deep" / "t.py").write_text("x")
    (project / "tests" / "skip.txt").write_text("x")
    machine.upload_project()
    sent = Path(f"/tmp/cb-wd-{os.getpid()}")
    try:
        assert (sent / "tests" / "deep" / "t.py").exists() and (sent / "cloud-init" / "user-data.yaml").exists()
        assert not (sent / "tests" / "skip.txt").exists()
    finally:
        subprocess.run(["rm", "-rf", str(sent)], check=True)


def test_upload_of_a_pattern_that_matches_nothing_is_the_upload_stage(guest, make_pipeline):
    machine = attached(make_pipeline, "{upload: [missing/*]}")
    with pytest.raises(MachineryError, match="upload: test.upload: 'missing/\\*' matches nothing"):
        machine.upload_project()


def test_put_and_get_files_and_folders(guest, make_pipeline, tmp_path):
    machine = attached(make_pipeline)
    folder = tmp_path / "payload"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("a")
    machine.put(folder, "~/data")
    machine.put(folder / "sub" / "a.txt", "~/data/b.txt")
    assert (guest / "data" / "sub" / "a.txt").read_text() == "a" and (guest / "data" / "b.txt").read_text() == "a"
    back = machine.get("~/data", tmp_path / "back")
    assert (back / "sub" / "a.txt").read_text() == "a"
    assert machine.get("~/data/b.txt", tmp_path / "b.txt").read_text() == "a"
    with pytest.raises(MachineryError, match="get:"):
        machine.get("~/nothing-here", tmp_path / "x")
    with pytest.raises(PipelineError, match="no such file"):
        machine.put(tmp_path / "absent", "~/x")


def test_port_names_ssh_and_forwards_only(guest, make_pipeline):
    from cloudbake.config.model import Forward

    machine = attached(make_pipeline)
    machine.forwards = (Forward(18080, 8080),)
    assert machine.port(22) == 2222 and machine.port(8080) == 18080
    with pytest.raises(PipelineError, match="guest port 9090 is not forwarded"):
        machine.port(9090)


# --- artifacts: one tar stream, bounded, failures are failures ---------------------------------


def _fetch(machine, patterns, dest):
    return machine.fetch_artifacts(patterns, dest)


def test_thousands_of_artifacts_arrive_in_one_stream(guest, make_pipeline, tmp_path):
    machine = attached(make_pipeline)
    many = tmp_path / "g" / "many"
    many.mkdir(parents=True)
    for index in range(2500):
        (many / f"result-{index:05d}.xml").write_text(f"<r>{index}</r>")
    (tmp_path / "g" / "log with space.txt").write_text("spaces ok")
    names = _fetch(machine, (f"{many}/*.xml", f"{tmp_path}/g/log with space.txt", "/nonexistent/*"), tmp_path / "out")
    out = tmp_path / "out" / str(many).lstrip("/")
    assert len([n for n in names if n.endswith(".xml")]) == 2500
    assert (out / "result-02499.xml").read_text() == "<r>2499</r>"
    assert (tmp_path / "out" / str(tmp_path).lstrip("/") / "g" / "log with space.txt").read_text() == "spaces ok"
    assert _fetch(machine, ("/nonexistent/*.xml",), tmp_path / "none") == []


def test_artifacts_over_the_cap_fail(guest, make_pipeline, tmp_path):
    machine = attached(make_pipeline, "{artifacts_max: 2M}")
    big = tmp_path / "g"
    big.mkdir()
    for index in range(4):
        (big / f"blob{index}").write_bytes(os.urandom(1 << 20))
    with pytest.raises(MachineryError, match=r"artifacts: copying the artifacts: larger than test.artifacts_max "
                                             r"\(2.0 MiB\)"):
        _fetch(machine, (f"{big}/*",), tmp_path / "out")


def test_a_dropped_copy_is_an_error_not_a_success(guest, make_pipeline, tmp_path, monkeypatch):
    machine = attached(make_pipeline)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.txt").write_text("a")
    monkeypatch.setenv("STANDIN_SSH_DROP", "1")
    with pytest.raises(MachineryError, match=r"copying the artifacts: failed \(exit status 255\)"):
        _fetch(machine, (f"{tmp_path}/g/*",), tmp_path / "out")


def test_a_copy_that_hangs_hits_the_deadline(guest, make_pipeline, tmp_path, monkeypatch):
    machine = attached(make_pipeline, timeout_s=2)
    machine._ready = False
    monkeypatch.setenv("STANDIN_SSH_SLEEP", "60")
    with pytest.raises(MachineryError, match="did not finish within the time left"):
        _fetch(machine, ("/etc/hostname",), tmp_path / "out")


def test_a_changed_host_key_during_the_copy_is_named(guest, make_pipeline, tmp_path):
    machine = attached(make_pipeline)
    fake_ssh = guest.parent / "bin" / "ssh"
    fake_ssh.write_text("#!/bin/sh\necho '@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@' >&2\n"
                        "echo 'Host key verification failed.' >&2\nexit 255\n")
    with pytest.raises(MachineryError, match="host key other than the one injected"):
        _fetch(machine, ("/etc/hostname",), tmp_path / "out")


def test_cloudbake_vm_stays_the_api_whatever_is_imported():
    """A submodule named like the API (cloudbake/vm.py once) would replace cloudbake.vm when imported."""
    import importlib
    import pkgutil

    import cloudbake

    for module in pkgutil.iter_modules(cloudbake.__path__):
        importlib.import_module(f"cloudbake.{module.name}")
    assert callable(cloudbake.vm) and cloudbake.vm.__module__ == "cloudbake"


def test_a_leftover_run_that_another_process_removes_meanwhile_is_skipped(tmp_path, monkeypatch):
    """Eight test runs at once each sweep leftovers: a folder listed by one and removed by another
    before it looked closer is skipped, not a FileNotFoundError (seen in CI)."""
    from cloudbake.run import runs as machine

    dist = tmp_path / "dist"
    (dist / ".runs" / "20261129-000000-1-abcdef").mkdir(parents=True)
    listed = machine.list_runs(dist)
    assert [info.state for info in listed] == ["leftover"]
    (dist / ".runs" / "20261129-000000-1-abcdef").rmdir()  # the other process was quicker
    monkeypatch.setattr(machine, "list_runs", lambda base_dir: listed)
    assert machine.clean_leftovers(dist / "base.qcow2") == []
