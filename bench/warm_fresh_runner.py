"""Warm start on a fresh CI runner: the output folder restored from a cache, the first test run timed.

    .venv/bin/python -m bench.warm_fresh_runner [--rounds 3]

A "baker" job bakes the bench project and runs `doit warm` (the shipped workflow's step before
its cache save; the time and size it adds are reported), then saves `dist/` as the cache. Each
round is a fresh runner: a new folder holding the pipeline, its lock and the restored `dist/`
copy, and a new download cache, HOME and XDG cache (no KVM verdict, nothing remembered). In it,
the first `cloudbake test-image --no-bake` is timed from process start to its exit: warm (the
restored set) against cold (`test.warm: false`, the same restored image), alternating, so load
changes hit both alike. Prints medians, spread and the ratio (goal <= 0.2x under TCG).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import report
from bench.project import PROJECT, make_bench_project


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def fresh_runner(baker: Path, cache: Path, root: Path, warm: bool) -> Path:
    """A new checkout with the cache restored: pipeline, cloud-init, lock, and the saved dist/."""
    runner = Path(tempfile.mkdtemp(prefix="runner-", dir=root))
    shutil.copytree(baker / "cloud-init", runner / "cloud-init")
    shutil.copy(baker / "pipeline.lock", runner / "pipeline.lock")
    text = (baker / "pipeline.yaml").read_text().replace(str(baker / "cache"), str(runner / "cache"))
    if not warm:
        text = text.replace("test: {", "test: {warm: false, ")
    (runner / "pipeline.yaml").write_text(text)
    shutil.copytree(cache, runner / "dist", symlinks=True)
    return runner


def first_test_run(runner: Path) -> tuple[float, str]:
    env = {**os.environ, "HOME": str(runner / "home"), "XDG_CACHE_HOME": str(runner / "home" / ".cache")}
    (runner / "home").mkdir()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cloudbake.cli", "test-image", "--no-bake"], cwd=runner,
                          capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"the test run failed in {runner}:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    project = make_bench_project()
    baker = project.folder
    project.doit("bake")
    started = time.monotonic()
    warmed = project.doit("warm")
    warm_s = time.monotonic() - started
    assert "saved the warm state" in warmed.stderr, warmed.stderr
    cache = baker / "actions-cache" / "dist"
    shutil.copytree(baker / "dist", cache, symlinks=True, ignore=shutil.ignore_patterns(".runs"))
    set_bytes = folder_bytes(cache / ".warm")
    image_bytes = sum(p.stat().st_size for p in cache.glob("bench-*.qcow2"))
    samples: dict[str, list[float]] = {"cold": [], "warm": []}
    for _ in range(args.rounds):
        for mode in ("cold", "warm"):
            runner = fresh_runner(baker, cache, baker, warm=mode == "warm")
            seconds, log = first_test_run(runner)
            resumed = "resumed warm" in log and "booting it once" not in log
            if resumed != (mode == "warm"):
                raise SystemExit(f"the {mode} run did not start {mode}:\n{log[-3000:]}")
            samples[mode].append(seconds)
            shutil.rmtree(runner, ignore_errors=True)
    medians = {mode: statistics.median(values) for mode, values in samples.items()}
    report(f"first test run on a fresh runner with the cache restored (TCG), median of {args.rounds} "
           "rounds (alternating)", [
               ("cold (test.warm: false)", f"{medians['cold']:.1f} s  (spread {min(samples['cold']):.1f}-"
                                          f"{max(samples['cold']):.1f})"),
               ("warm (restored set)", f"{medians['warm']:.1f} s  (spread {min(samples['warm']):.1f}-"
                                       f"{max(samples['warm']):.1f})"),
               ("warm / cold", f"{medians['warm'] / medians['cold']:.3f}x (goal <= 0.2x)"),
               ("doit warm after the bake", f"{warm_s:.1f} s"),
               ("cache entry: image / warm set", f"{image_bytes / (1 << 20):.0f} MiB / "
                                                 f"{set_bytes / (1 << 20):.0f} MiB"),
           ])
    project.server.stop()
    print(f"(project kept in {baker}; checkout {PROJECT})")


if __name__ == "__main__":
    main()
