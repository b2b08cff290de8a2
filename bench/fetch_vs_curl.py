"""Download throughput: cloudbake's fetch (hashing while it downloads) against curl, same server, same run.

    .venv/bin/python -m bench.fetch_vs_curl [--size-mib 1024] [--rounds 3]

Both download a random file from one loopback HTTP server (the test suite's server).
Also shown: curl followed by sha256sum, the two-pass way to get a verified file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from bench.common import alternate, report
from cloudbake.source.download import download
from cloudbake.source.http import HttpSettings, make_session
from tests.fixture.server import MirrorServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        root = Path(tmp) / "srv"
        root.mkdir()
        blob = root / "image.img"
        digest = hashlib.sha256()
        with open(blob, "wb") as f:
            for _ in range(args.size_mib):
                chunk = os.urandom(1 << 20)
                digest.update(chunk)
                f.write(chunk)
        sha = digest.hexdigest()
        out = Path(tmp) / "out"
        out.mkdir()
        with MirrorServer(root) as server:
            url = server.url + "image.img"

            def cloudbake() -> None:
                dest = out / "cb.img"
                for leftover in out.glob("cb.img*"):
                    leftover.unlink()
                with make_session() as session:
                    download(session, url, dest, sha, HttpSettings())

            def curl() -> None:
                subprocess.run(["curl", "-sS", "-o", str(out / "curl.img"), url], check=True)

            def curl_then_sha256sum() -> None:
                curl()
                subprocess.run(["sha256sum", str(out / "curl.img")], check=True, capture_output=True)

            times = alternate(args.rounds, cloudbake=cloudbake, curl=curl, curl_sha256sum=curl_then_sha256sum)
    size = args.size_mib / 1024
    report(f"download {args.size_mib} MiB from 127.0.0.1 (median of {args.rounds})", [
        ("cloudbake fetch (verified)", f"{times['cloudbake']:.2f} s  {size / times['cloudbake'] * 1024:.0f} MiB/s"),
        ("curl -o", f"{times['curl']:.2f} s  {size / times['curl'] * 1024:.0f} MiB/s"),
        ("curl -o + sha256sum", f"{times['curl_sha256sum']:.2f} s"),
        ("throughput vs curl", f"{times['curl'] / times['cloudbake']:.2f}x (goal >= 0.9x)"),
        ("vs curl + sha256sum", f"{times['curl_sha256sum'] / times['cloudbake']:.2f}x"),
    ])


if __name__ == "__main__":
    main()
