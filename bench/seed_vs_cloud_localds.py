"""Seed ISO generation: cloudbake (pycdlib) against cloud-localds (genisoimage), same files, same run.

    .venv/bin/python -m bench.seed_vs_cloud_localds [--rounds 20]

Two cloudbake figures: in-process (what `doit seed` spends once doit is running) and a
whole new Python process per seed (interpreter start and imports included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import alternate, report
from cloudbake.image.seed import SeedFiles, build_seed_iso

USER_DATA = b"#cloud-config\npackages: [curl, git]\nruncmd:\n  - echo hello\n" + b"# padding\n" * 200
META_DATA = b"instance-id: bench-1\nlocal-hostname: bench\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-seed-") as tmp:
        folder = Path(tmp)
        (folder / "user-data").write_bytes(USER_DATA)
        (folder / "meta-data").write_bytes(META_DATA)
        files = SeedFiles(USER_DATA, META_DATA)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                "from cloudbake.image.seed import SeedFiles, build_seed_iso; "
                "build_seed_iso(SeedFiles(Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]).read_bytes()), "
                "Path(sys.argv[4]))")
        root = str(Path(__file__).resolve().parent.parent)
        times = alternate(
            args.rounds,
            cloudbake=lambda: build_seed_iso(files, folder / "cb.iso"),
            cloudbake_process=lambda: subprocess.run(
                [sys.executable, "-c", code, root, str(folder / "user-data"), str(folder / "meta-data"),
                 str(folder / "cbp.iso")], check=True),
            cloud_localds=lambda: subprocess.run(
                ["cloud-localds", str(folder / "cl.iso"), str(folder / "user-data"), str(folder / "meta-data")],
                check=True, capture_output=True),
        )
    report(f"seed ISO (median of {args.rounds})", [
        ("cloudbake, in process", f"{times['cloudbake'] * 1000:.1f} ms"),
        ("cloudbake, new process", f"{times['cloudbake_process'] * 1000:.1f} ms"),
        ("cloud-localds", f"{times['cloud_localds'] * 1000:.1f} ms"),
        ("in process / cloud-localds", f"{times['cloudbake'] / times['cloud_localds']:.2f}x (goal <= 0.2x)"),
        ("new process / cloud-localds", f"{times['cloudbake_process'] / times['cloud_localds']:.2f}x"),
    ])


if __name__ == "__main__":
    main()
