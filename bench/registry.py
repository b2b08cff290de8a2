"""The registry cache against curl moving the same bytes, and a fleet pulling against a fleet baking.

    .venv/bin/python -m bench.registry [--size-mib 512] [--rounds 3] [--fleet 2]

All against one local registry (Debian's docker-registry on 127.0.0.1, plain HTTP):

- push: cloudbake's push (layers, chunked uploads) of a published image into a fresh
  repository, against curl uploading the same bytes as one blob (POST, then PUT -T);
- pull: cloudbake's pull into a fresh store (parallel layers, digest checks, join, publish),
  against curl downloading the same bytes as one blob into a file;
- fleet (--fleet N, 0 to skip): N clones of the bench project running `doit bake` at once,
  first with the image in the registry (they pull), then with an empty one (they bake);
  wall time and the CPU time of the children.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import alternate, report
from cloudbake.config.model import Compression, RemoteCache
from cloudbake.image.store import publish, published_image
from cloudbake.remote.registry import pull_image, push_image
from tests.fixture.registry import Registry

KEY = "b" * 16


def published(folder: Path, size_mib: int) -> Path:
    """A published image of incompressible bytes (qemu-img made, store published)."""
    from cloudbake.config.paths import Paths

    folder.mkdir(parents=True)
    raw = folder / "source.raw"
    with open(raw, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    qcow = folder / "source.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
    raw.unlink()
    paths = Paths(folder / "w", folder / "dist", folder / "cache", folder / "lock", folder)
    dest = published_image(paths, "bench", KEY)
    publish(qcow, dest, {"name": "bench", "key": KEY, "image": {"file": dest.name, "compression": "none"}},
            Compression.none)
    qcow.unlink()
    return dest


def curl(*args: str) -> str:
    return subprocess.run(["curl", "-sS", "--fail", *args], check=True, capture_output=True, text=True).stdout


def curl_push(address: str, repository: str, image: Path, digest: str) -> None:
    location = subprocess.run(["curl", "-sS", "--fail", "-X", "POST", "-D", "-", "-o", "/dev/null",
                               f"http://{address}/v2/{repository}/blobs/uploads/"], check=True, capture_output=True,
                              text=True).stdout
    url = next(line.split(":", 1)[1].strip() for line in location.splitlines() if line.lower().startswith("location:"))
    if url.startswith("/"):
        url = f"http://{address}{url}"
    curl("-X", "PUT", "-H", "Content-Type: application/octet-stream", "-T", str(image),
         url + ("&" if "?" in url else "?") + f"digest={digest}")


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def fleet(n: int, remote: RemoteCache | None, work: Path) -> tuple[float, float]:
    """Wall and children's CPU seconds of n clones of the bench project running `doit bake` at once."""
    from bench.project import make_bench_project

    source = make_bench_project(work / "source")
    source.doit("fetch")
    clones = []
    for index in range(n):
        folder = work / f"clone{index}"
        folder.mkdir()
        shutil.copytree(source.folder / "cloud-init", folder / "cloud-init")
        text = source.pipeline.read_text().replace(str(source.folder / "cache"), str(folder / "cache"))
        if remote is not None:
            text = text.replace(f"cache: {{dir: {folder / 'cache'}}}",
                                f"cache: {{dir: {folder / 'cache'}, remote: '{remote.url}', plain_http: true}}")
        (folder / "pipeline.yaml").write_text(text)
        shutil.copy(source.folder / "pipeline.lock", folder / "pipeline.lock")
        clones.append(folder)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        procs = [subprocess.Popen([sys.executable, "-m", "doit", "-f", str(Path(__file__).parent.parent / "dodo.py"),
                                   "bake", f"pipeline={folder / 'pipeline.yaml'}"], cwd=folder,
                                  stdout=subprocess.DEVNULL, stderr=stack.enter_context(open(folder / "bake.log", "wb")))
                 for folder in clones]
        codes = [proc.wait() for proc in procs]
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    source.server.__exit__(None, None, None)
    if any(codes):
        raise SystemExit(f"a clone's bake failed: exit codes {codes}; see {clones[0] / 'bake.log'}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fleet", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cloudbake-bench-registry-"))
    image = published(work / "baker", args.size_mib)
    size = image.stat().st_size
    digest = sha256_of(image)
    with Registry(work / "registry") as registry:
        counter = iter(range(1_000_000))
        remote_of: Callable[[str], RemoteCache] = lambda repo: RemoteCache(  # noqa: E731
            registry.address, repo, push=False, tag_latest=False, plain_http=True, ca_file=None)

        def cloudbake_push() -> None:
            push_image(remote_of(f"push/r{next(counter)}"), image)

        def curl_push_once() -> None:
            curl_push(registry.address, f"curl/r{next(counter)}", image, digest)

        pushes = alternate(args.rounds, cloudbake=cloudbake_push, curl=curl_push_once)
        remote = remote_of("pull/bench")
        push_image(remote, image)
        curl_push(registry.address, "pull/bench", image, digest)   # the whole image as one blob for curl

        def cloudbake_pull() -> None:
            from cloudbake.config.paths import Paths

            folder = work / f"pull{next(counter)}"
            assert pull_image(remote, Paths(folder / "w", folder / "dist", folder / "c", folder / "l", folder),
                              "bench", KEY) is not None
            shutil.rmtree(folder)

        def curl_pull() -> None:
            out = work / "curl.out"
            curl("-o", str(out), f"http://{registry.address}/v2/pull/bench/blobs/{digest}")
            out.unlink()

        def curl_checked_pull() -> None:
            """The like-for-like baseline: what cloudbake also does with the bytes (hash them, fsync them)."""
            out = work / "curl.out"
            curl("-o", str(out), f"http://{registry.address}/v2/pull/bench/blobs/{digest}")
            assert sha256_of(out) == digest
            with open(out, "rb") as f:
                os.fsync(f.fileno())
            out.unlink()

        pulls = alternate(args.rounds, cloudbake=cloudbake_pull, curl=curl_pull, checked=curl_checked_pull)
        mib = size / (1 << 20)
        rows = [
            ("image", f"{mib:.0f} MiB (incompressible), median of {args.rounds} alternating rounds"),
            ("push: cloudbake", f"{pushes['cloudbake']:.2f} s ({mib / pushes['cloudbake']:.0f} MiB/s)"),
            ("push: curl -T", f"{pushes['curl']:.2f} s ({mib / pushes['curl']:.0f} MiB/s)"),
            ("push throughput vs curl", f"{pushes['curl'] / pushes['cloudbake']:.2f}x (goal >= 0.8x)"),
            ("pull: cloudbake", f"{pulls['cloudbake']:.2f} s ({mib / pulls['cloudbake']:.0f} MiB/s)"),
            ("pull: curl", f"{pulls['curl']:.2f} s ({mib / pulls['curl']:.0f} MiB/s)"),
            ("pull throughput vs curl", f"{pulls['curl'] / pulls['cloudbake']:.2f}x (goal >= 0.9x)"),
            ("pull: curl + sha256 + fsync", f"{pulls['checked']:.2f} s ({mib / pulls['checked']:.0f} MiB/s)"),
            ("pull vs curl + sha256 + fsync", f"{pulls['checked'] / pulls['cloudbake']:.2f}x"),
        ]
        report("registry cache against curl", rows)
        rows = []
        if args.fleet:
            fleet_remote = remote_of("fleet/bench")
            # The registry holds the image for the clones' key once a first clone baked and pushed it.
            seed = work / "fleet-seed"
            seed.mkdir()
            from bench.project import make_bench_project

            seeded = make_bench_project(seed / "p")
            seeded.pipeline.write_text(seeded.pipeline.read_text().replace(
                f"cache: {{dir: {seed / 'p' / 'cache'}}}",
                f"cache: {{dir: {seed / 'p' / 'cache'}, remote: '{fleet_remote.url}', plain_http: true, push: true}}"))
            seeded.doit("bake")
            seeded.server.__exit__(None, None, None)
            pull_wall, pull_cpu = fleet(args.fleet, fleet_remote, work / "fleet-pull")
            bake_wall, bake_cpu = fleet(args.fleet, None, work / "fleet-bake")
            rows += [
                (f"fleet of {args.fleet}: pull", f"{pull_wall:.1f} s wall, {pull_cpu:.1f} s CPU"),
                (f"fleet of {args.fleet}: bake", f"{bake_wall:.1f} s wall, {bake_cpu:.1f} s CPU"),
                ("fleet pull / bake", f"{pull_wall / bake_wall:.3f}x wall, {pull_cpu / bake_cpu:.3f}x CPU"),
            ]
    if rows:
        report("a fleet pulling against a fleet baking", rows)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
