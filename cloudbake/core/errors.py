"""The one error type users see, and stop signals turned into an unwinding exception."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class PipelineError(Exception):
    """A problem the user can fix: bad input, a missing tool, a failed guest.

    ``hint`` says what to do next. Genuine bugs raise other exceptions and keep
    their traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        from cloudbake.core.log import redact

        # Redacted where it is made, so no place that prints an error can show a URL's credentials.
        message, hint = redact(message), redact(hint) if hint is not None else None
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class MachineryError(PipelineError):
    """cloudbake's own machinery failed (boot, SSH, upload, artifacts), not the user's command.

    ``stage`` names the step, so a CI log says which one without reading the traceback.
    """

    def __init__(self, stage: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{stage}: {message}", hint)
        self.stage = stage

    @classmethod
    def from_error(cls, stage: str, err: PipelineError) -> MachineryError:
        if isinstance(err, MachineryError):
            return err
        return cls(stage, err.message, err.hint)


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP, SIGINT) arrived: unwind like Ctrl-C so every cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """While the block runs, SIGTERM, SIGHUP and SIGINT raise Interrupted.

    Python's default for SIGTERM and SIGHUP is to die on the spot, skipping every
    ``finally``: QEMU (in its own session) would survive and a run's private keys stay
    on disk. Raising instead unwinds through the same cleanups as Ctrl-C. Signal
    handlers can only be set from the main thread; elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
