"""Log lines that carry their stage: ``[fetch] downloading ...``."""

from __future__ import annotations

import logging
import os
import sys


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is now (pytest and doit swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = record.name.rpartition(".")[2]
        prefix = f"[{stage}] "
        if record.levelno >= logging.WARNING:
            prefix += f"{record.levelname.lower()}: "
        return prefix + record.getMessage()


def stage_logger(stage: str) -> logging.Logger:
    """Logger whose lines start with ``[stage]``; goes to stderr, which doit never captures."""
    root = logging.getLogger("cloudbake")
    if not root.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(_StageFormatter())
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if os.environ.get("CLOUDBAKE_VERBOSE") else logging.INFO)
    return root.getChild(stage)
