"""The one way cloudbake runs other programs.

argv is always a list (never a shell string), every argument goes through
``os.fspath``, the command is logged shell-quoted, there is always a timeout, a
failure carries the tail of stderr, and on Ctrl-C or any error the child is
terminated, then killed, so no process outlives the step that started it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Union

from cloudbake.core.errors import PipelineError
from cloudbake.core.log import stage_logger

Arg = Union[str, "os.PathLike[str]"]
STDERR_TAIL_LINES = 20
STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def _argv(argv: Sequence[Arg]) -> list[str]:
    return [os.fspath(arg) for arg in argv]


def drain(stream: IO[bytes], keep_bytes: int = 64 << 10) -> Callable[[], str]:
    """Read ``stream`` to its end on a thread, keeping its last ``keep_bytes``; returns a function that
    waits for the end and gives the text. A program whose stderr nobody reads blocks once the pipe is full
    (about 64 KiB): reading it while waiting for the program is what lets the program finish."""
    kept = bytearray()

    read_some = getattr(stream, "read1", stream.read)   # a pipe's buffered reader has read1: what is there

    def read() -> None:
        with contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: read_some(65536), b""):
                kept.extend(chunk)
                del kept[:-keep_bytes]

    thread = threading.Thread(target=read, name="drain", daemon=True)
    thread.start()

    def text() -> str:
        thread.join(10.0)
        return bytes(kept).decode(errors="replace")

    return text


def guest_path(path: str) -> str:
    """A guest path for a shell command line: ``~`` and ``~/x`` become the user's home, the rest is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = STOP_GRACE_SECONDS) -> None:
    """Terminate ``proc``, wait up to ``grace`` seconds, then kill it; always reaps it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class CommandTimeoutError(PipelineError):
    """The program did not finish in time; it was stopped."""


def run(
    argv: Sequence[Arg],
    *,
    stage: str,
    timeout: float,
    check: bool = True,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = True,
) -> Result:
    """Run argv to completion and capture its output (decoded leniently).

    The parameters after ``argv`` are keyword options, each defaulting to what most callers
    want, in the manner of ``subprocess.run``: the one runner serves every program cloudbake runs.

    ``capture=False`` lets the output through to this process's own (a test command the
    user watches). A non-zero exit (with ``check``) raises PipelineError naming the program
    and showing the tail of its stderr; a timeout raises CommandTimeoutError.
    """
    args = _argv(argv)
    log = stage_logger(stage)
    log.debug("$ %s", shlex.join(args))
    pipe = subprocess.PIPE if capture else None
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=pipe,
            stderr=pipe,
            env=env,
            cwd=cwd,
        )
    except FileNotFoundError:
        raise PipelineError(f"'{args[0]}' not found", hint="install it or put it on PATH") from None
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise CommandTimeoutError(f"{shlex.join(args)} did not finish within {timeout:g} s") from None
    finally:
        stop_process(proc)
    stdout, stderr = (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")
    if check and proc.returncode != 0:
        detail = tail(stderr) or tail(stdout)
        raise PipelineError(
            f"{os.path.basename(args[0])} failed with exit status {proc.returncode}: {shlex.join(args)}"
            + (f"\n{detail}" if detail else "")
        )
    return Result(proc.returncode, stdout, stderr)


class Spawned:
    """A started program; stopped when its block ends unless ``keep_running()`` was called."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.kept = False

    def keep_running(self) -> None:
        """Leave the process running after the block (``keep=1``: the user takes it over)."""
        self.kept = True


@contextlib.contextmanager
def spawn(
    argv: Sequence[Arg],
    *,
    stage: str,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    stderr: IO[bytes] | int | None = subprocess.PIPE,
    stdin: IO[bytes] | int | None = subprocess.DEVNULL,
    grace: float = STOP_GRACE_SECONDS,
    new_session: bool = False,
    cwd: Path | None = None,
) -> Iterator[Spawned]:
    """Start a long-running program (a VM) and guarantee it is gone when the block ends.

    Keyword options as ``subprocess.Popen`` has them (streams, session, folder) with safe defaults.

    Whatever ends the block (success, error, Ctrl-C), the process is terminated,
    given ``grace`` seconds, then killed and reaped, unless the caller asked to
    keep it. Callers that want a clean shutdown (QMP powerdown) do it inside the block.
    ``new_session`` detaches it from the terminal's Ctrl-C, for processes that may be kept.
    """
    args = _argv(argv)
    stage_logger(stage).debug("$ %s", shlex.join(args))
    try:
        proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=new_session,
                                cwd=cwd)
    except FileNotFoundError:
        raise PipelineError(f"'{args[0]}' not found", hint="install it or put it on PATH") from None
    spawned = Spawned(proc)
    try:
        yield spawned
    finally:
        if not spawned.kept:
            stop_process(proc, grace)
