"""A bench project: the fixture image in a signed mirror on 127.0.0.1 and a pipeline pointing at it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tests.fixture.image import ensure_image
from tests.fixture.mirror import build_mirror, make_gpg_key
from tests.fixture.server import MirrorServer

PROJECT = Path(__file__).resolve().parent.parent


@dataclass
class BenchProject:
    folder: Path
    pipeline: Path
    server: MirrorServer

    def doit(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "doit", "-f", str(PROJECT / "dodo.py"), *args,
                               f"pipeline={self.pipeline}"], cwd=self.folder, capture_output=True, text=True,
                              check=True, env={**os.environ})


def make_bench_project(folder: Path | None = None, arch: str = "amd64") -> BenchProject:
    folder = folder or Path(tempfile.mkdtemp(prefix="cloudbake-bench-"))
    key = make_gpg_key(folder / "gnupg", "bench")
    build_mirror(folder / "mirror", {arch: ensure_image(arch)}, key)
    server = MirrorServer(folder / "mirror").__enter__()
    (folder / "cloud-init").mkdir(exist_ok=True)
    (folder / "cloud-init" / "user-data.yaml").write_text(
        "#cloud-config\nwrite_files:\n  - path: /etc/bench\n    content: bench\n")
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(textwrap.dedent(f"""\
        name: bench
        source:
          arch: {arch}
          mirror: {server.url}
          verify: {{keyring: {key.keyring}, fingerprints: [{key.fingerprint}]}}
        disk: {{size: +1G}}
        vm: {{cpus: 2, memory: 1G, accel: tcg, timeout: 20m}}
        cloud_init: {{ssh_authorized_keys: []}}
        test: {{command: 'true', timeout: 15m}}
        cache: {{dir: {folder / 'cache'}}}
        """))
    return BenchProject(folder, pipeline, server)
