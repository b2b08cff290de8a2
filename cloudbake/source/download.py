"""Resumable verified downloads: the SHA-256 computed while the bytes arrive (on a second thread), a
``.part`` file resumed with ``If-Range``, never grown past the size it was told to expect, a server
that trickles bytes cut off, and the file renamed into place only when the digest matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from cloudbake.core.errors import PipelineError
from cloudbake.core.files import file_lock, is_verified, record_verified, sha256_file, write_atomically
from cloudbake.core.log import stage_logger
from cloudbake.core.units import human_bytes
from cloudbake.source.http import (
    UNPINNED_MAX_BYTES,
    HttpSettings,
    Progress,
    RateFloor,
    ServerError,
    body_chunks,
    check_status,
    with_retries,
)

log = stage_logger("fetch")


@dataclass(frozen=True)
class Digest:
    """What a download must hash to: ``sha256`` (what the lock pins) or what the publisher lists (``sha512``)."""

    algorithm: str
    hexdigest: str

    @property
    def short(self) -> str:
        return f"{self.algorithm} {self.hexdigest[:12]}…"


def _hash_existing(path: Path, algorithm: str) -> tuple[Any, int]:
    digest = hashlib.new(algorithm)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest, size


def download(session: requests.Session, url: str, dest: Path, sha256: str | Digest, http: HttpSettings,
             expected_size: int | None = None) -> Path:
    """Download ``url`` to ``dest``, resuming a ``.part`` file, hashing while the bytes arrive.

    ``dest`` appears only when the digest matches (``sha256``: the hex SHA-256, or a ``Digest``
    of another algorithm); a mismatch deletes the partial. The file is remembered as verified
    by its SHA-256, computed once more when another algorithm checked it. Concurrent calls for
    the same ``dest`` serialize on a lock; the second one then finds the verified file and
    returns at once.
    """
    expected = sha256 if isinstance(sha256, Digest) else Digest("sha256", sha256)
    with file_lock(dest.with_name(dest.name + ".lock"), dest.name):
        if expected.algorithm == "sha256" and is_verified(dest, expected.hexdigest):
            log.info("cached: %s (verified sha256 %s…)", dest, expected.hexdigest[:12])
            return dest
        if url.startswith("file://"):
            _copy_local(url, dest, expected)
            return dest
        part = dest.with_name(dest.name + ".part")
        validator_file = dest.with_name(dest.name + ".part.json")
        def kept() -> str:
            size = part.stat().st_size if part.exists() else 0
            return f"; {human_bytes(size)} kept in {part} for the next run to resume"

        try:
            with_retries(lambda: _download_attempt(session, url, part, validator_file, http,
                                                   (expected_size, expected.algorithm)), url,
                         http, gave_up_detail=kept)
        except _TooLargeError as err:
            part.unlink(missing_ok=True)
            validator_file.unlink(missing_ok=True)
            _running.pop(part, None)
            raise PipelineError(str(err), hint="check source.mirror; run cloudbake update if the image really "
                                               "changed") from None
        digest, _ = _hash_existing_cached(part, expected.algorithm)
        actual = digest.hexdigest()
        if actual != expected.hexdigest:
            _running.pop(part, None)
            part.unlink(missing_ok=True)
            validator_file.unlink(missing_ok=True)
            name = "SHA-256" if expected.algorithm == "sha256" else expected.algorithm.upper()
            raise PipelineError(f"{url}: {name} mismatch: expected {expected.hexdigest}, got {actual}; the download "
                                "was deleted",
                                hint="run again; if it persists the mirror serves a corrupted or tampered file")
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        _running.pop(part, None)
        validator_file.unlink(missing_ok=True)
        record_verified(dest, actual if expected.algorithm == "sha256" else sha256_file(dest))
        log.info("verified %s (%s)", dest.name, expected.short)
        return dest


# The running digest of the partial file, kept between attempts so a resume hashes only new bytes.
_running: dict[Path, tuple[Any, int]] = {}


def _hash_existing_cached(part: Path, algorithm: str) -> tuple[Any, int]:
    size = part.stat().st_size if part.exists() else 0
    cached = _running.get(part)
    if cached is not None and cached[1] == size and cached[0].name == algorithm:
        return cached
    _running[part] = _hash_existing(part, algorithm) if part.exists() else (hashlib.new(algorithm), 0)
    return _running[part]


class BackgroundHasher:
    """Feeds a digest on a second thread, so hashing overlaps with receiving and writing.

    hashlib releases the GIL for large buffers; one extra thread takes the SHA-256 off
    the download's critical path. ``finish()`` waits until every chunk is hashed.
    """

    def __init__(self, digest: Any, depth: int = 16) -> None:
        import queue
        import threading

        self.digest = digest
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="cloudbake-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()


def _download_attempt(session: requests.Session, url: str, part: Path, validator_file: Path,
                      http: HttpSettings, expecting: tuple[int | None, str]) -> bool:
    """One HTTP request; True when the whole file is in ``part``. ``expecting``: (the size, if known;
    the digest's algorithm).

    Six parameters because one attempt of ``download`` needs them all, and they are its own.
    """
    expected_size, algorithm = expecting
    validator = None
    if part.exists() and validator_file.exists():
        with contextlib.suppress(ValueError):
            validator = json.loads(validator_file.read_text()).get("validator")
    have = part.stat().st_size if (part.exists() and validator) else 0
    # The checksum is of the bytes as published: never let a server compress them on the way.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": validator or ""})
    with session.get(url, stream=True, headers=headers,
                     timeout=(http.connect_timeout_s, http.read_timeout_s)) as response:
        digest, size, mode = _start_of_body(response, url, part, validator_file, (have, algorithm))
        limit = expected_size if expected_size and expected_size > 0 else UNPINNED_MAX_BYTES
        length = _content_length(response, url)
        if length is not None and size + length > limit:
            raise PipelineError(f"{url}: the server announces {human_bytes(size + length)}, more than the "
                                f"{human_bytes(limit)} {'the lock pins' if limit == expected_size else 'allowed'}; "
                                "refused", hint="check source.mirror; run cloudbake update if the image really changed")
        new_validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        write_atomically(validator_file, json.dumps({"url": url, "validator": new_validator}).encode())
        total = size + length if length is not None else expected_size
        progress = Progress(part.name.removesuffix(".part"), total, size)
        _running.pop(part, None)
        hasher = BackgroundHasher(digest)
        try:
            floor = RateFloor(url, http)
            with open(part, mode) as out:
                for chunk in body_chunks(response):
                    if size + len(chunk) > limit:
                        pinned = " (the size the lock pins)" if limit == expected_size else ""
                        raise _TooLargeError(f"{url}: the server sent more than {human_bytes(limit)}{pinned}; refused")
                    out.write(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                    progress.update(len(chunk))
                    floor.add(len(chunk))
        finally:
            progress.close()
            hasher.finish()
            _running[part] = (digest, size)
        if total is not None and size < total:
            raise requests.exceptions.ChunkedEncodingError(f"connection closed after {human_bytes(size)}")
        return True


def _start_of_body(response: requests.Response, url: str, part: Path, validator_file: Path,
                   kept: tuple[int, str]) -> tuple[Any, int, str]:
    """How the body continues the partial file: (running digest, bytes kept, open mode); a status or an
    encoding that cannot be taken raises. ``kept``: the bytes of the partial file, the digest's algorithm."""
    have, algorithm = kept
    check_status(response, url)
    if response.status_code == 416:
        part.unlink(missing_ok=True)
        validator_file.unlink(missing_ok=True)
        raise ServerError(f"{url}: the partial download no longer fits the file on the server; restarting")
    if response.status_code >= 500:
        raise ServerError(f"{url} answered {response.status_code} {response.reason}")
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise PipelineError(f"{url}: the server sent the image with Content-Encoding: {encoding}; the checksum "
                            "is of the bytes as published, so cloudbake takes them only unencoded",
                            hint="a proxy or mirror is re-encoding the file; fetch from another mirror")
    if response.status_code == 206 and have:
        digest, size = _hash_existing_cached(part, algorithm)
        log.info("resuming %s at %s", part.name.removesuffix(".part"), human_bytes(have))
        return digest, size, "ab"
    if have:
        log.info("the server sent the whole file (no range support or the file changed); restarting")
    return hashlib.new(algorithm), 0, "wb"


class _TooLargeError(Exception):
    """More bytes than the limit: the partial download is worthless."""


def _content_length(response: requests.Response, url: str) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise PipelineError(f"{url}: the server sent a malformed Content-Length ({value[:40]!r})",
                            hint="the mirror or a proxy in between is broken; try another mirror")
    return int(value)


def _copy_local(url: str, dest: Path, expected: Digest) -> None:
    source = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not source.is_file():
        raise PipelineError(f"not found: {url}", hint="check source.mirror and source.release")
    tmp = dest.with_name(dest.name + ".part")
    digest, sha256 = hashlib.new(expected.algorithm), hashlib.sha256()
    with open(source, "rb") as src, open(tmp, "wb") as out:
        while chunk := src.read(16 << 20):
            digest.update(chunk)
            sha256.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != expected.hexdigest:
        tmp.unlink()
        raise PipelineError(f"{url}: {expected.algorithm.upper().replace('SHA', 'SHA-')} mismatch: expected "
                            f"{expected.hexdigest}, got {digest.hexdigest()}")
    os.replace(tmp, dest)
    record_verified(dest, sha256.hexdigest())
