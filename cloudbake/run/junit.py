"""JUnit XML results among a run's artifacts, summed up for the log and for GitHub's job summary.

The files come from the guest, so they are read defensively: a size cap, no document type
declaration at all (a report with a DTD or entity declarations is skipped with a warning:
one internal entity repeated cost the host 815 MiB for a 10 MiB report), and anything that
is not a JUnit report skipped rather than failing the run. Test names are guest text too:
one line, control characters removed, Markdown escaped where it is rendered.
"""

from __future__ import annotations

import dataclasses
import os
import re
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cloudbake.core.log import stage_logger

log = stage_logger("test-image")
JUNIT_MAX_BYTES = 64 << 20
FAILED_NAMES_SHOWN = 20
NAME_MAX_CHARS = 300
PROLOG_SCAN_BYTES = 64 << 10


class _PrologEndError(Exception):
    """Raised by the prolog scan: the root element started (or a declaration was found)."""

    def __init__(self, doctype: bool) -> None:
        super().__init__()
        self.doctype = doctype


def has_doctype(path: Path) -> bool:
    """True when the file declares a document type (a DTD, entities) before its root element.

    Only the prolog is parsed, with expat, so the check costs a few KiB whatever the file holds.
    """
    parser = xml.parsers.expat.ParserCreate()

    def doctype(*_: object) -> None:
        raise _PrologEndError(True)

    def root(*_: object) -> None:
        raise _PrologEndError(False)

    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = doctype
    parser.StartElementHandler = root
    try:
        with open(path, "rb") as f:
            while chunk := f.read(PROLOG_SCAN_BYTES):
                parser.Parse(chunk, False)
            parser.Parse(b"", True)
    except _PrologEndError as done:
        return done.doctype
    except xml.parsers.expat.ExpatError:
        return False    # not XML: ElementTree says so next
    return False


def clean_name(text: str) -> str:
    """A guest's test name as one printable line: whitespace runs are one space, control characters gone."""
    text = re.sub(r"\s+", " ", text)
    text = "".join(c for c in text if c.isprintable())
    return text[:NAME_MAX_CHARS].strip()


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&])")


def escape_markdown(text: str) -> str:
    """Backslash every character Markdown (GitHub's flavour) would read as markup or HTML."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


@dataclass(frozen=True)
class JunitSummary:
    tests: int
    failures: int
    errors: int
    skipped: int
    failed: tuple[str, ...]     # "classname.name" of every failing or erroring test case
    files: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.failures == 0 and self.errors == 0


@dataclass
class _Report:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)


def _read_report(path: Path) -> _Report | None:
    """One report's counts, read incrementally: every element is dropped from its parent as soon as it ends,
    so a report costs memory in proportion to its deepest open elements, not to its size (a whole tree of a
    16 MiB report took 17 times that). None when its root is not a testsuite(s)."""
    report = _Report()
    stack: list[ET.Element] = []
    outcome: str | None = None
    for event, element in ET.iterparse(path, events=("start", "end")):
        if event == "start":
            if not stack and element.tag not in ("testsuites", "testsuite"):
                return None
            if element.tag == "testcase":
                outcome = None
            elif stack and stack[-1].tag == "testcase" and element.tag in ("failure", "error", "skipped"):
                outcome = outcome or element.tag
            stack.append(element)
            continue
        stack.pop()
        if element.tag == "testcase":
            report.tests += 1
            name = clean_name(".".join(filter(None, (element.get("classname"), element.get("name")))))
            if outcome == "failure":
                report.failures += 1
                report.failed.append(name)
            elif outcome == "error":
                report.errors += 1
                report.failed.append(name)
            elif outcome == "skipped":
                report.skipped += 1
        if stack:
            del stack[-1][-1]   # the element that just ended is its parent's last child
    return report


def summarize_junit(candidates: Iterable[Path]) -> JunitSummary | None:
    """Sum every JUnit report among ``candidates`` (``.xml`` files with a testsuite(s) root); None if none."""
    total = _Report()
    files: list[str] = []
    for path in candidates:
        try:
            if path.suffix != ".xml" or not path.is_file() or path.stat().st_size > JUNIT_MAX_BYTES:
                continue
        except OSError as err:   # a name the host cannot open (too long), gone meanwhile
            log.warning("%s: cannot be read (%s); left out of the test summary", clean_name(path.name)[:120],
                        err.strerror or err)
            continue
        try:
            if has_doctype(path):
                log.warning("%s: declares a document type (DTD or entities); left out of the test summary",
                            clean_name(path.name))
                continue
            report = _read_report(path)
        except (ET.ParseError, OSError, ValueError):
            log.warning("%s: not readable as XML; left out of the test summary", clean_name(path.name))
            continue
        if report is None:
            continue
        files.append(os.fspath(path))
        total.tests += report.tests
        total.failures += report.failures
        total.errors += report.errors
        total.skipped += report.skipped
        total.failed += report.failed
    if not files:
        return None
    return JunitSummary(total.tests, total.failures, total.errors, total.skipped, tuple(total.failed), tuple(files))


def render_text(summary: JunitSummary) -> str:
    line = (f"{summary.tests} tests, {summary.failures} failures, {summary.errors} errors, "
            f"{summary.skipped} skipped")
    shown = summary.failed[:FAILED_NAMES_SHOWN]
    more = len(summary.failed) - len(shown)
    return line + "".join(f"\n  failed: {name}" for name in shown) + (f"\n  ... and {more} more" if more else "")


def render_markdown(summary: JunitSummary, title: str) -> str:
    verdict = "passed" if summary.passed else "failed"
    lines = [f"### {title}: {verdict}", "",
             "| tests | failures | errors | skipped |", "|---|---|---|---|",
             f"| {summary.tests} | {summary.failures} | {summary.errors} | {summary.skipped} |"]
    if summary.failed:
        lines += ["", "Failing tests:", ""]
        lines += [f"- {escape_markdown(name)}" for name in summary.failed[:FAILED_NAMES_SHOWN]]
        more = len(summary.failed) - FAILED_NAMES_SHOWN
        if more > 0:
            lines.append(f"- ... and {more} more")
    return "\n".join(lines) + "\n\n"


def publish_summary(summary: JunitSummary, title: str) -> None:
    """The summary in the log, and in GitHub Actions' job summary when running there."""
    log.info("%s results: %s", title, render_text(summary))
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        try:
            with open(target, "a", encoding="utf-8") as f:
                f.write(render_markdown(summary, title))
        except OSError as err:
            log.warning("could not write the job summary (%s): %s", target, err)
