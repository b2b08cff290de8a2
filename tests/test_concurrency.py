"""Many cloudbake commands at once on one project: doit's state survives, runs stay apart.

No guest boots: stand-in QEMU programs (tests/fixture/standin.py) play guests that never answer
SSH, so every test run ends, cleanly, at its SSH stage.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import PROJECT
from tests.fixture.offline import offline_project
from tests.fixture.standin import install_standin_qemu, path_with


def _doit(tmp_path, *args: str, env: dict | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_parallel_commands_never_break_doit_state(tmp_path):
    """40 commands that read and write doit's state at once (the seed task's file checks, cache-key)."""
    pipeline = offline_project(tmp_path)
    args = [("seed", f"pipeline={pipeline}"), ("cache-key", f"pipeline={pipeline}"),
            ("-a", "seed", f"pipeline={pipeline}")]
    procs = [_doit(tmp_path, *args[index % len(args)]) for index in range(40)]
    results = [(proc, *proc.communicate(timeout=300)) for proc in procs]
    failures = [out + err for proc, out, err in results if proc.returncode != 0]
    assert failures == []
    keys = {out.strip().splitlines()[-1] for proc, out, _ in results if "cache-key" in str(proc.args)}
    assert len(keys) == 1


def test_eight_test_runs_side_by_side(tmp_path):
    pipeline = offline_project(tmp_path, published=True, extra="")
    text = pipeline.read_text().replace('timeout: 10m}', 'timeout: 4s}')
    pipeline.write_text(text)
    env = {"PATH": path_with(install_standin_qemu(tmp_path / "bin", "works")),
           "CLOUDBAKE_STANDIN_GUEST_SECONDS": "60"}
    procs = [_doit(tmp_path, "test-image", f"pipeline={pipeline}", env=env) for _ in range(8)]
    results = [(proc, *proc.communicate(timeout=300)) for proc in procs]
    ports = set()
    for proc, out, err in results:
        text = out + err
        assert proc.returncode == 1, text
        assert "'SSH port answers' did not happen within test.timeout (4 s)" in text
        assert "Traceback" not in text and "JSON" not in text and "database" not in text
        ports.add(text.split("SSH on 127.0.0.1:")[1].split(")")[0])
    assert len(ports) == 8
    assert list((tmp_path / "dist" / ".runs").iterdir()) == []
