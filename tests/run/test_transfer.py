"""What a guest sends back is hostile: extraction takes plain files and folders only, on any Python.

Streams are built here with tarfile (and GNU tar for a sparse member) and fed through the
stand-in `ssh` of tests/run/test_machine.py, so Machine.get() and fetch_artifacts() run their
real code on them. tarfile's ``data`` filter is removed in some cases to show that safety
does not depend on it (it is bypassable before Python 3.11.13, CVE-2025-4517).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from cloudbake.core.errors import MachineryError, PipelineError
from cloudbake.run.transfer import extract_safely, member_parts
from tests.run.test_machine import attached, guest  # noqa: F401  (the fixture)


def make_tar(*members: tuple[str, bytes | None, bytes], **kw) -> bytes:
    """Members as (name, type, data-or-linkname); type None is a regular file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind is None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                info.type = kind
                if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = data.decode()
                archive.addfile(info)
    return buffer.getvalue()


def serve_tar(guest_home: Path, data: bytes) -> None:
    """The stand-in ssh, from now on, answers every command with these bytes."""
    stream = guest_home.parent / "hostile.tar"
    stream.write_bytes(data)
    ssh = guest_home.parent / "bin" / "ssh"
    ssh.write_text(f"#!/bin/sh\ncat '{stream}'\n")


@pytest.mark.parametrize(("name", "fragment"), [
    ("/etc/passwd", "an absolute path"),
    ("a/../../b", "climbs out"),
    (".", "names no file"),
    ("./", "names no file"),
    ("", "names no file"),
    ("/".join(["x" * 255] * 20) + "/report.xml", "a path longer than this host names"),
    ("a/" + "y" * 256, "a path longer than this host names"),
])
def test_bad_member_names_are_refused(name, fragment):
    with pytest.raises(PipelineError, match=fragment):
        member_parts(name)


def test_member_names_are_normalized():
    assert member_parts("./a//b/") == ("a", "b")


@pytest.mark.parametrize("with_filter", [True, False])
@pytest.mark.parametrize(("member", "fragment"), [
    (("evil", tarfile.SYMTYPE, b"/etc"), "a symbolic link"),
    (("evil", tarfile.LNKTYPE, b"/etc/passwd"), "a hard link"),
    (("evil", tarfile.CHRTYPE, b""), "a device or FIFO"),
    (("evil", tarfile.FIFOTYPE, b""), "a device or FIFO"),
])
def test_links_and_devices_are_refused_whatever_the_filter(tmp_path, monkeypatch, with_filter, member, fragment):
    if not with_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    dest = tmp_path / "dest"
    with tarfile.open(fileobj=io.BytesIO(make_tar(member)), mode="r|") as archive, \
            pytest.raises(PipelineError, match=fragment):
        for item in archive:
            extract_safely(archive, item, dest)
    assert list(dest.iterdir()) == []


