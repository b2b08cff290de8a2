"""tasks/run.sh installs system packages the platform's way: apt on Debian/Ubuntu, Homebrew on macOS (never apt).

Stand-in programs first on PATH play the platform (uname), the package managers (brew, apt-get,
dpkg-query, sudo) and record every call, so both platforms run on every machine.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tests.conftest import PROJECT


def standins(folder: Path, system: str, brew_installed: tuple[str, ...] = (), with_brew: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    calls = folder / "calls.log"
    scripts = {
        "uname": f'[ "$1" = -s ] && echo {system} || exec /bin/uname "$@"',
        "apt-get": f'echo "apt-get $*" >> {calls}; exit 0',
        "sudo": f'echo "sudo $*" >> {calls}; exit 0',
        "dpkg-query": f'echo "dpkg-query $*" >> {calls}; exit 1',
    }
    if with_brew:
        installed = " ".join(brew_installed)
        scripts["brew"] = (f'echo "brew $*" >> {calls}\n'
                           f'if [ "$1" = list ]; then for p in {installed}; do [ "$3" = "$p" ] && exit 0; done; exit 1; fi\n'
                           'if [ "$1" = --prefix ]; then echo /nonexistent; fi\nexit 0')
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return calls


def run_sh(folder: Path, *args: str, drop_brew_dirs: bool = False) -> subprocess.CompletedProcess[str]:
    path = [str(folder)] + [p for p in os.environ["PATH"].split(":") if not (drop_brew_dirs and "brew" in p)]
    return subprocess.run(["bash", str(PROJECT / "tasks" / "run.sh"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PATH": ":".join(path)})


def test_macos_installs_through_homebrew_and_never_apt(tmp_path: Path) -> None:
    calls = standins(tmp_path, "Darwin", brew_installed=("gnupg",))
    result = run_sh(tmp_path, "packages")
    assert result.returncode == 0, result.stderr
    log = calls.read_text()
    assert "brew install qemu zstd python@3.12" in log
    assert "apt-get" not in log and "dpkg-query" not in log and "sudo" not in log
    test_result = run_sh(tmp_path, "packages", "test")
    assert test_result.returncode == 0 and "brew install qemu zstd python@3.12 distribution httpd" in calls.read_text()


def test_macos_without_homebrew_prints_the_exact_command(tmp_path: Path) -> None:
    calls = standins(tmp_path, "Darwin", with_brew=False)
    result = run_sh(tmp_path, "packages", drop_brew_dirs=True)
    assert result.returncode == 1
    assert "https://brew.sh" in result.stderr and "brew install qemu gnupg zstd python@3.12" in result.stderr
    assert not calls.exists() or "apt-get" not in calls.read_text()


def test_linux_installs_through_apt(tmp_path: Path) -> None:
    calls = standins(tmp_path, "Linux")
    result = run_sh(tmp_path, "packages")
    assert result.returncode == 0, result.stderr
    log = calls.read_text()
    install = "apt-get install -y -q --no-install-recommends qemu-system-x86"
    assert ("sudo " + install if os.geteuid() else install) in log and "brew" not in log


def test_an_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    standins(tmp_path, "Linux")
    result = run_sh(tmp_path, "frobnicate")
    assert result.returncode == 2 and "packages [test]" in result.stderr
