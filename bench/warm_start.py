"""Warm start against a cold boot: from process start to the first command's completion.

    .venv/bin/python -m bench.warm_start [--rounds 3] [--arch amd64]

Bakes the bench project (minutes under TCG), saves its warm state once (not timed), then
runs, alternating, a fresh process that starts a VM through the Python API and runs `true`:
cold (a boot) and warm (a restore). Prints medians, spread, the ratio and the state's size
against the guest's RAM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench.common import report
from bench.project import make_bench_project

# Prints the seconds from the parent's start of the process to the first command's completion
# (the tear-down after it is not part of the figure).
ONE_RUN = """
import sys, time, cloudbake
with cloudbake.vm(sys.argv[1], upload=False, warm=sys.argv[2] == "warm") as vm:
    assert (vm.vm.spec.incoming is not None) == (sys.argv[2] == "warm"), "not the start asked for"
    vm.run("true", check=True)
    print(time.time() - float(sys.argv[3]))
"""


def one_run(pipeline: str, mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", ONE_RUN, pipeline, mode, repr(time.time())], check=True,
                          capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="amd64")
    args = parser.parse_args()
    project = make_bench_project(arch=args.arch)
    project.doit("bake")
    pipeline = str(project.pipeline)
    first = one_run(pipeline, "warm")  # saves the warm state, then resumes from it
    samples: dict[str, list[float]] = {"cold": [], "warm": []}
    for _ in range(args.rounds):
        for mode in ("cold", "warm"):
            samples[mode].append(one_run(pipeline, mode))
    medians = {mode: statistics.median(values) for mode, values in samples.items()}
    record = json.loads(next((project.folder / "dist" / ".warm").glob("*/warm.json")).read_text())
    report(f"start to first command, {args.arch}, median of {args.rounds} rounds (alternating)", [
        ("cold boot", f"{medians['cold']:.1f} s  (spread {min(samples['cold']):.1f}-{max(samples['cold']):.1f})"),
        ("warm start", f"{medians['warm']:.1f} s  (spread {min(samples['warm']):.1f}-{max(samples['warm']):.1f})"),
        ("warm / cold", f"{medians['warm'] / medians['cold']:.3f}x (goal <= 0.1x)"),
        ("first warm run (saves the state)", f"{first:.1f} s, save {record['save_s']} s"),
        ("state file / guest RAM", f"{record['state_bytes'] / (1 << 20):.0f} MiB / "
                                   f"{record['memory_bytes'] / (1 << 20):.0f} MiB = "
                                   f"{record['state_bytes'] / record['memory_bytes']:.2f} (goal <= 0.5)"),
    ])


if __name__ == "__main__":
    main()
