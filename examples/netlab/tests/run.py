"""Run netlab's suite with the standard library only (a fresh VM has no pytest), write JUnit XML,
and take one shard of it when cloudbake says so (CLOUDBAKE_SHARD of CLOUDBAKE_SHARDS).

    sudo -En python3 tests/run.py [--junit results/junit.xml]

Exit status: 0 all passed, 1 a test failed or errored.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent


class JunitResult(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cases = []

    def startTest(self, test):  # noqa: N802 (unittest's names)
        self._started = time.monotonic()
        super().startTest(test)

    def _record(self, test, kind=None, detail=""):
        self.cases.append((test, kind, detail, time.monotonic() - self._started))

    def addSuccess(self, test):  # noqa: N802
        super().addSuccess(test)
        self._record(test)

    def addFailure(self, test, err):  # noqa: N802
        super().addFailure(test, err)
        self._record(test, "failure", self._exc_info_to_string(err, test))

    def addError(self, test, err):  # noqa: N802
        super().addError(test, err)
        self._record(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):  # noqa: N802
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)


def write_junit(result: JunitResult, path: Path) -> None:
    suite = ET.Element("testsuite", name="netlab", tests=str(len(result.cases)),
                       failures=str(len(result.failures)), errors=str(len(result.errors)),
                       skipped=str(len(result.skipped)))
    for test, kind, detail, seconds in result.cases:
        case = ET.SubElement(suite, "testcase", classname=f"{type(test).__module__}.{type(test).__name__}",
                             name=test._testMethodName, time=f"{seconds:.3f}")
        if kind:
            ET.SubElement(case, kind, message=detail.strip().splitlines()[-1] if detail else "").text = detail
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def flatten(suite: unittest.TestSuite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from flatten(item)
        else:
            yield item


def shard(suite: unittest.TestSuite) -> unittest.TestSuite:
    """Whole test classes per shard (a class's tests share its setUpClass), round-robin."""
    index, count = int(os.environ.get("CLOUDBAKE_SHARD", "0")), int(os.environ.get("CLOUDBAKE_SHARDS", "1"))
    classes: dict[str, list[unittest.TestCase]] = {}
    for test in flatten(suite):
        classes.setdefault(type(test).__name__, []).append(test)
    picked = [tests for position, (_, tests) in enumerate(sorted(classes.items())) if position % count == index]
    print(f"shard {index}/{count}: {sum(map(len, picked))} tests", flush=True)
    return unittest.TestSuite(test for tests in picked for test in tests)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--junit", type=Path, default=Path("/var/tmp/netlab/junit.xml"))
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    suite = shard(unittest.defaultTestLoader.discover(str(HERE), top_level_dir=str(HERE.parent)))
    runner = unittest.TextTestRunner(resultclass=JunitResult, verbosity=2, stream=sys.stdout)
    result = runner.run(suite)
    write_junit(result, args.junit)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
