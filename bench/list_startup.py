"""How long describing the tasks takes: `doit list` against importing doit, yaml and jsonschema alone.

    .venv/bin/python -m bench.list_startup [--rounds 30]

Both run as whole processes, alternating; the ratio is of the medians. Describing tasks loads the
pipeline and the task definitions only (the engine is imported where an action runs), so the
ratio is what cloudbake adds on top of the libraries every command needs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.common import alternate, report

PROJECT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    def run(argv: list[str]) -> None:
        subprocess.run(argv, cwd=PROJECT, check=True, stdout=subprocess.DEVNULL)

    doit_list = [sys.executable, "-m", "doit", "list"]
    baseline = [sys.executable, "-c", "import doit, yaml, jsonschema"]
    run(doit_list)   # warm the page cache and the bytecode
    run(baseline)
    medians = alternate(args.rounds, doit_list=lambda: run(doit_list), baseline=lambda: run(baseline))
    report(f"describing tasks, median of {args.rounds} alternating rounds", [
        ("import doit, yaml, jsonschema (baseline)", f"{medians['baseline'] * 1000:.0f} ms"),
        ("doit list", f"{medians['doit_list'] * 1000:.0f} ms ({medians['doit_list'] / medians['baseline']:.2f}x)"),
    ])


if __name__ == "__main__":
    main()
