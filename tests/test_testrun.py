"""test-image's pure parts: the SSH command, the per-run seed, overlays and leftover cleanup. No boots here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from cloudbake.errors import PipelineError
from cloudbake.pipeline import load_pipeline
from cloudbake.testrun import RunFiles, clean_leftovers, make_overlay, run_seed_files, runs_root, ssh_argv


def test_ssh_pins_the_host_key_and_uses_only_the_run_key(tmp_path):
    files = RunFiles(tmp_path)
    argv = ssh_argv(files, 2222, "ubuntu", "make check")
    joined = " ".join(argv)
    assert "StrictHostKeyChecking=yes" in joined and "StrictHostKeyChecking=no" not in joined
    assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in joined
    assert "IdentitiesOnly=yes" in joined and f"-i {tmp_path / 'id_ed25519'}" in joined
    assert argv[-3:] == ["ubuntu@127.0.0.1", "--", "make check"]
    assert argv[argv.index("-p") + 1] == "2222"


def test_run_seed_carries_run_key_and_host_key(make_pipeline):
    pipeline = load_pipeline(make_pipeline("cloud_init: {user: dev}\n"))
    files = run_seed_files(pipeline, "ssh-ed25519 AAAArun run", "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n",
                           "ssh-ed25519 AAAAhost host", "cloudbake-run-1")
    doc = yaml.safe_load(files.user_data)
    assert doc["users"][0]["name"] == "dev" and doc["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 AAAArun run"]
    assert doc["ssh_keys"]["ed25519_public"] == "ssh-ed25519 AAAAhost host"
    assert doc["ssh_pwauth"] is False and "power_state" not in doc
    assert yaml.safe_load(files.meta_data)["instance-id"] == "cloudbake-run-1"


def test_overlay_names_its_base_relatively(tmp_path):
    base = tmp_path / "dist" / "img-0123456789abcdef.qcow2"
    base.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    run_folder = runs_root(base) / "r1"
    run_folder.mkdir(parents=True)
    overlay = run_folder / "disk.qcow2"
    make_overlay(base, overlay)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["backing-filename"] == "../../img-0123456789abcdef.qcow2"
    assert overlay.stat().st_size < 1 << 20
    moved = tmp_path / "moved"
    (tmp_path / "dist").rename(moved)
    assert subprocess.run(["qemu-img", "info", str(moved / ".runs" / "r1" / "disk.qcow2")],
                          capture_output=True).returncode == 0


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    base = tmp_path / "dist" / "img.qcow2"
    root = runs_root(base)
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    for name, info in (("dead", {"pid": int(dead_pid)}), ("alive", {"pid": os.getpid()}),
                       ("kept", {"pid": int(dead_pid), "kept": True})):
        (root / name).mkdir(parents=True)
        (root / name / "run.json").write_text(json.dumps(info))
        (root / name / "disk.qcow2").write_bytes(b"x")
    removed = clean_leftovers(base)
    assert [p.name for p in removed] == ["dead"]
    assert sorted(p.name for p in root.iterdir()) == ["alive", "kept"]


def _tar(entries: dict[str, bytes]) -> bytes:
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("with_filter", [True, False])
def test_artifact_extraction_stays_in_its_folder(tmp_path, monkeypatch, with_filter):
    import io
    import tarfile

    from cloudbake.errors import PipelineError
    from cloudbake.testrun import _extract_safely
    if not with_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    dest = tmp_path / "artifacts"
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(_tar({"var/log/result.xml": b"<ok/>"})), mode="r|") as good:
        for member in good:
            _extract_safely(good, member, dest)
    assert (dest / "var" / "log" / "result.xml").read_bytes() == b"<ok/>"
    with tarfile.open(fileobj=io.BytesIO(_tar({"../escaped": b"x"})), mode="r|") as evil, \
            pytest.raises(PipelineError, match="refusing artifact"):
        for member in evil:
            _extract_safely(evil, member, dest)
    assert not (tmp_path / "escaped").exists()


# --- artifacts: one tar stream, bounded, failures are failures ---------------------------------
# A stand-in `ssh` runs the remote command on this machine (and `sudo -n` runs it as is), so the
# real artifact script and the host's real GNU tar do the work.

STANDIN_SSH = """#!/bin/sh
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done
shift
if [ -n "$STANDIN_SSH_SLEEP" ]; then exec sleep "$STANDIN_SSH_SLEEP"; fi
sh -c "$*"
status=$?
if [ -n "$STANDIN_SSH_DROP" ]; then echo "Connection to 127.0.0.1 closed by remote host." >&2; exit 255; fi
exit $status
"""
STANDIN_SUDO = '#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n'


@pytest.fixture
def guest_tools(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ssh", STANDIN_SSH), ("sudo", STANDIN_SUDO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def _fetch(tmp_path, patterns, **kw):
    from cloudbake.testrun import fetch_artifacts

    kw.setdefault("max_bytes", 1 << 30)
    kw.setdefault("timeout_s", 60)
    return fetch_artifacts(RunFiles(tmp_path / "run"), 2222, "ubuntu", patterns, tmp_path / "out", **kw)


def test_thousands_of_artifacts_arrive_in_one_stream(guest_tools):
    many = guest_tools / "guest" / "many"
    many.mkdir(parents=True)
    for index in range(2500):
        (many / f"result-{index:05d}.xml").write_text(f"<r>{index}</r>")
    (guest_tools / "guest" / "log with space.txt").write_text("spaces ok")
    names = _fetch(guest_tools, (f"{many}/*.xml", f"{guest_tools}/guest/log with space.txt", "/nonexistent/*"))
    out = guest_tools / "out" / str(many).lstrip("/")
    assert len([n for n in names if n.endswith(".xml")]) == 2500
    assert (out / "result-02499.xml").read_text() == "<r>2499</r>"
    assert (guest_tools / "out" / str(guest_tools).lstrip("/") / "guest" / "log with space.txt").read_text() == "spaces ok"


def test_no_match_is_no_artifacts(guest_tools):
    assert _fetch(guest_tools, ("/nonexistent/*.xml",)) == []


def test_artifacts_over_the_cap_fail(guest_tools):
    big = guest_tools / "guest"
    big.mkdir()
    for index in range(4):
        (big / f"blob{index}").write_bytes(os.urandom(1 << 20))
    with pytest.raises(PipelineError, match=r"larger than test.artifacts_max \(2.0 MiB\)"):
        _fetch(guest_tools, (f"{big}/*",), max_bytes=2 << 20)


def test_a_dropped_copy_is_an_error_not_a_success(guest_tools, monkeypatch):
    (guest_tools / "guest").mkdir()
    (guest_tools / "guest" / "a.txt").write_text("a")
    monkeypatch.setenv("STANDIN_SSH_DROP", "1")
    with pytest.raises(PipelineError, match=r"copying the artifacts failed \(exit status 255\)"):
        _fetch(guest_tools, (f"{guest_tools}/guest/*",))


def test_a_copy_that_hangs_hits_the_deadline(guest_tools, monkeypatch):
    monkeypatch.setenv("STANDIN_SSH_SLEEP", "60")
    with pytest.raises(PipelineError, match="did not finish within test.timeout"):
        _fetch(guest_tools, ("/etc/hostname",), timeout_s=1)


def test_a_changed_host_key_during_the_copy_is_named(guest_tools, monkeypatch):
    fake_ssh = guest_tools / "bin" / "ssh"
    fake_ssh.write_text("#!/bin/sh\necho '@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@' >&2\n"
                        "echo 'Host key verification failed.' >&2\nexit 255\n")
    with pytest.raises(PipelineError, match="host key other than the one injected"):
        _fetch(guest_tools, ("/etc/hostname",))
