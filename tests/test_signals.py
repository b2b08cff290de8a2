"""Stop signals to doit bake / test-image / console: QEMU stops, the run's keys and temp files go, exit non-zero.

No guest boots: stand-in QEMU programs (tests/fixture/standin.py) play a guest that runs until
stopped, behind the real doit, the real task code and the real qemu-img.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.fixture.offline import offline_project
from tests.fixture.standin import install_standin_qemu, path_with


def _processes_mentioning(*needles: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(needle in cmd for needle in needles):
                found.append(cmd)
    return found


def _start(tmp_path: Path, task: str, pipeline: Path) -> subprocess.Popen[str]:
    bin_dir = install_standin_qemu(tmp_path / "bin", "works")
    env = {**os.environ, "PATH": path_with(bin_dir), "CLOUDBAKE_STANDIN_GUEST_SECONDS": "600"}
    return subprocess.Popen([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), task,
                             f"pipeline={pipeline}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _wait_for(predicate, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


def _stop_and_check(proc: subprocess.Popen[str], signum: int, tmp_path: Path) -> str:
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode not in (0, None), out + err
    assert f"interrupted ({signal.Signals(signum).name})" in out + err
    assert "Traceback" not in out + err
    assert _processes_mentioning(str(tmp_path / "bin"), "-name cloudbake-") == []
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    return out + err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_the_bake_boot_stops_qemu(tmp_path, signum):
    pipeline = offline_project(tmp_path)
    proc = _start(tmp_path, "bake", pipeline)
    serial = tmp_path / "build" / "offline" / "serial.log"
    _wait_for(lambda: serial.exists() and serial.stat().st_size > 0, "the stand-in guest started")
    _stop_and_check(proc, signum, tmp_path)
    assert not (tmp_path / "dist").exists() or list((tmp_path / "dist").glob("*.qcow2")) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_a_test_run_removes_its_keys(tmp_path, signum):
    pipeline = offline_project(tmp_path, published=True)
    proc = _start(tmp_path, "test-image", pipeline)
    runs = tmp_path / "dist" / ".runs"
    _wait_for(lambda: runs.is_dir() and any((run / "serial.log").exists() and (run / "id_ed25519").exists()
                                            for run in runs.iterdir()), "the test VM started")
    _stop_and_check(proc, signum, tmp_path)
    assert list(runs.iterdir()) == []


def test_the_next_bake_removes_temps_a_killed_one_left(tmp_path):
    """SIGKILL leaves temps behind (no handler runs); the next bake of the pipeline sweeps them."""
    pipeline = offline_project(tmp_path)
    work, dist = tmp_path / "build" / "offline", tmp_path / "dist"
    work.mkdir(parents=True)
    dist.mkdir()
    left = [work / ".seed.iso.abc123.tmp", dist / ".offline-0123456789abcdef.qcow2.tmp"]
    for path in left:
        path.write_bytes(b"half")
    other = dist / ".other-0123456789abcdef.qcow2.tmp"  # another pipeline's, maybe being written now
    other.write_bytes(b"busy")
    bin_dir = install_standin_qemu(tmp_path / "bin", "works")
    result = subprocess.run([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), "bake",
                             f"pipeline={pipeline}"], cwd=tmp_path, env={**os.environ, "PATH": path_with(bin_dir)},
                            capture_output=True, text=True, timeout=120)
    # The stand-in guest reports nothing, so this bake fails; it still cleaned up first.
    assert "powered off without reporting cloud-init's result" in result.stdout + result.stderr
    assert [path for path in left if path.exists()] == []
    assert other.exists()
    assert list(tmp_path.rglob("*.tmp")) == [other]
