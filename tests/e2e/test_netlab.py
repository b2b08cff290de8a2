"""examples/netlab in real guests: a suite that rewrites the host's networking passes every time,
three ways (the CLI with upload, the Python API, the pytest plugin), each twice in a row.

The example is copied into a git repository of its own; its pipeline is the shared e2e
bake's (same source, user-data and output folder, so the same key: nothing is baked again)
with the example's `test:` section. The fixture image carries nftables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT
from tests.fixture.e2e import cloudbake, qemu_processes
from tests.fixture.mirror import sha256_file as sha256

pytestmark = pytest.mark.e2e
EXAMPLE = PROJECT / "examples" / "netlab"


def _pipeline_for(baked: dict, example_pipeline: Path, target: Path) -> Path:
    """The e2e bake's pipeline with absolute paths, and the example's test section."""
    shared = yaml.safe_load(baked["pipeline"].read_text())
    folder = baked["folder"]
    shared["cloud_init"]["user_data"] = str(folder / "cloud-init" / "user-data.yaml")
    shared["output"] = {"dir": str(folder / "dist")}
    shared["build"] = {"dir": str(target.parent / "build")}
    shared["test"] = yaml.safe_load(example_pipeline.read_text())["test"]
    shared["test"]["timeout"] = "10m"
    target.write_text(yaml.safe_dump(shared, sort_keys=False))
    shutil.copy(folder / "pipeline.lock", target.with_suffix(".lock"))
    return target


@pytest.fixture(scope="module")
def netlab(baked, tmp_path_factory):
    repo = tmp_path_factory.mktemp("netlab") / "netlab"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".cloudbake-logs"))
    _pipeline_for(baked, EXAMPLE / "pipeline.yaml", repo / "pipeline.yaml")
    _pipeline_for(baked, EXAMPLE / "sharded.yaml", repo / "sharded.yaml")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    (repo / "untracked-but-wanted.txt").write_text("uploaded too\n")
    return {"repo": repo, "cloudbake": baked["cloudbake"], "baked": baked}


def test_the_example_pipeline_is_valid_as_shipped():
    from cloudbake.config.pipeline import load_pipeline

    for name in ("pipeline.yaml", "sharded.yaml"):
        pipeline = load_pipeline(EXAMPLE / name)
        assert pipeline.test.upload == "git" and pipeline.test.artifacts == ("/var/tmp/netlab/junit.xml",)


def test_cli_uploads_runs_and_summarizes_twice_in_a_row(netlab, tmp_path):
    summary = tmp_path / "step-summary.md"
    for _ in range(2):
        result = cloudbake(netlab["cloudbake"], "test-image", "--no-bake", cwd=netlab["repo"],
                           env={"GITHUB_STEP_SUMMARY": str(summary)})
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert "uploading" in out and "into ~/src" in out
        assert "test-image results: 9 tests, 0 failures, 0 errors, 0 skipped" in out, out
    assert summary.read_text().count("### test-image: passed") == 2
    assert "| 9 | 0 | 0 | 0 |" in summary.read_text()
    assert not list((netlab["baked"]["image"].parent / ".runs").iterdir())


def test_sharded_runs_two_vms_at_once_and_leaves_nothing_up(netlab):
    result = cloudbake(netlab["cloudbake"], "-p", "sharded.yaml", "test-image", "--no-bake", cwd=netlab["repo"])
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "2 runs of e2e-" in out and "2 at a time (sharded)" in out
    assert "[run 0] shard 0/2: 4 tests" in out and "[run 1] shard 1/2: 5 tests" in out
    assert "the test command passed in all 2 runs" in out
    ports = {line.split("SSH on ")[1].split(")")[0] for line in out.splitlines() if "SSH on " in line}
    assert len(ports) == 2
    listed = cloudbake(netlab["cloudbake"], "ps", "--json", cwd=netlab["repo"])
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    assert qemu_processes(str(netlab["baked"]["image"].parent)) == []


def test_a_failing_suite_exits_with_the_runners_status_and_names_the_test(netlab, tmp_path):
    """Also proves accel auto where KVM aborts QEMU, with this real guest: a stand-in QEMU first on PATH
    aborts under -accel kvm with the MSR assertion and hands every other start to the real QEMU."""
    from tests.fixture.standin import install_standin_qemu, path_with

    baked = netlab["baked"]
    verdict = baked["folder"] / "cache" / "host" / "kvm-verdict.json"
    verdict.unlink(missing_ok=True)
    bin_dir = install_standin_qemu(tmp_path / "bin", "abort", real_guest=True)
    base_digest = sha256(baked["image"])
    result = cloudbake(netlab["cloudbake"], "test-image", "--no-bake", "--cmd",
                       "NETLAB_FAIL=1 sudo -En python3 tests/run.py --junit /var/tmp/netlab/junit.xml",
                       cwd=netlab["repo"], env={"PATH": path_with(bin_dir)})
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "1 failures" in out and "failed: tests.test_netlab.SetUpHost.test_deliberate_failure_when_asked" in out
    assert "the test command failed (exit status 1)" in out
    if Path("/dev/kvm").exists() and os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert "failed to set MSR 0x10a" in out and "falling back to TCG" in out
    assert sha256(baked["image"]) == base_digest
    assert qemu_processes(str(baked["image"].parent)) == []


def test_python_api_twice_from_an_installed_wheel(netlab):
    python = netlab["cloudbake"].parent / "python"
    result = subprocess.run([str(python), "run_with_api.py", "pipeline.yaml"], cwd=netlab["repo"],
                            capture_output=True, text=True, timeout=1500)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "run 1: exit status 0, 9 test cases" in out and "run 2: exit status 0, 9 test cases" in out


def test_pytest_plugin_gives_each_test_a_fresh_vm(netlab):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "vm_tests",
                             "--cloudbake-pipeline", "pipeline.yaml", "--rootdir", str(netlab["repo"])],
                            cwd=netlab["repo"], capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "PYTHONPATH": ""})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "2 passed" in out
    assert not (netlab["repo"] / ".cloudbake-logs").exists()
