"""The one subprocess runner: the real interpreter plays every program."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from cloudbake.core.errors import PipelineError
from cloudbake.core.runner import run, spawn
from cloudbake.core.tools import require_tool


def test_output_is_captured_and_decoded_leniently():
    result = run([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'ok \\xff'); print('e', file=sys.stderr)"],
                 stage="test", timeout=30)
    assert result.returncode == 0 and result.stdout == "ok \ufffd" and result.stderr.strip() == "e"


def test_non_zero_exit_names_the_program_and_shows_stderr():
    with pytest.raises(PipelineError) as caught:
        run([sys.executable, "-c", "import sys; print('first'); print('disk full', file=sys.stderr); sys.exit(3)"],
            stage="test", timeout=30)
    assert "failed with exit status 3" in str(caught.value) and "disk full" in str(caught.value)


def test_non_zero_is_returned_when_not_checked():
    assert run([sys.executable, "-c", "import sys; sys.exit(2)"], stage="test", timeout=30, check=False).returncode == 2


def test_timeout_kills_the_child_and_says_so(tmp_path):
    marker = tmp_path / "pid"
    with pytest.raises(PipelineError, match="did not finish within 1 s"):
        run([sys.executable, "-c", f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); "
             "time.sleep(60)"], stage="test", timeout=1)
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_program_is_a_clear_error():
    with pytest.raises(PipelineError, match="not found"):
        run(["/nonexistent/qemu-img", "info"], stage="test", timeout=5)
    with pytest.raises(PipelineError, match="install it: apt-get install qemu-utils; macOS: brew install qemu"):
        require_tool("qemu-img", path="/nonexistent")
    with pytest.raises(PipelineError, match="install it: apt-get install openssh-client \\(macOS has it\\)"):
        require_tool("ssh", path="/nonexistent")


def test_ctrl_c_stops_a_spawned_program(tmp_path):
    """KeyboardInterrupt inside the block: the program is terminated and reaped, the interrupt goes on."""
    started = []
    with pytest.raises(KeyboardInterrupt), spawn([sys.executable, "-c", "import time; time.sleep(60)"],
                                                 stage="test") as spawned:
        started.append(spawned.proc)
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        time.sleep(10)
    assert started[0].poll() is not None


def test_a_kept_program_survives_its_block():
    with spawn([sys.executable, "-c", "import time; time.sleep(30)"], stage="test") as spawned:
        spawned.keep_running()
    try:
        assert spawned.proc.poll() is None
    finally:
        spawned.proc.kill()
        spawned.proc.wait()


def test_arguments_are_never_a_shell_string(tmp_path):
    odd = tmp_path / "a b; echo pwned"
    result = run([sys.executable, "-c", "import sys; print(sys.argv[1])", odd], stage="test", timeout=30)
    assert result.stdout.strip() == str(odd)  # one argument, as given: no shell ever split or ran it


def test_uncaptured_output_reaches_our_own_streams(capfd):
    result = run([sys.executable, "-c", "print('from the guest')"], stage="test", timeout=30, capture=False)
    assert result.returncode == 0 and result.stdout == ""
    assert "from the guest" in capfd.readouterr().out


def test_timeout_is_its_own_error_type():
    from cloudbake.core.runner import CommandTimeoutError

    with pytest.raises(CommandTimeoutError):
        run([sys.executable, "-c", "import time; time.sleep(30)"], stage="test", timeout=0.5, check=False)


@pytest.mark.parametrize(("raw", "plain"), [
    ("\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh.service\x1b[0m.", "  OK  ] Started ssh.service."),
    ("\x1b]0;title\x07login: \x1b[?25h", "login:"),
    ("cloud-init\r\x1b[K\x08 done\x00", "cloud-init done"),
])
def test_console_lines_lose_their_escape_sequences(raw, plain):
    from cloudbake.core.progress import plain_text

    assert plain_text(raw) == plain


def test_a_wait_says_what_it_waits_for_while_one_call_blocks(monkeypatch, caplog):
    """The heartbeat runs beside a call that blocks (cloud-init status --wait over SSH, a migration)."""
    import logging
    import time

    from cloudbake.core.log import stage_logger
    from cloudbake.core.progress import waiting

    monkeypatch.setenv("CLOUDBAKE_HEARTBEAT_S", "1")
    caplog.set_level(logging.INFO, logger="cloudbake")
    with waiting(stage_logger("warm"), "saving the warm state", lambda: "console: x"):
        time.sleep(2.5)
    lines = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert lines[:2] == ["waiting for: saving the warm state (1 s so far); console: x",
                         "waiting for: saving the warm state (2 s so far); console: x"]


def test_a_timestamp_from_the_future_counts_as_stale(tmp_path):
    """A key cache or marker restored with a clock-ahead runner's mtime (actions/cache keeps mtimes) must not
    stay fresh for ever: freshness checks see it stale, sweeps take it."""
    import os
    import time

    from cloudbake.core.files import age_s, sweep_temps

    now = time.time()
    assert age_s(now - 10, now) == 10 and age_s(now + 2, now) == 0   # the file system's own granularity
    assert age_s(now + 3600, now) == float("inf")
    future = tmp_path / ".x.tmp"
    future.write_text("left by a writer")
    os.utime(future, (now + 86400, now + 86400))
    assert sweep_temps(tmp_path, older_than_s=3600) == [future]


def test_a_verified_file_restored_from_a_cache_is_hashed_again(tmp_path):
    """The .verified sidecar travels in a CI cache entry with its file, and a restore keeps size and mtime
    exactly: a copy (as a restore makes) or a file altered in place and set back to its old mtime is not
    taken as verified."""
    import os
    import shutil

    from cloudbake.core.files import is_verified, record_verified, sha256_file, verified_record

    original = tmp_path / "state.zst"
    original.write_bytes(b"a" * 4096)
    digest = sha256_file(original)
    record_verified(original, digest)
    assert is_verified(original, digest)
    restored = tmp_path / "restored" / "state.zst"
    restored.parent.mkdir()
    shutil.copy2(original, restored)
    shutil.copy2(verified_record(original), verified_record(restored))
    assert restored.stat().st_mtime_ns == original.stat().st_mtime_ns
    assert not is_verified(restored, digest)
    stat = original.stat()
    original.write_bytes(b"b" * 4096)   # altered, same size
    os.utime(original, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not is_verified(original, digest)
