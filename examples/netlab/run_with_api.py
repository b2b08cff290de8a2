"""netlab's suite driven through cloudbake's Python API, twice in a row, each in a fresh VM.

    python3 run_with_api.py [pipeline.yaml]

Exit status: 0 when both runs passed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cloudbake

SUITE = "sudo -En python3 tests/run.py --junit /var/tmp/netlab/junit.xml"


def main() -> int:
    pipeline = sys.argv[1] if len(sys.argv) > 1 else "pipeline.yaml"
    for attempt in (1, 2):
        with cloudbake.vm(pipeline) as vm:
            result = vm.run(SUITE)
            print(result.stdout + result.stderr)
            with tempfile.TemporaryDirectory() as out:
                junit = vm.get("/var/tmp/netlab/junit.xml", Path(out) / "junit.xml").read_text()
            print(f"run {attempt}: exit status {result.status}, {junit.count('<testcase')} test cases, "
                  f"serial log {vm.serial_log.name}")
            if result.status != 0:
                return result.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
