"""Log lines that carry their stage: ``[fetch] downloading ...``."""

from __future__ import annotations

import logging
import os
import re
import sys

# user:password@ (or a token@) in a URL: never printed, never written to a lock or manifest.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def strip_credentials(url: str) -> str:
    """``url`` without its user-info part, for what is stored (lock, manifest)."""
    return _URL_CREDENTIALS.sub(r"\1", url, count=1)


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


class _RedactCredentials(logging.Filter):
    """Applied where records are made, so every handler (files, pytest's, doit's) sees them redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_REDACT = _RedactCredentials()


def stage_logger(stage: str) -> logging.Logger:
    """Logger whose lines start with ``[stage]``; goes to stderr, which doit never captures."""
    root = logging.getLogger("cloudbake")
    if not root.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(_StageFormatter())
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if os.environ.get("CLOUDBAKE_VERBOSE") else logging.INFO)
    logger = root.getChild(stage)
    if _REDACT not in logger.filters:
        logger.addFilter(_REDACT)
    return logger