def test_a_sparse_member_is_refused(tmp_path):
    sparse = tmp_path / "g" / "holes"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.write(b"x")
    stream = subprocess.run(["tar", "--sparse", "-c", "-f", "-", "-C", str(sparse.parent), "holes"],
                            check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r|") as archive, \
            pytest.raises(PipelineError, match="a sparse file"):
        for item in archive:
            extract_safely(archive, item, tmp_path / "dest")


def test_a_link_already_in_the_folder_is_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a").symlink_to(outside)
    with tarfile.open(fileobj=io.BytesIO(make_tar(("a/x", None, b"owned"))), mode="r|") as archive, \
            pytest.raises(OSError):
        for item in archive:
            extract_safely(archive, item, dest)
    assert list(outside.iterdir()) == []


def test_artifacts_refuse_a_link_chain_and_copy_nothing_through_it(guest, make_pipeline, tmp_path):  # noqa: F811
    machine = attached(make_pipeline)
    # The shape of CVE-2025-4517: a chain of links, then a file written through the last one.
    chain = [(f"l{i}", tarfile.SYMTYPE, (f"l{i + 1}" if i < 3 else str(tmp_path / "host")).encode())
             for i in range(4)]
    serve_tar(guest, make_tar(("ok.txt", None, b"fine"), *chain, ("l0/pwned", None, b"x")))
    (tmp_path / "host").mkdir()
    with pytest.raises(MachineryError, match=r"^artifacts: refusing 'l0' from the guest: a symbolic link"):
        machine.fetch_artifacts(["*"], tmp_path / "out")
    assert list((tmp_path / "host").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.txt"]


def test_artifacts_count_extracted_sizes_against_the_cap(guest, make_pipeline, tmp_path):  # noqa: F811
    machine = attached(make_pipeline, "{artifacts_max: 1M}")
    serve_tar(guest, make_tar(("a", None, b"x" * (600 << 10)), ("b", None, b"y" * (600 << 10))))
    with pytest.raises(MachineryError, match="larger than test.artifacts_max"):
        machine.fetch_artifacts(["*"], tmp_path / "out")


def test_a_name_the_host_cannot_write_is_the_artifacts_stage_not_a_traceback(guest, make_pipeline,  # noqa: F811
                                                                                tmp_path):
    from cloudbake.run.testrun import EXIT_MACHINERY

    machine = attached(make_pipeline)
    serve_tar(guest, make_tar(("d/" + "n" * 300, None, b"x")))
    with pytest.raises(MachineryError, match=r"^artifacts: refusing 'd/n+'... from the guest: a path longer") as caught:
        machine.fetch_artifacts(["*"], tmp_path / "out")
    assert caught.value.stage == "artifacts" and EXIT_MACHINERY == 125
    deep = "/".join(["x" * 255] * 20) + "/junit.xml"   # each part fine; the whole path no host can open
    serve_tar(guest, make_tar((deep, None, b"<testsuite/>")))
    with pytest.raises(MachineryError, match="a path longer than this host names") as caught:
        machine.fetch_artifacts(["*"], tmp_path / "out-deep")
    assert caught.value.stage == "artifacts"


def test_an_absolute_member_never_makes_the_summary_read_a_host_file(guest, make_pipeline, tmp_path):  # noqa: F811
    host_report = tmp_path / "host-report.xml"
    host_report.write_text('<testsuite><testcase classname="host" name="secret"><failure/></testcase></testsuite>')
    machine = attached(make_pipeline)
    serve_tar(guest, make_tar((str(host_report), None, b"<testsuite/>")))
    with pytest.raises(MachineryError, match="an absolute path"):
        machine.fetch_artifacts(["*"], tmp_path / "out")


@pytest.mark.parametrize("first", ["/x", ".", "./"])
def test_get_refuses_a_stream_that_is_not_the_one_thing_asked_for(guest, make_pipeline, tmp_path,  # noqa: F811
                                                                   first):
    machine = attached(make_pipeline)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    serve_tar(guest, make_tar((first, tarfile.DIRTYPE, b""), ("x/y", None, b"z")))
    with pytest.raises(MachineryError, match="^get: "):
        machine.get("~/x", mine)
    assert (mine / "keep.txt").read_text() == "mine"


def test_get_refuses_members_beside_the_one_asked_for(guest, make_pipeline, tmp_path):  # noqa: F811
    machine = attached(make_pipeline)
    serve_tar(guest, make_tar(("x", None, b"a"), ("other", None, b"b")))
    with pytest.raises(MachineryError, match="more than the one file or folder"):
        machine.get("~/x", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "other").exists()


def test_get_returns_plain_files_only(guest, make_pipeline, tmp_path):  # noqa: F811
    machine = attached(make_pipeline)
    (guest / "data").mkdir()
    (guest / "data" / "a.txt").write_text("a")
    os.symlink("/etc/hostname", guest / "data" / "link")
    with pytest.raises(MachineryError, match="'data/link' from the guest: a symbolic link"):
        machine.get("~/data", tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_a_report_the_host_cannot_open_is_left_out_of_the_summary_with_a_warning(tmp_path, caplog):
    """A candidate whose name is too long to open: a warning, not an OSError traceback (no exit 125)."""
    import logging

    from cloudbake.run.junit import summarize_junit

    caplog.set_level(logging.WARNING, logger="cloudbake")
    good = tmp_path / "junit.xml"
    good.write_text('<testsuite tests="1"><testcase classname="t" name="ok"/></testsuite>')
    too_long = tmp_path.joinpath(*(["z" * 255] * 20), "report.xml")
    summary = summarize_junit([too_long, good])
    assert summary is not None and summary.tests == 1
    assert "cannot be read" in caplog.text


def test_an_upload_whose_tar_complains_a_lot_ends_with_tars_reason_not_the_timeout(tmp_path):
    """tar writing far more than a pipe holds to stderr (files gone since the listing) must not block until
    test.timeout: its stderr is read while waiting, and the failure says what tar said."""
    import sys
    import time

    from cloudbake.run.transfer import send_tar

    tar = [sys.executable, "-c", "import sys\nfor i in range(4000): sys.stderr.write(f'tar: file{i}: Cannot stat: "
                                 "No such file or directory\\n')\nsys.stdout.write('x' * 1024)\nsys.exit(2)"]
    ssh = [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
    started = time.monotonic()
    with pytest.raises(PipelineError, match="upload: failed .*host tar 2") as caught:
        send_tar(tar, ssh, cwd=tmp_path, what="upload", timeout_s=60)
    assert time.monotonic() - started < 30
    assert "file3999: Cannot stat" in str(caught.value)
