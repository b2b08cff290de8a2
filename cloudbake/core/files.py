"""Files shared between processes: atomic publishing, and locks."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cloudbake.core.log import stage_logger


def write_atomically(dest: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``dest`` through a temp file in the same folder: fsync, then rename over it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[bool]:
    """An exclusive lock shared by every cloudbake process on this machine (flock).

    Yields whether another process held it first (what it did may make the caller's work moot).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        waited = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stage_logger("lock").info("waiting for another cloudbake process working on %s", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_unheld_lock(path: Path) -> bool:
    """Remove a lock file nobody holds (taken and removed while held, so no holder is pulled from under);
    False, and the file kept, when another process holds it."""
    try:
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)
            return True
    except OSError:
        return False


# A timestamp this far ahead of the clock is not "just written": it came from a machine whose clock ran
# ahead (actions/cache restores mtimes exactly), or from someone who wants it never to expire.
FUTURE_TOLERANCE_S = 5.0


def age_s(timestamp: float, now: float | None = None) -> float:
    """Seconds since ``timestamp``; infinite for one in the future, so anything that checks freshness
    (``age_s(t) < refresh``) treats it as stale and anything that sweeps old files takes it."""
    now = time.time() if now is None else now
    return float("inf") if timestamp > now + FUTURE_TOLERANCE_S else max(0.0, now - timestamp)


def sweep_temps(folder: Path, *, older_than_s: float, prefix: str = ".") -> list[Path]:
    """Remove ``<prefix>*.tmp`` files in ``folder`` left by a killed writer; returns what went.

    Every writer here writes ``.<name>.<random>.tmp`` (or ``.<name>.tmp``) and renames it;
    one killed before the rename leaves the temp behind. Callers pick ``older_than_s`` so a
    live writer's temp is never taken: 0 under a lock that excludes every writer of that
    folder, otherwise longer than any write takes.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.glob(f"{glob.escape(prefix)}*.tmp"):
        with contextlib.suppress(OSError):
            if path.is_file() and age_s(path.lstat().st_mtime, now) >= older_than_s:
                path.unlink()
                removed.append(path)
    if removed:
        stage_logger("files").info("removed %d temp file(s) a killed run left in %s", len(removed), folder)
    return removed



HASH_CHUNK_BYTES = 16 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verified_record(path: Path) -> Path:
    """The sidecar that remembers ``path`` was verified: ``<name>.verified``."""
    return path.with_name(path.name + ".verified")


def is_verified(path: Path, sha256: str) -> bool:
    """True when ``path`` was verified as ``sha256`` and has not changed since (size, mtime_ns)."""
    return verified_sha256(path) == sha256


def verified_sha256(path: Path) -> str | None:
    """The SHA-256 ``path`` was verified as, if it has not changed since (size, mtime_ns); else None."""
    try:
        record = json.loads(verified_record(path).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record == {**_identity(stat), "sha256": record.get("sha256")} \
            and isinstance(record.get("sha256"), str):
        return str(record["sha256"])
    return None


def _identity(stat: os.stat_result) -> dict[str, int]:
    """What says the file is the one that was hashed. Size and mtime alone travel: a cache restore or
    ``tar -x`` sets them exactly, so a file altered inside a CI cache entry would pass. The inode and the
    change time cannot be set by anyone: every restore, copy or write gives new ones (a rename or a new
    link only costs one more hash)."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "ino": stat.st_ino}


def record_verified(path: Path, sha256: str) -> None:
    write_atomically(verified_record(path), json.dumps({"sha256": sha256, **_identity(path.stat())}).encode())


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone: Python's last flush at exit would otherwise
    print a BrokenPipeError of its own (the recipe in Python's signal documentation)."""
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
