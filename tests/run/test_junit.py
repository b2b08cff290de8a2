"""JUnit summaries of a run's artifacts: counted, named, published to GitHub's job summary; hostile files skipped."""

from __future__ import annotations

from cloudbake.run.junit import publish_summary, render_markdown, summarize_junit

PYTEST_REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4" failures="1" errors="1" skipped="1">
<testcase classname="tests.test_net" name="test_bridge"/>
<testcase classname="tests.test_net" name="test_route"><failure message="boom">trace</failure></testcase>
<testcase classname="tests.test_net" name="test_nft"><error message="setup">trace</error></testcase>
<testcase classname="tests.test_net" name="test_ipv6"><skipped message="no ipv6"/></testcase>
</testsuite></testsuites>
"""
UNITTEST_STYLE = """<testsuite name="netlab" tests="1"><testcase classname="a.B" name="test_ok"/></testsuite>"""
BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
<!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
<!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
<!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
<!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
<!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">]>
<testsuite><testcase classname="x" name="&lol9;"/></testsuite>
"""


def test_reports_are_summed_and_failing_tests_named(tmp_path):
    (tmp_path / "a.xml").write_text(PYTEST_REPORT)
    (tmp_path / "b.xml").write_text(UNITTEST_STYLE)
    (tmp_path / "notes.txt").write_text("<testsuite/>")
    summary = summarize_junit(sorted(tmp_path.iterdir()))
    assert summary is not None
    assert (summary.tests, summary.failures, summary.errors, summary.skipped) == (5, 1, 1, 1)
    assert summary.failed == ("tests.test_net.test_route", "tests.test_net.test_nft") and not summary.passed


def test_no_report_is_no_summary(tmp_path):
    (tmp_path / "pom.xml").write_text("<project/>")
    (tmp_path / "broken.xml").write_text("<testsuite><testcase")
    assert summarize_junit(sorted(tmp_path.iterdir())) is None
    assert summarize_junit([]) is None


def test_an_entity_bomb_from_the_guest_is_skipped_not_expanded(tmp_path, caplog):
    (tmp_path / "bomb.xml").write_text(BILLION_LAUGHS)
    (tmp_path / "ok.xml").write_text(UNITTEST_STYLE)
    summary = summarize_junit(sorted(tmp_path.iterdir()))
    assert summary is not None and summary.tests == 1
    assert "bomb.xml: declares a document type" in caplog.text


def test_one_internal_entity_is_skipped_with_a_warning_not_expanded(tmp_path, caplog):
    # One entity of 64 KiB referenced 160 times: expat allows it (the amplification is small),
    # and the host would build the expanded names in memory. Any DTD is refused.
    body = "&e;" * 160
    (tmp_path / "big.xml").write_text(f'<?xml version="1.0"?>\n<!DOCTYPE t [<!ENTITY e "{"x" * (64 << 10)}">]>\n'
                                      f'<testsuite><testcase classname="c" name="{body}"><failure/></testcase>'
                                      '</testsuite>')
    (tmp_path / "external.xml").write_text('<!DOCTYPE testsuite SYSTEM "file:///etc/passwd"><testsuite/>')
    (tmp_path / "ok.xml").write_text(UNITTEST_STYLE)
    summary = summarize_junit(sorted(tmp_path.iterdir()))
    assert summary is not None and summary.tests == 1 and summary.files == (str(tmp_path / "ok.xml"),)
    assert "big.xml: declares a document type" in caplog.text and "external.xml: declares" in caplog.text


def test_test_names_are_one_clean_line_and_escaped_in_markdown(tmp_path):
    name = "test_x\n### fake heading\x1b[31m [link](http://evil) <img src=x> `code`|cell"
    (tmp_path / "a.xml").write_text('<testsuite><testcase classname="c" name="'
                                    + name.replace("<", "&lt;").replace(">", "&gt;").replace("\n", "&#10;")
                                    .replace("\x1b", "")
                                    + '"><failure/></testcase></testsuite>')
    summary = summarize_junit([tmp_path / "a.xml"])
    assert summary is not None
    (failed,) = summary.failed
    assert "\n" not in failed and "\x1b" not in failed and failed.startswith("c.test_x ### fake heading")
    markdown = render_markdown(summary, "run")
    line = next(line for line in markdown.splitlines() if line.startswith("- "))
    assert "\\#\\#\\#" in line and "\\[link\\]\\(http" in line and "\\<img" in line and "\\`code\\`" in line
    assert not any(line.startswith("###") for line in markdown.splitlines()[1:])


def test_control_characters_never_reach_the_log(tmp_path, caplog):
    (tmp_path / "a.xml").write_text('<testsuite><testcase classname="c" name="a&#10;b&#9;&#x9b;2J&#127;c">'
                                    '<failure/></testcase></testsuite>')
    summary = summarize_junit([tmp_path / "a.xml"])
    assert summary is not None and summary.failed == ("c.a b 2Jc",)


def test_github_job_summary_gets_a_table(tmp_path, monkeypatch):
    (tmp_path / "a.xml").write_text(PYTEST_REPORT)
    summary = summarize_junit([tmp_path / "a.xml"])
    assert summary is not None
    target = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    publish_summary(summary, "run 1")
    publish_summary(summary, "run 2")
    text = target.read_text()
    assert text.count("| 4 | 1 | 1 | 1 |") == 2 and "### run 1: failed" in text and "- tests\\.test\\_net\\.test\\_nft" in text
    assert text.endswith(render_markdown(summary, "run 2"))


def test_available_memory_reads_memavailable(tmp_path):
    from cloudbake.qemu.host import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:    2000000 kB\n")
    assert available_memory(meminfo) == 2000000 * 1024
    assert (available_memory(tmp_path / "absent") or 0) > 0  # falls back to physical memory


def test_a_large_report_is_summed_without_holding_its_tree(tmp_path):
    """A 16 MiB report of many test cases (each with its output): read incrementally, its peak memory stays
    a small fraction of its size (the whole tree took 17 times its size, per run of -j)."""
    import tracemalloc

    from cloudbake.run.junit import summarize_junit

    report = tmp_path / "junit.xml"
    case = '<testcase classname="pkg.mod" name="test_{i}"><system-out>' + "o" * 1500 + "</system-out>{extra}</testcase>\n"
    with report.open("w") as out:
        out.write('<testsuites><testsuite name="big">\n')
        for i in range(10000):
            out.write(case.format(i=i, extra="<failure message='no'/>" if i % 1000 == 0 else ""))
        out.write("</testsuite></testsuites>\n")
    size = report.stat().st_size
    assert size > 15 << 20
    tracemalloc.start()
    try:
        summary = summarize_junit([report])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary is not None and (summary.tests, summary.failures) == (10000, 10)
    assert peak < size / 4, f"peak {peak >> 20} MiB for a {size >> 20} MiB report"
