"""A warm test run with the project's dependencies baked into the image (test.dependencies) against the same
run installing them first, as a suite that runs `uv sync` or `nox` in every VM does.

    .venv/bin/python -m bench.baked_dependencies [--rounds 3] [--wheels 24] [--wheel-mib 1]

The project locks ``--wheels`` wheels of ``--wheel-mib`` MiB each (incompressible), served on 127.0.0.1 and
read by the guest at 10.0.2.2, and installs them with its own script (download, check the SHA-256 the lock
pins, unpack), the way uv or pip would. Two images of one file: ``base`` (the fixture image with nothing of
the project) and ``deps`` on it (``from: base``, ``test.dependencies`` naming the lock and the script).

Timed from process start to exit, warm test runs (each image's warm set is saved by a first, untimed run),
alternating so load changes hit both alike:
  baseline   base: upload the lock and the script, install, then import the package
  candidate  deps: import the package (the install happened at bake time)
Prints medians, spread and the ratio. Under TCG, 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import report
from bench.project import make_bench_project
from tests.fixture.wheels import INSTALL_DEPS, serve_wheel

CHECK = "PYTHONPATH=.deps python3 -c 'import benchdep0'"


def wheels(root: Path, server_url: str, count: int, mib: int) -> str:
    """``count`` wheels of ``mib`` MiB (incompressible) in the served folder; the lock's text."""
    return "".join(serve_wheel(root, server_url, f"benchdep{index}",
                               {"__init__.py": b"VALUE = 1\n", "data.bin": os.urandom(mib << 20)})[1]
                   for index in range(count))


def run(folder: Path, image: str, command: str) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cloudbake.cli", "test-image", "--no-bake", "--image", image,
                           "--cmd", command], cwd=folder, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"the {image} run failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wheels", type=int, default=24)
    parser.add_argument("--wheel-mib", type=int, default=1)
    args = parser.parse_args()
    project = make_bench_project()
    folder = project.folder
    (folder / "deps.lock").write_text(wheels(folder / "mirror", project.server.url, args.wheels, args.wheel_mib))
    (folder / "tools").mkdir()
    (folder / "tools" / "install_deps.py").write_text(INSTALL_DEPS)
    text = project.pipeline.read_text().replace("test: {command: 'true', timeout: 15m}",
                                                "test: {command: 'true', timeout: 15m, upload: [deps.lock, tools]}")
    project.pipeline.write_text(text + (
        "images:\n"
        "  - name: base\n"
        "  - name: deps\n"
        "    from: base\n"
        "    disk: {flatten: false}\n"
        "    test: {dependencies: {files: [deps.lock, tools/install_deps.py], "
        "install: python3 tools/install_deps.py}}\n"))
    started = time.monotonic()
    project.doit("fetch")
    project.doit("bake")
    bake_s = time.monotonic() - started
    installing = f"python3 tools/install_deps.py && {CHECK}"
    run(folder, "base", installing)   # saves each image's warm set: not timed
    run(folder, "deps", CHECK)
    samples: dict[str, list[float]] = {"installing at test time": [], "baked by content": []}
    for _ in range(args.rounds):
        samples["installing at test time"].append(run(folder, "base", installing))
        samples["baked by content"].append(run(folder, "deps", CHECK))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    rows = [(name, f"median {medians[name]:.1f} s (spread {min(values):.1f}-{max(values):.1f} s)")
            for name, values in samples.items()]
    rows.append(("ratio", f"{medians['baked by content'] / medians['installing at test time']:.2f}x"))
    rows.append(("dependencies", f"{args.wheels} wheels x {args.wheel_mib} MiB; both images baked in "
                                 f"{bake_s:.0f} s"))
    report("A warm test run: dependencies baked into the image vs installed in the run (TCG)", rows)
    project.server.__exit__(None, None, None)


if __name__ == "__main__":
    main()
