"""The pytest plugin's fixtures and failure evidence, in a pytest run of their own.

The VM is the one part swapped: the inner conftest hands the plugin a Machine attached to the
stand-in `ssh` of tests/run/test_machine.py (commands run here, HOME playing the guest's home)
instead of booting one; the fixtures, hooks, artifact copy and clean-up are the plugin's own.
Real guests run the plugin in tests/e2e/test_netlab.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import PROJECT, USER_DATA
from tests.run.test_machine import install_guest_tools

INNER_CONFTEST = '''
import contextlib
from pathlib import Path

import cloudbake.pytest_plugin as plugin
from cloudbake.run.machine import Machine
from cloudbake.run.runs import RunFiles
from cloudbake.run.ssh import GuestShell
from cloudbake.config.paths import resolve_paths
from cloudbake.config.pipeline import load_pipeline

STARTED = []


@contextlib.contextmanager
def attached(config, node=None):
    pipeline = load_pipeline(plugin._pipeline_file(config))
    machine = Machine(pipeline, resolve_paths(pipeline), timeout_per_step=True)
    folder = Path(pipeline.file.parent / "runs" / str(len(STARTED)))
    folder.mkdir(parents=True)
    machine.files = RunFiles(folder)
    machine.ssh_port = 2222
    machine.shell = GuestShell(machine.files, 2222, machine.user, pipeline.test.workdir, machine.output_prefix)
    machine.files.serial_log.write_text(f"serial of VM {len(STARTED)}\\n")
    machine._prepare_guest()
    machine._ready = True
    STARTED.append(folder)
    try:
        yield machine
    finally:
        import shutil
        shutil.rmtree(folder)


plugin._machine = attached
'''

INNER_TESTS = '''
def test_passes(cloudbake_vm):
    assert cloudbake_vm.run("echo hi").stdout == "hi\\n"
    assert "VM 0" in cloudbake_vm.serial_log.read_text()


def test_fails_and_keeps_evidence(cloudbake_vm):
    cloudbake_vm.run("mkdir -p $HOME/out && echo evidence > $HOME/out/result.xml")
    assert cloudbake_vm.run("exit 3").ok


def test_session_vm_is_shared(cloudbake_vm_session):
    cloudbake_vm_session.run("touch $HOME/session-marker")


def test_session_vm_is_shared_again(cloudbake_vm_session):
    assert cloudbake_vm_session.run("test -f $HOME/session-marker").ok


def test_session_vm_failure_keeps_its_evidence(cloudbake_vm_session):
    assert cloudbake_vm_session.run("false").ok
'''


def test_fixtures_and_the_evidence_of_a_failing_test(tmp_path):
    bin_dir, home = install_guest_tools(tmp_path)
    project = tmp_path / "project"
    (project / "cloud-init").mkdir(parents=True)
    (project / "cloud-init" / "user-data.yaml").write_text(USER_DATA)
    (project / "pipeline.yaml").write_text(f"test: {{artifacts: ['{home}/out/*.xml']}}\n")
    (project / "conftest.py").write_text(INNER_CONFTEST)
    (project / "test_vm.py").write_text(textwrap.dedent(INNER_TESTS))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STANDIN_GUEST_HOME": str(home),
           "PYTHONPATH": str(PROJECT)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                             str(project), "--cloudbake-logs", str(tmp_path / "logs")], cwd=project,
                            capture_output=True, text=True, timeout=300, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "2 failed, 3 passed" in out, out
    kept = tmp_path / "logs" / "test_vm.py_test_fails_and_keeps_evidence"
    assert (kept / "serial.log").read_text() == "serial of VM 1\n"
    assert (kept / "artifacts" / str(home).lstrip("/") / "out" / "result.xml").read_text() == "evidence\n"
    assert f"serial log and artifacts kept in {kept}" in out
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["session-pytest", kept.name]
    assert (tmp_path / "logs" / "session-pytest" / "serial.log").read_text() == "serial of VM 2\n"
    assert not (project / "runs").exists() or list((project / "runs").iterdir()) == []
