"""Long waits say what they wait for: a line at least every ``heartbeat_s()`` seconds, with the time so far.

A CI log that shows nothing for four minutes looks like a hang; a line naming the awaited stage
("SSH port answers", "cloud-init status --wait", "saving the warm state") says it is not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator

DEFAULT_HEARTBEAT_S = 30.0
# CSI and OSC sequences, and other escapes, that guests' consoles print (colours, cursor moves, titles).
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def heartbeat_s() -> float:
    """Seconds between progress lines: ``CLOUDBAKE_HEARTBEAT_S`` (at least 1), else 30."""
    try:
        return max(1.0, float(os.environ.get("CLOUDBAKE_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)))
    except ValueError:
        return DEFAULT_HEARTBEAT_S


def plain_text(line: str) -> str:
    """A console line as text: escape sequences and control characters removed (indentation kept)."""
    return _CONTROL.sub("", _ESCAPES.sub("", line)).rstrip()


@contextlib.contextmanager
def waiting(log: logging.Logger, what: str, detail: Callable[[], str] | None = None) -> Iterator[None]:
    """While the block runs, log ``waiting for: WHAT (N s so far)`` every ``heartbeat_s()``, with
    ``detail()`` (e.g. the guest console's last line) appended. A thread does it, so a block that
    blocks in one call (``cloud-init status --wait`` over SSH, a migration) is covered too."""
    started = time.monotonic()
    done = threading.Event()
    every = heartbeat_s()

    def beat() -> None:
        while not done.wait(every):
            extra = ""
            if detail is not None:
                with contextlib.suppress(Exception):
                    extra = detail()
            log.info("waiting for: %s (%.0f s so far)%s", what, time.monotonic() - started,
                     f"; {extra}" if extra else "")

    thread = threading.Thread(target=beat, name=f"heartbeat: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1.0)
